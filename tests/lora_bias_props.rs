//! LoRA biases (`lora_bias`), by property: random sequences of adding adapters with and without
//! a bias on `B`, activating, disabling, merging, unmerging, deleting, saving and loading, and
//! mixed batches, on a `LoraLinear` with a bias. After every step:
//!
//! 1. the output equals the naive f64 `x·W0 + b0 + Σ s·(x·A·B + b_B)` over the adapters that are
//!    merged, or active and enabled, with `W0`, `b0` recorded before the first adapter and `A`,
//!    `B`, `b_B` read from the model as it is now; a mixed batch equals it sample by sample for
//!    that sample's adapter alone;
//! 2. while nothing is merged, the layer's stored weight and bias are `W0` and `b0` bit for bit,
//!    and `unload_lora` gives them back bit for bit in every state;
//! 3. each operation returns `Ok` or the `LoraError` its documentation names for that state, and
//!    a failed one leaves the model it borrowed unchanged.
//!
//! Which operations succeed, and each adapter's flags, come from a shadow state kept beside the
//! model.

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::peft::{load_adapter, save_adapter};
use burn_lora::{LoraConfig, LoraError, LoraModule, LoraState, Targets};
use common::shadow::{Shadow, Step, run_sequences, settle};
use common::{HostTensor, Projections, base_data, randomize, raw_data};
use proptest::prelude::*;

const D_IN: usize = 6;
const D_OUT: usize = 5;
const BATCH: usize = 3;
const NAMES: [&str; 3] = ["a", "b", "c"];
/// f32 against f64, outputs of size ~1: 1e-4 still catches a missing or doubled term (~1e-1).
const TOLERANCE: f64 = 1e-4;

