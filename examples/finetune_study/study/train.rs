//! One training run: AdamW with warmup and cosine decay, a validation loss every few steps,
//! and the time of each step.

use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::optim::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::optim::{AdamWConfig, GradientsParams, LearningRate};
use burn::prelude::*;
use burn_lora::LoraPlusConfig;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::corpus::Sequence;
use super::model::{Batch, LanguageModel};

/// How one run trains.
#[derive(Clone, Debug)]
pub struct TrainSettings {
    pub steps: usize,
    pub batch: usize,
    pub peak_lr: f64,
    pub eval_every: usize,
    /// LoRA+: `B` learns at this many times the rate of everything else.
    pub lora_plus_ratio: Option<f64>,
}

impl TrainSettings {
    /// Linear warmup over the first tenth, then cosine decay to a tenth of the peak.
    pub fn lr(&self, step: usize) -> f64 {
        let warmup = (self.steps / 10).max(1);
        if step < warmup {
            return self.peak_lr * (step + 1) as f64 / warmup as f64;
        }
        let progress = (step - warmup) as f64 / (self.steps - warmup).max(1) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak_lr * (0.1 + 0.9 * cosine)
    }
}

/// [`TrainSettings::lr`] as a Burn schedule, step after step.
#[derive(Clone)]
struct Schedule {
    settings: TrainSettings,
    step: usize,
}

impl LrScheduler for Schedule {
    fn step(&mut self) -> LearningRate {
        let lr = self.settings.lr(self.step);
        self.step += 1;
        lr
    }

    fn to_record(&self) -> LrSchedulerRecord {
        LrSchedulerRecord::new().with_scalar("step", self.step as u64)
    }

    fn load_record(&mut self, record: LrSchedulerRecord) {
        self.step = record.scalar::<u64>("step").unwrap_or(0) as usize;
    }
}

/// What a run produced.
pub struct Trained {
    pub model: LanguageModel,
    /// (step, validation loss), from step 0 (before training) to the last.
    pub curve: Vec<(usize, f64)>,
    /// Seconds of each training step.
    pub step_seconds: Vec<f64>,
}

/// Trains `model` on batches drawn from `next_sequence`. The validation loss is taken on
/// `val`, which lives on the inference device, every `eval_every` steps and at the end. A
/// progress bar with `label` shows on a terminal; `None` draws none.
pub fn train(
    mut model: LanguageModel,
    next_sequence: &mut dyn FnMut() -> Sequence,
    settings: &TrainSettings,
    val: &Batch,
    label: Option<&str>,
) -> Trained {
    let device = model.devices()[0].clone();
    let mut optimizer = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init();
    let progress = match label {
        Some(label) => progress_bar(settings.steps as u64, label),
        None => ProgressBar::hidden(),
    };
    let schedule = Schedule {
        settings: settings.clone(),
        step: 0,
    };
    let mut schedule = match settings.lora_plus_ratio {
        Some(ratio) => LoraPlusConfig::new()
            .with_lr_ratio(ratio)
            .scheduler_from(&model, schedule)
            .expect("LoRA+ trains an adapted model"),
        None => ModuleLrScheduler::new(schedule),
    };
    let mut curve = vec![(0, validation_loss(&model, val))];
    let mut step_seconds = Vec::with_capacity(settings.steps);
    for step in 0..settings.steps {
        let sequences: Vec<Sequence> = (0..settings.batch).map(|_| next_sequence()).collect();
        let start = Instant::now();
        let batch = Batch::new(&sequences, &device);
        let loss = model.loss(&batch);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(schedule.step(), model, grads);
        let loss: f32 = loss.into_scalar();
        step_seconds.push(start.elapsed().as_secs_f64());
        let done = step + 1;
        if done % settings.eval_every == 0 || done == settings.steps {
            let val_loss = validation_loss(&model, val);
            curve.push((done, val_loss));
            progress.set_message(format!("train {loss:.3}  val {val_loss:.3}"));
        }
        progress.inc(1);
    }
    progress.finish();
    Trained {
        model,
        curve,
        step_seconds,
    }
}

/// The loss on `val` without dropout or autodiff.
pub fn validation_loss(model: &LanguageModel, val: &Batch) -> f64 {
    model.valid().loss(val).into_scalar::<f32>() as f64
}

fn progress_bar(len: u64, label: &str) -> ProgressBar {
    let progress = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{prefix:>20} [{bar:30}] {pos:>4}/{len} {msg} ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    progress.set_prefix(label.to_string());
    progress
}
