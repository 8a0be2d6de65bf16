//! Walking a whole model: planning, attaching, merging, unmerging and unloading adapters.
//!
//! This file knows module paths and Burn's traversal; the math of one adapted weight lives in
//! [`adapter`](crate::adapter).
//!
//! Burn lets a mapper attach a reparameterization to a parameter that has none, and lets
//! `materialize` remove them all; it cannot replace one in place. So every change of adapter
//! structure or of the stored base (merge, unmerge, unload) is a rebuild: take the states off
//! ([`detach_states`]), decide the new states and bases, then attach them again. The rebuild
//! keeps every `ParamId`, so optimizer state survives it. All checks run before anything is
//! rebuilt, and the operations take `&self`, so a failure leaves the caller's model as it was.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId, Reparameterization, Reparameterizer};
use burn::nn::DropoutConfig;
use burn::tensor::{DType, Distribution, FloatDType, Tensor};

use crate::adapter::detaching::detach_states;
use crate::targets::CompiledTarget;
use crate::{
    AdaptedLayer, DEFAULT_ADAPTER, LoraAdapter, LoraConfig, LoraError, LoraInit, LoraReport,
    LoraState, SkippedModule, Target, TargetMatch,
};

/// Module types whose `weight` LoRA adapts.
const LINEAR_TYPES: [&str; 2] = ["Linear", "LoraLinear"];

/// A float parameter of the model, as the survey saw it.
struct ParamSite {
    /// Full parameter path, e.g. `encoder.query.weight`.
    path: String,
    /// Type of the module that owns it, e.g. `Linear`.
    owner: String,
    dims: Vec<usize>,
}

impl ParamSite {
    /// Path of the owning module: the parameter path without its last segment.
    fn module_path(&self) -> &str {
        self.path.rsplit_once('.').map_or("", |(module, _)| module)
    }

    fn is_linear_weight(&self) -> bool {
        self.path.rsplit('.').next() == Some("weight")
            && self.dims.len() == 2
            && LINEAR_TYPES.contains(&self.owner.as_str())
    }
}

/// Everything one visit of the model learns.
#[derive(Default)]
struct Survey {
    /// Base parameters, in module order; parameters inside reparameterizations are left out.
    params: Vec<ParamSite>,
    /// Parameter path → name of the reparameterization it carries.
    reparameterized: HashMap<String, String>,
    /// `lora_a` id of a state's first adapter → path of the weight carrying the state.
    state_paths: HashMap<ParamId, String>,
    base_params: usize,
}

impl Survey {
    fn of<M: Module>(model: &M) -> Self {
        let mut surveyor = Surveyor::default();
        model.visit(&mut surveyor);
        surveyor.survey
    }
}

#[derive(Default)]
struct Surveyor {
    survey: Survey,
    /// (segment name, container type the segment was entered from)
    stack: Vec<(String, String)>,
    /// Path of the last base parameter visited outside a reparameterization.
    last_param: Option<String>,
}

impl Surveyor {
    fn path(&self) -> String {
        let names: Vec<&str> = self.stack.iter().map(|(name, _)| name.as_str()).collect();
        names.join(".")
    }

    /// The `(path of the carrying weight, reparameterization name)` when inside one.
    fn enclosing_reparameterization(&self) -> Option<(String, &str)> {
        let index = self
            .stack
            .iter()
            .position(|(_, container)| container == "Reparameterization")?;
        let names: Vec<&str> = self.stack[..index]
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        Some((names.join("."), self.stack[index].0.as_str()))
    }
}

