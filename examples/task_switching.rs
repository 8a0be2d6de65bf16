//! One frozen base, one adapter per task: train, save in PEFT's format, reload, switch, and
//! serve a mixed batch. Works offline.
//!
//! ```sh
//! cargo run --release --example task_switching
//! ```
//!
//! 1. "Pretrain" a small classifier on a base task, then train two rank-4 adapters from it on
//!    two related tasks, A and B, and save each as a PEFT adapter.
//! 2. Reload the base once and both adapters from disk, and switch between them: each task is
//!    scored with its own adapter, the other task's adapter, and none.
//! 3. Serve one batch whose samples come from both tasks, each with its own adapter.
//! 4. Compare the adapter files with the base model's file.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::relu;
use burn_lora::peft::{load_adapter, save_adapter};
use burn_lora::{LoraConfig, LoraLinear, LoraModule, MixedBatch, Targets};

const FEATURES: usize = 32;
const HIDDEN: usize = 256;
const CLASSES: usize = 8;
const BATCH: usize = 128;

#[derive(Module, Debug)]
struct Classifier {
    fc1: LoraLinear,
    fc2: LoraLinear,
    head: LoraLinear,
}

impl Classifier {
    fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(FEATURES, HIDDEN).init(device).into(),
            fc2: LinearConfig::new(HIDDEN, HIDDEN).init(device).into(),
            head: LinearConfig::new(HIDDEN, CLASSES).init(device).into(),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = relu(self.fc1.forward(x));
        let x = relu(self.fc2.forward(x));
        self.head.forward(x)
    }

    /// The same network, each sample through the adapter `batch` gives it.
    fn forward_mixed(&self, x: Tensor<2>, batch: &MixedBatch) -> Tensor<2> {
        let x = relu(self.fc1.forward_mixed(x, batch));
        let x = relu(self.fc2.forward_mixed(x, batch));
        self.head.forward_mixed(x, batch)
    }
}

/// A task labels a point by the largest of `CLASSES` linear scores: `argmax(x · teacher)`.
struct Task {
    name: &'static str,
    teacher: Tensor<2>,
}

impl Task {
    /// `count` points and their labels.
    fn sample(&self, count: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let x = Tensor::<2>::random([count, FEATURES], Distribution::Normal(0.0, 1.0), device);
        let labels = x
            .clone()
            .matmul(self.teacher.clone())
            .argmax(1)
            .reshape([count]);
        (x, labels)
    }

    /// A related task: this teacher moved by a random rank-2 change.
    fn related(&self, name: &'static str, device: &Device) -> Task {
        let u = Tensor::<2>::random([FEATURES, 2], Distribution::Normal(0.0, 0.8), device);
        let v = Tensor::<2>::random([2, CLASSES], Distribution::Normal(0.0, 0.8), device);
        Task {
            name,
            teacher: self.teacher.clone() + u.matmul(v),
        }
    }
}

fn accuracy(logits: Tensor<2>, labels: Tensor<1, Int>) -> f32 {
    let [count, _] = logits.dims();
    logits
        .argmax(1)
        .reshape([count])
        .equal(labels)
        .float()
        .mean()
        .into_scalar::<f32>()
}

