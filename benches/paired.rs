//! Paired, interleaved timing: the ratios of `docs/benchmarks.md` on a machine whose speed
//! drifts.
//!
//! criterion times one variant for seconds, then the next; on a shared 2-core machine the
//! speed can change by 40% between them, which a ratio of two such means then carries. Here
//! every round runs each variant of a group once, in an order that rotates from round to round,
//! and a ratio is taken within each round, where the machine's speed is the same for both
//! sides. The table gives, per variant, the median time over the rounds, and the median and
//! interquartile range of its per-round ratio to the group's baseline.
//!
//! ```sh
//! cargo bench --bench paired                      # every group, 15 rounds
//! PAIRED_ROUNDS=30 cargo bench --bench paired -- stack   # groups whose name contains "stack"
//! python3 benches/peft_reference.py --compare --paired   # PyTorch + PEFT beside these medians
//! ```
//!
//! The medians also go to `$CARGO_TARGET_DIR/paired.json` (default `target/`), group by group,
//! for `peft_reference.py --paired`.

#[path = "support/layer.rs"]
mod layer;
#[path = "support/stack.rs"]
mod stack;

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use layer::{Composed, Layer, Plain, SHAPES, base, burn_apply_lora, lora};
use stack::Encoder;

/// One timed call: a forward, or a training step that keeps its model and optimizer state.
type Run = Box<dyn FnMut()>;

struct Group {
    name: String,
    /// `(variant, run)`, the baseline first.
    variants: Vec<(&'static str, Run)>,
}

fn forward_run<M: Module + 'static>(
    model: M,
    x: &Tensor<3>,
    forward: fn(&M, Tensor<3>) -> Tensor<3>,
) -> Run {
    let x = x.clone();
    Box::new(move || {
        let output = forward(&model, x.clone());
        output.device().sync().expect("device sync");
    })
}

fn train_run<M: Module + 'static>(
    model: M,
    x: &Tensor<3>,
    loss: fn(&M, &Tensor<3>) -> Tensor<1>,
) -> Run {
    let x = x.clone();
    let mut optimizer = AdamWConfig::new().init();
    let mut model = Some(model);
    Box::new(move || {
        let current = model.take().expect("model");
        let grads = GradientsParams::from_grads(loss(&current, &x).backward(), &current);
        model = Some(optimizer.step(1e-4, current, grads));
        x.device().sync().expect("device sync");
    })
}

fn layer_forward<M: Layer>(model: &M, x: Tensor<3>) -> Tensor<3> {
    model.forward(x)
}

fn layer_loss<M: Layer>(model: &M, x: &Tensor<3>) -> Tensor<1> {
    model.forward(x.clone()).mean()
}

fn encoder_forward<M: Encoder>(model: &M, x: Tensor<3>) -> Tensor<3> {
    model.encode(x)
}

fn encoder_loss<M: Encoder>(model: &M, x: &Tensor<3>) -> Tensor<1> {
    stack::loss(model, x)
}

