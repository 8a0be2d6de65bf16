//! The 4-layer transformer block stack (d = 512, 8 heads, seq 128, batch 8), forward and
//! training step: plain, merged, unmerged (burn-lora's fast path), Burn's `apply_lora`, and
//! full fine-tuning, all in the same run.
//!
//! ```sh
//! cargo bench --bench transformer
//! python3 benches/ratios.py
//! ```

#[path = "support/stack.rs"]
mod stack;

use std::time::Duration;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use criterion::{Criterion, criterion_group, criterion_main};
use stack::Encoder;

fn time_forward<M: Encoder>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    model: M,
    x: &Tensor<3>,
) {
    let device = x.device();
    c.bench_function(name, |b| {
        b.iter(|| {
            let output = model.encode(x.clone());
            device.sync().expect("device sync");
            output
        })
    });
}

fn time_train_step<M: Encoder>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    model: M,
    x: &Tensor<3>,
) {
    let device = x.device();
    let mut optimizer = AdamWConfig::new().init();
    let mut model = Some(model);
    c.bench_function(name, |b| {
        b.iter(|| {
            let current = model.take().expect("model");
            let loss = stack::loss(&current, x);
            let grads = GradientsParams::from_grads(loss.backward(), &current);
            model = Some(optimizer.step(1e-4, current, grads));
            device.sync().expect("device sync");
        })
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
    time_train_step(
        &mut group,
        "burn_apply_lora",
        stack::burn_apply_lora(&device),
        &x,
    );
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15))
}

criterion_group! {
    name = benches;
    config = config();
    targets = forward, train_step
}
criterion_main!(benches);
