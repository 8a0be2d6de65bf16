//! How every bench times a forward and a training step, and criterion's settings for this
//! noisy 2-core machine. Shared by the bench files through `#[path]`.

#![allow(dead_code)] // each includer uses a part

use std::time::Duration;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};

pub type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// Time `forward`, waiting for the device after each call so asynchronous backends are timed
/// whole.
pub fn time_forward<T>(group: &mut Group, name: &str, device: &Device, forward: impl Fn() -> T) {
    group.bench_function(name, |b| {
        b.iter(|| {
            let output = forward();
            device.sync().expect("device sync");
            output
        })
    });
}

/// Time one training step of `model`: `loss`, backward, AdamW. The optimizer state carries over
/// from step to step, as in a real run.
pub fn time_train_step<M: Module>(
    group: &mut Group,
    name: &str,
    device: &Device,
    model: M,
    loss: impl Fn(&M) -> Tensor<1>,
) {
    let mut optimizer = AdamWConfig::new().init();
    let mut model = Some(model);
    group.bench_function(name, |b| {
        b.iter(|| {
            let current = model.take().expect("model");
            let grads = GradientsParams::from_grads(loss(&current).backward(), &current);
            model = Some(optimizer.step(1e-4, current, grads));
            device.sync().expect("device sync");
        })
    });
}

/// 10 samples after `warm_up` seconds, measured for `measurement` seconds per variant.
pub fn config(warm_up: u64, measurement: u64) -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(warm_up))
        .measurement_time(Duration::from_secs(measurement))
}
