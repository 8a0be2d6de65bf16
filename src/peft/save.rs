//! Writing one named adapter of a Burn model as a PEFT adapter.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Tensor;

use super::config::{AdapterConfig, TargetModules};
use super::files::{
    DIGEST_FIELD, OutTensor, digest, encode, io_error, lock, publish, write_tensors,
};
use super::keys::{
    Factor, KeyMap, PEFT_PREFIX, factor_key, param_module_key, peft_shapes, regroup,
};
use super::load::TOKENS_KEY;
use super::{CONFIG_FILE, WEIGHTS_FILE};
use crate::adapter::layout::param_dims;
use crate::config::scaling::alpha_for_scale;
use crate::model::snapshot::Snapshot;
use crate::model::survey::module_path_of;
use crate::{Adapter, LayerKind, LoraError};

/// How [`save_adapter_with`](crate::peft::save_adapter_with) writes an adapter.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Maps the model's module paths to the names the file should use.
    pub key_map: KeyMap,
    /// `base_model_name_or_path` in the config, e.g. `meta-llama/Llama-3.2-1B`.
    pub base_model_name_or_path: Option<String>,
    /// `task_type` in the config, e.g. `CAUSAL_LM`.
    pub task_type: Option<String>,
}

impl SaveOptions {
    /// Identity key map, no base model name, no task type.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set [`key_map`](Self::key_map).
    pub fn with_key_map(mut self, key_map: KeyMap) -> Self {
        self.key_map = key_map;
        self
    }

    /// Set [`base_model_name_or_path`](Self::base_model_name_or_path).
    pub fn with_base_model(mut self, name: impl Into<String>) -> Self {
        self.base_model_name_or_path = Some(name.into());
        self
    }

    /// Set [`task_type`](Self::task_type).
    pub fn with_task_type(mut self, task_type: impl Into<String>) -> Self {
        self.task_type = Some(task_type.into());
        self
    }
}

/// What [`save_adapter`](crate::peft::save_adapter) wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedAdapter {
    /// `adapter_model.safetensors`.
    pub weights_path: PathBuf,
    /// `adapter_config.json`.
    pub config_path: PathBuf,
    /// The config written.
    pub config: AdapterConfig,
    /// The number of adapted modules.
    pub modules: usize,
    /// The size of the weights file in bytes.
    pub weights_bytes: usize,
}

/// One adapted module, ready to write.
struct Entry {
    /// The module's PEFT path, or `<module>.<parameter>` for a raw parameter.
    peft_path: String,
    /// Whether it is a raw parameter (`target_parameters`).
    param: bool,
    rank: usize,
    alpha: f64,
    scale: f64,
    use_rslora: bool,
    dropout: f64,
    dora: bool,
}