#[derive(Debug, Clone)]
enum Op {
    Add {
        name: &'static str,
        bias: bool,
        rank: usize,
    },
    SetActive(&'static str),
    Disable,
    Enable,
    Merge,
    Unmerge,
    Delete(&'static str),
    SaveLoad {
        source: &'static str,
        new: &'static str,
    },
    Mixed(Vec<Option<&'static str>>),
}

fn name() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(NAMES.to_vec())
}

/// What the shadow sees of `op`.
fn shadow_step(op: &Op) -> Step<'_> {
    match op {
        Op::Add { name, .. } => Step::Add(name),
        Op::SetActive(name) => Step::SetActive(name),
        Op::Disable => Step::Disable,
        Op::Enable => Step::Enable,
        Op::Merge => Step::Merge,
        Op::Unmerge => Step::Unmerge,
        Op::Delete(name) => Step::Delete(name),
        Op::SaveLoad { source, new } => Step::SaveLoad { source, new },
        Op::Mixed(routes) => Step::Mixed {
            names: routes.iter().flatten().copied().collect(),
            supported: true,
        },
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (name(), any::<bool>(), 1..=3usize)
            .prop_map(|(name, bias, rank)| Op::Add { name, bias, rank }),
        2 => name().prop_map(Op::SetActive),
        1 => Just(Op::Disable),
        1 => Just(Op::Enable),
        2 => Just(Op::Merge),
        2 => Just(Op::Unmerge),
        1 => name().prop_map(Op::Delete),
        2 => (name(), name()).prop_map(|(source, new)| Op::SaveLoad { source, new }),
        2 => proptest::collection::vec(proptest::option::of(name()), BATCH).prop_map(Op::Mixed),
    ]
}

struct Ctx {
    x: Tensor<2>,
    host_x: HostTensor,
    w0: HostTensor,
    b0: HostTensor,
    raw_w0: TensorData,
    raw_b0: TensorData,
    dir: std::path::PathBuf,
}

/// `x·W0 + b0 + Σ s·(x·A·B + b_B)` over the adapters `include` picks, read from `model`.
fn reference(
    model: &Projections,
    ctx: &Ctx,
    x: &HostTensor,
    include: impl Fn(&str) -> bool,
) -> HostTensor {
    let mut y = x.matmul(&ctx.w0).add_row(&ctx.b0);
    if let Some(state) = model.query.weight.reparameterization::<LoraState>() {
        for adapter in state.adapters.iter().filter(|a| include(&a.name)) {
            let a = HostTensor::from(adapter.lora_a.val());
            let b = HostTensor::from(adapter.lora_b.val());
            let mut term = x.matmul(&a).matmul(&b);
            if let Some(bias) = &adapter.lora_bias {
                term = term.add_row(&HostTensor::from(bias.val()));
            }
            y = y.add(&term.scale(adapter.scale));
        }
    }
    y
}

fn max_abs(a: &HostTensor, b: &HostTensor) -> f64 {
    a.values
        .iter()
        .zip(&b.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn check(model: &Projections, shadow: &Shadow, ctx: &Ctx) -> Result<(), String> {
    let shapes = |name: &str| shadow.shapes(name);
    let output = HostTensor::from(model.query.forward(ctx.x.clone()));
    let error = max_abs(&output, &reference(model, ctx, &ctx.host_x, shapes));
    if error > TOLERANCE {
        return Err(format!("output off by {error} in {shadow:?}"));
    }
    // The parameters as stored (`val()` would compose the adapters in).
    let stored = |model: &Projections| {
        let base = base_data(model);
        (base["query.weight"].clone(), base["query.bias"].clone())
    };
    let (weight, bias) = stored(model);
    if !shadow.any_merged() && (weight != ctx.raw_w0 || bias != ctx.raw_b0) {
        return Err("the stored base moved while nothing is merged".into());
    }
    if shadow.adapters.is_empty() {
        return Ok(());
    }
    let unloaded = model.unload_lora().map_err(|e| format!("unload: {e}"))?;
    let (weight, bias) = stored(&unloaded);
    if weight != ctx.raw_w0 || bias != ctx.raw_b0 {
        return Err("unload_lora did not give back the base bit for bit".into());
    }
    Ok(())
}

fn perform(
    op: &Op,
    model: &Projections,
    ctx: &Ctx,
) -> Result<(Projections, Option<Tensor<2>>), LoraError> {
    let same = |model: Projections| (model, None);
    match op {
        Op::Add { name, bias, rank } => {
            let config = LoraConfig::new(*rank)
                .with_alpha(Some(2.0))
                .with_lora_bias(*bias)
                .with_targets(Targets::names(["query"]));
            model.add_adapter(name, &config).map(|(m, _)| same(m))
        }
        Op::SetActive(name) => model.set_active(&[name]).map(same),
        Op::Disable => model.disable_adapters().map(same),
        Op::Enable => model.enable_adapters().map(same),
        Op::Merge => model.merge_lora().map(same),
        Op::Unmerge => model.unmerge_lora().map(same),
        Op::Delete(name) => model.delete_adapter(name).map(same),
        Op::SaveLoad { source, new } => {
            save_adapter(model, &ctx.dir, source)?;
            load_adapter(model, &ctx.dir, new).map(|(m, _)| same(m))
        }
        Op::Mixed(routes) => {
            let batch = model.mixed_batch(routes)?;
            let output = model.query.forward_mixed(ctx.x.clone(), &batch);
            Ok((model.clone(), Some(output)))
        }
    }
}

fn run(ops: &[Op], case: usize) -> Result<(), String> {
    let device = Device::flex();
    device.seed(case as u64);
    let model = Projections::new(D_IN, D_OUT, &device);
    let x = Tensor::<2>::random([BATCH, D_IN], Distribution::Uniform(-1.0, 1.0), &device);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("lora_bias_props")
        .join(case.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let ctx = Ctx {
        host_x: HostTensor::from(x.clone()),
        x,
        w0: HostTensor::from(model.query.weight.val()),
        b0: HostTensor::from(model.query.bias.as_ref().unwrap().val()),
        raw_w0: model.query.weight.val().into_data(),
        raw_b0: model.query.bias.as_ref().unwrap().val().into_data(),
        dir,
    };
    let mut model = model;
    let mut shadow = Shadow::default();
    for (step, op) in ops.iter().enumerate() {
        let before = raw_data(&model);
        let predicted = shadow.predict(&shadow_step(op));
        let outcome = perform(op, &model, &ctx);
        let label = format!("step {step} {op:?}");
        let unchanged = || raw_data(&model) == before;
        if let Some(((next, routed), next_shadow)) = settle(&label, outcome, predicted, unchanged)?
        {
            model = next;
            shadow = next_shadow;
            if let (Some(routed), Op::Mixed(routes)) = (routed, op) {
                let routed = HostTensor::from(routed);
                for (sample, route) in routes.iter().enumerate() {
                    let row = |t: &HostTensor| HostTensor {
                        dims: vec![1, D_OUT],
                        values: t.values[sample * D_OUT..(sample + 1) * D_OUT].to_vec(),
                    };
                    let x = HostTensor {
                        dims: vec![1, D_IN],
                        values: ctx.host_x.values[sample * D_IN..(sample + 1) * D_IN].to_vec(),
                    };
                    let expected = reference(&model, &ctx, &x, |n| Some(n) == *route);
                    let error = max_abs(&row(&routed), &expected);
                    if error > TOLERANCE {
                        return Err(format!(
                            "step {step} {op:?}: sample {sample} off by {error}"
                        ));
                    }
                }
            }
            // New adapters start at B = 0 and a zero bias: give them values, while no
            // merge holds the old ones.
            if matches!(op, Op::Add { .. }) && !shadow.any_merged() {
                model = randomize(randomize(model, "lora_b", 0.4), "lora_bias", 0.4);
            }
        }
        check(&model, &shadow, &ctx).map_err(|e| format!("step {step} {op:?}: {e}"))?;
    }
    Ok(())
}

#[test]
fn random_sequences_keep_biases_on_b_exact() {
    run_sequences(64, 0x6c6f_7261_6269_6173, op(), run);
}
