//! Attaching new adapters: planning which weights a [`LoraConfig`] selects, creating the
//! adapters on them, and the one path that puts new adapters on a model, which
//! [`LoraConfig::apply`], [`LoraModule::add_adapter`](crate::LoraModule::add_adapter), PEFT
//! loading and combinations all take.
//!
//! This file knows module paths and targets; the math of one adapted weight lives in
//! [`adapter`](crate::adapter), and the rebuild that puts adapters on a model in
//! [`snapshot`](super::snapshot).

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::{DType, Tensor};

use super::report::{AdaptedLayer, LoraReport, SavedModule, SkippedModule, TargetMatch};
use super::snapshot::Snapshot;
use super::survey::{Survey, module_path_of};
use crate::adapter::init::{self, Site};
use crate::adapter::layout::{float_dtype, param_dims, to_f32};
use crate::adapter::saved::{check_rows, row_indices};
use crate::adapter::{Adapter, DEFAULT_ADAPTER, LayerKind, LoraState, ResidualInit, SavedCopy};
use crate::config::ParamLayout;
use crate::config::matcher::first_match;
use crate::{LoraConfig, LoraError, Target};

impl LoraConfig {
    /// What [`apply`](Self::apply) would do, without changing the model: the matched layers
    /// with their shapes, ranks and alphas, and the parameter counts.
    pub fn plan<M: Module>(&self, model: &M) -> Result<LoraReport, LoraError> {
        plan(self, model)
    }

    /// Freeze every base parameter of `model` and attach an adapter named `"default"` to each
    /// targeted weight (linear, embedding or conv2d).
    ///
    /// Returns the adapted model and a report of what was adapted. The model's output is
    /// unchanged until the adapters train, since `B` starts at zero.
    ///
    /// # Errors
    ///
    /// An invalid config ([`validate`](Self::validate)), a target that matches nothing, a rank
    /// larger than a target allows, or a model that already carries adapters.
    pub fn apply<M: Module>(&self, model: M) -> Result<(M, LoraReport), LoraError> {
        self.apply_with_progress(model, &mut |_| {})
    }

    /// [`apply`](Self::apply), calling `progress` after each layer's adapter is initialized.
    /// PiSSA and OLoRA factor every weight, seconds each for wide ones: this is the place to
    /// show a progress bar.
    ///
    /// ```
    /// # use burn::nn::{Linear, LinearConfig};
    /// # use burn::prelude::*;
    /// use burn_lora::{LoraConfig, LoraInit, Targets};
    /// # fn main() -> Result<(), burn_lora::LoraError> {
    /// # let model: Linear = LinearConfig::new(32, 32).init(&Device::default());
    /// let config = LoraConfig::new(4)
    ///     .with_init(LoraInit::PissaNiter(4))
    ///     .with_targets(Targets::all_linear());
    /// let (model, _) = config.apply_with_progress(model, &mut |step| {
    ///     eprintln!("[{}/{}] {}", step.done, step.total, step.path);
    /// })?;
    /// # let _ = model;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply).
    pub fn apply_with_progress<M: Module>(
        &self,
        model: M,
        progress: &mut dyn FnMut(&InitProgress),
    ) -> Result<(M, LoraReport), LoraError> {
        // `apply` is for a model without adapters; `add_adapter` adds to one that has some.
        plan(self, &model)?;
        add_adapter(&model, DEFAULT_ADAPTER, self, progress)
    }
}

/// Where attaching an adapter is: the adapter of one more layer was initialized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitProgress {
    /// The layers initialized so far, this one included.
    pub done: usize,
    /// The layers to initialize in all.
    pub total: usize,
    /// Module path of the layer just initialized.
    pub path: String,
}

