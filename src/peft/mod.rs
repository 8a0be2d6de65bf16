//! Adapters as files, in Hugging Face PEFT's format, which PEFT, vLLM, mistral.rs and LoRAX read.
//!
//! An adapter directory holds two files:
//!
//! - `adapter_model.safetensors`: for each adapted module, `base_model.model.<path>.lora_A.weight`
//!   of shape `[r, d_in]` and `….lora_B.weight` of shape `[d_out, r]`, PyTorch's layout, the
//!   transposes of burn-lora's `A: [d_in, r]` and `B: [r, d_out]`. An embedding's are
//!   `….lora_embedding_A` / `_B` (no `.weight`); a convolution's `lora_A` keeps the kernel axes
//!   (`[r, c_in, k1, k2]`) and its `lora_B` is `[c_out, r, 1, 1]`; a DoRA adapter adds
//!   `….lora_magnitude_vector` (`[d_out]`);
//! - `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha`, `target_modules`,
//!   `rank_pattern`, `alpha_pattern`, `use_rslora`, `use_dora` and the rest ([`AdapterConfig`]).
//!
//! [`save_adapter`] writes one named adapter of a model; [`load_adapter`] attaches one to a
//! model. Module paths differ between a Hugging Face checkpoint and a Burn port; a [`KeyMap`]
//! rewrites them, in both directions:
//!
//! ```no_run
//! use burn_lora::peft::{KeyMap, LoadOptions, load_adapter_with};
//! # fn demo<M: burn::module::Module>(model: M) -> Result<(), burn_lora::LoraError> {
//! let options = LoadOptions::new().with_key_map(
//!     KeyMap::new()
//!         .rename("model.layers", "layers")
//!         .rename("self_attn", "attn")
//!         .rename("q_proj", "query")
//!         .rename("v_proj", "value"),
//! );
//! let (model, report) = load_adapter_with(&model, "adapters/summarize", "summarize", &options)?;
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! Several adapters share a directory as PEFT's `save_pretrained` lays them out: the adapter
//! `default` at the root, every other adapter `name` in the subdirectory `name/`, which PEFT
//! reads back with `PeftModel.from_pretrained(model, dir)` and
//! `load_adapter(dir/name, adapter_name=name)`. [`save_adapters`] writes them, each adapter's
//! pair of files as one unit (the set is not one unit); [`load_adapters`] attaches them, all or
//! nothing; [`adapter_dirs`] lists them.
//!
//! Loading is strict by default: missing or unexpected keys, shapes or ranks that disagree with
//! the model or the config, unusable dtypes, empty tensors and NaN or Inf all fail, with a
//! [`LoadReport`] that lists every one. `modules_to_save` (a classifier head trained in full)
//! loads as the adapter's own copy of the module, trainable tokens
//! (`trainable_token_indices`) as its own copy of those rows, and LoRA biases (`lora_bias`) as
//! the adapters' [`lora_bias`](crate::Adapter::lora_bias). Features burn-lora cannot reproduce
//! (files still relative to a base rewritten by PiSSA, OLoRA or LoftQ, raw-parameter targets...)
//! are refused whole, never half-applied. A PiSSA or OLoRA adapter trained here is
//! saved as PEFT converts it: a plain LoRA of rank `2r` for the original base. Writes go
//! through a temporary file and a rename, so a crash never leaves half a file.

mod config;
mod dirs;
pub(crate) mod files;
mod keys;
mod load;
mod save;

use std::path::Path;

use burn::module::Module;

pub use crate::error::{DtypeNote, LoadReport, LoadedModule, ShapeMismatch};
pub use config::{AdapterConfig, TargetModules};
pub use dirs::{adapter_dirs, load_adapters, save_adapters};
pub use keys::{KeyMap, PEFT_PREFIX};
pub use load::{LoadOptions, PeftAdapter};
pub use save::{SaveOptions, SavedAdapter};

use crate::LoraError;

/// The weights file of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The config file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Write the adapter `name` of `model` to `dir` in PEFT's format, with module paths as in the
/// model. See [`save_adapter_with`] for options.
///
/// # Errors
///
/// [`LoraError::UnknownAdapter`], [`LoraError::NonFiniteAdapter`] and [`LoraError::Io`].
pub fn save_adapter<M: Module>(
    model: &M,
    dir: impl AsRef<Path>,
    name: &str,
) -> Result<SavedAdapter, LoraError> {
    save_adapter_with(model, dir, name, &SaveOptions::default())
}

/// Write the adapter `name` of `model` to `dir` in PEFT's format.
///
/// Each module's rank and scale are reproduced exactly: the most common rank and alpha become
/// `r` and `lora_alpha`, the others go to `rank_pattern` and `alpha_pattern`.
/// `target_modules` lists the module names when they select exactly the adapted layers, and is
/// a regex of the exact paths otherwise.
///
/// # Errors
///
/// [`LoraError::UnknownAdapter`], [`LoraError::NonFiniteAdapter`],
/// [`LoraError::KeyMapNotInvertible`] and [`LoraError::Io`]. A failed save leaves any previous
/// file in place.
pub fn save_adapter_with<M: Module>(
    model: &M,
    dir: impl AsRef<Path>,
    name: &str,
    options: &SaveOptions,
) -> Result<SavedAdapter, LoraError> {
    save::save(model, dir.as_ref(), name, options)
}

/// Read the PEFT adapter in `dir` and attach it to `model` as adapter `name`, strictly and with
/// module paths as in the model. See [`load_adapter_with`] for options.
///
/// # Errors
///
/// See [`PeftAdapter::read`] and [`PeftAdapter::load_into`].
pub fn load_adapter<M: Module>(
    model: &M,
    dir: impl AsRef<Path>,
    name: &str,
) -> Result<(M, LoadReport), LoraError> {
    load_adapter_with(model, dir, name, &LoadOptions::default())
}

/// Read the PEFT adapter in `dir` and attach it to `model` as adapter `name`.
///
/// # Errors
///
/// See [`PeftAdapter::read`] and [`PeftAdapter::load_into`].
pub fn load_adapter_with<M: Module>(
    model: &M,
    dir: impl AsRef<Path>,
    name: &str,
    options: &LoadOptions,
) -> Result<(M, LoadReport), LoraError> {
    PeftAdapter::read(dir)?.load_into(model, name, options)
}

/// Replace the weights of the model's adapter `name` with the PEFT adapter in `dir`, in place,
/// keeping every parameter's id and shape: PEFT's `hotswap_adapter`. See
/// [`PeftAdapter::hotswap_into`] and [`LoraModule::prepare_hotswap`](crate::LoraModule::prepare_hotswap).
///
/// # Errors
///
/// See [`PeftAdapter::read`] and [`PeftAdapter::hotswap_into`].
pub fn hotswap_adapter<M: Module>(
    model: &M,
    dir: impl AsRef<Path>,
    name: &str,
    options: &LoadOptions,
) -> Result<(M, LoadReport), LoraError> {
    PeftAdapter::read(dir)?.hotswap_into(model, name, options)
}
