//! Forward and training-step time of one adapted linear layer, against its baselines in the
//! same run: a plain `nn::Linear`, Burn's own `apply_lora`, and full fine-tuning.
//!
//! ```sh
//! cargo bench --bench linear                    # CPU (flex; BURN_DEVICE=ndarray for ndarray)
//! cargo bench --bench linear --features wgpu    # GPU
//! python3 benches/ratios.py                     # the ratios, as in docs/benchmarks.md
//! ```

#[path = "support/layer.rs"]
mod layer;
#[path = "support/timing.rs"]
mod timing;

use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::LoraModule;
use criterion::{Criterion, criterion_group, criterion_main};
use layer::{Composed, Layer, Plain, SHAPES, base, burn_apply_lora, dense, lora};

use timing::Group;

fn time_forward<M: Layer>(group: &mut Group, name: &str, model: M, x: &Tensor<3>) {
    timing::time_forward(group, name, &x.device(), || model.forward(x.clone()));
}

fn forward(c: &mut Criterion) {
    let device = Device::default();
    for (batch, seq, d_model, rank) in SHAPES {
        device.seed(0);
        let mut group = c.benchmark_group(format!("forward_{batch}x{seq}x{d_model}_r{rank}"));
        let group = &mut group;
        let x = Tensor::<3>::random([batch, seq, d_model], Distribution::Default, &device);
        let plain = Plain {
            layer: base(d_model, &device),
        };
        let unmerged = lora(d_model, rank, &device);
        let merged = unmerged.merge_lora().expect("finite");
        time_forward(group, "plain", plain, &x);
        time_forward(group, "merged", merged, &x);
        let composed = Composed {
            layer: unmerged.layer.clone(),
        };
        time_forward(group, "unmerged", unmerged, &x);
        time_forward(group, "unmerged_composed", composed, &x);
        time_forward(group, "dense", dense(d_model, rank, &device), &x);
        time_forward(
            group,
            "burn_apply_lora",
            burn_apply_lora(d_model, rank, &device),
            &x,
        );
    }
}

/// One step: forward, mean loss, backward, AdamW. The input requires a gradient, as the input
/// of any layer but the first does, so every variant computes `dx`.
fn time_train_step<M: Layer>(group: &mut Group, name: &str, model: M, x: &Tensor<3>) {
    timing::time_train_step(group, name, &x.device(), model, |model| {
        model.forward(x.clone()).mean()
    });
}

fn train_step(c: &mut Criterion) {
    let device = Device::default().autodiff();
    for (batch, seq, d_model, rank) in SHAPES {
        device.seed(0);
        let mut group = c.benchmark_group(format!("train_step_{batch}x{seq}x{d_model}_r{rank}"));
        let group = &mut group;
        let x = Tensor::<3>::random([batch, seq, d_model], Distribution::Default, &device)
            .require_grad();
        let full = Plain {
            layer: base(d_model, &device),
        };
        time_train_step(group, "full_finetune", full, &x);
        let adapted = lora(d_model, rank, &device);
        let composed = Composed {
            layer: adapted.layer.clone(),
        };
        time_train_step(group, "lora", adapted, &x);
        time_train_step(group, "lora_composed", composed, &x);
        time_train_step(group, "dense", dense(d_model, rank, &device), &x);
        let burn = burn_apply_lora(d_model, rank, &device);
        time_train_step(group, "burn_apply_lora", burn, &x);
    }
}

fn merge(c: &mut Criterion) {
    let device = Device::default();
    device.seed(0);
    let (d_model, rank) = (4096, 16);
    let model = lora(d_model, rank, &device);
    let mut group = c.benchmark_group(format!("merge_{d_model}x{d_model}_r{rank}"));
    group.bench_function("merge_unmerge", |b| {
        b.iter(|| {
            let merged = model.merge_lora().expect("finite");
            let unmerged = merged.unmerge_lora().expect("merged");
            device.sync().expect("device sync");
            unmerged
        })
    });
    // The reference: one [4096, 16]·[16, 4096] product plus one add, twice (merge, unmerge).
    let a = Tensor::<2>::random([d_model, rank], Distribution::Default, &device);
    let b_factor = Tensor::<2>::random([rank, d_model], Distribution::Default, &device);
    let weight = Tensor::<2>::random([d_model, d_model], Distribution::Default, &device);
    group.bench_function("matmul_add_x2", |b| {
        b.iter(|| {
            let merged = weight.clone() + a.clone().matmul(b_factor.clone());
            let unmerged = merged - a.clone().matmul(b_factor.clone());
            device.sync().expect("device sync");
            unmerged
        })
    });
}

criterion_group! {
    name = benches;
    config = timing::config(1, 8);
    targets = forward, train_step, merge
}
criterion_main!(benches);