fn groups() -> Vec<Group> {
    let mut groups = Vec::new();
    let device = Device::default();
    let training = device.clone().autodiff();
    for (batch, seq, d_model, rank) in SHAPES {
        device.seed(0);
        let x = Tensor::<3>::random([batch, seq, d_model], Distribution::Default, &device);
        let adapted = lora(d_model, rank, &device);
        let composed = Composed {
            layer: adapted.layer.clone(),
        };
        let plain = Plain {
            layer: base(d_model, &device),
        };
        groups.push(Group {
            name: format!("forward_{batch}x{seq}x{d_model}_r{rank}"),
            variants: vec![
                ("plain", forward_run(plain, &x, layer_forward)),
                ("unmerged", forward_run(adapted, &x, layer_forward)),
                (
                    "unmerged_composed",
                    forward_run(composed, &x, layer_forward),
                ),
                (
                    "burn_apply_lora",
                    forward_run(burn_apply_lora(d_model, rank, &device), &x, layer_forward),
                ),
            ],
        });

        training.seed(0);
        // The input requires a gradient, as every layer's but the first does.
        let x = Tensor::<3>::random([batch, seq, d_model], Distribution::Default, &training)
            .require_grad();
        let adapted = lora(d_model, rank, &training);
        let composed = Composed {
            layer: adapted.layer.clone(),
        };
        let full = Plain {
            layer: base(d_model, &training),
        };
        groups.push(Group {
            name: format!("train_step_{batch}x{seq}x{d_model}_r{rank}"),
            variants: vec![
                ("full_finetune", train_run(full, &x, layer_loss)),
                ("lora", train_run(adapted, &x, layer_loss)),
                ("lora_composed", train_run(composed, &x, layer_loss)),
                (
                    "burn_apply_lora",
                    train_run(burn_apply_lora(d_model, rank, &training), &x, layer_loss),
                ),
            ],
        });
    }

    device.seed(0);
    let x = stack::input(&device);
    groups.push(Group {
        name: format!("stack_forward_{}", stack::shape_label()),
        variants: vec![
            (
                "plain",
                forward_run(stack::plain(&device), &x, encoder_forward),
            ),
            (
                "merged",
                forward_run(stack::merged(&device), &x, encoder_forward),
            ),
            (
                "unmerged",
                forward_run(stack::lora(&device), &x, encoder_forward),
            ),
            (
                "burn_apply_lora",
                forward_run(stack::burn_apply_lora(&device), &x, encoder_forward),
            ),
            (
                "qlora_unmerged",
                forward_run(stack::qlora(&device), &x, encoder_forward),
            ),
            (
                "qlora4_unmerged",
                forward_run(stack::qlora4(&device), &x, encoder_forward),
            ),
        ],
    });
    training.seed(0);
    let x = stack::input(&training);
    groups.push(Group {
        name: format!("stack_train_step_{}", stack::shape_label()),
        variants: vec![
            (
                "full_finetune",
                train_run(stack::plain(&training), &x, encoder_loss),
            ),
            ("lora", train_run(stack::lora(&training), &x, encoder_loss)),
            (
                "burn_apply_lora",
                train_run(stack::burn_apply_lora(&training), &x, encoder_loss),
            ),
            (
                "qlora",
                train_run(stack::qlora(&training), &x, encoder_loss),
            ),
            (
                "qlora4",
                train_run(stack::qlora4(&training), &x, encoder_loss),
            ),
        ],
    });
    groups
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|argument| !argument.starts_with('-'))
        .unwrap_or_default();
    let rounds: usize = std::env::var("PAIRED_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(15);
    let store = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("paired.json");
    let mut medians: serde_json::Map<String, serde_json::Value> = std::fs::read(&store)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    println!("| group | variant | median (ms) | baseline | ratio (median of rounds) | IQR |");
    println!("|---|---|---:|---|---:|---|");
    for mut group in groups()
        .into_iter()
        .filter(|group| group.name.contains(&filter))
    {
        let count = group.variants.len();
        // A warm-up call each: first-touch allocations, lazily loaded weights, thread pools.
        for (_, run) in &mut group.variants {
            run();
        }
        let mut times = vec![Vec::with_capacity(rounds); count];
        for round in 0..rounds {
            for offset in 0..count {
                let index = (round + offset) % count;
                let start = Instant::now();
                (group.variants[index].1)();
                times[index].push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        let baseline = group.variants[0].0;
        let mut group_medians = serde_json::Map::new();
        for (index, (name, _)) in group.variants.iter().enumerate() {
            let median = quantile(&sorted(times[index].clone()), 0.5);
            group_medians.insert(name.to_string(), median.into());
            let ratios = sorted(
                times[index]
                    .iter()
                    .zip(&times[0])
                    .map(|(time, base)| time / base)
                    .collect(),
            );
            let (low, mid, high) = (
                quantile(&ratios, 0.25),
                quantile(&ratios, 0.5),
                quantile(&ratios, 0.75),
            );
            println!(
                "| {} | {name} | {median:.2} | {baseline} | {mid:.3} | {low:.3}–{high:.3} |",
                group.name
            );
        }
        medians.insert(group.name.clone(), group_medians.into());
        let json = serde_json::to_vec_pretty(&medians).expect("medians serialize");
        std::fs::write(&store, json).expect("paired.json is writable");
    }
}
