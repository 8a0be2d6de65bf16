//! Forward and training-step time of one adapted linear layer, against its baselines in the
//! same run: a plain `nn::Linear`, Burn's own `apply_lora`, and full fine-tuning.
//!
//! ```sh
//! cargo bench --bench linear                    # CPU (flex; BURN_DEVICE=ndarray for ndarray)
//! cargo bench --bench linear --features wgpu    # GPU
//! python3 benches/ratios.py                     # the ratios, as in docs/benchmarks.md
//! ```

#[path = "support/timing.rs"]
mod timing;

use burn::module::{Lora, Module};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::{LoraConfig, LoraLinear, LoraModule, Targets};
use criterion::{Criterion, criterion_group, criterion_main};

/// `(batch, seq, d_model, rank)`: the shapes the issue asks for.
const SHAPES: [(usize, usize, usize, usize); 2] = [(32, 128, 1024, 8), (4, 128, 4096, 16)];

#[derive(Module, Debug)]
struct Fast {
    layer: LoraLinear,
}

#[derive(Module, Debug)]
struct Plain {
    layer: Linear,
}

trait Layer: Module {
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;
}

impl Layer for Fast {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.layer.forward(x)
    }
}

impl Layer for Plain {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.layer.forward(x)
    }
}

fn lora_config(rank: usize) -> LoraConfig {
    LoraConfig::new(rank)
        .with_alpha(Some(2.0 * rank as f64))
        .with_targets(Targets::names(["layer"]))
}

fn base(d_model: usize, device: &Device) -> Linear {
    LinearConfig::new(d_model, d_model).init(device)
}

fn lora(d_model: usize, rank: usize, device: &Device) -> Fast {
    let (model, _) = lora_config(rank)
        .apply(Fast {
            layer: base(d_model, device).into(),
        })
        .expect("valid config");
    model
}

/// `nn::Linear` carrying our adapter: dense composition through `Param::val()`.
fn dense(d_model: usize, rank: usize, device: &Device) -> Plain {
    let (model, _) = lora_config(rank)
        .apply(Plain {
            layer: base(d_model, device),
        })
        .expect("valid config");
    model
}

/// `nn::Linear` with Burn 0.22's built-in `apply_lora`.
fn burn_apply_lora(d_model: usize, rank: usize, device: &Device) -> Plain {
    Plain {
        layer: base(d_model, device),
    }
    .apply_lora(Lora::new(rank, 2.0 * rank as f64))
}

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
        time_forward(group, "unmerged", unmerged, &x);
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
        time_train_step(group, "lora", lora(d_model, rank, &device), &x);
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
