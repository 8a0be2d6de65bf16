//! Hugging Face checkpoints in and out through Burn's own [`burn::store`].
//!
//! Burn reads and writes safetensors checkpoints with [`SafetensorsStore`], converts PyTorch's
//! layouts with [`PyTorchToBurnAdapter`], and renames keys with a [`KeyRemapper`]. Three things
//! are missing for a model built from [`LoraLinear`](crate::LoraLinear) and ported from
//! Hugging Face, and this module adds them, on Burn's machinery:
//!
//! - [`PyTorchToLoraAdapter`] and [`LoraToPyTorchAdapter`]: Burn's adapters transpose the
//!   weights of `Linear` only, found by module type; these also transpose `LoraLinear`'s, and
//!   leave alone the layers that store `[d_in, d_out]` already (GPT-2's `Conv1D`, PEFT's
//!   `fan_in_fan_out`).
//! - [`KeyMap::load_remapper`] and [`KeyMap::save_remapper`]: the same [`KeyMap`] that maps
//!   PEFT adapter paths maps the checkpoint's keys, as an exact [`KeyRemapper`].
//! - [`HfCheckpoint`]: both together, strict by default: a load that leaves a model parameter
//!   unset or a checkpoint tensor unused is an error that names them, a load casts each tensor
//!   to its parameter's dtype (hub checkpoints are mostly bf16), a `save_pretrained` directory
//!   loads whole, shards included, and a save is atomic.
//!
//! ```no_run
//! # use burn::prelude::*;
//! # use burn::nn::{Linear, LinearConfig};
//! # #[derive(Module, Debug)] struct Model { lm_head: Linear }
//! use burn_lora::peft::KeyMap;
//! use burn_lora::store::HfCheckpoint;
//!
//! # fn main() -> Result<(), burn_lora::LoraError> {
//! # let device = Device::default();
//! # let mut model = Model { lm_head: LinearConfig::new(4, 4).init(&device) };
//! let checkpoint = HfCheckpoint::new(KeyMap::new().rename("model.layers", "layers"));
//! checkpoint.load("llama/model.safetensors", &mut model)?; // every parameter, or an error
//! checkpoint.save(&model, "merged/model.safetensors")?; // Hugging Face names and layouts
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Tensor};

use burn::store::BurnToPyTorchAdapter;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    FloatCastAdapter, KeyRemapper, ModuleAdapter, ModuleContext, ModuleSnapshot,
    PyTorchToBurnAdapter, SafetensorsStore,
};

use crate::error::LoraError;
use crate::model::survey::PathStack;
use crate::peft::KeyMap;

/// The module type Burn's `Module` derive gives [`LoraLinear`](crate::LoraLinear).
const LORA_LINEAR: &str = "Struct:LoraLinear";
/// The module type of Burn's `Linear`, which Burn's PyTorch adapters transpose.
const LINEAR: &str = "Struct:Linear";

/// Loads PyTorch checkpoints: [`PyTorchToBurnAdapter`] for models built from `LoraLinear`.
///
/// A linear weight is `[d_out, d_in]` in PyTorch and `[d_in, d_out]` in Burn. Burn's adapter
/// transposes the weights of `Linear` modules and renames normalization parameters
/// (`weight`/`bias` to `gamma`/`beta`); this one does the same and also transposes the weights
/// of `LoraLinear` modules, except in layers listed with
/// [`with_fan_in_fan_out`](PyTorchLayoutAdapter::with_fan_in_fan_out), which PyTorch already
/// stores as `[d_in, d_out]`.
pub type PyTorchToLoraAdapter = PyTorchLayoutAdapter<true>;

/// Saves PyTorch checkpoints: [`BurnToPyTorchAdapter`] for models built from `LoraLinear`, the
/// inverse of [`PyTorchToLoraAdapter`].
pub type LoraToPyTorchAdapter = PyTorchLayoutAdapter<false>;

/// Burn's PyTorch adapter for models built from `LoraLinear`, into Burn's layouts (`TO_BURN`,
/// [`PyTorchToLoraAdapter`]) or out of them ([`LoraToPyTorchAdapter`]).
#[derive(Debug, Clone, Default)]
pub struct PyTorchLayoutAdapter<const TO_BURN: bool> {
    fan_in_fan_out: Vec<String>,
}

