//! Adapters on raw parameters (PEFT's `target_parameters`), by property: random sequences of
//! adding adapters on one or both expert banks of a mixture of experts, activating, disabling,
//! merging, unmerging, deleting, saving and loading, and asking for mixed batches. After every
//! step:
//!
//! 1. each bank's composed value (`Param::val()`) equals the naive f64
//!    `W0[e] + Σ s·(A_e·B_e)ᵀ` per expert `e`, over the adapters that are merged, or active and
//!    enabled, with `W0` recorded before the first adapter and `A`, `B` read from the model;
//! 2. while nothing is merged, the stored banks are `W0` bit for bit, and `unload_lora` gives
//!    them back bit for bit in every state;
//! 3. each operation returns `Ok` or the `LoraError` its documentation names for that state
//!    (a mixed batch is refused on a model with adapted raw parameters), and a failed one
//!    leaves the model it borrowed unchanged.
//!
//! An adapter on `gate_up_proj` alone is saved with PEFT's un-nested key (`experts.lora_A`),
//! one on both with `gate_up_proj` one `base_layer` deep, so saving and loading checks the
//! nesting both ways.

mod common;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use burn_lora::peft::{load_adapter, save_adapter};
use burn_lora::{LoraConfig, LoraError, LoraModule, LoraState, Targets};
use common::shadow::{Shadow, Step, run_sequences, settle};
use common::{HostTensor, base_data, randomize, raw_data};
use proptest::prelude::*;

const EXPERTS: usize = 3;
const HIDDEN: usize = 5;
const INTERMEDIATE: usize = 3;
const NAMES: [&str; 3] = ["a", "b", "c"];
const BANKS: [&str; 2] = ["gate_up_proj", "down_proj"];
/// f32 against f64 on values of size ~1: a missing or doubled expert term is ~1e-1.
const TOLERANCE: f64 = 1e-4;

#[derive(Module, Debug)]
struct Experts {
    gate_up_proj: Param<Tensor<3>>,
    down_proj: Param<Tensor<3>>,
}

impl Experts {
    fn bank(&self, name: &str) -> &Param<Tensor<3>> {
        match name {
            "gate_up_proj" => &self.gate_up_proj,
            _ => &self.down_proj,
        }
    }
}

#[derive(Module, Debug)]
struct Moe {
    experts: Experts,
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        name: &'static str,
        rank: usize,
        both: bool,
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
    Mixed(&'static str),
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
        // A raw parameter's update is composed for the whole batch: always refused.
        Op::Mixed(name) => Step::Mixed {
            names: vec![name],
            supported: false,
        },
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (name(), 1..=3usize, any::<bool>())
            .prop_map(|(name, rank, both)| Op::Add { name, rank, both }),
        2 => name().prop_map(Op::SetActive),
        1 => Just(Op::Disable),
        1 => Just(Op::Enable),
        2 => Just(Op::Merge),
        2 => Just(Op::Unmerge),
        1 => name().prop_map(Op::Delete),
        2 => (name(), name()).prop_map(|(source, new)| Op::SaveLoad { source, new }),
        1 => name().prop_map(Op::Mixed),
    ]
}

struct Ctx {
    /// Each bank as recorded before the first adapter: f64, and raw.
    w0: Vec<(HostTensor, TensorData)>,
    dir: std::path::PathBuf,
}

/// `W0[e] + Σ s·(A_e·B_e)ᵀ` for the bank `index` (`[E, d_out, d_in]`), over the adapters
/// `include` picks, read from `model`.
fn reference(model: &Moe, ctx: &Ctx, index: usize, include: impl Fn(&str) -> bool) -> HostTensor {
    let mut out = ctx.w0[index].0.clone();
    let [experts, d_out, d_in] = [out.dims[0], out.dims[1], out.dims[2]];
    let bank = model.experts.bank(BANKS[index]);
    let Some(state) = bank.reparameterization::<LoraState>() else {
        return out;
    };
    for adapter in state.adapters.iter().filter(|a| include(&a.name)) {
        let a = HostTensor::from(adapter.lora_a.val());
        let b = HostTensor::from(adapter.lora_b.val());
        let (rank, width) = (adapter.rank(), a.dims[1]);
        for e in 0..experts {
            for o in 0..d_out {
                for i in 0..d_in {
                    let delta: f64 = (0..rank)
                        .map(|k| {
                            a.values[i * width + e * rank + k]
                                * b.values[(e * rank + k) * d_out + o]
                        })
                        .sum();
                    out.values[(e * d_out + o) * d_in + i] += adapter.scale * delta;
                }
            }
        }
    }
    out
}

