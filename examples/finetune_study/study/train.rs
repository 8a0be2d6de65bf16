//! One training run under burn-train's `Learner`: AdamW with warmup and cosine decay (LoRA+'s
//! rates where the variant asks for them), a validation pass every few steps, and the time of
//! each step.
//!
//! burn-train validates once per epoch, so an epoch here is one stretch of `eval_every` steps:
//! the run's batches are drawn up front from the data stream, and the loader serves the next
//! stretch each time the Learner starts an epoch. The model is wrapped in a [`Trainee`] whose
//! steps leave their start time and validation loss in a shared log.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::grad_clipping::GradientClippingConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::optim::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::optim::{AdamWConfig, LearningRate};
use burn::prelude::*;
use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{Adaptor, ItemLazy, LossInput, LossMetric, MetricDefinition};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};
use burn::train::{
    InferenceStep, Learner, LearnerSummary, SupervisedTraining, TrainOutput, TrainStep,
};
use burn_lora::LoraPlusConfig;
use burn_std::ExecutionError;
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

    /// The Learner's epochs: stretches of `eval_every` steps, the last one possibly shorter.
    fn epochs(&self) -> usize {
        self.steps.div_ceil(self.eval_every.max(1))
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

/// What the steps of a run leave behind, in the order they happened.
#[derive(Debug)]
enum Event {
    /// A training step started.
    Step(Instant),
    /// A validation pass started, and gave this loss.
    Validation(Instant, f64),
}

/// The log a [`Trainee`] and its copies share (the Learner clones the model for validation).
#[derive(Clone, Debug, Default)]
pub struct Log(Arc<Mutex<Vec<Event>>>);

impl Log {
    fn push(&self, event: Event) {
        self.0
            .lock()
            .expect("no step panics holding the log")
            .push(event);
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().expect("no step panics holding the log"))
    }
}

/// The study's model as burn-train sees it: the language model, and the log its steps write.
#[derive(Module, Debug)]
pub struct Trainee {
    pub model: LanguageModel,
    #[module(skip)]
    log: Log,
}

/// A step's output: the loss, for burn-train's loss metric.
pub struct StepOutput {
    loss: Tensor<1>,
}

impl Adaptor<LossInput> for StepOutput {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss.clone())
    }
}

impl ItemLazy for StepOutput {
    fn sync(self) -> Result<Self, ExecutionError> {
        // The metric thread reads the loss off the autodiff graph, which it must not keep.
        self.loss.device().flush()?;
        Ok(Self {
            loss: self.loss.without_autodiff(),
        })
    }
}

impl TrainStep for Trainee {
    type Input = Batch;
    type Output = StepOutput;

    fn step(&self, batch: Batch) -> TrainOutput<StepOutput> {
        self.log.push(Event::Step(Instant::now()));
        let loss = self.model.loss(&batch);
        TrainOutput::new(self, loss.backward(), StepOutput { loss })
    }
}

impl InferenceStep for Trainee {
    type Input = Batch;
    type Output = StepOutput;

    fn step(&self, batch: Batch) -> StepOutput {
        let start = Instant::now();
        let loss = self.model.loss(&batch);
        let value = loss.clone().into_scalar::<f32>() as f64;
        self.log.push(Event::Validation(start, value));
        StepOutput { loss }
    }
}

/// The run's training batches, drawn up front, served one stretch of `per_epoch` batches per
/// epoch of the Learner.
#[derive(Clone)]
struct Stretches {
    batches: Arc<Vec<Vec<Sequence>>>,
    per_epoch: usize,
    /// The stretch the next epoch gets; shared by the copies `to_device` makes.
    next: Arc<AtomicUsize>,
    device: Device,
}

/// A fixed list of batches, built on the device as they are served.
struct Served<'a> {
    batches: &'a [Vec<Sequence>],
    device: Device,
    done: usize,
}

impl Iterator for Served<'_> {
    type Item = Result<Batch, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let sequences = self.batches.get(self.done)?;
        self.done += 1;
        Some(Ok(Batch::new(sequences, &self.device)))
    }
}

