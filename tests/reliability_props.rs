//! Reliability, by property: random sequences of every `LoraModule` operation (add, activate,
//! select the trainable ones, disable and enable, merge and unmerge, delete, a weighted `Cat`
//! combination, a PEFT save followed by a load, a mixed batch) on a model with a fast-path
//! projection (`LoraLinear`) and a dense-path one (`Linear`). After every step it proves:
//!
//! 1. both outputs equal the naive f64 reference `x·W0 + b + Σ s·x·A·B` over the adapters that
//!    are merged or active and enabled, with `W0` the base recorded before the first adapter
//!    and `A`, `B` read from the model as it is now; a mixed batch equals, sample by sample,
//!    `x_i·W0 + b + s·x_i·A·B` for that sample's adapter alone;
//! 2. the original base comes back bit for bit: `unload_lora` gives exactly `W0`'s data and no
//!    adapter, and while nothing is merged the stored base is `W0` itself;
//! 3. nothing panics: each operation returns `Ok`, or the typed `LoraError` that the trait's
//!    documentation names for that state, and the model it borrowed is unchanged bit for bit.
//!
//! Which operations succeed, and every adapter's rank, scale and flags, come from a shadow
//! state that follows the documented semantics, kept beside the model and never read from it.
//! Every value (base, factors, input) comes from the case's seed, so a failing case replays.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::{Device, Tensor, TensorData};
use burn_lora::peft::{load_adapter, save_adapter};
use burn_lora::{AdapterInfo, Combination, LoraConfig, LoraError, LoraModule, Targets};
use common::{HostTensor, Projections, base_data, raw_data, values};
use proptest::arbitrary::any;
use proptest::strategy::{Just, Strategy};
use proptest::test_runner::{
    Config as RunnerConfig, RngAlgorithm, RngSeed, TestCaseError, TestRunner,
};

const D_IN: usize = 6;
const D_OUT: usize = 5;
/// Four samples, so that a mixed batch can give each its own adapter.
const BATCH: usize = 4;
const LAYERS: [&str; 2] = ["query", "value"];
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const ALPHAS: [f64; 3] = [1.0, 2.0, 4.0];
/// Combination weights; none above 1 in size, so nested combinations do not grow.
const WEIGHTS: [f64; 3] = [1.0, 0.5, -0.75];
const SEQUENCES: u32 = 256;

/// Outputs in f32 against the f64 reference, with inputs in [-1, 1), base and factor entries in
/// [-0.5, 0.5) and scales up to 4: outputs are of size ~1, f32 rounding leaves ~1e-6, and 1e-4
/// (max absolute error) still catches any missing or doubled adapter term (~1e-1).
const OUTPUT_TOLERANCE: f64 = 1e-4;
/// A `Cat` combination's `s·A·B` against the exact `Σ wᵢ·sᵢ·Aᵢ·Bᵢ` (max absolute error): the
/// combination is exact in f64 and only rounds its factors to f32 (~1e-7 here).
const DELTA_TOLERANCE: f64 = 1e-5;
/// Scales are `alpha / r` or `alpha / √r` in f64, and survive a PEFT file exactly; relative.
const SCALE_TOLERANCE: f64 = 1e-12;

/// One operation of a sequence.
#[derive(Debug, Clone)]
enum Op {
    Add {
        name: &'static str,
        rank: usize,
        alpha: f64,
        rslora: bool,
    },
    SetActive(Vec<&'static str>),
    SetTrainable(Vec<&'static str>),
    Disable,
    Enable,
    Merge,
    Unmerge,
    Delete(&'static str),
    Combine {
        x: &'static str,
        wx: f64,
        y: &'static str,
        wy: f64,
        new: &'static str,
    },
    SaveLoad {
        source: &'static str,
        new: &'static str,
    },
    Mixed(Vec<Option<&'static str>>),
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Add { .. } => "add_adapter",
            Op::SetActive(_) => "set_active",
            Op::SetTrainable(_) => "set_trainable",
            Op::Disable => "disable_adapters",
            Op::Enable => "enable_adapters",
            Op::Merge => "merge_lora",
            Op::Unmerge => "unmerge_lora",
            Op::Delete(_) => "delete_adapter",
            Op::Combine { .. } => "add_weighted_adapter",
            Op::SaveLoad { .. } => "save+load",
            Op::Mixed(_) => "mixed_batch",
        }
    }
}

fn name() -> impl Strategy<Value = &'static str> {
    (0..NAMES.len()).prop_map(|i| NAMES[i])
}

fn names(count: RangeInclusive<usize>) -> impl Strategy<Value = Vec<&'static str>> {
    proptest::collection::vec(name(), count)
}

