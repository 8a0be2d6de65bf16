//! Reading PEFT adapters into a Burn model, strictly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};

use super::config::{AdapterConfig, TargetModules};
use super::files::{DIGEST_FIELD, HostTensor, digest, lock, read_file, read_tensors};
use super::keys::{
    Factor, Key, KeyMap, PEFT_PREFIX, factor_key, factor_segment, param_module_key, parse_key,
    peft_shapes, regroup,
};
use super::{CONFIG_FILE, WEIGHTS_FILE};
use crate::adapter::layout::{float_dtype, param_dims};
use crate::adapter::saved::check_rows;
use crate::config::ParamLayout;
use crate::error::{DtypeNote, LoadReport, LoadedModule, ShapeMismatch};
use crate::model::attach::{attach_adapters, saved_module_of};
use crate::model::snapshot::Snapshot;
use crate::model::survey::{ParamSite, module_path_of, weight_path_of};
use crate::{Adapter, LayerKind, LoraError, SavedCopy};

/// How [`load_adapter_with`](crate::peft::load_adapter_with) reads an adapter.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Fail on any problem (the default). When false, modules with problems are skipped and
    /// listed in the report; a file with nothing loadable still fails.
    pub strict: bool,
    /// Maps the file's module paths to the model's.
    pub key_map: KeyMap,
    /// Whether the loaded adapter takes gradients, to continue training it. Off by default,
    /// as in PEFT's `is_trainable=False`.
    pub trainable: bool,
    /// How the model stores the raw parameters of the file's `target_parameters` (which axis
    /// is the input): PEFT's files do not say, the model does.
    pub parameter_layout: ParamLayout,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            strict: true,
            key_map: KeyMap::new(),
            trainable: false,
            parameter_layout: ParamLayout::OutIn,
        }
    }
}

impl LoadOptions {
    /// Strict, identity key map, frozen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set [`strict`](Self::strict).
    pub fn with_strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Set [`key_map`](Self::key_map).
    pub fn with_key_map(mut self, key_map: KeyMap) -> Self {
        self.key_map = key_map;
        self
    }

    /// Set [`trainable`](Self::trainable).
    pub fn with_trainable(mut self, trainable: bool) -> Self {
        self.trainable = trainable;
        self
    }

    /// Set [`parameter_layout`](Self::parameter_layout).
    pub fn with_parameter_layout(mut self, parameter_layout: ParamLayout) -> Self {
        self.parameter_layout = parameter_layout;
        self
    }
}

/// A PEFT adapter read from disk or memory: its config and its tensors, decoded and checked for
/// features burn-lora does not load, not yet matched against a model.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    config: AdapterConfig,
    tensors: Vec<HostTensor>,
    source: String,
}

