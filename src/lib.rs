#![warn(missing_docs)]
//! # burn-lora
//!
//! LoRA (low-rank adaptation) for models written with [Burn](https://burn.dev).
//!
//! LoRA freezes every pretrained weight `W: [d_in, d_out]` and learns a low-rank update beside
//! it, `ΔW = s·A·B` with `A: [d_in, r]`, `B: [r, d_out]` and `r` small. `B` starts at zero, so
//! the adapted model starts exactly equal to the base. Training touches only `A` and `B`; for
//! inference the update can be merged into `W`, which then costs exactly the plain layer.
//!
//! ## Concepts (PEFT's vocabulary)
//!
//! - **rank** `r`: the inner size of `A·B`; 4 to 32 is usual.
//! - **alpha**: sets the scale `s = alpha / r` (`alpha / √r` with rsLoRA).
//! - **targets**: which modules get adapters, by module path ([`Targets`]).
//! - **adapter**: one named pair `(A, B)` on a weight ([`Adapter`]), stored as Burn's
//!   reparameterization on the weight's `Param` ([`LoraState`]), so any Burn model can be
//!   adapted without changing its code.
//! - **merge / unmerge**: fold `s·A·B` into `W` and take it back out ([`LoraModule`]).
//! - **named adapters**: many adapters per model; the *active* ones add up, switching copies
//!   no weight, and [`LoraLinear::forward_mixed`] gives each sample of a batch its own
//!   ([`LoraModule::add_adapter`], [`LoraModule::set_active`], [`MixedBatch`]).
//! - **adapter files**: PEFT's `adapter_model.safetensors` + `adapter_config.json`, read and
//!   written exactly ([`peft`]).
//! - **layers**: linear layers, embeddings and 2-D convolutions ([`LayerKind`]); targets pick
//!   them by name or by module type ([`Target::ModuleType`]).
//! - **target parameters**: raw 2-D or 3-D parameters picked by path
//!   ([`Targets::parameters`]), such as a mixture of experts' expert banks, where each expert
//!   gets its own rank-`r` update ([`Adapter::experts`], [`ParamLayout`]).
//!
//! ## Variants
//!
//! - **DoRA**: [`LoraConfig::use_dora`] adds a trainable magnitude per output feature
//!   ([`Adapter::magnitude`]), PEFT's `use_dora`.
//! - **PiSSA, OLoRA**: [`LoraInit::Pissa`] and [`LoraInit::Olora`] start the factors from the
//!   base's principal directions; saving converts them to a plain LoRA for the original base.
//! - **LoRA+**: [`LoraPlusConfig`] builds Burn's per-group learning rates, `B` at `ratio × lr`.
//! - **QLoRA**: [`quantize_base`] stores the base's linear weights in a Burn QFloat dtype;
//!   [`merge_quantized`] merges in f32 and says what re-quantizing would cost.
//!
//! `docs/variants.md` says when to use which, with a measured comparison.
//!
//! ## Example
//!
//! ```
//! use burn::nn::{Linear, LinearConfig};
//! use burn::prelude::*;
//! use burn_lora::{LoraConfig, LoraLinear, LoraModule, Targets};
//!
//! #[derive(Module, Debug)]
//! struct Attention {
//!     query: LoraLinear, // the fast path
//!     value: Linear,     // a plain Burn layer works too, composing densely
//! }
//!
//! # fn main() -> Result<(), burn_lora::LoraError> {
//! let device = Device::default();
//! let model = Attention {
//!     query: LinearConfig::new(64, 64).init(&device).into(),
//!     value: LinearConfig::new(64, 64).init(&device),
//! };
//! let config = LoraConfig::new(8)
//!     .with_alpha(Some(16.0))
//!     .with_targets(Targets::attention_qv());
//! let (model, report) = config.apply(model)?; // base frozen, adapter "default" attached
//! println!("{report}");
//! assert_eq!(report.trainable_params(), 2 * 8 * (64 + 64));
//!
//! // ... train with Burn's autodiff and an optimizer ...
//!
//! let merged = model.merge_lora()?; // W += s·A·B: no added latency
//! let model = merged.unmerge_lora()?; // and back out, within float tolerance
//! let plain = model.merge_and_unload_lora()?; // fine-tuned weights, no adapters left
//! assert!(plain.lora_adapters().is_empty());
//! # Ok(())
//! # }
//! ```
//!
//! ## Layout
//!
//! The modules are layers, and each imports only from the ones below it: `error` (the error
//! type) and [`ops`] (the fused LoRA linear, a Burn backend extension) → `config` (what the user asks for, as data) → `adapter` (one adapted weight: its
//! factors and math) → `layers` ([`LoraLinear`], mixed batches, [`nn`]) → `model` (whole-model
//! operations: [`LoraModule`]) → `variants` (LoRA+, QLoRA) and [`peft`] (the file format) →
//! [`store`] (Hugging Face checkpoints through `burn::store`) and `train` (burn-train's
//! `Learner`: adapter-only checkpoints, with the `train` feature).
//!
//! ## Backends
//!
//! burn-lora runs on every Burn device. Its Cargo features pick the backends compiled in:
//! `flex` (default, CPU), `ndarray` (CPU, deprecated upstream) and `wgpu` (GPU, or Mesa's
//! lavapipe on CPU). `Device::default()` picks one, and `BURN_DEVICE` overrides it. On flex,
//! [`LoraLinear`] runs the fused operation of [`ops::lora_linear`]: one output buffer forward,
//! a hand-written backward; other backends compose the same formula from Burn's operations.

mod adapter;
mod config;
mod error;
mod layers;
mod model;
pub mod ops;
pub mod peft;
pub mod store;
#[cfg(feature = "train")]
pub mod train;
mod variants;

pub use adapter::{
    Adapter, DEFAULT_ADAPTER, LayerKind, LoraState, MajoritySign, ResidualInit, SavedCopy,
};
pub use config::{
    AlphaPattern, LoraConfig, LoraInit, ParamLayout, RankPattern, Target, Targets, TrainableTokens,
    layer_index,
};
pub use error::LoraError;
pub use layers::{LoraLinear, LoraLinearConfig, MixedBatch, nn};
pub use model::{
    AdaptedLayer, AdapterInfo, Combination, CombineReport, CombinedLayer, InitProgress, LoraModule,
    LoraReport, SavedCopyInfo, SavedModule, SkippedModule, TargetMatch,
};
pub use variants::{
    LoraPlusConfig, QuantizedMerge, QuantizedMergeReport, merge_quantized, quantize_base,
};