impl<const TO_BURN: bool> PyTorchLayoutAdapter<TO_BURN> {
    /// The adapter, transposing every linear weight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Leave the weights of these layers as stored: module names matched as PEFT matches
    /// targets (the path, or its dotted suffix), such as GPT-2's `c_attn`, `c_proj` and `c_fc`,
    /// whose `Conv1D` weights are `[d_in, d_out]` in the checkpoint as in Burn.
    pub fn with_fan_in_fan_out<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.fan_in_fan_out
            .extend(names.into_iter().map(Into::into));
        self
    }

    /// Burn's own adapter for this direction.
    fn burn_adapter(&self) -> &'static dyn ModuleAdapter {
        match TO_BURN {
            true => &PyTorchToBurnAdapter,
            false => &BurnToPyTorchAdapter,
        }
    }
}

impl<const TO_BURN: bool> ModuleAdapter for PyTorchLayoutAdapter<TO_BURN> {
    fn adapt(&self, tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
        adapt_linear(self.burn_adapter(), &self.fan_in_fan_out, tensor, ctx)
    }

    fn get_alternative_param_name(&self, param_name: &str, module_type: &str) -> Option<String> {
        self.burn_adapter()
            .get_alternative_param_name(param_name, module_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// `burn_adapter`'s conversion, with `LoraLinear` treated as `Linear` and the layers named in
/// `fan_in_fan_out` left as they are. Burn's adapter does the transposition itself: it is given
/// a context that names `Linear`.
fn adapt_linear(
    burn_adapter: &dyn ModuleAdapter,
    fan_in_fan_out: &[String],
    tensor: PackTensor,
    ctx: ModuleContext<'_>,
) -> PackTensor {
    let module_type = ctx.module_type();
    if !matches!(module_type, Some(LORA_LINEAR | LINEAR)) {
        return burn_adapter.adapt(tensor, ctx);
    }
    let module_path = tensor
        .name
        .rsplit_once('.')
        .map_or("", |(module, _)| module);
    if fan_in_fan_out
        .iter()
        .any(|name| module_path == name || module_path.ends_with(&format!(".{name}")))
    {
        return tensor;
    }
    let linear = [LINEAR.to_string()];
    burn_adapter.adapt(tensor, ModuleContext::new(&linear))
}

impl KeyMap {
    /// A [`KeyRemapper`] that renames the checkpoint's `keys` (Hugging Face names, such as
    /// `model.layers.0.self_attn.q_proj.weight`) to the Burn model's, for
    /// [`SafetensorsStore::remap`] when loading.
    ///
    /// Each key's module path (all but its last segment) goes through
    /// [`to_burn`](Self::to_burn), exactly as adapter paths do; the parameter name is kept. The
    /// remapper holds one exact, anchored pattern per key that changes, so it renames those keys
    /// and nothing else.
    ///
    /// # Errors
    ///
    /// [`LoraError::InvalidRegex`] if a key cannot be written as a pattern (it cannot: keys are
    /// escaped).
    pub fn load_remapper<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<KeyRemapper, LoraError> {
        let renames = keys
            .into_iter()
            .map(|key| {
                (
                    key.to_string(),
                    rename_module(key, |module| self.to_burn(module)),
                )
            })
            .collect();
        exact_remapper(renames)
    }

    /// A [`KeyRemapper`] that renames the Burn model's parameter `keys` to the checkpoint's
    /// names, for saving: the inverse of [`load_remapper`](Self::load_remapper).
    ///
    /// # Errors
    ///
    /// [`LoraError::KeyMapNotInvertible`] if a path does not map back to itself, so that a
    /// saved checkpoint could not be loaded again.
    pub fn save_remapper<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<KeyRemapper, LoraError> {
        let mut renames = Vec::new();
        for key in keys {
            let (module, param) = split_key(key);
            let peft = self.to_peft_checked(module)?;
            renames.push((key.to_string(), join_key(&peft, param)));
        }
        exact_remapper(renames)
    }
}

/// `(module path, parameter name)` of a tensor key: `a.b.weight` gives `(a.b, weight)`.
fn split_key(key: &str) -> (&str, &str) {
    key.rsplit_once('.').unwrap_or(("", key))
}

/// The key of parameter `param` in the module at `module` (the root's when empty).
fn join_key(module: &str, param: &str) -> String {
    match module.is_empty() {
        true => param.to_string(),
        false => format!("{module}.{param}"),
    }
}

/// `key` with its module path passed through `map`.
fn rename_module(key: &str, map: impl Fn(&str) -> String) -> String {
    let (module, param) = split_key(key);
    join_key(&map(module), param)
}

/// One anchored pattern per `(key, renamed)` pair that changes the key.
fn exact_remapper(renames: Vec<(String, String)>) -> Result<KeyRemapper, LoraError> {
    let mut remapper = KeyRemapper::new();
    let unique: BTreeSet<(String, String)> = renames.into_iter().collect();
    for (key, renamed) in unique.into_iter().filter(|(key, renamed)| key != renamed) {
        let pattern = format!("^{}$", regex::escape(&key));
        remapper = remapper
            .add_pattern(&pattern, renamed.replace('$', "$$"))
            .map_err(|error| LoraError::InvalidRegex {
                pattern,
                message: error.to_string(),
            })?;
    }
    Ok(remapper)
}

/// A Hugging Face safetensors checkpoint of a Burn port: the key map between the checkpoint's
/// names and the model's, and the layers stored `[d_in, d_out]`.
///
/// [`load`](Self::load) reads the checkpoint into a model through Burn's [`SafetensorsStore`]
/// with [`PyTorchToLoraAdapter`] and the key map's exact remapper, and [`save`](Self::save)
/// writes a model (typically after `merge_and_unload_lora`) back in the checkpoint's names and
/// layouts, for `from_pretrained` in transformers.
#[derive(Debug, Clone, Default)]
pub struct HfCheckpoint {
    map: KeyMap,
    fan_in_fan_out: Vec<String>,
    ignored: Vec<String>,
}

impl HfCheckpoint {
    /// A checkpoint whose names `map` translates.
    pub fn new(map: KeyMap) -> Self {
        Self {
            map,
            ..Self::default()
        }
    }

    /// Layers whose weights the checkpoint stores as `[d_in, d_out]` (GPT-2's `c_attn`,
    /// `c_proj`, `c_fc`); see [`PyTorchToLoraAdapter::with_fan_in_fan_out`].
    pub fn with_fan_in_fan_out<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.fan_in_fan_out
            .extend(names.into_iter().map(Into::into));
        self
    }

    /// Checkpoint tensors the model does not hold and a load may leave unused, as exact keys
    /// in the checkpoint's names (a tied `lm_head.weight`, rotary caches, buffers such as
    /// `position_ids`).
    pub fn ignoring<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.ignored.extend(keys.into_iter().map(Into::into));
        self
    }

    /// The key map.
    pub fn key_map(&self) -> &KeyMap {
        &self.map
    }

    /// Loads every parameter of `model` from the safetensors file at `path`.
    ///
    /// # Errors
    ///
    /// - [`LoraError::Io`] or [`LoraError::InvalidSafetensors`] if the file cannot be read;
    /// - [`LoraError::CheckpointMismatch`] if a model parameter is not in the file, a tensor of
    ///   the file is left unused (and not [`ignoring`](Self::ignoring) it), or a shape does not
    ///   fit; `model` is then left as it was.
    ///
    /// Each tensor is cast to the dtype of the parameter it loads into: a bf16 checkpoint in an
    /// f32 model gives f32 weights.
    pub fn load<M: ModuleSnapshot>(
        &self,
        path: impl AsRef<Path>,
        model: &mut M,
    ) -> Result<(), LoraError> {
        let path = path.as_ref();
        self.load_files(path, &[path.to_path_buf()], model)
    }

    /// Loads every parameter of `model` from a `save_pretrained` directory: its
    /// `model.safetensors`, or, for a checkpoint saved in shards (every large model on the hub),
    /// the files that `model.safetensors.index.json` lists, each read once.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load), over all the shards together: a parameter is missing when no
    /// shard holds it. [`LoraError::Io`] when the directory holds neither file, and
    /// [`LoraError::InvalidSafetensors`] for an index that is not JSON, has no `weight_map`, or
    /// names a shard outside the directory.
    pub fn load_dir<M: ModuleSnapshot>(
        &self,
        dir: impl AsRef<Path>,
        model: &mut M,
    ) -> Result<(), LoraError> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        if single.exists() {
            return self.load(single, model);
        }
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index).map_err(|error| io_error(&index, error))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| invalid(&index, error))?;
        let Some(weight_map) = json.get("weight_map").and_then(|map| map.as_object()) else {
            return Err(invalid(&index, "no `weight_map` object"));
        };
        let mut shards = BTreeSet::new();
        for (key, file) in weight_map {
            let file = file
                .as_str()
                .ok_or_else(|| invalid(&index, format!("`{key}` maps to no file name")))?;
            let inside = Path::new(file)
                .components()
                .all(|part| matches!(part, std::path::Component::Normal(_)));
            if !inside {
                return Err(invalid(
                    &index,
                    format!("shard `{file}` is not in the directory"),
                ));
            }
            shards.insert(dir.join(file));
        }
        let shards: Vec<_> = shards.into_iter().collect();
        self.load_files(&index, &shards, model)
    }

    /// Loads `files` into `model` in turn, and checks them as one checkpoint; `origin` names it
    /// in errors.
    fn load_files<M: ModuleSnapshot>(
        &self,
        origin: &Path,
        files: &[std::path::PathBuf],
        model: &mut M,
    ) -> Result<(), LoraError> {
        // Hub checkpoints are mostly bf16: each tensor takes its parameter's dtype, so an f32
        // port holds f32 weights (and an f16 port f16 ones), never a mix.
        let dtypes = Arc::new(param_dtypes(model));
        let ignored: BTreeSet<String> = self
            .ignored
            .iter()
            .map(|key| rename_module(key, |module| self.map.to_burn(module)))
            .collect();
        let mut applied: BTreeSet<String> = BTreeSet::new();
        let mut missing: Vec<String> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        // Loaded into a copy (Burn modules share their tensors: a cheap clone), which replaces
        // the caller's model only when everything fits: a failed load leaves it as it was.
        let mut candidate = model.clone();
        for path in files {
            let keys = checkpoint_keys(path)?;
            let remapper = self.map.load_remapper(keys.iter().map(String::as_str))?;
            let adapter = PyTorchToLoraAdapter::new()
                .with_fan_in_fan_out(self.fan_in_fan_out.clone())
                .chain(ToModelDtypes {
                    dtypes: dtypes.clone(),
                });
            let mut store = SafetensorsStore::from_file(path)
                .remap(remapper)
                .with_from_adapter(adapter)
                .allow_partial(true)
                .validate(true);
            let result = candidate
                .load_from(&mut store)
                .map_err(|error| mismatch(path, vec![error.to_string()]))?;
            applied.extend(result.applied);
            missing = result.missing.into_iter().map(|(path, _)| path).collect();
            let shard = match files.len() {
                1 => String::new(),
                _ => format!(" (in {})", path.display()),
            };
            problems.extend(
                (result.unused.iter())
                    .filter(|key| !ignored.contains(key.as_str()))
                    .map(|key| format!("checkpoint tensor `{key}`{shard} fits no model parameter")),
            );
            problems.extend(result.errors.iter().map(ToString::to_string));
        }
        // Missing from the checkpoint: from the last file, and loaded by none.
        let mut all = (missing.into_iter())
            .filter(|path| !applied.contains(path))
            .map(|path| format!("model parameter `{path}` is not in the checkpoint"))
            .collect::<Vec<_>>();
        all.extend(problems);
        if !all.is_empty() {
            return Err(mismatch(origin, all));
        }
        *model = candidate;
        Ok(())
    }

    /// Writes every parameter of `model` to a safetensors file at `path`, in the checkpoint's
    /// names and PyTorch layouts. The write is atomic: the file appears whole or not at all.
    ///
    /// Adapters still attached are saved as they sit in the model's record; merge and unload
    /// them first (`merge_and_unload_lora`) to get a checkpoint transformers can read.
    ///
    /// # Errors
    ///
    /// [`LoraError::KeyMapNotInvertible`] if a parameter's path does not map back to itself,
    /// and [`LoraError::Io`] if the file cannot be written.
    pub fn save<M: ModuleSnapshot>(
        &self,
        model: &M,
        path: impl AsRef<Path>,
    ) -> Result<(), LoraError> {
        let path = path.as_ref();
        let adapter = LoraToPyTorchAdapter::new().with_fan_in_fan_out(self.fan_in_fan_out.clone());
        // The store renames after the adapter has (a norm's `gamma` is `weight` by then), so
        // the remapper is built on the adapter's names.
        let keys: Vec<String> = model
            .collect(None, Some(adapter.clone_box()), false)
            .into_iter()
            .map(|tensor| tensor.name)
            .collect();
        let remapper = self.map.save_remapper(keys.iter().map(String::as_str))?;
        let mut store = SafetensorsStore::from_file(path)
            .remap(remapper)
            .with_to_adapter(adapter)
            .overwrite(true);
        model
            .save_into(&mut store)
            .map_err(|error| io_error(path, std::io::Error::other(error.to_string())))
    }
}