fn weight() -> impl Strategy<Value = f64> {
    (0..WEIGHTS.len()).prop_map(|i| WEIGHTS[i])
}

fn add() -> impl Strategy<Value = Op> {
    (name(), 1..=3usize, 0..ALPHAS.len(), any::<bool>()).prop_map(|(name, rank, alpha, rslora)| {
        Op::Add {
            name,
            rank,
            alpha: ALPHAS[alpha],
            rslora,
        }
    })
}

fn op() -> impl Strategy<Value = Op> {
    proptest::prop_oneof![
        3 => add(),
        2 => names(1..=2).prop_map(Op::SetActive),
        1 => names(0..=2).prop_map(Op::SetTrainable),
        1 => Just(Op::Disable),
        1 => Just(Op::Enable),
        2 => Just(Op::Merge),
        2 => Just(Op::Unmerge),
        1 => name().prop_map(Op::Delete),
        2 => (name(), weight(), name(), weight(), name())
            .prop_map(|(x, wx, y, wy, new)| Op::Combine { x, wx, y, wy, new }),
        2 => (name(), name()).prop_map(|(source, new)| Op::SaveLoad { source, new }),
        2 => proptest::collection::vec(proptest::option::of(name()), BATCH).prop_map(Op::Mixed),
    ]
}

/// What the documentation says one adapter should look like.
#[derive(Debug, Clone)]
struct Expected {
    name: String,
    rank: usize,
    scale: f64,
    active: bool,
    trainable: bool,
    merged: bool,
}

/// The model's adapters as the documented semantics predict them, in the order added.
#[derive(Debug, Clone)]
struct Shadow {
    adapters: Vec<Expected>,
    enabled: bool,
}

impl Shadow {
    fn index(&self, name: &str) -> Option<usize> {
        self.adapters.iter().position(|a| a.name == name)
    }

    fn knows(&self, name: &str) -> bool {
        self.index(name).is_some()
    }

    fn any_merged(&self) -> bool {
        self.adapters.iter().any(|a| a.merged)
    }

    /// Whether the adapter shapes the output: folded into the base, or active and enabled.
    fn shapes_output(&self, adapter: &Expected) -> bool {
        adapter.merged || (adapter.active && self.enabled)
    }

    fn push(&mut self, name: &str, rank: usize, scale: f64, first: bool) {
        self.adapters.push(Expected {
            name: name.to_string(),
            rank,
            scale,
            active: first,
            trainable: first,
            merged: false,
        });
    }
}

/// Whether `names` lists the adapter.
fn chosen(names: &[&str], adapter: &Expected) -> bool {
    names.iter().any(|name| *name == adapter.name)
}

fn scale(rank: usize, alpha: f64, rslora: bool) -> f64 {
    match rslora {
        true => alpha / (rank as f64).sqrt(),
        false => alpha / rank as f64,
    }
}