impl PeftAdapter {
    /// Read `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    ///
    /// # Errors
    ///
    /// [`LoraError::Io`] for a missing or unreadable file, then everything
    /// [`from_bytes`](Self::from_bytes) refuses.
    pub fn read(dir: impl AsRef<Path>) -> Result<Self, LoraError> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);
        // A save in progress holds the lock exclusively: read a pair it finished.
        let _lock = lock(dir, false)?;
        let config = read_file(&config_path)?;
        if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(LoraError::UnsupportedAdapter {
                path: dir.display().to_string(),
                feature: "adapter_model.bin (pickle); save it as safetensors".into(),
            });
        }
        let weights = read_file(&weights_path)?;
        let config = String::from_utf8(config).map_err(|_| LoraError::InvalidConfig {
            path: config_path.display().to_string(),
            message: "not UTF-8 text".into(),
        })?;
        let weights = matching_weights(dir, &config, weights)?;
        let mut adapter = Self::from_bytes(&weights, &config, &dir.display().to_string())?;
        adapter.source = dir.display().to_string();
        Ok(adapter)
    }

    /// Parse an adapter from the bytes of its two files; `source` names it in errors.
    ///
    /// # Errors
    ///
    /// [`LoraError::InvalidSafetensors`], [`LoraError::InvalidConfig`] and
    /// [`LoraError::UnsupportedAdapter`] (a config or a tensor key of LoRA biases, trainable
    /// tokens, unconverted base-rewriting inits...).
    pub fn from_bytes(weights: &[u8], config: &str, source: &str) -> Result<Self, LoraError> {
        let config = AdapterConfig::from_json(config, &format!("{source}/{CONFIG_FILE}"))?;
        let tensors = read_tensors(weights, &format!("{source}/{WEIGHTS_FILE}"))?;
        for tensor in &tensors {
            if let Key::Unsupported { feature } = parse_key(&tensor.key) {
                return Err(LoraError::UnsupportedAdapter {
                    path: format!("{source}/{WEIGHTS_FILE}"),
                    feature: format!("{feature}, in key `{}`", tensor.key),
                });
            }
        }
        Ok(Self {
            config,
            tensors,
            source: source.to_string(),
        })
    }

    /// The adapter's config.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The tensor keys, sorted.
    pub fn keys(&self) -> Vec<&str> {
        self.tensors.iter().map(|t| t.key.as_str()).collect()
    }

    /// Attach this adapter to `model` under `name`.
    ///
    /// The first adapter of a model freezes the base and is active; a later one starts
    /// inactive, for [`set_active`](crate::LoraModule::set_active). Nothing is attached unless
    /// every check passes (strict) or at least one module loads (non-strict).
    ///
    /// # Errors
    ///
    /// [`LoraError::AdapterExists`], [`LoraError::AlreadyAdapted`] (a foreign
    /// reparameterization), and [`LoraError::AdapterMismatch`] with the full report.
    pub fn load_into<M: Module>(
        &self,
        model: &M,
        name: &str,
        options: &LoadOptions,
    ) -> Result<(M, LoadReport), LoraError> {
        let snapshot = Snapshot::take(model)?;
        snapshot.require_new_name(name)?;
        snapshot.refuse_beside_residual("another adapter beside it", name)?;
        let (adapters, copies, mut report) = self.build(&snapshot, name, options)?;
        report.saved = copies.iter().map(|(path, _)| path.clone()).collect();
        Ok((
            attach_adapters(snapshot, adapters, copies, HashMap::new()),
            report,
        ))
    }

    /// Replace the factors of the model's adapter `name` with this file's, in place: PEFT's
    /// `hotswap_adapter`. Every parameter keeps its `ParamId` and its shape, so an optimizer's
    /// state, a LoRA+ schedule and anything else keyed by id or shape stays attached, and no
    /// module is rebuilt around new parameters.
    ///
    /// The file must adapt exactly the layers that carry `name`, with a rank no larger than the
    /// adapter's on each: a smaller one is zero-padded (pad every adapter to the largest rank
    /// you will swap in with [`prepare_hotswap`](crate::LoraModule::prepare_hotswap)). The scale
    /// comes from the file (its `lora_alpha` and `r`); the adapter keeps its flags (active,
    /// trainable) and dropout. Other adapters are untouched.
    ///
    /// # Errors
    ///
    /// [`LoraError::UnknownAdapter`], [`LoraError::AdaptersMerged`] (unmerge first),
    /// [`LoraError::AdapterMismatch`] (the file does not fit the model, as in a load),
    /// [`LoraError::UnsupportedAdapter`] (a file with `modules_to_save`), and
    /// [`LoraError::HotswapMismatch`] listing every layer that does not fit: one adapted by
    /// only one side, a rank above the adapter's, DoRA on one side only, or a PiSSA/OLoRA
    /// adapter. On any error the model is left as it was.
    pub fn hotswap_into<M: Module>(
        &self,
        model: &M,
        name: &str,
        options: &LoadOptions,
    ) -> Result<(M, LoadReport), LoraError> {
        let snapshot = Snapshot::take(model)?;
        snapshot.require_adapter(name)?;
        snapshot.require_unmerged("hot-swapping an adapter")?;
        let (adapters, copies, report) = self.build(&snapshot, name, options)?;
        if !copies.is_empty() {
            return Err(LoraError::UnsupportedAdapter {
                path: self.source.clone(),
                feature: "modules_to_save or trainable tokens in a hot-swap (load it as a new \
                          adapter)"
                    .into(),
            });
        }
        let mut incoming: HashMap<String, Adapter> = (adapters.into_iter())
            .map(|(path, adapter, _)| (path, adapter))
            .collect();
        let mut problems = Vec::new();
        let mut states = Vec::with_capacity(snapshot.states.len());
        for (path, state) in &snapshot.states {
            let module = module_path_of(path);
            let new = incoming.remove(path);
            let Some(current) = state.adapter(name) else {
                if new.is_some() {
                    problems.push(format!("`{module}`: the file adapts it, `{name}` does not"));
                }
                states.push((path.clone(), state.clone()));
                continue;
            };
            let Some(new) = new else {
                problems.push(format!("`{module}`: `{name}` adapts it, the file does not"));
                continue;
            };
            if new.rank() > current.rank() {
                problems.push(format!(
                    "`{module}`: rank {} in the file, {} in the model (pad the model's adapters \
                     with prepare_hotswap({}))",
                    new.rank(),
                    current.rank(),
                    new.rank()
                ));
            }
            if new.is_dora() != current.is_dora() {
                problems.push(format!(
                    "`{module}`: DoRA in {} only",
                    match current.is_dora() {
                        true => "the model",
                        false => "the file",
                    }
                ));
            }
            if new.lora_bias.is_some() != current.lora_bias.is_some() {
                problems.push(format!(
                    "`{module}`: a bias on lora_B (lora_bias) in {} only",
                    match current.lora_bias.is_some() {
                        true => "the model",
                        false => "the file",
                    }
                ));
            }
            if current.residual_init.is_some() {
                problems.push(format!(
                    "`{module}`: `{name}` started from the base (PiSSA/OLoRA); save and reload it \
                     before hot-swapping"
                ));
            }
            let mut state = state.clone();
            state.adapters = state
                .adapters
                .into_iter()
                .map(|adapter| match adapter.name == name {
                    true => adapter.swapped(new.clone()),
                    false => adapter,
                })
                .collect();
            states.push((path.clone(), state));
        }
        // Layers the file adapts that no adapter of the model does.
        for path in incoming.keys() {
            problems.push(format!(
                "`{}`: the file adapts it, `{name}` does not",
                module_path_of(path)
            ));
        }
        if !problems.is_empty() {
            problems.sort();
            return Err(LoraError::HotswapMismatch {
                adapter: name.to_string(),
                source_name: self.source.clone(),
                problems,
            });
        }
        Ok((snapshot.rebuild(states, HashMap::new(), false), report))
    }

    /// The adapters (weight path → adapter `name`) and `modules_to_save` copies this file
    /// gives `snapshot`'s model, each checked against it, and the report of what was checked.
    ///
    /// # Errors
    ///
    /// [`LoraError::AdapterMismatch`] when nothing loads, or, with `strict`, when anything
    /// does not fit.
    #[allow(clippy::type_complexity)]
    fn build<M: Module>(
        &self,
        snapshot: &Snapshot<M>,
        name: &str,
        options: &LoadOptions,
    ) -> Result<(Vec<NewAdapter>, Vec<(String, SavedCopy)>, LoadReport), LoraError> {
        let mut report = LoadReport {
            adapter: name.to_string(),
            ..Default::default()
        };
        let report = &mut report;
        let saved_tensors: Vec<&HostTensor> = self
            .tensors
            .iter()
            .filter(|tensor| self.saved_key(&tensor.key))
            .collect();
        let pairs = self.pair_tensors(report);
        let mut accepted: Vec<CheckedModule> = Vec::new();
        for (module, tensors) in &pairs {
            let Some(checked) = self.check_module(snapshot, module, tensors, options, report)
            else {
                continue;
            };
            // A key map that sends two modules of the file to one layer would attach two
            // adapters of one name there.
            if let Some(first) = accepted.iter().find(|other| other.path == checked.path) {
                for tensor in [
                    Some(checked.a),
                    Some(checked.b),
                    checked.magnitude,
                    checked.bias,
                ]
                .into_iter()
                .flatten()
                {
                    report.unexpected.push(format!(
                        "{} (maps to `{}`, as `{}` does)",
                        tensor.key, checked.path, first.loaded.peft_path
                    ));
                }
                continue;
            }
            accepted.push(checked);
        }
        self.check_coverage(snapshot, &pairs, &options.key_map, report);

        let paths: Vec<String> = accepted.iter().map(|m| m.weight.clone()).collect();
        let layouts: HashMap<String, ParamLayout> = (accepted.iter())
            .filter_map(|m| m.layout.map(|layout| (m.weight.clone(), layout)))
            .collect();
        let bases = snapshot.bases_in(&paths, &layouts);
        let mut adapters = Vec::with_capacity(accepted.len());
        for (module, path) in accepted.into_iter().zip(paths) {
            let base = &bases[&path];
            let (device, dtype) = (base.device(), float_dtype(base.dtype()));
            // PyTorch stores A as [r, d_in] and B as [d_out, r] (a convolution's with kernel
            // axes, which flatten into d_in and drop out of B); Burn wants the transposes.
            let values = |tensor: &HostTensor, shape: Vec<usize>| {
                let values = tensor.values.clone().expect("checked usable");
                TensorData::new(values, shape)
            };
            let (rank, experts) = (module.loaded.rank, module.experts);
            let factor = |tensor: &HostTensor, rows: usize, cols: usize| {
                Tensor::<2>::from_data(values(tensor, vec![rows, cols]), &device)
                    .transpose()
                    .cast(dtype)
            };
            // An expert bank's B comes in PEFT's row order (k·E + e), which burn-lora keeps
            // per expert (e·r + k).
            let (lora_a, lora_b) = (
                factor(module.a, experts * rank, module.d_in),
                regroup(
                    factor(module.b, module.d_out, experts * rank),
                    rank,
                    experts,
                ),
            );
            let vector = |tensor: &'_ HostTensor| {
                let data = values(tensor, vec![module.d_out]);
                Tensor::<1>::from_data(data, &device).cast(dtype)
            };
            let magnitude = module.magnitude.map(|tensor| (tensor, vector(tensor)));
            let lora_bias = module.bias.map(|tensor| (tensor, vector(tensor)));
            // Finite in f32 is not enough: the layer's dtype (f16) may not hold the values.
            let finite = |t: &Tensor<2>| t.clone().is_finite().all().into_scalar::<bool>();
            let overflows: Vec<&HostTensor> = [
                (!finite(&lora_a)).then_some(module.a),
                (!finite(&lora_b)).then_some(module.b),
                magnitude.as_ref().and_then(|(tensor, value)| {
                    (!value.clone().is_finite().all().into_scalar::<bool>()).then_some(*tensor)
                }),
                lora_bias.as_ref().and_then(|(tensor, value)| {
                    (!value.clone().is_finite().all().into_scalar::<bool>()).then_some(*tensor)
                }),
            ]
            .into_iter()
            .flatten()
            .collect();
            if !overflows.is_empty() {
                for tensor in overflows {
                    report.non_finite.push(format!(
                        "{} (overflows the layer's {:?})",
                        tensor.key,
                        base.dtype()
                    ));
                }
                continue;
            }
            let mut adapter = Adapter::new(
                name,
                lora_a,
                lora_b,
                module.loaded.scale,
                module.loaded.alpha,
                self.config.use_rslora,
                self.config.lora_dropout,
            );
            if let Some((_, magnitude)) = magnitude {
                adapter = adapter.with_magnitude(magnitude);
            }
            if let Some((_, lora_bias)) = lora_bias {
                adapter = adapter.with_lora_bias(lora_bias);
            }
            report.loaded.push(module.loaded);
            adapters.push((
                path,
                adapter
                    .with_experts(experts)
                    .with_trainable(options.trainable),
                module.layout,
            ));
        }

        let mut copies = self.saved_copies(name, snapshot, &saved_tensors, options, report);
        copies.extend(self.token_copies(name, snapshot, options, report));
        // A parameter holds LoRA factors or a trained copy, never both: the copy would hide
        // the factors.
        copies.retain(|(path, _)| {
            let both = adapters.iter().any(|(adapted, _, _)| adapted == path);
            if both {
                report.unexpected.push(format!(
                    "the trained copy of `{path}` (modules_to_save or trainable tokens; the file \
                     also has LoRA factors for it)"
                ));
            }
            !both
        });
        if (options.strict && !report.is_clean()) || adapters.is_empty() {
            if adapters.is_empty() && report.is_clean() {
                report.notes.push("the file holds no LoRA tensors".into());
            }
            report.loaded.clear();
            return Err(LoraError::AdapterMismatch {
                path: self.source.clone(),
                report: Box::new(std::mem::take(report)),
            });
        }
        Ok((adapters, copies, std::mem::take(report)))
    }

    /// Whether `key` holds a copy of a parameter of a `modules_to_save` module: a key that is
    /// no LoRA tensor, under a module the config lists.
    fn saved_key(&self, key: &str) -> bool {
        let Some(names) = &self.config.modules_to_save else {
            return false;
        };
        if !matches!(parse_key(key), Key::Other) {
            return false;
        }
        let path = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
        let module = path.rsplit_once('.').map_or("", |(module, _)| module);
        names
            .iter()
            .any(|name| saved_module_of(module, name).is_some())
    }

    /// The adapter's copies of the `modules_to_save` parameters, from `tensors` (their keys in
    /// PyTorch's names and layouts); problems go to the report. Every parameter of a saved
    /// module the model has must be in the file.
    fn saved_copies<M: Module>(
        &self,
        name: &str,
        snapshot: &Snapshot<M>,
        tensors: &[&HostTensor],
        options: &LoadOptions,
        report: &mut LoadReport,
    ) -> Vec<(String, SavedCopy)> {
        let mut found: Vec<(String, &HostTensor, bool)> = Vec::new();
        for tensor in tensors {
            let path = tensor.key.strip_prefix(PEFT_PREFIX).unwrap_or(&tensor.key);
            let (module, param) = path.rsplit_once('.').unwrap_or(("", path));
            let module = options.key_map.to_burn(module);
            // PyTorch names a norm's parameters `weight` and `bias`, Burn `gamma` and `beta`.
            let names: &[&str] = match param {
                "weight" => &["weight", "gamma"],
                "bias" => &["bias", "beta"],
                other => &[other],
            };
            let Some(site) = snapshot.survey.params.iter().find(|site| {
                site.module_path() == module
                    && names
                        .iter()
                        .any(|name| site.path.ends_with(&format!(".{name}")))
            }) else {
                report.unexpected.push(format!(
                    "{} (modules_to_save: the model has no parameter `{module}.{param}`)",
                    tensor.key
                ));
                continue;
            };
            // A linear weight is `[d_out, d_in]` in PyTorch.
            let transposed = matches!(site.owner.as_str(), "Linear" | "LoraLinear")
                && site.path.ends_with(".weight")
                && site.dims.len() == 2;
            let expected = match transposed {
                true => vec![site.dims[1], site.dims[0]],
                false => site.dims.clone(),
            };
            if tensor.shape != expected {
                report.shape_mismatches.push(ShapeMismatch {
                    key: tensor.key.clone(),
                    expected,
                    found: tensor.shape.clone(),
                    reason: format!("modules_to_save copy of `{}` {:?}", site.path, site.dims),
                });
                continue;
            }
            match &tensor.values {
                None => report.unusable_dtypes.push(DtypeNote {
                    key: tensor.key.clone(),
                    stored: tensor.dtype.clone(),
                }),
                Some(values) if values.iter().any(|v| !v.is_finite()) => {
                    report.non_finite.push(tensor.key.clone())
                }
                Some(_) => found.push((site.path.clone(), tensor, transposed)),
            }
        }
        // Every parameter of every saved module the model has.
        for name in self.config.modules_to_save.iter().flatten() {
            let mut matched = false;
            for site in &snapshot.survey.params {
                if saved_module_of(site.module_path(), name).is_none() {
                    continue;
                }
                matched = true;
                if !found.iter().any(|(path, _, _)| *path == site.path) {
                    let peft = options.key_map.to_peft(site.module_path());
                    report.missing.push(format!(
                        "{PEFT_PREFIX}{peft}.<{}> (modules_to_save `{name}` holds `{}`)",
                        site.path.rsplit('.').next().unwrap_or_default(),
                        site.path
                    ));
                }
            }
            if !matched {
                report.notes.push(format!(
                    "modules_to_save `{name}` matches no module of the model (PEFT's task types \
                     list heads that a model may not have)"
                ));
            }
        }
        // In the model's order, whatever the file's.
        let order = |path: &String| {
            let sites = &snapshot.survey.params;
            sites.iter().position(|site| site.path == *path)
        };
        found.sort_by_key(|(path, _, _)| order(path));
        let paths: Vec<String> = found.iter().map(|(path, _, _)| path.clone()).collect();
        let originals = snapshot.values(&paths);
        let mut copies = Vec::new();
        for (path, tensor, transposed) in found {
            let original = &originals[&path];
            let values = tensor.values.clone().expect("checked usable");
            let device = original.device();
            let count = values.len();
            let value = match transposed {
                true => {
                    Tensor::<2>::from_data(TensorData::new(values, tensor.shape.clone()), &device)
                        .transpose()
                        .reshape([count])
                }
                false => Tensor::<1>::from_data(TensorData::new(values, [count]), &device),
            };
            let value = value.cast(float_dtype(original.dtype()));
            if !value.clone().is_finite().all().into_scalar::<bool>() {
                report.non_finite.push(format!(
                    "{} (overflows the parameter's {:?})",
                    tensor.key,
                    original.dtype()
                ));
                continue;
            }
            copies.push((
                path,
                SavedCopy::new(name, value).with_trainable(options.trainable),
            ));
        }
        copies
    }

    /// The adapter's trainable tokens: from each `…<module>.token_adapter.trainable_tokens_delta`
    /// tensor, a copy of the rows `trainable_token_indices` names for that embedding. Problems
    /// go to the report.
    fn token_copies<M: Module>(
        &self,
        name: &str,
        snapshot: &Snapshot<M>,
        options: &LoadOptions,
        report: &mut LoadReport,
    ) -> Vec<(String, SavedCopy)> {
        let mut copies = Vec::new();
        let mut covered: Vec<&str> = Vec::new();
        for tensor in &self.tensors {
            let Some(module) = token_module(&tensor.key) else {
                continue;
            };
            let entry = (self.config.trainable_token_indices.iter())
                .find(|(name, _)| saved_module_of(module, name) == Some(module));
            let Some((entry_name, ids)) = entry else {
                report.unexpected.push(format!(
                    "{} (no trainable_token_indices entry names `{module}`)",
                    tensor.key
                ));
                continue;
            };
            covered.push(entry_name);
            let path = options.key_map.to_burn(module);
            let Some(site) = (snapshot.survey.params.iter()).find(|site| {
                site.module_path() == path && site.kind() == Some(LayerKind::Embedding)
            }) else {
                report.unexpected.push(format!(
                    "{} (trainable tokens: the model has no embedding `{path}`)",
                    tensor.key
                ));
                continue;
            };
            let width = site.dims[1];
            if let Err(problem) = check_rows(ids, site.dims[0]) {
                report.unexpected.push(format!(
                    "{} (trainable_token_indices `{entry_name}` = {ids:?}: {problem})",
                    tensor.key
                ));
                continue;
            }
            let expected = vec![ids.len(), width];
            if tensor.shape != expected {
                report.shape_mismatches.push(ShapeMismatch {
                    key: tensor.key.clone(),
                    expected,
                    found: tensor.shape.clone(),
                    reason: format!("one row per token id of `{entry_name}`, width of `{path}`"),
                });
                continue;
            }
            let Some(values) = tensor.values.clone() else {
                report.unusable_dtypes.push(DtypeNote {
                    key: tensor.key.clone(),
                    stored: tensor.dtype.clone(),
                });
                continue;
            };
            let original = &snapshot.values([&site.path])[&site.path];
            let data = TensorData::new(values, [ids.len(), width]);
            let rows = Tensor::<2>::from_data(data, &original.device())
                .cast(float_dtype(original.dtype()));
            if !rows.clone().is_finite().all().into_scalar::<bool>() {
                report.non_finite.push(tensor.key.clone());
                continue;
            }
            let copy = SavedCopy::of_rows(name, rows, ids.clone());
            copies.push((site.path.clone(), copy.with_trainable(options.trainable)));
        }
        for (entry_name, _) in &self.config.trainable_token_indices {
            if !covered.contains(&entry_name.as_str()) {
                report.missing.push(format!(
                    "{PEFT_PREFIX}<{entry_name}>.{TOKENS_KEY} (trainable_token_indices names it)"
                ));
            }
        }
        copies
    }

    /// Group the adapter tensors by module; report the keys that are no adapter tensor.
    fn pair_tensors<'a>(&'a self, report: &mut LoadReport) -> BTreeMap<String, ModuleTensors<'a>> {
        let mut modules: BTreeMap<String, ModuleTensors<'a>> = BTreeMap::new();
        let mut file_adapter: Option<Option<String>> = None;
        for tensor in &self.tensors {
            let Key::Lora {
                module,
                factor,
                embedding,
                adapter,
            } = parse_key(&tensor.key)
            else {
                if !self.saved_key(&tensor.key) && token_module(&tensor.key).is_none() {
                    report.unexpected.push(tensor.key.clone());
                }
                continue;
            };
            // A file holds one adapter; keys naming a second one do not belong to it.
            let expected = file_adapter.get_or_insert_with(|| adapter.clone());
            if *expected != adapter {
                report.unexpected.push(tensor.key.clone());
                continue;
            }
            let entry = modules.entry(module).or_default();
            if matches!(factor, Factor::A | Factor::B) {
                entry.embedding_keys.push(embedding);
            }
            let slot = match factor {
                Factor::A => &mut entry.a,
                Factor::B => &mut entry.b,
                Factor::Magnitude => &mut entry.magnitude,
                Factor::Bias => &mut entry.bias,
            };
            match slot {
                Some(_) => report.unexpected.push(tensor.key.clone()),
                None => *slot = Some(tensor),
            }
        }
        modules
    }

    /// Check one module's tensors against the model and the config; `None` when they have a
    /// problem, which goes to the report.
    fn check_module<'a, M: Module>(
        &self,
        snapshot: &Snapshot<M>,
        module: &str,
        tensors: &ModuleTensors<'a>,
        options: &LoadOptions,
        report: &mut LoadReport,
    ) -> Option<CheckedModule<'a>> {
        let present = || {
            [tensors.a, tensors.b, tensors.magnitude, tensors.bias]
                .into_iter()
                .flatten()
        };
        let target = match self.parameter_target(snapshot, module, options) {
            Some(Ok(target)) => target,
            Some(Err(problem)) => {
                for tensor in present() {
                    report
                        .unexpected
                        .push(format!("{} ({problem})", tensor.key));
                }
                return None;
            }
            None => {
                let path = options.key_map.to_burn(module);
                let Some(site) = snapshot.survey.adaptable_weight(&weight_path_of(&path)) else {
                    for tensor in present() {
                        report.unexpected.push(format!(
                            "{} (the model has no linear, embedding or conv2d layer `{path}`)",
                            tensor.key
                        ));
                    }
                    return None;
                };
                Target {
                    weight: site.path.clone(),
                    kind: site.kind().expect("an adaptable weight has a kind"),
                    owner: site.owner.clone(),
                    dims: site.dims.clone(),
                    experts: 1,
                    dims_in_out: site.factor_dims(),
                    layout: None,
                    pattern_key: module.to_string(),
                    path,
                }
            }
        };
        let (path, kind, site_owner) = (target.path.clone(), target.kind, target.owner.as_str());
        let embedding = kind == LayerKind::Embedding;
        if tensors
            .embedding_keys
            .iter()
            .any(|&keyed| keyed != embedding)
        {
            for tensor in present() {
                report.unexpected.push(format!(
                    "{} (`{path}` is a {} layer, whose keys are `{}`/`{}`)",
                    tensor.key,
                    kind.label(),
                    factor_segment(Factor::A, kind),
                    factor_segment(Factor::B, kind),
                ));
            }
            return None;
        }
        let mut ok = true;
        for (tensor, factor) in [(tensors.a, Factor::A), (tensors.b, Factor::B)] {
            if tensor.is_none() {
                report.missing.push(factor_key(module, factor, kind));
                ok = false;
            }
        }
        match (self.config.use_dora, tensors.magnitude) {
            (true, None) => {
                report
                    .missing
                    .push(factor_key(module, Factor::Magnitude, kind));
                ok = false;
            }
            (false, Some(magnitude)) => {
                report.unexpected.push(format!(
                    "{} (the config has use_dora = false)",
                    magnitude.key
                ));
                ok = false;
            }
            _ => {}
        }
        match (self.config.lora_bias, tensors.bias) {
            (true, None) => {
                report.missing.push(factor_key(module, Factor::Bias, kind));
                ok = false;
            }
            (false, Some(bias)) => {
                report
                    .unexpected
                    .push(format!("{} (the config has lora_bias = false)", bias.key));
                ok = false;
            }
            (true, Some(bias)) if site_owner != "LoraLinear" => {
                report.unexpected.push(format!(
                    "{} (`{path}` is a {} that computes through its weight alone; a bias on \
                     lora_B needs a LoraLinear)",
                    bias.key, site_owner
                ));
                ok = false;
            }
            _ => {}
        }
        for tensor in present() {
            if tensor.values.is_none() {
                report.unusable_dtypes.push(DtypeNote {
                    key: tensor.key.clone(),
                    stored: tensor.dtype.clone(),
                });
                ok = false;
                continue;
            }
            if tensor.dtype != "F32" {
                report.conversions.push(DtypeNote {
                    key: tensor.key.clone(),
                    stored: tensor.dtype.clone(),
                });
            }
            if tensor.shape.contains(&0) {
                report.empty.push(tensor.key.clone());
                ok = false;
            } else if tensor.values.iter().flatten().any(|v| !v.is_finite()) {
                report.non_finite.push(tensor.key.clone());
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        let (a, b) = (tensors.a?, tensors.b?);
        let (d_in, d_out) = target.dims_in_out;
        let (rank, pattern) = self.config.rank_for(&target.pattern_key);
        let rank_source = match pattern {
            Some(key) => format!("rank_pattern \"{key}\" gives r = {rank}"),
            None => format!("config r = {rank}"),
        };
        let [a_shape, b_shape, magnitude_shape] =
            peft_shapes(kind, &target.dims, rank, target.layout);
        let experts = match target.experts {
            1 => String::new(),
            experts => format!("{experts} experts × "),
        };
        let inputs = match kind {
            LayerKind::Conv2d => format!("c_in·k1·k2 = {d_in}"),
            _ => format!("d_in = {d_in}"),
        };
        let mut expectations = vec![
            (
                a,
                a_shape,
                Some(0),
                format!("{experts}{inputs} of `{path}`"),
            ),
            (
                b,
                b_shape,
                Some(1),
                format!("{experts}d_out = {d_out} of `{path}`"),
            ),
        ];
        if let Some(magnitude) = tensors.magnitude {
            expectations.push((
                magnitude,
                magnitude_shape,
                None,
                format!("one magnitude per output feature, d_out = {d_out} of `{path}`"),
            ));
        }
        if let Some(bias) = tensors.bias {
            expectations.push((
                bias,
                vec![d_out],
                None,
                format!("one bias per output feature, d_out = {d_out} of `{path}`"),
            ));
        }
        for (tensor, expected, rank_axis, layer) in expectations {
            if tensor.shape == expected {
                continue;
            }
            let only_rank_differs = rank_axis.is_some_and(|axis| {
                tensor.shape.len() == expected.len()
                    && (0..expected.len())
                        .filter(|&i| i != axis)
                        .all(|i| tensor.shape[i] == expected[i])
            });
            let reason = match (only_rank_differs, rank_axis) {
                (true, Some(axis)) => {
                    format!("rank {} disagrees: {rank_source}", tensor.shape[axis])
                }
                _ => format!("{layer}, {rank_source}"),
            };
            report.shape_mismatches.push(ShapeMismatch {
                key: tensor.key.clone(),
                expected,
                found: tensor.shape.clone(),
                reason,
            });
            ok = false;
        }
        if !ok {
            return None;
        }
        let alpha = self.config.alpha_for(&target.pattern_key);
        Some(CheckedModule {
            path: path.clone(),
            weight: target.weight,
            experts: target.experts,
            layout: target.layout,
            a,
            b,
            magnitude: tensors.magnitude,
            bias: tensors.bias,
            d_in,
            d_out,
            loaded: LoadedModule {
                peft_path: module.to_string(),
                path,
                rank,
                alpha,
                scale: self.config.scale(rank, alpha),
            },
        })
    }

    /// The raw parameter the file's module key `module` adapts, when `target_parameters` selects
    /// a parameter of that module (after the `base_layer.` segments of PEFT's nesting, which
    /// say which of the module's targeted parameters it is); `None` for a layer's key, and the
    /// problem when the nesting names no targeted parameter.
    fn parameter_target<M: Module>(
        &self,
        snapshot: &Snapshot<M>,
        module: &str,
        options: &LoadOptions,
    ) -> Option<Result<Target, String>> {
        if self.config.target_parameters.is_empty() {
            return None;
        }
        let (mut peft_module, mut depth) = (module, 0);
        while let Some(outer) = peft_module.strip_suffix(".base_layer") {
            peft_module = outer;
            depth += 1;
        }
        let path = options.key_map.to_burn(peft_module);
        let targeted: Vec<&ParamSite> = (snapshot.survey.params.iter())
            .filter(|site| site.module_path() == path)
            .filter(|site| {
                let name = site.path.rsplit('.').next().unwrap_or_default();
                self.config
                    .selects_parameter(&format!("{peft_module}.{name}"))
            })
            .collect();
        if targeted.is_empty() {
            return (depth > 0).then(|| {
                Err(format!(
                    "target_parameters selects no parameter of the model's `{path}`"
                ))
            });
        }
        let Some(index) = targeted.len().checked_sub(depth + 1) else {
            return Some(Err(format!(
                "{depth} nested base_layer, but target_parameters selects {} parameter(s) of \
                 `{path}`",
                targeted.len()
            )));
        };
        let site = targeted[index];
        let layout = options.parameter_layout;
        let Some((experts, d_in, d_out)) = param_dims(&site.dims, layout) else {
            return Some(Err(format!(
                "`{}` has shape {:?}; LoRA adapts 2-D and 3-D parameters",
                site.path, site.dims
            )));
        };
        let name = site.path.rsplit('.').next().unwrap_or_default();
        Some(Ok(Target {
            path: site.path.clone(),
            weight: site.path.clone(),
            kind: LayerKind::Parameter,
            owner: site.owner.clone(),
            dims: site.dims.clone(),
            experts,
            dims_in_out: (d_in, d_out),
            layout: Some(layout),
            pattern_key: format!("{peft_module}.{name}"),
        }))
    }

    /// Report the raw parameters the config's `target_parameters` select in the model that the
    /// file has no tensors for.
    fn check_parameter_coverage<M: Module, T>(
        &self,
        snapshot: &Snapshot<M>,
        pairs: &BTreeMap<String, T>,
        key_map: &KeyMap,
        report: &mut LoadReport,
    ) {
        let mut by_module: Vec<(String, Vec<&ParamSite>)> = Vec::new();
        for site in &snapshot.survey.params {
            let module = key_map.to_peft(site.module_path());
            let name = site.path.rsplit('.').next().unwrap_or_default();
            if !self.config.selects_parameter(&format!("{module}.{name}")) {
                continue;
            }
            match by_module.iter_mut().find(|(known, _)| *known == module) {
                Some((_, sites)) => sites.push(site),
                None => by_module.push((module, vec![site])),
            }
        }
        for (module, sites) in by_module {
            for (index, site) in sites.iter().enumerate() {
                let key = param_module_key(&module, index, sites.len());
                if !pairs.contains_key(&key) {
                    report.missing.push(format!(
                        "{} and {} (target_parameters selects `{}`)",
                        factor_key(&key, Factor::A, LayerKind::Parameter),
                        factor_key(&key, Factor::B, LayerKind::Parameter),
                        site.path
                    ));
                }
            }
        }
    }

    /// Report the modules the config's `target_modules` select in the model that the file has
    /// no tensors for.
    fn check_coverage<M: Module, T>(
        &self,
        snapshot: &Snapshot<M>,
        pairs: &BTreeMap<String, T>,
        key_map: &KeyMap,
        report: &mut LoadReport,
    ) {
        self.check_parameter_coverage(snapshot, pairs, key_map, report);
        let Some(targets) = &self.config.target_modules else {
            return;
        };
        if matches!(targets, TargetModules::Regex(r) if r == "all-linear") {
            report
                .notes
                .push("target_modules = \"all-linear\": coverage not checked".into());
            return;
        }
        let files_modules: Vec<String> = pairs.keys().cloned().collect();
        for site in snapshot.survey.params.iter() {
            let Some(kind) = site.kind() else {
                continue;
            };
            let peft = key_map.to_peft(site.module_path());
            let Some(selected) = self.config.selects(&peft) else {
                report.notes.push(format!(
                    "target_modules is a regex the Rust regex engine cannot compile; coverage \
                     not checked: {targets:?}"
                ));
                return;
            };
            if selected && !files_modules.contains(&peft) {
                report.missing.push(format!(
                    "{} and {} (target_modules selects `{}`)",
                    factor_key(&peft, Factor::A, kind),
                    factor_key(&peft, Factor::B, kind),
                    site.module_path()
                ));
            }
        }
    }
}

