//! Attaching new adapters: planning which weights a [`LoraConfig`] selects, and creating the
//! adapters on them.
//!
//! This file knows module paths and targets; the math of one adapted weight lives in
//! [`adapter`](crate::adapter), and the rebuild that puts adapters on a model in
//! [`rebuild`](crate::rebuild).

use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::{DType, FloatDType, Tensor};

use crate::rebuild::Snapshot;
use crate::survey::Survey;
use crate::targets::CompiledTarget;
use crate::{
    AdaptedLayer, DEFAULT_ADAPTER, LoraAdapter, LoraConfig, LoraError, LoraReport, LoraState,
    ResidualInit, SkippedModule, Target, TargetMatch, dora, init,
};

/// The plan of [`LoraConfig::plan`].
pub(crate) fn plan<M: Module>(config: &LoraConfig, model: &M) -> Result<LoraReport, LoraError> {
    config.validate()?;
    let survey = Survey::of(model);
    if let Some((path, kind)) = survey.reparameterized.iter().min() {
        return Err(LoraError::AlreadyAdapted {
            path: path.clone(),
            kind: kind.clone(),
        });
    }
    plan_survey(config, &survey)
}

pub(crate) fn plan_survey(config: &LoraConfig, survey: &Survey) -> Result<LoraReport, LoraError> {
    let targets = config.targets.compile()?;
    let rank_patterns = config
        .rank_pattern
        .iter()
        .map(|pattern| Ok((pattern.target.compile()?, pattern.rank)))
        .collect::<Result<Vec<_>, LoraError>>()?;
    let alpha_patterns = config
        .alpha_pattern
        .iter()
        .map(|pattern| Ok((pattern.target.compile()?, pattern.alpha)))
        .collect::<Result<Vec<_>, LoraError>>()?;

    // Every pattern the user wrote, in one list, so each can be reported and checked alike:
    // the targets, then the rank patterns, then the alpha patterns.
    let mut patterns: Vec<(&Target, String)> = config
        .targets
        .include
        .iter()
        .map(|target| (target, target.label()))
        .collect();
    let rank_offset = patterns.len();
    patterns.extend(config.rank_pattern.iter().map(|pattern| {
        let label = format!(
            "rank_pattern {} (r={})",
            pattern.target.label(),
            pattern.rank
        );
        (&pattern.target, label)
    }));
    let alpha_offset = patterns.len();
    patterns.extend(config.alpha_pattern.iter().map(|pattern| {
        let label = format!(
            "alpha_pattern {} (alpha={})",
            pattern.target.label(),
            pattern.alpha
        );
        (&pattern.target, label)
    }));

    let mut report = LoraReport {
        base_params: survey.base_params,
        targets: patterns
            .iter()
            .map(|(_, label)| TargetMatch {
                target: label.clone(),
                matched: Vec::new(),
            })
            .collect(),
        ..Default::default()
    };

    for site in &survey.params {
        let module_path = site.module_path();
        let kind = site.kind();
        let Some(hits) = targets.included_by_module(module_path, &site.owner) else {
            continue;
        };
        let Some(kind) = kind else {
            // A target names this module, but it is no weight LoRA adapts (a bias, a norm...).
            // Say so once per module rather than adapting it.
            if !report.skipped.iter().any(|s| s.path == module_path) {
                report.skipped.push(SkippedModule {
                    path: module_path.to_string(),
                    module_type: site.owner.clone(),
                    reason: "LoRA adapts the weights of linear, embedding and conv2d layers only"
                        .into(),
                });
            }
            continue;
        };
        let mut matched = hits;
        let rank = match first_match(&rank_patterns, module_path, &site.owner) {
            Some((index, rank)) => {
                matched.push(rank_offset + index);
                rank
            }
            None => config.rank,
        };
        let alpha = match first_match(&alpha_patterns, module_path, &site.owner) {
            Some((index, alpha)) => {
                matched.push(alpha_offset + index);
                alpha
            }
            None => config.effective_alpha(),
        };
        let (d_in, d_out) = site.factor_dims();
        if rank > d_in.min(d_out) {
            return Err(LoraError::RankTooLarge {
                path: module_path.to_string(),
                rank,
                max_rank: d_in.min(d_out),
                d_in,
                d_out,
            });
        }
        for index in matched {
            report.targets[index].matched.push(module_path.to_string());
        }
        report.layers.push(AdaptedLayer {
            path: module_path.to_string(),
            module_type: site.owner.clone(),
            kind,
            d_in,
            d_out,
            rank,
            alpha,
            dora: config.use_dora,
            fast_path: site.owner == "LoraLinear",
        });
    }
    // A module whose weight was adapted is not a skip, even if its bias was named too.
    let adapted: Vec<String> = report.layers.iter().map(|l| l.path.clone()).collect();
    report
        .skipped
        .retain(|skipped| !adapted.contains(&skipped.path));

    if !config.allow_unmatched_targets
        && let Some(index) = report.targets.iter().position(|t| t.matched.is_empty())
    {
        return Err(LoraError::UnmatchedTarget {
            target: report.targets[index].target.clone(),
            candidates: nearest_linear_paths(patterns[index].0, survey),
        });
    }
    Ok(report)
}

/// The first override whose target selects the layer at `path`, with its index.
fn first_match<T: Copy>(
    overrides: &[(CompiledTarget, T)],
    path: &str,
    module_type: &str,
) -> Option<(usize, T)> {
    overrides
        .iter()
        .enumerate()
        .find(|(_, (target, _))| target.matches_module(path, module_type))
        .map(|(index, (_, value))| (index, *value))
}