impl DataLoaderIterator<Batch> for Served<'_> {
    fn progress(&self) -> Progress {
        Progress::new(self.done, self.batches.len(), Some("batches".into()))
    }
}

impl Stretches {
    fn stretch(&self, index: usize) -> &[Vec<Sequence>] {
        let start = (index * self.per_epoch).min(self.batches.len());
        let end = (start + self.per_epoch).min(self.batches.len());
        &self.batches[start..end]
    }
}

impl DataLoader<Batch> for Stretches {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<Batch> + 'a> {
        let index = self.next.fetch_add(1, Ordering::SeqCst);
        Box::new(Served {
            batches: self.stretch(index),
            device: self.device.clone(),
            done: 0,
        })
    }

    fn num_items(&self) -> usize {
        self.stretch(self.next.load(Ordering::SeqCst)).len()
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<Batch>> {
        Arc::new(Self {
            device: device.clone(),
            ..self.clone()
        })
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<Batch>> {
        Arc::new(Self {
            batches: Arc::new(self.batches[start..end].to_vec()),
            next: Arc::new(AtomicUsize::new(0)),
            ..self.clone()
        })
    }
}

/// The validation set: one batch, every epoch.
struct Validation {
    sequences: Arc<Vec<Vec<Sequence>>>,
    device: Device,
}

impl DataLoader<Batch> for Validation {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<Batch> + 'a> {
        Box::new(Served {
            batches: &self.sequences,
            device: self.device.clone(),
            done: 0,
        })
    }

    fn num_items(&self) -> usize {
        self.sequences.len()
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<Batch>> {
        Arc::new(Self {
            sequences: self.sequences.clone(),
            device: device.clone(),
        })
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<Batch>> {
        Arc::new(Self {
            sequences: Arc::new(self.sequences[start..end].to_vec()),
            device: self.device.clone(),
        })
    }
}

/// burn-train's renderer for the study: one progress bar over the run's steps, on a terminal
/// and only when asked (several runs side by side would overwrite each other's bars).
struct Bar {
    bar: ProgressBar,
    training: bool,
    /// Steps of the epochs before this one.
    before: u64,
    last_val: Option<f64>,
}

impl Bar {
    fn new(steps: usize, label: Option<&str>) -> Self {
        let bar = match label {
            Some(label) => {
                let bar =
                    ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>20} [{bar:30}] {pos:>4}/{len} {msg} ({elapsed})",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(label.to_string());
                bar
            }
            None => ProgressBar::hidden(),
        };
        Self {
            bar,
            training: false,
            before: 0,
            last_val: None,
        }
    }
}

impl TrainingProgressLogger for Bar {
    fn start(
        &mut self,
        _epochs: usize,
        _start: usize,
        _items: Option<usize>,
        _label: Option<&str>,
    ) {
    }

    fn update_epoch(&mut self, _epoch: usize) {}

    fn start_split(&mut self, split: &str, _items: usize) {
        self.training = split == "train";
        self.before = self.bar.position();
    }

    fn update_split(&mut self, items: usize) {
        if self.training {
            self.bar.set_position(self.before + items as u64);
        }
    }

    fn end_split(&mut self) {
        if let Some(loss) = self.last_val {
            self.bar.set_message(format!("val {loss:.3}"));
        }
    }

    fn end(&mut self) {
        self.bar.finish();
    }

    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for Bar {
    fn start_global_progress(&mut self, _tests: usize) {}
    fn start_test(&mut self, _name: &str, _items: usize) {}
    fn update_test_progress(&mut self, _items: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRendererTraining for Bar {
    fn update_train(&mut self, _state: MetricState) {}

    fn update_valid(&mut self, state: MetricState) {
        if let MetricState::Numeric(_, Some(value)) = state {
            self.last_val = Some(value.current());
        }
    }

    fn on_train_end(
        &mut self,
        _summary: Option<LearnerSummary>,
    ) -> Result<(), Box<dyn core::error::Error>> {
        Ok(())
    }
}

impl MetricsRendererEvaluation for Bar {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
}

impl MetricsRenderer for Bar {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _definition: MetricDefinition) {}
}

/// What a run produced.
pub struct Trained {
    pub model: LanguageModel,
    /// (step, validation loss), from step 0 (before training) to the last.
    pub curve: Vec<(usize, f64)>,
    /// Seconds of each training step, from its start to the next step's (or the validation's)
    /// start: data, forward, backward, optimizer and the Learner's own work.
    pub step_seconds: Vec<f64>,
}

/// Trains `model` with burn-train's `Learner` on `steps × batch` sequences drawn from
/// `next_sequence`, validating on `val` (its sequences, on the inference device) every
/// `eval_every` steps. The Learner's files (metric logs) go to `dir`. A progress bar with
/// `label` shows on a terminal; `None` draws none.
pub fn train(
    model: LanguageModel,
    next_sequence: &mut dyn FnMut() -> Sequence,
    settings: &TrainSettings,
    val: &[Sequence],
    dir: &Path,
    label: Option<&str>,
) -> Result<Trained, String> {
    let device = model.devices()[0].clone();
    let batches: Vec<Vec<Sequence>> = (0..settings.steps)
        .map(|_| (0..settings.batch).map(|_| next_sequence()).collect())
        .collect();
    let train_loader = Arc::new(Stretches {
        batches: Arc::new(batches),
        per_epoch: settings.eval_every.max(1),
        next: Arc::new(AtomicUsize::new(0)),
        device: device.clone(),
    });
    let valid_loader = Arc::new(Validation {
        sequences: Arc::new(vec![val.to_vec()]),
        device: device.clone().inner(),
    });
    let start_loss = validation_loss(&model, &Batch::new(val, &device.clone().inner()));

    let log = Log::default();
    let trainee = Trainee {
        model,
        log: log.clone(),
    };
    let schedule = Schedule {
        settings: settings.clone(),
        step: 0,
    };
    let scheduler = match settings.lora_plus_ratio {
        Some(ratio) => LoraPlusConfig::new()
            .with_lr_ratio(ratio)
            .scheduler_from(&trainee, schedule)
            .map_err(|e| format!("LoRA+ trains an adapted model: {e}"))?,
        None => ModuleLrScheduler::new(schedule),
    };
    let optimizer = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init();
    let result = SupervisedTraining::new(dir, train_loader, valid_loader)
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .renderer(Box::new(Bar::new(settings.steps, label)))
        .with_application_logger(None)
        .num_epochs(settings.epochs())
        .launch(Learner::new(trainee, optimizer, scheduler));
    if let Some(error) = result.error {
        return Err(format!("training failed: {error}"));
    }

    // Each step lasts until the next event starts; the run ends with a validation.
    let events = log.take();
    let starts = events.iter().map(|event| match event {
        Event::Step(at) | Event::Validation(at, _) => *at,
    });
    let step_seconds: Vec<f64> = events
        .iter()
        .zip(starts.skip(1))
        .filter_map(|(event, next)| match event {
            Event::Step(at) => Some(next.duration_since(*at).as_secs_f64()),
            Event::Validation(..) => None,
        })
        .collect();
    let mut curve = vec![(0, start_loss)];
    let mut steps = 0;
    for event in &events {
        match event {
            Event::Step(_) => steps += 1,
            Event::Validation(_, loss) => curve.push((steps, *loss)),
        }
    }
    if steps != settings.steps || step_seconds.len() != settings.steps {
        return Err(format!(
            "the Learner ran {steps} steps of the {} asked for",
            settings.steps
        ));
    }
    Ok(Trained {
        model: result.model.model,
        curve,
        step_seconds,
    })
}

/// The loss on `val` without dropout or autodiff.
pub fn validation_loss(model: &LanguageModel, val: &Batch) -> f64 {
    model.valid().loss(val).into_scalar::<f32>() as f64
}