pub(crate) fn save<M: Module>(
    model: &M,
    dir: &Path,
    name: &str,
    options: &SaveOptions,
) -> Result<SavedAdapter, LoraError> {
    let snapshot = Snapshot::take(model)?;
    if !snapshot.is_adapted() {
        return Err(LoraError::NoAdapters);
    }
    snapshot.require_adapter(name)?;

    // PEFT's lora_bias is one setting per file: when some module's adapter has a bias on B,
    // every module gets one, zero where it had none (the same outputs).
    let lora_bias = snapshot
        .states
        .iter()
        .any(|(_, state)| state.adapter(name).is_some_and(|a| a.lora_bias.is_some()));
    let mut entries = Vec::new();
    let mut tensors = Vec::new();
    let mut target_parameters: Vec<String> = Vec::new();
    for (weight_path, state) in &snapshot.states {
        let Some(adapter) = state.adapter(name) else {
            continue;
        };
        let path = module_path_of(weight_path);
        let peft_module = options.key_map.to_peft_checked(path)?;
        let site = (snapshot.survey.params.iter())
            .find(|site| site.path == *weight_path)
            .expect("adapters sit on parameters of the model");
        let (lora_a, lora_b) = plain_delta_factors(adapter, path)?;
        let (device, dtype) = (lora_b.device(), lora_b.dtype());
        let (kind, peft_path, key_path, lora_b) = match state.param_layout {
            // A raw parameter: keyed by its module, nested as PEFT nests its wrappers, and
            // with B's rows in PEFT's order.
            Some(_) => {
                let param_name = weight_path.rsplit('.').next().unwrap_or_default();
                // The module's parameters this adapter adapts, in the module's order.
                let siblings: Vec<&String> = (snapshot.states.iter())
                    .filter(|(other, state)| {
                        state.param_layout.is_some()
                            && module_path_of(other) == path
                            && state.adapter(name).is_some()
                    })
                    .map(|(other, _)| other)
                    .collect();
                let index = (siblings.iter())
                    .position(|other| *other == weight_path)
                    .expect("the parameter is among its module's");
                let key = param_module_key(&peft_module, index, siblings.len());
                let lora_b = regroup(lora_b, adapter.experts, adapter.rank());
                let peft_param = format!("{peft_module}.{param_name}");
                target_parameters.push(peft_param.clone());
                (LayerKind::Parameter, peft_param, key, lora_b)
            }
            None => {
                let kind = site.kind().expect("an adaptable weight has a kind");
                (kind, peft_module.clone(), peft_module, lora_b)
            }
        };
        // The rank written: the adapter's, or twice it for a converted PiSSA/OLoRA adapter.
        let rank = lora_a.dims()[1] / adapter.experts.max(1);
        let (_, d_out) = match state.param_layout {
            Some(layout) => param_dims(&site.dims, layout)
                .map(|(_, d_in, d_out)| (d_in, d_out))
                .expect("an adapted parameter is 2-D or 3-D"),
            None => site.factor_dims(),
        };
        // PyTorch's layouts, the transposes of Burn's (the same values, row-major, under a
        // convolution's kernel axes).
        let [a_shape, b_shape, magnitude_shape] =
            peft_shapes(kind, &site.dims, rank, state.param_layout);
        let mut parts = vec![
            (Factor::A, lora_a.transpose(), a_shape),
            (Factor::B, lora_b.transpose(), b_shape),
        ];
        if let Some(magnitude) = &adapter.magnitude {
            let magnitude = magnitude.val().reshape([1, d_out]);
            parts.push((Factor::Magnitude, magnitude, magnitude_shape));
        }
        if lora_bias {
            let bias = match &adapter.lora_bias {
                Some(bias) => bias.val(),
                None => Tensor::<1>::zeros([d_out], (&device, dtype)),
            };
            parts.push((Factor::Bias, bias.reshape([1, d_out]), vec![d_out]));
        }
        for (factor, tensor, shape) in parts {
            let key = factor_key(&key_path, factor, kind);
            let tensor =
                out_tensor(key, tensor, shape).ok_or_else(|| LoraError::NonFiniteAdapter {
                    path: path.to_string(),
                    adapter: name.to_string(),
                })?;
            tensors.push(tensor);
        }
        entries.push(Entry {
            param: state.param_layout.is_some(),
            ..entry(peft_path, adapter, rank)
        });
    }
    // The adapter's copies of modules_to_save, under the modules' own keys, in PyTorch's
    // names and layouts, as PEFT writes them.
    let mut saved_modules: Vec<String> = Vec::new();
    let mut token_indices: Vec<(String, Vec<usize>)> = Vec::new();
    for (param_path, state) in &snapshot.states {
        let Some(copy) = state.copies.iter().find(|copy| copy.name == name) else {
            continue;
        };
        let module = module_path_of(param_path);
        let peft_module = options.key_map.to_peft_checked(module)?;
        if let Some(rows) = &copy.rows {
            // Trainable tokens: the rows, `[ids, width]`, and their ids in the config.
            let count = copy.value.lazy_shape().num_elements();
            let shape = vec![rows.len(), count / rows.len().max(1)];
            let key = format!("{PEFT_PREFIX}{peft_module}.{TOKENS_KEY}");
            let value = copy.value.val().reshape([1, count]);
            let tensor =
                out_tensor(key, value, shape).ok_or_else(|| LoraError::NonFiniteAdapter {
                    path: param_path.clone(),
                    adapter: name.to_string(),
                })?;
            tensors.push(tensor);
            token_indices.push((peft_module, rows.clone()));
            continue;
        }
        let site = snapshot
            .survey
            .params
            .iter()
            .find(|site| site.path == *param_path)
            .expect("copies sit on parameters of the model");
        let param = match param_path.rsplit('.').next().unwrap_or_default() {
            "gamma" => "weight",
            "beta" => "bias",
            other => other,
        };
        let count = site.dims.iter().product::<usize>();
        let linear_weight = matches!(site.owner.as_str(), "Linear" | "LoraLinear")
            && param == "weight"
            && site.dims.len() == 2;
        let (value, shape) = match linear_weight {
            true => (
                copy.value_as::<2>(site.dims.clone().into())
                    .transpose()
                    .reshape([1, count]),
                vec![site.dims[1], site.dims[0]],
            ),
            false => (copy.value.val().reshape([1, count]), site.dims.clone()),
        };
        let key = format!("{PEFT_PREFIX}{peft_module}.{param}");
        let tensor = out_tensor(key, value, shape).ok_or_else(|| LoraError::NonFiniteAdapter {
            path: param_path.clone(),
            adapter: name.to_string(),
        })?;
        tensors.push(tensor);
        if !saved_modules.contains(&peft_module) {
            saved_modules.push(peft_module);
        }
    }
    if entries.is_empty() {
        let (path, _) = snapshot
            .states
            .first()
            .expect("an adapted model has a state");
        return Err(LoraError::UnsupportedVariant {
            what: "saving an adapter with modules_to_save only (a PEFT LoRA file has target \
                   modules)"
                .into(),
            path: module_path_of(path).to_string(),
            adapter: name.to_string(),
        });
    }
    let dora = entries.iter().filter(|entry| entry.dora).count();
    if dora != 0 && dora != entries.len() {
        let (weight_path, _) = snapshot
            .states
            .iter()
            .find(|(_, state)| state.adapter(name).is_some_and(|a| !a.is_dora()))
            .expect("a module without DoRA");
        return Err(LoraError::UnsupportedVariant {
            what: "saving an adapter that is DoRA on some modules only (PEFT's use_dora is one \
                   setting per file)"
                .into(),
            path: module_path_of(weight_path).to_string(),
            adapter: name.to_string(),
        });
    }
    let mut config = adapter_config(&snapshot, &entries, options);
    config.lora_bias = lora_bias;
    config.modules_to_save = (!saved_modules.is_empty()).then_some(saved_modules);
    config.trainable_token_indices = token_indices;
    config.target_parameters = parameter_names(&snapshot, &target_parameters, &options.key_map);
    let weights_path = dir.join(WEIGHTS_FILE);
    let config_path = dir.join(CONFIG_FILE);
    let bytes = write_tensors(&tensors, &weights_path.display().to_string())?;
    // The config names the weights it goes with, so a reader can tell a torn pair.
    config
        .extra
        .insert(DIGEST_FIELD.to_string(), digest(&bytes).into());
    let text = config.to_json();

    fs::create_dir_all(dir).map_err(|error| io_error(dir, &error))?;
    let _lock = lock(dir, true)?;
    publish(
        dir,
        &[
            (WEIGHTS_FILE, bytes.as_slice()),
            (CONFIG_FILE, text.as_bytes()),
        ],
    )?;
    Ok(SavedAdapter {
        weights_path,
        config_path,
        config,
        modules: entries.len(),
        weights_bytes: bytes.len(),
    })
}