fn train(mut model: Classifier, task: &Task, steps: usize, lr: f64, device: &Device) -> Classifier {
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut optimizer = AdamWConfig::new().init();
    for _ in 0..steps {
        let (x, labels) = task.sample(BATCH, device);
        let loss = loss_fn.forward(model.forward(x), labels);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(lr, model, grads);
    }
    model
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::default().autodiff();
    device.seed(0);
    let out = std::env::temp_dir().join("burn-lora-task-switching");
    std::fs::create_dir_all(&out)?;

    // 1. A base, and an adapter per task trained from it.
    let pretraining = Task {
        name: "base",
        teacher: Tensor::random([FEATURES, CLASSES], Distribution::Normal(0.0, 1.0), &device),
    };
    let tasks = [
        pretraining.related("task_a", &device),
        pretraining.related("task_b", &device),
    ];
    println!("pretraining the base classifier (all parameters)");
    let base = train(Classifier::new(&device), &pretraining, 400, 2e-3, &device);
    base.clone().save_file(out.join("base.bpk"))?;

    let config = LoraConfig::new(4)
        .with_alpha(Some(8.0))
        .with_targets(Targets::names(["fc1", "fc2", "head"]));
    for task in &tasks {
        let (model, report) = base.add_adapter(task.name, &config)?;
        println!(
            "training adapter `{}`: {} of {} parameters ({:.2}%)",
            task.name,
            report.trainable_params(),
            report.total_params(),
            report.trainable_percent()
        );
        let model = train(model, task, 400, 1e-2, &device);
        let saved = save_adapter(&model, out.join(task.name), task.name)?;
        println!(
            "  saved {} ({} bytes)",
            saved.weights_path.display(),
            saved.weights_bytes
        );
    }

    // 2. The base once, both adapters from disk; switching reattaches, it copies no weight.
    let start = Instant::now();
    let mut serving = base.clone();
    for task in &tasks {
        serving = load_adapter(&serving, out.join(task.name), task.name)?.0;
    }
    println!(
        "\nloaded both adapters in {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );

    let held_out: Vec<_> = tasks
        .iter()
        .map(|task| task.sample(2048, &device))
        .collect();
    println!("\naccuracy | adapter task_a | adapter task_b | no adapter");
    println!("---------|----------------|----------------|-----------");
    for (task, (x, labels)) in tasks.iter().zip(&held_out) {
        let mut row = format!("{:<8} |", task.name);
        for adapter in ["task_a", "task_b"] {
            let switched = serving.set_active(&[adapter])?;
            let score = accuracy(switched.forward(x.clone()), labels.clone());
            row += &format!(" {:>13.1}% |", 100.0 * score);
        }
        let plain = serving.disable_adapters()?;
        let score = accuracy(plain.forward(x.clone()), labels.clone());
        row += &format!(" {:>9.1}%", 100.0 * score);
        println!("{row}");
    }

    // What a switch costs, against reloading the model with the other adapter.
    let rounds = 20;
    let start = Instant::now();
    for round in 0..rounds {
        serving = serving.set_active(&[tasks[round % 2].name])?;
    }
    let switch_ms = start.elapsed().as_secs_f64() * 1e3 / rounds as f64;
    let start = Instant::now();
    for round in 0..rounds {
        let reloaded = Classifier::new(&device).try_load_file(out.join("base.bpk"))?;
        let name = tasks[round % 2].name;
        std::hint::black_box(load_adapter(&reloaded, out.join(name), name)?);
    }
    let reload_ms = start.elapsed().as_secs_f64() * 1e3 / rounds as f64;
    println!(
        "\nswitching adapters: {switch_ms:.3} ms; reloading base + adapter: {reload_ms:.3} ms \
         ({:.0}x)",
        reload_ms / switch_ms
    );
    // 3. One batch, half from each task, each sample through its own adapter.
    let half = 64;
    let x = Tensor::cat(
        vec![
            held_out[0].0.clone().narrow(0, 0, half),
            held_out[1].0.clone().narrow(0, 0, half),
        ],
        0,
    );
    let labels = Tensor::cat(
        vec![
            held_out[0].1.clone().narrow(0, 0, half),
            held_out[1].1.clone().narrow(0, 0, half),
        ],
        0,
    );
    let routes: Vec<Option<&str>> = (0..2 * half)
        .map(|i| Some(if i < half { "task_a" } else { "task_b" }))
        .collect();
    let batch = serving.mixed_batch(&routes)?;
    let logits = serving.forward_mixed(x, &batch);
    println!(
        "\nmixed batch of {} (half task_a, half task_b, one forward): {:.1}% accuracy",
        2 * half,
        100.0 * accuracy(logits, labels)
    );

    // 4. Sizes on disk.
    let base_bytes = file_size(&out.join("base.bpk"));
    println!("\nbase model file:  {base_bytes:>8} bytes");
    for task in &tasks {
        let bytes = file_size(&out.join(task.name).join("adapter_model.safetensors"));
        println!(
            "adapter {}:   {bytes:>8} bytes ({:.1}% of the base)",
            task.name,
            100.0 * bytes as f64 / base_bytes as f64
        );
    }
    Ok(())
}