/// The tensors of one module in a file.
#[derive(Default)]
struct ModuleTensors<'a> {
    a: Option<&'a HostTensor>,
    b: Option<&'a HostTensor>,
    magnitude: Option<&'a HostTensor>,
    bias: Option<&'a HostTensor>,
    /// For each factor key, whether it was an embedding's (`lora_embedding_*`).
    embedding_keys: Vec<bool>,
}

/// A loaded adapter: the path of the parameter it goes on, and that parameter's layout when it
/// is a raw parameter.
type NewAdapter = (String, Adapter, Option<ParamLayout>);

/// Where a module of the file goes in the model: a layer's weight, or a raw parameter.
struct Target {
    /// The module path (a layer) or parameter path (a raw parameter), for reports.
    path: String,
    /// The path of the parameter that gets the adapter.
    weight: String,
    kind: LayerKind,
    owner: String,
    dims: Vec<usize>,
    experts: usize,
    /// `(d_in, d_out)`, one expert's for an expert bank.
    dims_in_out: (usize, usize),
    layout: Option<ParamLayout>,
    /// The PEFT path `rank_pattern` and `alpha_pattern` match: the module's, or for a raw
    /// parameter `<module>.<parameter>`.
    pattern_key: String,
}

/// A module that passed every check.
struct CheckedModule<'a> {
    path: String,
    /// The path of the parameter that gets the adapter.
    weight: String,
    experts: usize,
    layout: Option<ParamLayout>,
    a: &'a HostTensor,
    b: &'a HostTensor,
    magnitude: Option<&'a HostTensor>,
    bias: Option<&'a HostTensor>,
    d_in: usize,
    d_out: usize,
    loaded: LoadedModule,
}