impl ModuleVisitor for Surveyor {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if container_type == "Reparameterization"
            && let Some(path) = self.last_param.take()
        {
            self.survey.reparameterized.insert(path, name.to_string());
        }
        self.stack
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path();
        if let Some((weight_path, name)) = self.enclosing_reparameterization() {
            // Our states lay out `adapters.<i>.lora_a`; the first adapter's A identifies the state.
            if name == LoraState::NAME
                && path == format!("{weight_path}.{}.adapters.0.lora_a", name)
            {
                self.survey.state_paths.insert(param.id, weight_path);
            }
            return;
        }
        let dims = param.lazy_shape().to_vec();
        self.survey.base_params += dims.iter().product::<usize>();
        let owner = self
            .stack
            .last()
            .map(|(_, container)| container.rsplit(':').next().unwrap_or("").to_string())
            .unwrap_or_default();
        self.survey.params.push(ParamSite {
            path: path.clone(),
            owner,
            dims,
        });
        self.last_param = Some(path);
    }
}

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
        let is_linear = site.is_linear_weight();
        let Some(hits) = targets.included_by(module_path, is_linear) else {
            continue;
        };
        if !is_linear {
            // A target names this module, but it is no linear weight (a bias, an embedding, a
            // norm...). Say so once per module rather than adapting it.
            if !report.skipped.iter().any(|s| s.path == module_path) {
                report.skipped.push(SkippedModule {
                    path: module_path.to_string(),
                    module_type: site.owner.clone(),
                    reason: "LoRA adapts the 2-D weights of linear layers only".into(),
                });
            }
            continue;
        }
        let mut matched = hits;
        let rank = match first_match(&rank_patterns, module_path) {
            Some((index, rank)) => {
                matched.push(rank_offset + index);
                rank
            }
            None => config.rank,
        };
        let alpha = match first_match(&alpha_patterns, module_path) {
            Some((index, alpha)) => {
                matched.push(alpha_offset + index);
                alpha
            }
            None => config.effective_alpha(),
        };
        let (d_in, d_out) = (site.dims[0], site.dims[1]);
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
            d_in,
            d_out,
            rank,
            alpha,
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

/// The first override whose target selects the linear layer at `path`, with its index.
fn first_match<T: Copy>(overrides: &[(CompiledTarget, T)], path: &str) -> Option<(usize, T)> {
    overrides
        .iter()
        .enumerate()
        .find(|(_, (target, _))| target.matches(path, true))
        .map(|(index, (_, value))| (index, *value))
}

/// Up to five linear-layer paths, the ones whose last segment is closest to the target first.
fn nearest_linear_paths(target: &Target, survey: &Survey) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = survey
        .params
        .iter()
        .filter(|site| site.is_linear_weight())
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
    let report = plan(config, &model)?;
    let layers: HashMap<String, &AdaptedLayer> = report
        .layers
        .iter()
        .map(|layer| (format!("{}.weight", layer.path), layer))
        .collect();
    let model = model.apply_reparameterization(Attach {
        config,
        layers: &layers,
    });
    Ok((model, report))
}

/// Freezes every float parameter and creates a fresh adapter on each planned weight.
struct Attach<'a> {
    config: &'a LoraConfig,
    layers: &'a HashMap<String, &'a AdaptedLayer>,
}

impl Reparameterizer for Attach<'_> {
    type Reparam = LoraState;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraState>) {
        let param = param.set_require_grad(false);
        let Some(layer) = self.layers.get(path) else {
            return (param, None);
        };
        let device = param.lazy_device();
        let dtype = param.base().dtype();
        let (d_in, d_out, rank) = (layer.d_in, layer.d_out, layer.rank);
        let distribution = match self.config.init {
            LoraInit::KaimingUniform => {
                let bound = 1.0 / (d_in as f64).sqrt();
                Distribution::Uniform(-bound, bound)
            }
            LoraInit::Gaussian => Distribution::Normal(0.0, 1.0 / rank as f64),
        };
        let factors_dtype = match dtype {
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 => FloatDType::from(dtype),
            _ => FloatDType::F32,
        };
        let lora_a = Tensor::<2>::random([d_in, rank], distribution, &device).cast(factors_dtype);
        let lora_b = Tensor::<2>::zeros([rank, d_out], &device).cast(factors_dtype);
        let adapter = LoraAdapter {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            scale: self.config.scale_for(rank, layer.alpha),
            alpha: layer.alpha,
            dropout: DropoutConfig::new(self.config.dropout).init(),
            name: DEFAULT_ADAPTER.to_string(),
            merged: false,
        };
        (
            param,
            Some(LoraState {
                adapters: vec![adapter],
            }),
        )
    }
}