/// The plan of [`LoraConfig::plan`].
fn plan<M: Module>(config: &LoraConfig, model: &M) -> Result<LoraReport, LoraError> {
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

fn plan_survey(config: &LoraConfig, survey: &Survey) -> Result<LoraReport, LoraError> {
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
    let parameter_offset = patterns.len();
    patterns.extend(
        (config.targets.parameters.iter())
            .map(|target| (target, format!("parameter {}", target.label()))),
    );
    let labelled =
        |kind: &str, target: &Target, value: String| format!("{kind} {} ({value})", target.label());
    let rank_offset = patterns.len();
    patterns.extend(config.rank_pattern.iter().map(|pattern| {
        let label = labelled(
            "rank_pattern",
            &pattern.target,
            format!("r={}", pattern.rank),
        );
        (&pattern.target, label)
    }));
    let alpha_offset = patterns.len();
    patterns.extend(config.alpha_pattern.iter().map(|pattern| {
        let label = labelled(
            "alpha_pattern",
            &pattern.target,
            format!("alpha={}", pattern.alpha),
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
            return Err(LoraError::rank_too_large(module_path, rank, d_in, d_out));
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
            experts: 1,
            param_layout: None,
        });
    }
    // Raw parameters (PEFT's target_parameters), after the layers so that a clash is seen.
    for site in &survey.params {
        let Some(hits) = targets.included_parameter(&site.path) else {
            continue;
        };
        let path = site.path.as_str();
        let invalid = |reason: String| LoraError::InvalidTargetParameter {
            path: path.to_string(),
            reason,
        };
        let layout = config.targets.parameter_layout;
        let Some((experts, d_in, d_out)) = param_dims(&site.dims, layout) else {
            return Err(invalid(format!(
                "it has shape {:?}; LoRA adapts 2-D and 3-D parameters (one matrix or a bank \
                 of experts)",
                site.dims
            )));
        };
        if site.quantized {
            return Err(invalid(
                "it is quantized; a raw parameter's update composes densely, which a quantized \
                 value cannot take"
                    .into(),
            ));
        }
        if report
            .layers
            .iter()
            .any(|layer| layer.param_path() == site.path)
        {
            return Err(invalid(
                "its layer is a module target too; target the layer or the parameter".into(),
            ));
        }
        let mut matched: Vec<usize> = hits.iter().map(|hit| parameter_offset + hit).collect();
        let rank = match first_match(&rank_patterns, path, &site.owner) {
            Some((index, rank)) => {
                matched.push(rank_offset + index);
                rank
            }
            None => config.rank,
        };
        let alpha = match first_match(&alpha_patterns, path, &site.owner) {
            Some((index, alpha)) => {
                matched.push(alpha_offset + index);
                alpha
            }
            None => config.effective_alpha(),
        };
        if rank > d_in.min(d_out) {
            return Err(LoraError::rank_too_large(path, rank, d_in, d_out));
        }
        for index in matched {
            report.targets[index].matched.push(path.to_string());
        }
        report.layers.push(AdaptedLayer {
            path: path.to_string(),
            module_type: site.owner.clone(),
            kind: LayerKind::Parameter,
            d_in,
            d_out,
            rank,
            alpha,
            dora: config.use_dora,
            fast_path: false,
            experts,
            param_layout: Some(layout),
        });
    }
    plan_saved(config, survey, &mut report)?;
    plan_tokens(config, survey, &mut report)?;
    // One weight at several paths would get one adapter per path, and stop being shared.
    let planned: Vec<String> = report
        .layers
        .iter()
        .map(AdaptedLayer::param_path)
        .chain(report.saved.iter().flat_map(|saved| saved.params.clone()))
        .collect();
    if let Some(paths) = survey
        .aliases(|_| true)
        .into_iter()
        .find(|paths| paths.iter().any(|path| planned.contains(path)))
    {
        return Err(LoraError::SharedWeight { paths });
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

/// The modules of `config.modules_to_save` in `survey`, added to `report.saved`: each name
/// matches a module path exactly or as a dotted suffix, and the module's parameters, its
/// submodules' included, are copied.
fn plan_saved(
    config: &LoraConfig,
    survey: &Survey,
    report: &mut LoraReport,
) -> Result<(), LoraError> {
    for name in &config.modules_to_save {
        let mut found = false;
        for site in &survey.params {
            let Some(module) = saved_module_of(site.module_path(), name) else {
                continue;
            };
            found = true;
            if let Some(layer) = report
                .layers
                .iter()
                .find(|layer| layer.path == module || layer.path.starts_with(&format!("{module}.")))
            {
                return Err(LoraError::SavedAndTargeted {
                    path: layer.path.clone(),
                });
            }
            let numel = site.dims.iter().product::<usize>();
            match report.saved.iter_mut().find(|saved| saved.path == module) {
                Some(saved) if saved.params.contains(&site.path) => {}
                Some(saved) => {
                    saved.params.push(site.path.clone());
                    saved.numel += numel;
                }
                None => report.saved.push(SavedModule {
                    path: module.to_string(),
                    module_type: survey
                        .params
                        .iter()
                        .find(|other| other.module_path() == module)
                        .map_or_else(|| site.owner.clone(), |other| other.owner.clone()),
                    params: vec![site.path.clone()],
                    numel,
                    rows: None,
                }),
            }
        }
        if !found && !config.allow_unmatched_targets {
            return Err(LoraError::UnmatchedTarget {
                target: format!("modules_to_save `{name}`"),
                candidates: nearest_linear_paths(&Target::Name(name.clone()), survey),
            });
        }
    }
    Ok(())
}

/// The embeddings of `config.trainable_token_indices` in `survey`, added to `report.saved`
/// with their rows. Each name matches a module path exactly or as a dotted suffix.
fn plan_tokens(
    config: &LoraConfig,
    survey: &Survey,
    report: &mut LoraReport,
) -> Result<(), LoraError> {
    for tokens in &config.trainable_token_indices {
        let named: Vec<_> = (survey.params.iter())
            .filter(|site| {
                saved_module_of(site.module_path(), &tokens.module) == Some(site.module_path())
            })
            .collect();
        let Some(site) = named
            .iter()
            .find(|site| site.kind() == Some(LayerKind::Embedding))
        else {
            if let Some(site) = named.first() {
                return Err(LoraError::InvalidTokenIndices {
                    path: site.module_path().to_string(),
                    message: format!("a {} is no embedding", site.owner),
                });
            }
            if config.allow_unmatched_targets {
                continue;
            }
            return Err(LoraError::UnmatchedTarget {
                target: format!("trainable_token_indices `{}`", tokens.module),
                candidates: Vec::new(),
            });
        };
        let module = site.module_path();
        let invalid = |message: String| LoraError::InvalidTokenIndices {
            path: module.to_string(),
            message,
        };
        check_rows(&tokens.indices, site.dims[0]).map_err(invalid)?;
        let taken = report.layers.iter().any(|layer| layer.path == module)
            || report.saved.iter().any(|saved| saved.path == module);
        if taken {
            return Err(LoraError::SavedAndTargeted {
                path: module.to_string(),
            });
        }
        report.saved.push(SavedModule {
            path: module.to_string(),
            module_type: site.owner.clone(),
            params: vec![site.path.clone()],
            numel: tokens.indices.len() * site.dims[1],
            rows: Some(tokens.indices.clone()),
        });
    }
    Ok(())
}

/// The module of `modules_to_save` entry `name` that holds the module at `module_path`: the
/// shortest prefix of the path equal to `name` or ending in `.` + `name`.
pub(crate) fn saved_module_of<'a>(module_path: &'a str, name: &str) -> Option<&'a str> {
    let mut end = 0;
    for segment in module_path.split('.') {
        end += segment.len();
        let prefix = &module_path[..end];
        if prefix == name || prefix.ends_with(&format!(".{name}")) {
            return Some(prefix);
        }
        end += 1;
    }
    None
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

/// Attach a new adapter `name`, as `config` describes, beside any the model already has.
///
/// The first adapter of a model freezes the base and starts active and trainable. A later one
/// starts inactive and frozen, as in PEFT, until `set_active` picks it.
pub(crate) fn add_adapter<M: Module>(
    model: &M,
    name: &str,
    config: &LoraConfig,
    progress: &mut dyn FnMut(&InitProgress),
) -> Result<(M, LoraReport), LoraError> {
    config.validate()?;
    let snapshot = Snapshot::take(model)?;
    snapshot.require_new_name(name)?;
    let report = plan_survey(config, &snapshot.survey)?;
    let first = !snapshot.is_adapted();
    let weight_paths: Vec<String> = report.layers.iter().map(AdaptedLayer::param_path).collect();
    let layouts: HashMap<String, ParamLayout> = (report.layers.iter())
        .filter_map(|layer| {
            layer
                .param_layout
                .map(|layout| (layer.param_path(), layout))
        })
        .collect();
    snapshot.refuse_beside_residual("another adapter beside it", name)?;
    if config.init.rewrites_base() {
        // The residual is taken from the stored base, which must not hold a merged update.
        snapshot.require_unmerged("a PiSSA or OLoRA init")?;
        // The other adapters would compute on the residual instead of the base they learned on.
        if let Some((path, _)) = snapshot.states.first() {
            return Err(LoraError::UnsupportedVariant {
                what: format!(
                    "the {} init on a model that already has adapters (it rewrites the base \
                     they compute on); give it a model of its own",
                    config.init.peft_name()
                ),
                path: module_path_of(path).to_string(),
                adapter: name.to_string(),
            });
        }
    }
    let bases = snapshot.bases_in(&weight_paths, &layouts);
    let mut adapters = Vec::with_capacity(report.layers.len());
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
        if let Some(residual) = residual {
            residuals.insert(path.clone(), residual.cast(float_dtype(base.dtype())));
        }
        adapters.push((
            path.clone(),
            adapter.with_trainable(first),
            layer.param_layout,
        ));
        progress(&InitProgress {
            done: adapters.len(),
            total: report.layers.len(),
            path: layer.path.clone(),
        });
    }
    let saved: Vec<String> = report
        .saved
        .iter()
        .flat_map(|saved| saved.params.clone())
        .collect();
    for (path, state) in &snapshot.states {
        let layer_with_copies = weight_paths.contains(path) && !state.copies.is_empty();
        if layer_with_copies || (saved.contains(path) && !state.adapters.is_empty()) {
            return Err(LoraError::SavedAndTargeted {
                path: module_path_of(path).to_string(),
            });
        }
    }
    let values = snapshot.values(&saved);
    let rows_of = |path: &String| {
        let module = report
            .saved
            .iter()
            .find(|saved| saved.params.contains(path));
        module.and_then(|module| module.rows.clone())
    };
    let copies = saved
        .iter()
        .map(|path| {
            let value = values[path].clone();
            // A quantized original (QLoRA) gets a float copy: it trains.
            let value = match value.dtype() {
                DType::QFloat(_) => to_f32(value),
                _ => value,
            };
            let copy = match rows_of(path) {
                Some(rows) => {
                    SavedCopy::of_rows(name, select_rows(value, path, &snapshot, &rows), rows)
                }
                None => SavedCopy::new(name, value),
            };
            (path.clone(), copy.with_trainable(first))
        })
        .collect();
    Ok((
        attach_adapters(snapshot, adapters, copies, residuals),
        report,
    ))
}

/// Put new adapters (weight path, adapter) and copies of `modules_to_save` (parameter path,
/// copy) on the model a snapshot was taken of, and replace the stored bases in `bases`: the one
/// way adapters are added. Each new adapter is active when
/// it is the model's first, and inactive otherwise; its trainability is the caller's. The
/// first adapters of a model freeze every base parameter.
pub(crate) fn attach_adapters<M: Module>(
    snapshot: Snapshot<M>,
    adapters: Vec<(String, Adapter, Option<ParamLayout>)>,
    copies: Vec<(String, SavedCopy)>,
    bases: HashMap<String, Tensor<2>>,
) -> M {
    let first = !snapshot.is_adapted();
    let mut states: HashMap<String, LoraState> = snapshot.states.iter().cloned().collect();
    for (path, adapter, layout) in adapters {
        states
            .entry(path)
            .or_insert_with(|| LoraState::new(Vec::new()).with_param_layout(layout))
            .adapters
            .push(Adapter {
                active: first,
                ..adapter
            });
    }
    for (path, copy) in copies {
        states
            .entry(path)
            .or_insert_with(|| LoraState::new(Vec::new()))
            .copies
            .push(SavedCopy {
                active: first,
                ..copy
            });
    }
    snapshot.rebuild(states, bases, first)
}

/// A fresh adapter for `layer` as `config.init` starts it, in the base's dtype, and the
/// residual base when the init rewrites it.
fn new_adapter(
    config: &LoraConfig,
    layer: &AdaptedLayer,
    name: &str,
    base: &Tensor<2>,
) -> Result<(Adapter, Option<Tensor<2>>), LoraError> {
    let scale = config.scale_for(layer.rank, layer.alpha);
    let dtype = float_dtype(base.dtype());
    if layer.kind == LayerKind::Parameter {
        // PEFT's ParamWrapper refuses the same: the update composes into the parameter, so
        // there is no input to drop out, no output to add a bias to, no norm per output.
        let refused = [
            (config.dropout > 0.0, "lora_dropout"),
            (config.use_dora, "DoRA"),
            (config.lora_bias, "lora_bias"),
            (config.init.rewrites_base(), "a PiSSA or OLoRA init"),
        ];
        if let Some((_, what)) = refused.into_iter().find(|(refused, _)| *refused) {
            return Err(LoraError::UnsupportedVariant {
                what: format!("{what} on a raw parameter (target_parameters)"),
                path: layer.path.clone(),
                adapter: name.to_string(),
            });
        }
    }
    if config.lora_bias {
        let refused = match (config.use_dora, layer.fast_path) {
            (true, _) => Some("lora_bias with DoRA (PEFT does not support it either)".to_string()),
            (false, false) => Some(format!(
                "lora_bias on a {} (it computes through its weight alone; a bias on B needs a \
                 LoraLinear, as in burn_lora::nn's blocks)",
                layer.module_type
            )),
            (false, true) => None,
        };
        if let Some(what) = refused {
            return Err(LoraError::UnsupportedVariant {
                what,
                path: layer.path.clone(),
                adapter: name.to_string(),
            });
        }
    }
    let site = Site {
        kind: layer.kind,
        path: &layer.path,
        adapter: name,
        rank: layer.rank,
        experts: layer.experts,
        scale,
    };
    let start = init::start(config.init, &site, base, dtype)?;
    let residual_init = start.residual.as_ref().map(|_| ResidualInit {
        lora_a: start.lora_a.clone(),
        lora_b: start.lora_b.clone(),
        method: config.init.peft_name(),
        base: base.clone(),
    });
    let adapter = Adapter::new(
        name,
        start.lora_a,
        start.lora_b,
        scale,
        layer.alpha,
        config.use_rslora,
        config.dropout,
    )
    .with_residual_init(residual_init)
    .with_experts(layer.experts);
    let adapter = match config.lora_bias {
        true => {
            let zeros = Tensor::<1>::zeros([layer.d_out], &base.device()).cast(dtype);
            adapter.with_lora_bias(zeros)
        }
        false => adapter,
    };
    if !config.use_dora {
        return Ok((adapter, start.residual));
    }
    let stored = start.residual.clone().unwrap_or_else(|| base.clone());
    // Computed from the weight, it must not carry the weight's graph into a new leaf.
    let magnitude = adapter.initial_magnitude(&stored).cast(dtype).detach();
    if !magnitude.clone().is_finite().all().into_scalar::<bool>() {
        return Err(LoraError::NonFiniteAdapter {
            path: layer.path.clone(),
            adapter: name.to_string(),
        });
    }
    Ok((adapter.with_magnitude(magnitude), start.residual))
}

/// The rows `rows` of the parameter at `path`, whose stored values `flat` are flattened:
/// `[rows, width]`.
fn select_rows<M: Module>(
    flat: Tensor<1>,
    path: &str,
    snapshot: &Snapshot<M>,
    rows: &[usize],
) -> Tensor<2> {
    let site = (snapshot.survey.params.iter())
        .find(|site| site.path == path)
        .expect("copies sit on parameters of the model");
    let (height, width) = (site.dims[0], site.dims[1..].iter().product::<usize>());
    let indices = row_indices(rows, &flat.device());
    flat.reshape([height, width]).select(0, indices)
}