/// The factors to write for `adapter`, in Burn's layout. An adapter that started from the
/// base (PiSSA, OLoRA) moved `s·A₀·B₀` out of the stored base, so against the original base its
/// update is `s·(A·B - A₀·B₀)`: PEFT's conversion writes that as rank `2r` factors `[A | A₀]`
/// and `[B ; -B₀]` at the same scale, a plain LoRA that works on an unmodified base.
fn plain_delta_factors(adapter: &Adapter, path: &str) -> Result<(Tensor<2>, Tensor<2>), LoraError> {
    let (lora_a, lora_b) = (adapter.lora_a.val(), adapter.lora_b.val());
    let Some(initial) = &adapter.residual_init else {
        return Ok((lora_a, lora_b));
    };
    if adapter.is_dora() {
        return Err(LoraError::UnsupportedVariant {
            what: format!(
                "saving a DoRA adapter with the {} init (its update is not a low-rank delta \
                 against the original base)",
                initial.method
            ),
            path: path.to_string(),
            adapter: adapter.name.clone(),
        });
    }
    let dtype = lora_a.dtype();
    let a = Tensor::cat(vec![lora_a, initial.lora_a.clone().cast(dtype)], 1);
    let b = Tensor::cat(vec![lora_b, initial.lora_b.clone().cast(dtype).neg()], 0);
    Ok((a, b))
}