/// The weights that go with `config`: `weights` when the config names no digest (a file PEFT
/// wrote) or names theirs. A save that died between its two renames leaves the new weights
/// beside the old config, and the old weights kept aside: those are the config's.
///
/// # Errors
///
/// [`LoraError::TornAdapter`] when neither matches.
fn matching_weights(dir: &Path, config: &str, weights: Vec<u8>) -> Result<Vec<u8>, LoraError> {
    let Some(expected) = serde_json::from_str::<serde_json::Value>(config)
        .ok()
        .and_then(|value| value.get(DIGEST_FIELD)?.as_str().map(str::to_string))
    else {
        return Ok(weights);
    };
    if digest(&weights) == expected {
        return Ok(weights);
    }
    let kept_aside = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!(".{WEIGHTS_FILE}.")) && name.ends_with(".bak")
        })
        .filter_map(|entry| std::fs::read(entry.path()).ok())
        .find(|bytes| digest(bytes) == expected);
    kept_aside.ok_or_else(|| LoraError::TornAdapter {
        path: dir.display().to_string(),
    })
}

/// The key segments of trainable tokens' rows, after the embedding's module path.
pub(crate) const TOKENS_KEY: &str = "token_adapter.trainable_tokens_delta";

/// The module (PEFT's path) whose trainable tokens `key` holds, if it is such a key.
fn token_module(key: &str) -> Option<&str> {
    let path = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    path.strip_suffix(TOKENS_KEY)?.strip_suffix('.')
}