/// Casts each float tensor to the dtype of the model parameter it loads into.
#[derive(Clone)]
struct ToModelDtypes {
    /// Parameter path → dtype.
    dtypes: Arc<HashMap<String, DType>>,
}

impl ModuleAdapter for ToModelDtypes {
    fn adapt(&self, tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
        // A norm's parameter may still carry PyTorch's name here.
        let (module, param) = split_key(&tensor.name);
        let burn_name = match param {
            "weight" => "gamma",
            "bias" => "beta",
            other => other,
        };
        let target = self
            .dtypes
            .get(&tensor.name)
            .or_else(|| self.dtypes.get(&join_key(module, burn_name)));
        match target {
            Some(&target)
                if target.is_float() && tensor.dtype.is_float() && tensor.dtype != target =>
            {
                FloatCastAdapter::to(target).adapt(tensor, ctx)
            }
            _ => tensor,
        }
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// The dtype of every float parameter of `model`, by path: its value's, or for a parameter not
/// yet initialized, its device's default float dtype, which it will get.
fn param_dtypes<M: Module>(model: &M) -> HashMap<String, DType> {
    struct Dtypes {
        stack: PathStack,
        dtypes: HashMap<String, DType>,
    }
    impl ModuleVisitor for Dtypes {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.stack.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dtype = match param.is_initialized() {
                true => param.val().dtype(),
                false => param.lazy_device().settings().float_dtype.into(),
            };
            self.dtypes.insert(self.stack.path(), dtype);
        }
    }
    let mut visitor = Dtypes {
        stack: PathStack::default(),
        dtypes: HashMap::new(),
    };
    model.visit(&mut visitor);
    visitor.dtypes
}

/// The tensor keys in the safetensors file at `path`, read from its header.
fn checkpoint_keys(path: &Path) -> Result<Vec<String>, LoraError> {
    let file = std::fs::File::open(path).map_err(|error| io_error(path, error))?;
    let mut reader = std::io::BufReader::new(file);
    let mut length = [0u8; 8];
    std::io::Read::read_exact(&mut reader, &mut length).map_err(|error| invalid(path, error))?;
    let length = u64::from_le_bytes(length);
    if length > 100 << 20 {
        return Err(invalid(path, "header larger than 100 MiB"));
    }
    let mut header = vec![0u8; length as usize];
    std::io::Read::read_exact(&mut reader, &mut header).map_err(|error| invalid(path, error))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|error| invalid(path, error))?;
    Ok(header
        .keys()
        .filter(|key| key.as_str() != "__metadata__")
        .cloned()
        .collect())
}

fn io_error(path: &Path, error: std::io::Error) -> LoraError {
    LoraError::Io {
        path: path.display().to_string(),
        kind: error.kind(),
        message: error.to_string(),
    }
}

fn invalid(path: &Path, error: impl ToString) -> LoraError {
    LoraError::InvalidSafetensors {
        path: path.display().to_string(),
        message: error.to_string(),
    }
}

fn mismatch(path: &Path, problems: Vec<String>) -> LoraError {
    LoraError::CheckpointMismatch {
        path: path.display().to_string(),
        problems,
    }
}
