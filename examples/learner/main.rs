//! A LoRA run under burn-train's `Learner`: `TrainStep`/`InferenceStep`, loss and accuracy
//! metrics, LoRA+ learning rates from [`LoraPlusConfig`], and checkpoints that hold the
//! adapters only (PEFT files plus what an exact resume needs).
//!
//! ```sh
//! cargo run --release --features train --example learner                  # train, checkpoint, report sizes
//! cargo run --release --features train --example learner -- --resume 2    # continue the run from epoch 2
//! cargo run --release --features train --example learner -- --compare     # Learner against a hand-written loop
//! ```
//!
//! With a terminal attached burn-train shows its dashboard; otherwise (a pipe, CI) it prints
//! plain progress lines, and the metrics go to `<run>/train` and `<run>/valid`.

#[path = "task.rs"]
mod task;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::train::checkpoint::{Checkpointer, FileCheckpointer};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining, TrainStep};
use burn_lora::LoraPlusConfig;
use burn_lora::train::AdapterCheckpointer;
use task::{Batch, Classifier, Sample, SampleBatcher};

const SEED: u64 = 7;
const TRAIN: usize = 2048;
const VALID: usize = 512;
const BATCH: usize = 32;
const LR: f64 = 2e-3;
/// Timed epochs per loop in `--compare`; the best counts.
const ROUNDS: usize = 5;

fn loaders(
    train: Vec<Sample>,
    valid: Vec<Sample>,
) -> (Arc<dyn DataLoader<Batch>>, Arc<dyn DataLoader<Batch>>) {
    let train = DataLoaderBuilder::new(SampleBatcher)
        .batch_size(BATCH)
        .build(InMemDataset::new(train));
    let valid = DataLoaderBuilder::new(SampleBatcher)
        .batch_size(256)
        .build(InMemDataset::new(valid));
    (train, valid)
}

fn run(
    dir: &Path,
    epochs: usize,
    resume: Option<usize>,
) -> Result<(Classifier, f64), Box<dyn std::error::Error>> {
    let device = Device::default().autodiff();
    let (base, train, valid) = task::base_and_data(&device, SEED, TRAIN, VALID);
    let model = task::adapted(base);
    let (train, valid) = loaders(train, valid);
    let checkpoints = dir.join("checkpoint");
    let adapters = AdapterCheckpointer::new(&checkpoints, &model)?;
    let scheduler = LoraPlusConfig::new()
        .with_lr_ratio(4.0)
        .scheduler(&model, LR)?;
    let mut training = SupervisedTraining::new(dir, train, valid)
        .metrics((LossMetric::new(), AccuracyMetric::new()))
        .with_custom_checkpointers(
            adapters,
            FileCheckpointer::new(&checkpoints, "optim"),
            FileCheckpointer::new(&checkpoints, "scheduler"),
        )
        .num_epochs(epochs)
        .summary();
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    let optimizer = AdamWConfig::new().with_weight_decay(0.0).init();
    let start = Instant::now();
    let result = training.launch(Learner::new(model, optimizer, scheduler));
    let seconds = start.elapsed().as_secs_f64();
    if let Some(error) = result.error {
        return Err(format!("training failed: {error}").into());
    }
    Ok((result.model, seconds))
}

/// Counts the values of the gradients a step produced, parameter by parameter.
struct GradientSizes<'a> {
    grads: &'a GradientsParams,
    gradient_values: usize,
}

impl ModuleVisitor for GradientSizes<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            self.gradient_values += grad.shape().num_elements();
        }
    }
}

/// Writes `model`'s adapter checkpoint and its whole record into `dir`, and prints their sizes
/// and times.
fn checkpoint_sizes(model: &Classifier, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let adapters = AdapterCheckpointer::new(dir, model)?;
    let start = Instant::now();
    adapters.save(0, model.clone().into_record())?;
    let adapter_seconds = start.elapsed().as_secs_f64();
    let full = dir.join("full-model.bpk");
    let start = Instant::now();
    model.clone().into_record().save(&full)?;
    let full_seconds = start.elapsed().as_secs_f64();
    println!("| checkpoint | bytes | seconds |");
    println!("|---|---:|---:|");
    println!(
        "| adapters (PEFT files, resume record, flags) | {} | {adapter_seconds:.4} |",
        directory_size(&adapters.epoch_dir(0))
    );
    println!(
        "| whole model record | {} | {full_seconds:.4} |",
        std::fs::metadata(&full)?.len()
    );
    Ok(())
}