/// The outcome the documentation predicts for `op` on a model in state `shadow`: the next
/// state, or the name of the `LoraError` variant it returns.
fn predict(op: &Op, shadow: &Shadow) -> Result<Shadow, &'static str> {
    let mut next = shadow.clone();
    match op {
        // "The first adapter of a model ... is active and trainable. A later one starts inactive
        // and frozen." AdapterExists for a taken name.
        Op::Add {
            name,
            rank,
            alpha,
            rslora,
        } => {
            if shadow.knows(name) {
                return Err("AdapterExists");
            }
            let first = shadow.adapters.is_empty();
            next.push(name, *rank, scale(*rank, *alpha, *rslora), first);
        }
        // Exactly these active, and trainable; UnknownAdapter, then AdaptersMerged.
        Op::SetActive(names) => {
            if names.iter().any(|n| !shadow.knows(n)) {
                return Err("UnknownAdapter");
            }
            if shadow.any_merged() {
                return Err("AdaptersMerged");
            }
            for adapter in &mut next.adapters {
                adapter.active = chosen(names, adapter);
                adapter.trainable = adapter.active;
            }
        }
        // Exactly these trainable, activity unchanged; UnknownAdapter.
        Op::SetTrainable(names) => {
            if names.iter().any(|n| !shadow.knows(n)) {
                return Err("UnknownAdapter");
            }
            for adapter in &mut next.adapters {
                adapter.trainable = chosen(names, adapter);
            }
        }
        Op::Disable => {
            if shadow.any_merged() {
                return Err("AdaptersMerged");
            }
            next.enabled = false;
        }
        Op::Enable => next.enabled = true,
        // Folds every active, unmerged adapter; AdaptersDisabled, AlreadyMerged when nothing
        // is left to merge.
        Op::Merge => {
            if !shadow.enabled {
                return Err("AdaptersDisabled");
            }
            let mut merged_any = false;
            for adapter in &mut next.adapters {
                if adapter.active && !adapter.merged {
                    adapter.merged = true;
                    merged_any = true;
                }
            }
            if !merged_any {
                return Err("AlreadyMerged");
            }
        }
        Op::Unmerge => {
            if !shadow.any_merged() {
                return Err("NothingMerged");
            }
            for adapter in &mut next.adapters {
                adapter.merged = false;
            }
        }
        // UnknownAdapter; DeleteActive for an active one (disabled or not).
        Op::Delete(name) => {
            let Some(index) = shadow.index(name) else {
                return Err("UnknownAdapter");
            };
            if shadow.adapters[index].active {
                return Err("DeleteActive");
            }
            next.adapters.remove(index);
        }
        // Cat: the ranks add up, scale 1, a new inactive and frozen adapter.
        Op::Combine { x, y, new, .. } => {
            let (Some(ix), Some(iy)) = (shadow.index(x), shadow.index(y)) else {
                return Err("UnknownAdapter");
            };
            if shadow.knows(new) {
                return Err("AdapterExists");
            }
            let rank = shadow.adapters[ix].rank + shadow.adapters[iy].rank;
            next.push(new, rank, 1.0, false);
        }
        // The save refuses an unknown adapter; the load a taken name. A loaded adapter joins
        // inactive and frozen, with the saved rank and scale.
        Op::SaveLoad { source, new } => {
            let Some(index) = shadow.index(source) else {
                return Err("UnknownAdapter");
            };
            if shadow.knows(new) {
                return Err("AdapterExists");
            }
            let saved = &shadow.adapters[index];
            next.push(new, saved.rank, saved.scale, false);
        }
        // UnknownAdapter, then AdaptersMerged; the model does not change.
        Op::Mixed(routes) => {
            if routes.iter().flatten().any(|n| !shadow.knows(n)) {
                return Err("UnknownAdapter");
            }
            if shadow.any_merged() {
                return Err("AdaptersMerged");
            }
        }
    }
    Ok(next)
}

/// The new model, and for a mixed batch the query layer's routed output.
type Outcome = Result<(Projections, Option<Tensor<2>>), LoraError>;

/// A new model, no routed output.
fn plain(model: Projections) -> (Projections, Option<Tensor<2>>) {
    (model, None)
}