/// A summary of one adapter on one weight, from [`LoraModule::lora_adapters`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    /// Module path of the adapted layer.
    pub path: String,
    /// Name of the adapter.
    pub name: String,
    /// Its rank.
    pub rank: usize,
    /// Its scale, `alpha / r` or `alpha / √r`.
    pub scale: f64,
    /// Whether it is folded into the base weight.
    pub merged: bool,
}

/// LoRA operations on any Burn module that carries adapters from
/// [`LoraConfig::apply`](crate::LoraConfig::apply).
///
/// Implemented for every [`Module`]. The operations return a new module and leave `self` as it
/// was, so a failed merge loses nothing; Burn modules share their tensors, so the copy is cheap.
pub trait LoraModule: Module + Sized {
    /// Fold every unmerged adapter into its base weight: `W ← W + s·A·B`, computed in f32.
    ///
    /// The merged model costs exactly what the plain model costs. The adapters stay attached,
    /// so [`unmerge_lora`](Self::unmerge_lora) can take the update out again.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`], [`LoraError::AlreadyMerged`] when every adapter is merged, and
    /// [`LoraError::NonFiniteMerge`] when a result would hold NaN or Inf (then nothing merges).
    fn merge_lora(&self) -> Result<Self, LoraError>;

    /// Take every merged adapter back out of its base weight: `W ← W - s·A·B`.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`], and [`LoraError::NothingMerged`] when no adapter is merged.
    fn unmerge_lora(&self) -> Result<Self, LoraError>;

    /// Merge the unmerged adapters, then drop every adapter: a plain model with the fine-tuned
    /// weights.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`] and [`LoraError::NonFiniteMerge`].
    fn merge_and_unload_lora(&self) -> Result<Self, LoraError>;

    /// Drop every adapter and return the base model as it was before `apply`: merged adapters
    /// are taken out of their weights first.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`] and [`LoraError::NonFiniteMerge`].
    fn unload_lora(&self) -> Result<Self, LoraError>;

    /// The adapters attached to the model, one entry per adapted weight and adapter.
    fn lora_adapters(&self) -> Vec<AdapterInfo>;
}

impl<M: Module> LoraModule for M {
    fn merge_lora(&self) -> Result<Self, LoraError> {
        rebuild(self, Rebuild::Merge)
    }

    fn unmerge_lora(&self) -> Result<Self, LoraError> {
        rebuild(self, Rebuild::Unmerge)
    }

    fn merge_and_unload_lora(&self) -> Result<Self, LoraError> {
        rebuild(self, Rebuild::MergeAndUnload)
    }

    fn unload_lora(&self) -> Result<Self, LoraError> {
        rebuild(self, Rebuild::Unload)
    }

    fn lora_adapters(&self) -> Vec<AdapterInfo> {
        let survey = Survey::of(self);
        let (_, states) = detach_states(self.clone());
        let mut infos = Vec::new();
        for state in &states {
            let path = state_path(&survey, state);
            for adapter in &state.adapters {
                infos.push(AdapterInfo {
                    path: module_path_of(&path).to_string(),
                    name: adapter.name.clone(),
                    rank: adapter.rank(),
                    scale: adapter.scale,
                    merged: adapter.merged,
                });
            }
        }
        infos
    }
}

/// The structural operations, each a rebuild.
#[derive(Clone, Copy, PartialEq)]
enum Rebuild {
    Merge,
    Unmerge,
    MergeAndUnload,
    Unload,
}