fn directory_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| match entry.path().is_dir() {
                    true => directory_size(&entry.path()),
                    false => entry.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Steps per second of the Learner against a hand-written loop on the same model and batches
/// (no checkpoints, loss metric only, one epoch each after a warm-up epoch), and checkpoint
/// sizes, for the task's model at width `width`.
fn compare(dir: &Path, width: usize) -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::default().autodiff();
    let (base, train, valid) = task::base_and_data_of_width(&device, SEED, TRAIN, VALID, width);
    println!(
        "model width {width}: {} values",
        task::adapted(base.clone()).num_params()
    );
    let steps = TRAIN.div_ceil(BATCH);
    let (train_loader, valid_loader) = loaders(train.clone(), valid.clone());

    let hand = |model: Classifier| {
        let mut model = model;
        let mut optimizer = AdamWConfig::new().with_weight_decay(0.0).init();
        let loader = DataLoaderBuilder::new(SampleBatcher)
            .batch_size(BATCH)
            .set_device(device.clone())
            .build(InMemDataset::new(train.clone()));
        let start = Instant::now();
        for batch in loader.iter() {
            let batch = batch.expect("the data is in memory");
            let output = TrainStep::step(&model, batch);
            let _ = output.item.loss.into_scalar::<f32>();
            model = optimizer.step(LR, model, output.grads);
        }
        (model, start.elapsed().as_secs_f64())
    };
    // Warm-up, then one timed epoch each, alternating.
    let _ = hand(task::adapted(base.clone()));
    let mut hand_times = Vec::new();
    let mut learner_times = Vec::new();
    for round in 0..ROUNDS {
        hand_times.push(hand(task::adapted(base.clone())).1);
        let model = task::adapted(base.clone());
        let start = Instant::now();
        let result = SupervisedTraining::new(
            dir.join(format!("compare-{round}")),
            train_loader.clone(),
            valid_loader.clone(),
        )
        .metric_train_numeric(LossMetric::new())
        .num_epochs(1)
        .launch(Learner::new(
            model,
            AdamWConfig::new().with_weight_decay(0.0).init(),
            LR,
        ));
        if let Some(error) = result.error {
            return Err(format!("training failed: {error}").into());
        }
        learner_times.push(start.elapsed().as_secs_f64());
    }
    // Two devices through burn-train's multi-device strategy: flex and ndarray, two CPU
    // backends sharing the same cores.
    #[allow(deprecated)]
    let devices = vec![Device::flex(), Device::ndarray()];
    let mut multi_times = Vec::new();
    for round in 0..ROUNDS {
        let start = Instant::now();
        let result = SupervisedTraining::new(
            dir.join(format!("multi-{round}")),
            train_loader.clone(),
            valid_loader.clone(),
        )
        .metric_train_numeric(LossMetric::new())
        .with_training_strategy(
            ExecutionStrategy::multi(devices.clone(), MultiDeviceOptim::OptimMainDevice).into(),
        )
        .num_epochs(1)
        .launch(Learner::new(
            task::adapted(base.clone()),
            AdamWConfig::new().with_weight_decay(0.0).init(),
            LR,
        ));
        if let Some(error) = result.error {
            return Err(format!("training failed: {error}").into());
        }
        multi_times.push(start.elapsed().as_secs_f64());
    }
    // The Learner's epoch includes one validation pass; time it alone to take it out.
    let model = task::adapted(base.clone()).valid();
    let start = Instant::now();
    for batch in valid_loader.iter() {
        let batch = batch.expect("the data is in memory");
        let _ = model.classify(batch).loss.into_scalar::<f32>();
    }
    let validation = start.elapsed().as_secs_f64();
    let hand_best = hand_times.iter().copied().fold(f64::INFINITY, f64::min);
    let learner_best = learner_times.iter().copied().fold(f64::INFINITY, f64::min) - validation;
    println!("| loop | batches of {BATCH} | seconds (best of {ROUNDS}) | batches/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| hand-written | {steps} | {hand_best:.3} | {:.1} |",
        steps as f64 / hand_best
    );
    println!(
        "| Learner (validation pass of {validation:.3} s taken out) | {steps} | {learner_best:.3} | {:.1} |",
        steps as f64 / learner_best
    );
    let multi_best = multi_times.iter().copied().fold(f64::INFINITY, f64::min) - validation;
    println!(
        "| Learner, two devices (flex + ndarray, same 2 cores), {BATCH} per device | {steps} | {multi_best:.3} | {:.1} |",
        steps as f64 / multi_best
    );
    println!(
        "Learner / hand-written time: {:.3}",
        learner_best / hand_best
    );

    let model = task::adapted(base);
    checkpoint_sizes(&model, &dir.join("compare-checkpoints"))?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|arg| arg == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>())
            .transpose()
    };
    let dir = PathBuf::from(
        std::env::var("LEARNER_RUN_DIR").unwrap_or_else(|_| "target/learner-run".into()),
    );
    if args.iter().any(|arg| arg == "--compare") {
        return compare(&dir, value("--width")?.unwrap_or(256));
    }
    let epochs = value("--epochs")?.unwrap_or(4);
    let resume = value("--resume")?;
    if resume.is_none() && dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let (model, seconds) = run(&dir, epochs, resume)?;
    println!("trained {epochs} epochs in {seconds:.1} s");

    // Checkpoint size and time: the adapters against the whole model's record.
    let checkpoints = dir.join("checkpoint");
    checkpoint_sizes(&model, &checkpoints.join("timing"))?;
    let adapter_dir = checkpoints.join(format!("adapter-{epochs}"));
    println!("PEFT adapter of the last epoch: {}", adapter_dir.display());

    // What a step hands to the other devices: the gradients, which exist for the adapters only.
    let device = Device::default().autodiff();
    let (_, train, _) = task::base_and_data(&device, SEED, BATCH, 1);
    let model = model.train();
    let step = TrainStep::step(&model, SampleBatcher.batch_of(&train, &device));
    let mut sizes = GradientSizes {
        grads: &step.grads,
        gradient_values: 0,
    };
    model.visit(&mut sizes);
    println!(
        "per step and device: {} gradient tensors, {} values ({} bytes); the model holds {} values ({} bytes)",
        step.grads.len(),
        sizes.gradient_values,
        4 * sizes.gradient_values,
        model.num_params(),
        4 * model.num_params()
    );
    Ok(())
}