fn perform(op: &Op, model: &Projections, ctx: &Ctx) -> Outcome {
    match op {
        Op::Add {
            name,
            rank,
            alpha,
            rslora,
        } => {
            let config = LoraConfig::new(*rank)
                .with_alpha(Some(*alpha))
                .with_use_rslora(*rslora)
                .with_targets(Targets::attention_qv());
            model.add_adapter(name, &config).map(|(m, _)| plain(m))
        }
        Op::SetActive(names) => model.set_active(names).map(plain),
        Op::SetTrainable(names) => model.set_trainable(names).map(plain),
        Op::Disable => model.disable_adapters().map(plain),
        Op::Enable => model.enable_adapters().map(plain),
        Op::Merge => model.merge_lora().map(plain),
        Op::Unmerge => model.unmerge_lora().map(plain),
        Op::Delete(name) => model.delete_adapter(name).map(plain),
        Op::Combine { x, wx, y, wy, new } => model
            .add_weighted_adapter(&[(*x, *wx), (*y, *wy)], new, Combination::Cat)
            .map(|(m, _)| plain(m)),
        Op::SaveLoad { source, new } => {
            save_adapter(model, &ctx.dir, source)?;
            load_adapter(model, &ctx.dir, new).map(|(m, _)| plain(m))
        }
        Op::Mixed(routes) => {
            let batch = model.mixed_batch(routes)?;
            let output = model.query.forward_mixed(ctx.x.clone(), &batch);
            Ok((model.clone(), Some(output)))
        }
    }
}

/// What one case starts from.
struct Ctx {
    x: Tensor<2>,
    host_x: HostTensor,
    /// The base parameters before the first adapter, by path: `W0` and `b` in f64...
    w0: BTreeMap<String, HostTensor>,
    /// ... and their raw data, for bit-exact comparisons.
    w0_raw: BTreeMap<String, TensorData>,
    /// The plain model's outputs `(query, value)`, raw.
    base_out: (TensorData, TensorData),
    dir: PathBuf,
}

/// Deterministic values from a case's seed (SplitMix64): 24-bit uniforms in [-0.5, 0.5),
/// exact in f32.
struct Stream(u64);

impl Stream {
    fn value(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn take(&mut self, count: usize) -> Vec<f32> {
        (0..count).map(|_| self.value()).collect()
    }
}

/// Replace the float parameters at exactly these paths with these values (keeping each one's
/// id and gradient setting); fails unless every path was found.
fn set_params<M: Module>(model: M, new: &BTreeMap<String, Vec<f32>>) -> Result<M, String> {
    struct Setter<'a> {
        stack: Vec<String>,
        new: &'a BTreeMap<String, Vec<f32>>,
        found: usize,
    }
    impl ModuleMapper for Setter<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(values) = self.new.get(&self.stack.join(".")) else {
                return param;
            };
            self.found += 1;
            let values = values.clone();
            param.map(move |tensor| {
                let require_grad = tensor.is_require_grad();
                let data = TensorData::new(values, tensor.dims());
                Tensor::<D>::from_data(data, &tensor.device()).set_require_grad(require_grad)
            })
        }
    }
    let mut setter = Setter {
        stack: Vec::new(),
        new,
        found: 0,
    };
    let model = model.map(&mut setter);
    match setter.found == new.len() {
        true => Ok(model),
        false => Err(format!(
            "set {} of the parameters {:?}",
            setter.found,
            new.keys().collect::<Vec<_>>()
        )),
    }
}

fn factor_path(layer: &str, index: usize, factor: &str) -> String {
    format!("{layer}.weight.burn_lora.adapters.{index}.{factor}")
}

/// `(A, B)` of the adapter at `index` on `layer`.
fn factors<'a>(
    params: &'a BTreeMap<String, HostTensor>,
    layer: &str,
    index: usize,
) -> Result<(&'a HostTensor, &'a HostTensor), String> {
    let a = factor(params, layer, index, "lora_a")?;
    let b = factor(params, layer, index, "lora_b")?;
    Ok((a, b))
}

fn factor<'a>(
    params: &'a BTreeMap<String, HostTensor>,
    layer: &str,
    index: usize,
    which: &str,
) -> Result<&'a HostTensor, String> {
    let path = factor_path(layer, index, which);
    params
        .get(&path)
        .ok_or_else(|| format!("the model has no parameter `{path}`"))
}

