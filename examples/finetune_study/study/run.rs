//! What each child process does: pretrain the base on task A, or adapt it to task B one way
//! and measure the result.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use serde_json::json;

use super::corpus::{self, EOS, Example, Rng, Sequence, Vocab};
use super::memory;
use super::model::{Batch, LanguageModel};
use super::preset::Preset;
use super::rouge;
use super::train::{self, TrainSettings};
use super::variant::{RunResult, Variant};

/// Seeds of the study's independent data streams, mixed with the study's seed.
const PRETRAIN_STREAM: u64 = 0xA11CE;
const FINETUNE_STREAM: u64 = 0xB0B;
const VAL_STREAM: u64 = 0xCA201;
const TEST_STREAM: u64 = 0xDA7E;

/// The study's fixed data: the vocabulary and the held-out dialogues.
pub struct Data {
    pub vocab: Vocab,
    /// Validation dialogues (the loss curve).
    pub val: Vec<Example>,
    /// Test dialogues (ROUGE-1).
    pub test: Vec<Example>,
    held_out: HashSet<Vec<&'static str>>,
}

impl Data {
    pub fn new(preset: &Preset, seed: u64) -> Self {
        let draw = |stream: u64, n: usize| {
            let mut rng = Rng::new(seed ^ stream);
            (0..n)
                .map(|_| corpus::example(&mut rng))
                .collect::<Vec<_>>()
        };
        let val = draw(VAL_STREAM, preset.val_examples);
        let test = draw(TEST_STREAM, preset.test_examples);
        let held_out = val
            .iter()
            .chain(&test)
            .map(|e| e.dialogue.clone())
            .collect();
        Self {
            vocab: Vocab::new(),
            val,
            test,
            held_out,
        }
    }

    /// Whether an example is one of the held-out dialogues, which training never sees.
    fn is_held_out(&self, example: &Example) -> bool {
        self.held_out.contains(&example.dialogue)
    }

    /// Task B's validation sequences.
    pub fn val_sequences(&self) -> Vec<Sequence> {
        self.val
            .iter()
            .map(|e| corpus::summarisation_sequence(&self.vocab, e))
            .collect()
    }

    /// Task B's validation batch.
    pub fn val_batch(&self, device: &Device) -> Batch {
        Batch::new(&self.val_sequences(), device)
    }
}

/// The path of the pretrained base in the work directory.
pub fn base_path(work: &Path) -> PathBuf {
    work.join("base.bpk")
}

/// The path of a run's results in the work directory.
pub fn result_path(work: &Path, run: &str) -> PathBuf {
    work.join(format!("{run}.json"))
}

/// Pretrains a model on task A from `seed` and saves it as the base.
pub fn pretrain(preset: &Preset, seed: u64, work: &Path, progress: bool) -> Result<(), String> {
    let device = Device::default().autodiff();
    device.seed(seed);
    let data = Data::new(preset, seed);
    let model = preset.model(data.vocab.len()).init(&device);
    let total_params = model.num_params();
    // Task A's validation set: held-out language-modelling sequences.
    let mut val_rng = Rng::new(seed ^ PRETRAIN_STREAM ^ VAL_STREAM);
    let val_sequences: Vec<Sequence> = (0..preset.val_examples)
        .map(|_| corpus::pretraining_sequence(&data.vocab, &mut val_rng))
        .collect();
    let mut rng = Rng::new(seed ^ PRETRAIN_STREAM);
    let mut next = || corpus::pretraining_sequence(&data.vocab, &mut rng);
    let settings = TrainSettings {
        steps: preset.pretrain_steps,
        batch: preset.batch,
        peak_lr: preset.pretrain_lr,
        eval_every: preset.eval_every * 5,
        lora_plus_ratio: None,
    };
    let start = Instant::now();
    let label = progress.then_some("pretrain (task A)");
    let dir = work.join("pretrain.learner");
    let trained = train::train(model, &mut next, &settings, &val_sequences, &dir, label)?;
    let seconds = start.elapsed().as_secs_f64();
    let task_b_loss = train::validation_loss(&trained.model, &data.val_batch(&device.inner()));
    trained
        .model
        .save_file(base_path(work))
        .map_err(|e| format!("cannot save the base model: {e}"))?;
    let summary = json!({
        "params": total_params,
        "steps": preset.pretrain_steps,
        "seconds": seconds,
        "curve": trained.curve,
        "task_b_val_loss": task_b_loss,
    });
    write_json(&result_path(work, "pretrain"), &summary)
}

