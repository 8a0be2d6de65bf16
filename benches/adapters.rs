//! Serving many adapters on one base: mixed batches against one adapter for the whole batch,
//! switching adapters against reloading the model, and hot-swapping an adapter's weights from a
//! file against loading the file as a new adapter.
//!
//! ```sh
//! cargo bench --bench adapters                  # CPU (flex; BURN_DEVICE=ndarray for ndarray)
//! cargo bench --bench adapters --features wgpu  # GPU
//! python3 benches/ratios.py                     # the ratios, as in docs/benchmarks.md
//! ```

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::peft::{LoadOptions, hotswap_adapter, load_adapter, save_adapter};
use burn_lora::{LoraConfig, LoraLinear, LoraModule, MixedBatch, Targets};
use criterion::{Criterion, criterion_group, criterion_main};

#[path = "support/timing.rs"]
mod timing;

#[derive(Module, Debug)]
struct Layer {
    proj: LoraLinear,
}

#[derive(Module, Debug)]
struct Stack {
    layers: Vec<LoraLinear>,
}

impl Stack {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.layers.iter().fold(x, |x, layer| layer.forward(x))
    }
}

fn config(rank: usize, targets: Targets) -> LoraConfig {
    LoraConfig::new(rank)
        .with_alpha(Some(2.0 * rank as f64))
        .with_targets(targets)
}

/// Eight adapters of the same rank on one layer.
fn layer_with_adapters(d_model: usize, rank: usize, device: &Device) -> Layer {
    let mut layer = Layer {
        proj: LinearConfig::new(d_model, d_model).init(device).into(),
    };
    for i in 0..8 {
        let config = config(rank, Targets::names(["proj"]));
        layer = layer
            .add_adapter(&format!("tenant_{i}"), &config)
            .expect("valid")
            .0;
    }
    layer
}

fn mixed(c: &mut Criterion) {
    let device = Device::default();
    device.seed(0);
    let (batch, seq, d_model, rank) = (32, 128, 1024, 8);
    let layer = layer_with_adapters(d_model, rank, &device);
    let x = Tensor::<3>::random([batch, seq, d_model], Distribution::Default, &device);
    let mut group = c.benchmark_group(format!("mixed_{batch}x{seq}x{d_model}_r{rank}"));

    // The baseline: the whole batch through one active adapter, the plain fast path.
    let single = layer.set_active(&["tenant_0"]).expect("known");
    timing::time_forward(&mut group, "single_adapter", &device, || {
        single.proj.forward(x.clone())
    });
    for adapters in [1, 4, 8] {
        let names: Vec<String> = (0..batch)
            .map(|i| format!("tenant_{}", i % adapters))
            .collect();
        let routes: Vec<Option<&str>> = names.iter().map(|n| Some(n.as_str())).collect();
        let routing = MixedBatch::new(&routes, &device);
        timing::time_forward(&mut group, &format!("mixed_{adapters}"), &device, || {
            layer.proj.forward_mixed(x.clone(), &routing)
        });
    }
}

fn switching(c: &mut Criterion) {
    let device = Device::default();
    device.seed(0);
    let (layers, d_model, rank) = (8, 2048, 16);
    let base = Stack {
        layers: (0..layers)
            .map(|_| LinearConfig::new(d_model, d_model).init(&device).into())
            .collect(),
    };
    let dir = std::env::temp_dir().join("burn-lora-bench-switching");
    std::fs::create_dir_all(&dir).expect("temp dir");
    base.clone()
        .save_file(dir.join("base.bpk"))
        .expect("save base");
    let mut serving = base.clone();
    for name in ["a", "b"] {
        let adapted = base
            .add_adapter(name, &config(rank, Targets::all_linear()))
            .expect("valid")
            .0;
        save_adapter(&adapted, dir.join(name), name).expect("save adapter");
        serving = load_adapter(&serving, dir.join(name), name)
            .expect("load")
            .0;
    }
    let x = Tensor::<2>::random([1, d_model], Distribution::Default, &device);
    let mut group = c.benchmark_group(format!("switch_{layers}x{d_model}x{d_model}_r{rank}"));
    let mut round = 0;
    // Each variant ends with one forward, so lazily loaded weights are paid for.
    group.bench_function("set_active", |b| {
        b.iter(|| {
            round += 1;
            let name = if round % 2 == 0 { "a" } else { "b" };
            let switched = serving.set_active(&[name]).expect("known");
            let output = switched.forward(x.clone());
            device.sync().expect("device sync");
            output
        })
    });
    group.bench_function("reload", |b| {
        b.iter(|| {
            round += 1;
            let name = if round % 2 == 0 { "a" } else { "b" };
            let fresh = Stack {
                layers: (0..layers)
                    .map(|_| LinearConfig::new(d_model, d_model).init(&device).into())
                    .collect(),
            }
            .try_load_file(dir.join("base.bpk"))
            .expect("load base");
            let model = load_adapter(&fresh, dir.join(name), name).expect("load").0;
            let output = model.forward(x.clone());
            device.sync().expect("device sync");
            output
        })
    });
    // One adapter slot whose weights a file replaces in place (ids and shapes kept), against
    // loading the file as a new adapter beside it and activating that one.
    let slot = load_adapter(&base, dir.join("a"), "slot").expect("load").0;
    let options = LoadOptions::default();
    group.bench_function("hotswap", |b| {
        b.iter(|| {
            round += 1;
            let name = if round % 2 == 0 { "a" } else { "b" };
            let swapped = hotswap_adapter(&slot, dir.join(name), "slot", &options)
                .expect("same shapes")
                .0;
            let output = swapped.forward(x.clone());
            device.sync().expect("device sync");
            output
        })
    });
    group.bench_function("load_and_set_active", |b| {
        b.iter(|| {
            round += 1;
            let name = if round % 2 == 0 { "a" } else { "b" };
            let loaded = load_adapter(&slot, dir.join(name), "incoming")
                .expect("load")
                .0
                .set_active(&["incoming"])
                .expect("known");
            let output = loaded.forward(x.clone());
            device.sync().expect("device sync");
            output
        })
    });
}

criterion_group! {
    name = benches;
    config = timing::config(1, 8);
    targets = mixed, switching
}
criterion_main!(benches);