impl Rebuild {
    /// Which adapters of `state` to fold into the base, with which sign, and whether the
    /// adapters stay attached afterwards.
    fn edit(self, state: &LoraState) -> (Vec<usize>, f64, bool) {
        let select = |merged: bool| -> Vec<usize> {
            (0..state.adapters.len())
                .filter(|&index| state.adapters[index].merged == merged)
                .collect()
        };
        match self {
            Rebuild::Merge => (select(false), 1.0, true),
            Rebuild::Unmerge => (select(true), -1.0, true),
            Rebuild::MergeAndUnload => (select(false), 1.0, false),
            Rebuild::Unload => (select(true), -1.0, false),
        }
    }
}

/// The new base (if it changes) and the state to attach (if any) of one adapted weight.
type WeightEdit = (Option<Tensor<2>>, Option<LoraState>);

fn rebuild<M: Module>(model: &M, operation: Rebuild) -> Result<M, LoraError> {
    let survey = Survey::of(model);
    if survey.state_paths.is_empty() {
        return Err(LoraError::NoAdapters);
    }
    let (plain, states) = detach_states(model.clone());
    let paths: Vec<String> = states
        .iter()
        .map(|state| state_path(&survey, state))
        .collect();
    let mut bases = collect_bases(&plain, &paths);

    // Everything is computed and checked before the model is rebuilt.
    let mut edits: HashMap<String, WeightEdit> = HashMap::new();
    let mut folded_any = false;
    for (mut state, path) in states.into_iter().zip(paths) {
        let (fold, sign, keep) = operation.edit(&state);
        let base = match fold.is_empty() {
            true => None,
            false => {
                folded_any = true;
                let base = bases
                    .remove(&path)
                    .expect("every adapted weight is a 2-D parameter of the model");
                let folded = state.fold_into_base(module_path_of(&path), base, &fold, sign)?;
                Some(folded.detach())
            }
        };
        for index in fold {
            state.adapters[index].merged = sign > 0.0;
        }
        edits.insert(path, (base, keep.then_some(state)));
    }
    match operation {
        Rebuild::Merge if !folded_any => return Err(LoraError::AlreadyMerged),
        Rebuild::Unmerge if !folded_any => return Err(LoraError::NothingMerged),
        _ => {}
    }
    Ok(plain.apply_reparameterization(Reattach { edits }))
}

/// The weight path a captured state belongs to.
fn state_path(survey: &Survey, state: &LoraState) -> String {
    let id = state.adapters[0].lora_a.id;
    survey
        .state_paths
        .get(&id)
        .cloned()
        .expect("the survey sees every state that materialize captures")
}

fn module_path_of(param_path: &str) -> &str {
    param_path.rsplit_once('.').map_or("", |(module, _)| module)
}

/// The stored values of the 2-D parameters at `paths`.
fn collect_bases<M: Module>(model: &M, paths: &[String]) -> HashMap<String, Tensor<2>> {
    struct Collector<'a> {
        paths: &'a [String],
        stack: Vec<String>,
        bases: HashMap<String, Tensor<2>>,
    }
    impl ModuleVisitor for Collector<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.stack.join(".");
            if D == 2 && self.paths.contains(&path) {
                let [d_in, d_out] = param.shape().dims::<2>();
                self.bases.insert(path, param.val().reshape([d_in, d_out]));
            }
        }
    }
    let mut collector = Collector {
        paths,
        stack: Vec::new(),
        bases: HashMap::new(),
    };
    model.visit(&mut collector);
    collector.bases
}

/// Puts edited bases and states back onto a model whose states were detached.
struct Reattach {
    edits: HashMap<String, WeightEdit>,
}

impl Reparameterizer for Reattach {
    type Reparam = LoraState;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraState>) {
        match self.edits.remove(path) {
            None => (param, None),
            Some((base, state)) => {
                let param = match base {
                    Some(base) => {
                        let shape = param.shape();
                        param.map(|_| base.reshape(shape))
                    }
                    None => param,
                };
                (param, state)
            }
        }
    }
}