/// The config entry of `adapter`, written at `rank` (twice its own for a converted PiSSA or
/// OLoRA adapter, with the alpha that keeps its scale).
fn entry(peft_path: String, adapter: &Adapter, rank: usize) -> Entry {
    let alpha = match rank == adapter.rank() {
        true => adapter.alpha,
        false => alpha_for_scale(adapter.scale, rank, adapter.use_rslora),
    };
    Entry {
        peft_path,
        param: false,
        rank,
        alpha,
        scale: adapter.scale,
        use_rslora: adapter.use_rslora,
        dropout: adapter.dropout.prob,
        dora: adapter.is_dora(),
    }
}

/// A tensor's bytes in its own float dtype (other dtypes as f32), written with `shape` (the same
/// values in row-major order); `None` if it holds NaN or Inf.
fn out_tensor(key: String, tensor: Tensor<2>, shape: Vec<usize>) -> Option<OutTensor> {
    if !tensor.clone().is_finite().all().into_scalar::<bool>() {
        return None;
    }
    let (dtype, bytes) = encode(tensor.into_data());
    Some(OutTensor {
        key,
        dtype,
        shape,
        bytes,
    })
}

/// The config that makes PEFT rebuild exactly these adapters: the most common rank and alpha
/// as defaults, patterns for the rest, and the scale of every module reproduced.
fn adapter_config<M: Module>(
    snapshot: &Snapshot<M>,
    entries: &[Entry],
    options: &SaveOptions,
) -> AdapterConfig {
    let rslora_count = entries.iter().filter(|e| e.use_rslora).count();
    let use_rslora = 2 * rslora_count > entries.len();
    // The alpha that gives each module its scale under the file's one rsLoRA setting.
    let alphas: Vec<f64> = entries
        .iter()
        .map(|e| match e.use_rslora == use_rslora {
            true => e.alpha,
            false => alpha_for_scale(e.scale, e.rank, use_rslora),
        })
        .collect();
    let r = most_common(entries.iter().map(|e| e.rank as f64)) as usize;
    let lora_alpha = most_common(alphas.iter().copied());
    let mut config = AdapterConfig::new(r, lora_alpha);
    config.use_rslora = use_rslora;
    config.use_dora = entries.iter().any(|entry| entry.dora);
    config.lora_dropout = most_common(entries.iter().map(|e| e.dropout));
    config.base_model_name_or_path = options.base_model_name_or_path.clone();
    config.task_type = options.task_type.clone();
    let modules: Vec<&Entry> = entries.iter().filter(|entry| !entry.param).collect();
    // PEFT takes no target_modules beside target_parameters as "none".
    config.target_modules =
        (!modules.is_empty()).then(|| target_modules(snapshot, &modules, &options.key_map));

    let ranks: Vec<f64> = entries.iter().map(|e| e.rank as f64).collect();
    config.rank_pattern = overrides(entries, &ranks, r as f64)
        .into_iter()
        .map(|(key, rank)| (key, rank as usize))
        .collect();
    config.alpha_pattern = overrides(entries, &alphas, lora_alpha);
    config
}