/// Adapts the base to task B as `variant` says, then measures it, and writes `run.json`.
/// `seed` is the study's (the base, the held-out dialogues); `finetune_seed` draws the
/// fine-tuning data stream, the adapters' initialisation and dropout.
pub fn finetune(
    preset: &Preset,
    seed: u64,
    finetune_seed: u64,
    variant: Variant,
    work: &Path,
    run: &str,
    progress: bool,
) -> Result<(), String> {
    let device = Device::default().autodiff();
    device.seed(finetune_seed);
    let data = Data::new(preset, seed);
    let base = preset
        .model(data.vocab.len())
        .init(&device)
        .try_load_file(base_path(work))
        .map_err(|e| format!("cannot load the base model: {e}"))?;
    let base_params = base.num_params();
    let base = match variant.quantized_bits() {
        Some(bits) => quantize(base, bits, &device)?,
        None => base,
    };
    let (model, trainable_params, total_params) = match (variant, variant.lora()) {
        (_, Some(config)) => {
            let (model, report) = config.apply(base).map_err(|e| e.to_string())?;
            (model, report.trainable_params(), report.total_params())
        }
        (Variant::Full, None) => (base, base_params, base_params),
        _ => (base, 0, base_params),
    };

    let tracks_memory = memory::reset_peak_rss();
    let (model, curve, step_seconds) = if variant == Variant::Base {
        let loss = train::validation_loss(&model, &data.val_batch(&device.clone().inner()));
        (model, vec![(0, loss)], Vec::new())
    } else {
        let mut rng = Rng::new(finetune_seed ^ FINETUNE_STREAM);
        let mut next = || loop {
            let example = corpus::example(&mut rng);
            if !data.is_held_out(&example) {
                break corpus::summarisation_sequence(&data.vocab, &example);
            }
        };
        let settings = TrainSettings {
            steps: preset.finetune_steps,
            batch: preset.batch,
            peak_lr: preset.lr_for(variant),
            eval_every: preset.eval_every,
            lora_plus_ratio: variant.lora_plus_ratio(),
        };
        let label = variant.id();
        let label = progress.then_some(label.as_str());
        let dir = work.join(format!("{run}.learner"));
        let val = data.val_sequences();
        let trained = train::train(model, &mut next, &settings, &val, &dir, label)?;
        (trained.model, trained.curve, trained.step_seconds)
    };
    // The base's process only evaluates; its peak is not a training peak.
    let peak_rss_mib = match (tracks_memory, variant) {
        (true, Variant::Base) | (false, _) => None,
        (true, _) => memory::peak_rss_mib(),
    };

    let (rouge, generations_digest, samples) = evaluate(&model.valid(), &data, &device.inner());
    let disk_bytes = save(&model, variant, &work.join(run))?;
    let result = RunResult {
        variant: variant.id(),
        trainable_params,
        total_params,
        train_seconds: step_seconds.iter().sum(),
        step_ms: median(&step_seconds) * 1e3,
        peak_rss_mib,
        disk_bytes,
        rouge1: rouge.f1,
        rouge1_precision: rouge.precision,
        rouge1_recall: rouge.recall,
        curve,
        generations_digest,
        samples,
    };
    write_json(&result_path(work, run), &result.to_json())
}

/// The base with the linear weights of its encoder quantized to `bits`-bit symmetric integers,
/// one f32 scale per block of 32 values (QLoRA's frozen base). As in QLoRA, the output head
/// stays in f32, and so do embeddings, norms and biases.
fn quantize(model: LanguageModel, bits: u8, device: &Device) -> Result<LanguageModel, String> {
    use burn::module::{ParamGroup, Quantizer};
    use burn::tensor::quantization::{Calibration, QuantValue, ScaleDtype};
    let value = match bits {
        8 => QuantValue::Q8S,
        _ => QuantValue::Q4S,
    };
    let scheme = device
        .settings()
        .quantization
        .scheme
        .with_value(value)
        .per_block([32], ScaleDtype::F32);
    let mut quantizer = Quantizer::new(Calibration::MinMax, scheme);
    quantizer.set_param_group(ParamGroup::from_predicate("encoder"));
    burn_lora::quantize_base(model, &mut quantizer).map_err(|e| e.to_string())
}

/// Mean ROUGE-1 of greedy summaries of the test dialogues, a digest of every generated token, and
/// the first few (reference, generated) pairs.
fn evaluate(
    model: &LanguageModel,
    data: &Data,
    device: &Device,
) -> (rouge::Rouge1, u64, Vec<(String, String)>) {
    let vocab = &data.vocab;
    let prompts: Vec<Vec<usize>> = data.test.iter().map(|e| corpus::prompt(vocab, e)).collect();
    let longest = data.test.iter().map(|e| e.summary.len()).max().unwrap_or(0);
    let generated = model.generate(&prompts, vocab.id(EOS), longest + 4, device);
    let words: Vec<Vec<&str>> = generated
        .iter()
        .map(|tokens| tokens.iter().map(|t| vocab.word(*t)).collect())
        .collect();
    let score = rouge::mean(
        words
            .iter()
            .zip(&data.test)
            .map(|(g, e)| (g.as_slice(), e.summary.as_slice())),
    );
    let digest = generated
        .iter()
        .flatten()
        .chain([&usize::MAX])
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, token| {
            (hash ^ *token as u64).wrapping_mul(0x0100_0000_01b3)
        });
    let samples = words
        .iter()
        .zip(&data.test)
        .take(3)
        .map(|(g, e)| (e.summary.join(" "), g.join(" ")))
        .collect();
    (score, digest, samples)
}

/// Saves what the variant ships and returns its size in bytes: the whole model for the base
/// and full fine-tuning, the PEFT adapter files for LoRA.
fn save(model: &LanguageModel, variant: Variant, dir: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if variant.lora().is_some() {
        burn_lora::peft::save_adapter(model, dir, burn_lora::DEFAULT_ADAPTER)
            .map_err(|e| e.to_string())?;
    } else {
        model
            .clone()
            .save_file(dir.join("model.bpk"))
            .map_err(|e| format!("cannot save the model: {e}"))?;
    }
    directory_size(dir)
}

fn directory_size(dir: &Path) -> Result<u64, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut total = 0;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        total += entry.metadata().map_err(|e| e.to_string())?.len();
    }
    Ok(total)
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}
