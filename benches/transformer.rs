//! The 4-layer transformer block stack (d = 512, 8 heads, seq 128, batch 8), forward and
//! training step: plain, merged, unmerged (burn-lora's fast path), DoRA, QLoRA (8-bit base),
//! Burn's `apply_lora`, and full fine-tuning, all in the same run.
//!
//! ```sh
//! cargo bench --bench transformer
//! python3 benches/ratios.py
//! ```

#[path = "support/stack.rs"]
mod stack;
#[path = "support/timing.rs"]
mod timing;

use burn::prelude::*;
use criterion::{Criterion, criterion_group, criterion_main};
use stack::Encoder;
use timing::Group;

fn time_forward<M: Encoder>(group: &mut Group, name: &str, model: M, x: &Tensor<3>) {
    timing::time_forward(group, name, &x.device(), || model.encode(x.clone()));
}

fn time_train_step<M: Encoder>(group: &mut Group, name: &str, model: M, x: &Tensor<3>) {
    timing::time_train_step(group, name, &x.device(), model, |model| {
        stack::loss(model, x)
    });
}

fn forward(c: &mut Criterion) {
    let device = Device::default();
    device.seed(0);
    let x = stack::input(&device);
    let mut group = c.benchmark_group(format!("stack_forward_{}", stack::shape_label()));
    time_forward(&mut group, "plain", stack::plain(&device), &x);
    time_forward(&mut group, "merged", stack::merged(&device), &x);
    time_forward(&mut group, "unmerged", stack::lora(&device), &x);
    time_forward(&mut group, "dora_unmerged", stack::dora(&device), &x);
    time_forward(&mut group, "qlora_unmerged", stack::qlora(&device), &x);
    time_forward(&mut group, "qlora4_unmerged", stack::qlora4(&device), &x);
    time_forward(
        &mut group,
        "burn_apply_lora",
        stack::burn_apply_lora(&device),
        &x,
    );
}

fn train_step(c: &mut Criterion) {
    let device = Device::default().autodiff();
    device.seed(0);
    let x = stack::input(&device);
    let mut group = c.benchmark_group(format!("stack_train_step_{}", stack::shape_label()));
    time_train_step(&mut group, "full_finetune", stack::plain(&device), &x);
    time_train_step(&mut group, "lora", stack::lora(&device), &x);
    time_train_step(&mut group, "dora", stack::dora(&device), &x);
    time_train_step(&mut group, "qlora", stack::qlora(&device), &x);
    time_train_step(&mut group, "qlora4", stack::qlora4(&device), &x);
    time_train_step(
        &mut group,
        "burn_apply_lora",
        stack::burn_apply_lora(&device),
        &x,
    );
}

criterion_group! {
    name = benches;
    config = timing::config(2, 15);
    targets = forward, train_step
}
criterion_main!(benches);