/// Pattern entries for the modules whose value differs from `default`. A module name
/// (`v_proj`) stands for all saved modules of that name when they share the value, as a person
/// would write it; otherwise each module gets its own path.
fn overrides(entries: &[Entry], values: &[f64], default: f64) -> Vec<(String, f64)> {
    let last = |path: &str| path.rsplit('.').next().unwrap_or_default().to_string();
    let mut patterns: Vec<(String, f64)> = Vec::new();
    for (entry, &value) in entries.iter().zip(values) {
        if value == default {
            continue;
        }
        let name = last(&entry.peft_path);
        let shared = entries
            .iter()
            .zip(values)
            .filter(|(other, _)| last(&other.peft_path) == name)
            .all(|(_, &other)| other == value);
        let key = match shared {
            true => name,
            false => pattern_key(entries, &entry.peft_path),
        };
        if !patterns.iter().any(|(known, _)| *known == key) {
            patterns.push((key, value));
        }
    }
    patterns
}

/// The pattern key for one module: its path, anchored when it would also match another saved
/// module as a suffix (PEFT matches pattern keys as path suffixes).
fn pattern_key(entries: &[Entry], peft_path: &str) -> String {
    let suffix = format!(".{peft_path}");
    match entries
        .iter()
        .any(|other| other.peft_path.ends_with(&suffix))
    {
        true => format!("^{}", regex::escape(peft_path)),
        false => peft_path.to_string(),
    }
}

/// `target_parameters` for the raw parameters at `saved` (PEFT paths): each as its module's last
/// segment and its name (`experts.gate_up_proj`) when those names select exactly the saved
/// parameters among the model's, else the full paths. Sorted, as PEFT sorts them.
fn parameter_names<M: Module>(
    snapshot: &Snapshot<M>,
    saved: &[String],
    key_map: &KeyMap,
) -> Vec<String> {
    let short = |path: &str| {
        let segments: Vec<&str> = path.rsplit('.').take(2).collect();
        segments.into_iter().rev().collect::<Vec<_>>().join(".")
    };
    let mut names: Vec<String> = saved.iter().map(|path| short(path)).collect();
    names.sort();
    names.dedup();
    let mut by_names = AdapterConfig::new(1, 1.0);
    by_names.target_parameters = names.clone();
    let exact = (snapshot.survey.params.iter()).all(|site| {
        let module = key_map.to_peft(site.module_path());
        let name = site.path.rsplit('.').next().unwrap_or_default();
        let peft = format!("{module}.{name}");
        by_names.selects_parameter(&peft) == saved.contains(&peft)
    });
    match exact {
        true => names,
        false => {
            let mut full = saved.to_vec();
            full.sort();
            full
        }
    }
}

/// `target_modules` as a list of names when those names select exactly the saved modules among
/// the model's linear layers, else a regex of the exact paths.
fn target_modules<M: Module>(
    snapshot: &Snapshot<M>,
    entries: &[&Entry],
    key_map: &KeyMap,
) -> TargetModules {
    let mut names: Vec<String> = Vec::new();
    for entry in entries {
        let name = entry.peft_path.rsplit('.').next().unwrap_or_default();
        if !names.iter().any(|known| known == name) {
            names.push(name.to_string());
        }
    }
    let saved: HashSet<&str> = entries.iter().map(|e| e.peft_path.as_str()).collect();
    let mut by_names = AdapterConfig::new(1, 1.0);
    by_names.target_modules = Some(TargetModules::Names(names));
    let exact = snapshot
        .survey
        .params
        .iter()
        .filter(|site| site.kind().is_some())
        .map(|site| key_map.to_peft(site.module_path()))
        .all(|peft| by_names.selects(&peft) == Some(saved.contains(peft.as_str())));
    match (exact, by_names.target_modules) {
        (true, Some(by_names)) => by_names,
        _ => {
            let mut paths: Vec<String> = entries
                .iter()
                .map(|e| regex::escape(&e.peft_path))
                .collect();
            paths.sort();
            TargetModules::Regex(paths.join("|"))
        }
    }
}

/// The most frequent value, the smallest among ties.
fn most_common(values: impl Iterator<Item = f64>) -> f64 {
    let mut counts: Vec<(f64, usize)> = Vec::new();
    for value in values {
        match counts.iter_mut().find(|(known, _)| *known == value) {
            Some((_, count)) => *count += 1,
            None => counts.push((value, 1)),
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.total_cmp(&a.0)))
        .map_or(0.0, |(value, _)| value)
}