fn max_abs(a: &HostTensor, b: &HostTensor) -> f64 {
    a.values
        .iter()
        .zip(&b.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn check(model: &Moe, shadow: &Shadow, ctx: &Ctx) -> Result<(), String> {
    let shapes = |name: &str| shadow.shapes(name);
    for (index, bank) in BANKS.iter().enumerate() {
        let composed = HostTensor::from(model.experts.bank(bank).val());
        let error = max_abs(&composed, &reference(model, ctx, index, shapes));
        if error > TOLERANCE {
            return Err(format!("{bank} off by {error} in {shadow:?}"));
        }
    }
    let stored = |model: &Moe| {
        let base = base_data(model);
        BANKS.map(|bank| base[&format!("experts.{bank}")].clone())
    };
    let raw = |index: usize| &ctx.w0[index].1;
    if !shadow.any_merged() && stored(model).iter().enumerate().any(|(i, s)| s != raw(i)) {
        return Err("a stored bank moved while nothing is merged".into());
    }
    if shadow.adapters.is_empty() {
        return Ok(());
    }
    let unloaded = model.unload_lora().map_err(|e| format!("unload: {e}"))?;
    if stored(&unloaded)
        .iter()
        .enumerate()
        .any(|(i, s)| s != raw(i))
    {
        return Err("unload_lora did not give back the banks bit for bit".into());
    }
    Ok(())
}

fn perform(op: &Op, model: &Moe, ctx: &Ctx) -> Result<Moe, LoraError> {
    match op {
        Op::Add { name, rank, both } => {
            let banks = match both {
                true => vec!["experts.gate_up_proj", "experts.down_proj"],
                false => vec!["experts.gate_up_proj"],
            };
            let config = LoraConfig::new(*rank)
                .with_alpha(Some(2.0))
                .with_targets(Targets::parameter_names(banks));
            model.add_adapter(name, &config).map(|(m, _)| m)
        }
        Op::SetActive(name) => model.set_active(&[name]),
        Op::Disable => model.disable_adapters(),
        Op::Enable => model.enable_adapters(),
        Op::Merge => model.merge_lora(),
        Op::Unmerge => model.unmerge_lora(),
        Op::Delete(name) => model.delete_adapter(name),
        Op::SaveLoad { source, new } => {
            save_adapter(model, &ctx.dir, source)?;
            load_adapter(model, &ctx.dir, new).map(|(m, _)| m)
        }
        Op::Mixed(name) => model
            .mixed_batch(&[Some(name), None])
            .map(|_| model.clone()),
    }
}

fn run(ops: &[Op], case: usize) -> Result<(), String> {
    let device = Device::flex();
    device.seed(case as u64);
    let bank = |dims: [usize; 3]| {
        Param::from_tensor(Tensor::<3>::random(
            dims,
            Distribution::Uniform(-1.0, 1.0),
            &device,
        ))
    };
    let model = Moe {
        experts: Experts {
            gate_up_proj: bank([EXPERTS, 2 * INTERMEDIATE, HIDDEN]),
            down_proj: bank([EXPERTS, HIDDEN, INTERMEDIATE]),
        },
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("target_parameters_props")
        .join(case.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let ctx = Ctx {
        w0: BANKS
            .iter()
            .map(|name| {
                let value = model.experts.bank(name).val();
                (HostTensor::from(value.clone()), value.into_data())
            })
            .collect(),
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
        if let Some((next, next_shadow)) = settle(&label, outcome, predicted, unchanged)? {
            model = next;
            shadow = next_shadow;
            // New adapters start at B = 0: give them values, while no merge holds the
            // old ones.
            if matches!(op, Op::Add { .. }) && !shadow.any_merged() {
                model = randomize(model, "lora_b", 0.4);
            }
        }
        check(&model, &shadow, &ctx).map_err(|e| format!("step {step} {op:?}: {e}"))?;
    }
    Ok(())
}

#[test]
fn random_sequences_keep_every_experts_update_exact() {
    run_sequences(64, 0x6578_7065_7274_7321, op(), run);
}