/// Up to five linear-layer paths, the ones whose last segment is closest to the target first.
fn nearest_linear_paths(target: &Target, survey: &Survey) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = survey
        .params
        .iter()
        .filter(|site| site.kind().is_some())
        .map(|site| {
            let path = site.module_path();
            let last = path.rsplit('.').next().unwrap_or(path);
            let distance = target
                .names()
                .iter()
                .map(|name| edit_distance(name, last))
                .min()
                .unwrap_or(usize::MAX);
            (distance, path)
        })
        .collect();
    scored.sort();
    let mut paths: Vec<String> = Vec::new();
    for (_, path) in scored {
        if !paths.iter().any(|p| p == path) {
            paths.push(path.to_string());
        }
        if paths.len() == 5 {
            break;
        }
    }
    paths
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The work of [`LoraConfig::apply`].
pub(crate) fn attach<M: Module>(
    config: &LoraConfig,
    model: M,
) -> Result<(M, LoraReport), LoraError> {
    // `apply` is for a model without adapters; `add_adapter` adds to one that has some.
    plan(config, &model)?;
    add_adapter(&model, DEFAULT_ADAPTER, config)
}

/// Attach a new adapter `name`, as `config` describes, beside any the model already has.
///
/// The first adapter of a model freezes the base and starts active and trainable. A later one
/// starts inactive and frozen, as in PEFT, until `set_active` picks it.
pub(crate) fn add_adapter<M: Module>(
    model: &M,
    name: &str,
    config: &LoraConfig,
) -> Result<(M, LoraReport), LoraError> {
    config.validate()?;
    let snapshot = Snapshot::take(model)?;
    if snapshot.adapter_names().iter().any(|known| known == name) {
        return Err(LoraError::AdapterExists {
            name: name.to_string(),
        });
    }
    let report = plan_survey(config, &snapshot.survey)?;
    let first = !snapshot.is_adapted();
    let weight_paths: Vec<String> = report
        .layers
        .iter()
        .map(|layer| crate::survey::weight_path_of(&layer.path))
        .collect();
    if config.init.rewrites_base() {
        // The residual is taken from the stored base, which must not hold a merged update.
        snapshot.require_unmerged("a PiSSA or OLoRA init")?;
    }
    let bases = snapshot.bases(&weight_paths);
    let mut states: HashMap<String, LoraState> = snapshot.states.iter().cloned().collect();
    let mut residuals = HashMap::new();
    for (layer, path) in report.layers.iter().zip(&weight_paths) {
        let base = &bases[path];
        if config.init.rewrites_base() && matches!(base.dtype(), DType::QFloat(_)) {
            return Err(LoraError::UnsupportedVariant {
                what: format!(
                    "the {} init on a quantized base (it would store the residual in f32)",
                    config.init.peft_name()
                ),
                path: layer.path.clone(),
                adapter: name.to_string(),
            });
        }
        let (adapter, residual) = new_adapter(config, layer, name, base)?;
        let adapter = LoraAdapter {
            active: first,
            ..adapter.with_trainable(first)
        };
        if let Some(residual) = residual {
            residuals.insert(path.clone(), residual.cast(factor_dtype(base.dtype())));
        }
        states
            .entry(path.clone())
            .or_insert_with(|| LoraState::new(Vec::new()))
            .adapters
            .push(adapter);
    }
    Ok((snapshot.rebuild(states, residuals, first), report))
}

/// A fresh adapter for `layer` as `config.init` starts it, in the base's dtype, and the
/// residual base when the init rewrites it.
fn new_adapter(
    config: &LoraConfig,
    layer: &AdaptedLayer,
    name: &str,
    base: &Tensor<2>,
) -> Result<(LoraAdapter, Option<Tensor<2>>), LoraError> {
    let scale = config.scale_for(layer.rank, layer.alpha);
    let dtype = factor_dtype(base.dtype());
    let start = init::start(config.init, layer, base, scale, dtype, name)?;
    let residual_init = start.residual.as_ref().map(|_| ResidualInit {
        lora_a: start.lora_a.clone(),
        lora_b: start.lora_b.clone(),
        method: config.init.peft_name(),
    });
    let mut adapter = LoraAdapter {
        lora_a: Param::from_tensor(start.lora_a),
        lora_b: Param::from_tensor(start.lora_b),
        magnitude: None,
        scale,
        alpha: layer.alpha,
        use_rslora: config.use_rslora,
        dropout: DropoutConfig::new(config.dropout).init(),
        name: name.to_string(),
        active: true,
        trainable: true,
        merged: false,
        merged_norm: None,
        residual_init,
    };
    if config.use_dora {
        let stored = start.residual.clone().unwrap_or_else(|| base.clone());
        // Computed from the weight, it must not carry the weight's graph into a new leaf.
        let magnitude = dora::initial_magnitude(&adapter, &stored)
            .cast(dtype)
            .detach();
        adapter.magnitude = Some(Param::from_tensor(magnitude));
    }
    Ok((adapter, start.residual))
}

/// The float dtype adapter factors take beside a base of `dtype`: the same, or f32 for a
/// quantized or integer base.
pub(crate) fn factor_dtype(dtype: DType) -> FloatDType {
    match dtype {
        DType::F64 | DType::F32 | DType::F16 | DType::BF16 => FloatDType::from(dtype),
        _ => FloatDType::F32,
    }
}