/// `max |a - b|`, infinite when the shapes differ.
fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f64 {
    if a.dims != b.dims {
        return f64::INFINITY;
    }
    a.values
        .iter()
        .zip(&b.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn close(scale: f64, expected: f64) -> bool {
    (scale - expected).abs() <= SCALE_TOLERANCE * expected.abs().max(1.0)
}

/// Naive f64 `x·W0 + b + Σ s·x·A·B` for `layer`, over the adapters `include` picks, with `A`,
/// `B` from `params` (the model now) and `s` from the shadow.
fn reference(
    ctx: &Ctx,
    params: &BTreeMap<String, HostTensor>,
    shadow: &Shadow,
    layer: &str,
    x: &HostTensor,
    include: impl Fn(&Expected) -> bool,
) -> Result<HostTensor, String> {
    let mut y = x
        .matmul(&ctx.w0[&format!("{layer}.weight")])
        .add_row(&ctx.w0[&format!("{layer}.bias")]);
    for (index, adapter) in shadow.adapters.iter().enumerate() {
        if include(adapter) {
            let (a, b) = factors(params, layer, index)?;
            y = y.add(&x.matmul(a).matmul(b).scale(adapter.scale));
        }
    }
    Ok(y)
}

/// Everything an operation must leave as it was in the model it borrowed.
struct Before {
    raw: BTreeMap<String, TensorData>,
    outputs: (TensorData, TensorData),
    adapters: Vec<AdapterInfo>,
}

impl Before {
    fn of(model: &Projections, ctx: &Ctx) -> Self {
        let (query, value) = model.outputs(ctx.x.clone());
        Self {
            raw: raw_data(model),
            outputs: (query.into_data(), value.into_data()),
            adapters: model.lora_adapters(),
        }
    }

    fn unchanged(&self, model: &Projections, ctx: &Ctx) -> Result<(), String> {
        let after = Self::of(model, ctx);
        if after.raw != self.raw {
            return Err("the borrowed model's parameters changed".into());
        }
        if after.outputs != self.outputs {
            return Err("the borrowed model's outputs changed".into());
        }
        if after.adapters != self.adapters {
            return Err(format!(
                "the borrowed model's adapters changed: {:?} -> {:?}",
                self.adapters, after.adapters
            ));
        }
        Ok(())
    }
}

/// Check a model against its shadow: adapters and flags, guarantee 1 (outputs) and guarantee
/// 2 (the base). Returns whether the adapters move the output off the plain model's.
fn check_state(model: &Projections, shadow: &Shadow, ctx: &Ctx) -> Result<bool, String> {
    let infos = model.lora_adapters();
    if infos.len() != LAYERS.len() * shadow.adapters.len() {
        return Err(format!(
            "lora_adapters() has {} entries, expected {} per layer as in {shadow:?}: {infos:?}",
            infos.len(),
            shadow.adapters.len()
        ));
    }
    for layer in LAYERS {
        let listed: Vec<&AdapterInfo> = infos.iter().filter(|i| i.path == layer).collect();
        if listed.len() != shadow.adapters.len() {
            return Err(format!("`{layer}` lists {listed:?}, expected {shadow:?}"));
        }
        for (info, expected) in listed.iter().zip(&shadow.adapters) {
            let actual = (
                info.name.as_str(),
                info.rank,
                info.active,
                info.trainable,
                info.merged,
                info.dora,
                info.residual_init.is_some(),
            );
            let wanted = (
                expected.name.as_str(),
                expected.rank,
                expected.active && shadow.enabled,
                expected.trainable,
                expected.merged,
                false,
                false,
            );
            if actual != wanted || !close(info.scale, expected.scale) {
                return Err(format!(
                    "`{layer}`: adapter (name, rank, active, trainable, merged, dora, residual) \
                     = {actual:?} with scale {}, expected {wanted:?} with scale {}",
                    info.scale, expected.scale
                ));
            }
        }
    }
    let names: Vec<String> = shadow.adapters.iter().map(|a| a.name.clone()).collect();
    if model.adapter_names() != names {
        return Err(format!(
            "adapter_names() = {:?}, expected {names:?}",
            model.adapter_names()
        ));
    }

    // 1. The outputs against the naive reference.
    let params = values(model);
    let (query, value) = model.outputs(ctx.x.clone());
    let mut moved = false;
    for (layer, output, base) in [
        ("query", query, &ctx.base_out.0),
        ("value", value, &ctx.base_out.1),
    ] {
        let expected = reference(ctx, &params, shadow, layer, &ctx.host_x, |a| {
            shadow.shapes_output(a)
        })?;
        let output = HostTensor::from(output);
        let error = max_abs_diff(&output, &expected);
        if error.is_nan() || error > OUTPUT_TOLERANCE {
            return Err(format!(
                "`{layer}` output is off the reference by {error:e} (tolerance \
                 {OUTPUT_TOLERANCE:e})"
            ));
        }
        moved |= max_abs_diff(&output, &HostTensor::from(base.clone())) > 1e-3;
    }

    // 2. The original base, bit for bit: stored while nothing is merged, and from unload.
    if !shadow.any_merged() && base_data(model) != ctx.w0_raw {
        return Err("nothing is merged, yet the stored base is not W0 bit for bit".into());
    }
    let unloaded = model
        .unload_lora()
        .map_err(|error| format!("unload_lora failed: {error:?}"))?;
    let unloaded_raw = raw_data(&unloaded);
    if unloaded_raw != ctx.w0_raw {
        let worst = ctx
            .w0
            .iter()
            .map(|(path, w0)| match unloaded_raw.get(path) {
                Some(data) => max_abs_diff(&HostTensor::from(data.clone()), w0),
                None => f64::INFINITY,
            })
            .fold(0.0, f64::max);
        return Err(format!(
            "unload_lora did not give back the original base bit for bit (max difference \
             {worst:e}; parameters {:?})",
            unloaded_raw.keys().collect::<Vec<_>>()
        ));
    }
    if !unloaded.lora_adapters().is_empty() {
        return Err("unload_lora left adapters".into());
    }
    Ok(moved)
}

/// Checks of a successful step beyond the state: factors that must not move, a combination's
/// update, a loaded adapter's factors, a mixed batch's output.
fn check_step(
    op: &Op,
    (old_model, old_shadow): (&Projections, &Shadow),
    (new_model, new_shadow): (&Projections, &Shadow),
    mixed: Option<Tensor<2>>,
    ctx: &Ctx,
) -> Result<(), String> {
    let (old_params, new_params) = (values(old_model), values(new_model));
    // Every adapter that was there keeps its factors exactly, whatever the operation.
    for (old_index, adapter) in old_shadow.adapters.iter().enumerate() {
        let Some(new_index) = new_shadow.index(&adapter.name) else {
            continue;
        };
        for layer in LAYERS {
            if factors(&old_params, layer, old_index)? != factors(&new_params, layer, new_index)? {
                return Err(format!(
                    "the factors of `{}` on `{layer}` moved",
                    adapter.name
                ));
            }
        }
    }
    let added = new_shadow.adapters.len().wrapping_sub(1);
    match op {
        Op::Combine { x, wx, y, wy, .. } => {
            let scale = new_shadow.adapters[added].scale;
            for layer in LAYERS {
                let (a, b) = factors(&new_params, layer, added)?;
                let combined = a.matmul(b).scale(scale);
                let mut exact = HostTensor {
                    dims: vec![D_IN, D_OUT],
                    values: vec![0.0; D_IN * D_OUT],
                };
                for (source, weight) in [(x, wx), (y, wy)] {
                    let index = old_shadow.index(source).expect("predicted known");
                    let (a, b) = factors(&old_params, layer, index)?;
                    let coefficient = weight * old_shadow.adapters[index].scale;
                    exact = exact.add(&a.matmul(b).scale(coefficient));
                }
                let error = max_abs_diff(&combined, &exact);
                if error.is_nan() || error > DELTA_TOLERANCE {
                    return Err(format!(
                        "`{layer}`: the Cat combination's update is off Σ w·s·A·B by {error:e}"
                    ));
                }
            }
        }
        Op::SaveLoad { source, .. } => {
            let index = old_shadow.index(source).expect("predicted known");
            for layer in LAYERS {
                if factors(&old_params, layer, index)? != factors(&new_params, layer, added)? {
                    return Err(format!(
                        "`{layer}`: the loaded factors differ from the saved `{source}`'s"
                    ));
                }
            }
        }
        Op::Mixed(routes) => {
            let output = HostTensor::from(mixed.ok_or("a mixed batch gave no output")?);
            let mut expected = HostTensor {
                dims: vec![0, D_OUT],
                values: Vec::new(),
            };
            for (sample, route) in routes.iter().enumerate() {
                let row = HostTensor {
                    dims: vec![1, D_IN],
                    values: ctx.host_x.values[sample * D_IN..(sample + 1) * D_IN].to_vec(),
                };
                let y = reference(ctx, &new_params, new_shadow, "query", &row, |a| {
                    *route == Some(a.name.as_str())
                })?;
                expected.dims[0] += 1;
                expected.values.extend(y.values);
            }
            let error = max_abs_diff(&output, &expected);
            if error.is_nan() || error > OUTPUT_TOLERANCE {
                return Err(format!(
                    "forward_mixed is off the per-sample reference by {error:e} (routes \
                     {routes:?})"
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

#[derive(Default)]
struct Stats {
    sequences: usize,
    steps: usize,
    /// Per operation: (Ok, typed errors).
    outcomes: BTreeMap<&'static str, (usize, usize)>,
    /// Steps after which the adapters moved an output off the plain model's by more than 1e-3.
    moved: usize,
    mixed_checked: usize,
}

/// One step: predict, perform, check guarantee 3 on the borrowed model, then the new state.
fn step(
    op: &Op,
    model: Projections,
    shadow: &mut Shadow,
    ctx: &Ctx,
    stream: &mut Stream,
    stats: &RefCell<Stats>,
) -> Result<Projections, String> {
    let before = Before::of(&model, ctx);
    let predicted = predict(op, shadow);
    let outcome = perform(op, &model, ctx);
    // 3. Whatever happened, the borrowed model is as it was.
    before.unchanged(&model, ctx)?;
    {
        let mut stats = stats.borrow_mut();
        stats.steps += 1;
        let counts = stats.outcomes.entry(op.kind()).or_default();
        match outcome.is_ok() {
            true => counts.0 += 1,
            false => counts.1 += 1,
        }
    }
    match (predicted, outcome) {
        (Err(expected), Err(error)) => {
            let debug = format!("{error:?}");
            let variant = debug
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or_default();
            match variant == expected {
                true => Ok(model),
                false => Err(format!("expected LoraError::{expected}, got {error:?}")),
            }
        }
        (Err(expected), Ok(_)) => Err(format!("expected LoraError::{expected}, got Ok")),
        (Ok(_), Err(error)) => Err(format!("expected Ok, got {error:?} ({error})")),
        (Ok(next), Ok((new_model, mixed))) => {
            let new_model = match op {
                // B starts at zero: give the new adapter's factors values of size ~1 (training,
                // in effect), so that activating or merging it changes the outputs.
                Op::Add { .. } => {
                    let index = next.adapters.len() - 1;
                    let rank = next.adapters[index].rank;
                    let mut fresh = BTreeMap::new();
                    for layer in LAYERS {
                        fresh.insert(
                            factor_path(layer, index, "lora_a"),
                            stream.take(D_IN * rank),
                        );
                        fresh.insert(
                            factor_path(layer, index, "lora_b"),
                            stream.take(rank * D_OUT),
                        );
                    }
                    set_params(new_model, &fresh)?
                }
                _ => new_model,
            };
            if matches!(op, Op::Mixed(_)) {
                stats.borrow_mut().mixed_checked += 1;
            }
            let old_shadow: &Shadow = shadow;
            check_step(op, (&model, old_shadow), (&new_model, &next), mixed, ctx)?;
            if check_state(&new_model, &next, ctx)? {
                stats.borrow_mut().moved += 1;
            }
            *shadow = next;
            Ok(new_model)
        }
    }
}

fn run_sequence(
    seed: u64,
    ops: &[Op],
    dir: &std::path::Path,
    stats: &RefCell<Stats>,
) -> Result<(), String> {
    stats.borrow_mut().sequences += 1;
    let device = Device::flex();
    let mut stream = Stream(seed);
    let mut base = BTreeMap::new();
    for layer in LAYERS {
        base.insert(format!("{layer}.weight"), stream.take(D_IN * D_OUT));
        base.insert(format!("{layer}.bias"), stream.take(D_OUT));
    }
    let model = set_params(Projections::new(D_IN, D_OUT, &device), &base)?;
    let x_values: Vec<f32> = stream.take(BATCH * D_IN).iter().map(|v| 2.0 * v).collect();
    let x = Tensor::<2>::from_data(TensorData::new(x_values, [BATCH, D_IN]), &device);
    let (query, value) = model.outputs(x.clone());
    let ctx = Ctx {
        host_x: HostTensor::from(x.clone()),
        x,
        w0: values(&model),
        w0_raw: raw_data(&model),
        base_out: (query.into_data(), value.into_data()),
        dir: dir.to_path_buf(),
    };
    if ctx.w0_raw.len() != 4 {
        return Err(format!(
            "expected 4 base parameters, got {:?}",
            ctx.w0_raw.keys()
        ));
    }

    let mut model = model;
    let mut shadow = Shadow {
        adapters: Vec::new(),
        enabled: true,
    };
    for (index, op) in ops.iter().enumerate() {
        model = step(op, model, &mut shadow, &ctx, &mut stream, stats)
            .map_err(|error| format!("step {index}, {op:?}: {error}\nsequence: {ops:?}"))?;
    }
    Ok(())
}

#[test]
fn random_operation_sequences_match_the_reference_and_give_back_the_base() {
    let dir = std::env::temp_dir().join(format!(
        "burn_lora_reliability_props_{}",
        std::process::id()
    ));
    let stats = RefCell::new(Stats::default());
    let mut runner = TestRunner::new(RunnerConfig {
        cases: SEQUENCES,
        // No regression files (the `std`-only build of proptest), a fixed seed: every run
        // draws the same sequences.
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(0x5EED_10AA),
        max_shrink_iters: 256,
        ..RunnerConfig::default()
    });
    // The first step adds the first adapter; up to 11 more follow.
    let strategy = (any::<u64>(), add(), proptest::collection::vec(op(), 3..=11));
    let result = runner.run(&strategy, |(seed, first, rest): (u64, Op, Vec<Op>)| {
        let mut ops = vec![first];
        ops.extend(rest);
        run_sequence(seed, &ops, &dir, &stats).map_err(TestCaseError::fail)
    });
    let _ = std::fs::remove_dir_all(dir);
    let stats = stats.into_inner();
    let (ok, errors) = stats
        .outcomes
        .values()
        .fold((0usize, 0usize), |(ok, err), &(o, e)| (ok + o, err + e));
    println!(
        "reliability_props: {} sequences, {} steps ({ok} Ok, {errors} typed errors); {} steps \
         with adapters moving an output; {} mixed batches checked; per operation (Ok, Err): {:?}",
        stats.sequences, stats.steps, stats.moved, stats.mixed_checked, stats.outcomes
    );
    if let Err(error) = result {
        panic!("{error}");
    }
    assert!(stats.sequences >= SEQUENCES as usize);
    // Every operation succeeded at least once: the sequences reach the states that matter.
    for op in [
        "add_adapter",
        "set_active",
        "set_trainable",
        "disable_adapters",
        "enable_adapters",
        "merge_lora",
        "unmerge_lora",
        "delete_adapter",
        "add_weighted_adapter",
        "save+load",
        "mixed_batch",
    ] {
        let (ok, _) = stats.outcomes.get(op).copied().unwrap_or_default();
        assert!(
            ok > 0,
            "no successful {op} in {} sequences",
            stats.sequences
        );
    }
    assert!(stats.moved > 0, "the adapters never changed an output");
}
