//! The task of the `learner` example and of `tests/learner.rs`: classify sequences the way a
//! "fine-tuned" teacher does. The teacher is the base model with a low-rank change of its
//! attention's query and value weights, so LoRA on the attention can learn it exactly, and the
//! data is generated offline from a seed.

use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::nn::attention::MultiHeadAttentionConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::gelu;
use burn::train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};
use burn_lora::nn::{MhaInput, MultiHeadAttention};
use burn_lora::{LoraConfig, LoraModule, Targets};

/// Width of the model.
pub const D_MODEL: usize = 32;
/// Attention heads.
pub const HEADS: usize = 4;
/// Tokens per sequence.
pub const SEQ: usize = 8;
/// Classes.
pub const CLASSES: usize = 4;

/// A transformer block with a classification head over the mean of its tokens.
#[derive(Module, Debug)]
pub struct Classifier {
    /// burn-lora's LoRA-ready attention (Burn's parameter paths).
    pub attention: MultiHeadAttention,
    /// Feed-forward, up.
    pub up: Linear,
    /// Feed-forward, down.
    pub down: Linear,
    /// The head.
    pub head: Linear,
    /// Sum the loss over the batch instead of averaging it: what makes one step over two
    /// devices (whose gradients burn-train adds) equal one step over their joint batch.
    pub sum_loss: bool,
}

impl Classifier {
    /// A randomly initialised base of width `d_model` (a multiple of [`HEADS`]) on `device`
    /// (seed it first for a reproducible one).
    pub fn with_width(device: &Device, d_model: usize) -> Self {
        Self {
            attention: MultiHeadAttentionConfig::new(d_model, HEADS)
                .with_dropout(0.0)
                .init(device)
                .into(),
            up: LinearConfig::new(d_model, 2 * d_model).init(device),
            down: LinearConfig::new(2 * d_model, d_model).init(device),
            head: LinearConfig::new(d_model, CLASSES).init(device),
            sum_loss: false,
        }
    }

    /// Class logits of `x: [batch, SEQ, D_MODEL]`, `[batch, CLASSES]`.
    pub fn logits(&self, x: Tensor<3>) -> Tensor<2> {
        let x = x.clone() + self.attention.forward(MhaInput::self_attn(x)).context;
        let x = x.clone() + self.down.forward(gelu(self.up.forward(x)));
        let pooled: Tensor<2> = x.mean_dim(1).squeeze_dim(1);
        self.head.forward(pooled)
    }

    /// Loss, logits and targets of a batch.
    pub fn classify(&self, batch: Batch) -> ClassificationOutput {
        let logits = self.logits(batch.x);
        let count = batch.labels.dims()[0] as f32;
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), batch.labels.clone());
        let loss = match self.sum_loss {
            true => loss.mul_scalar(count),
            false => loss,
        };
        ClassificationOutput::new(loss, logits, batch.labels)
    }
}

impl TrainStep for Classifier {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        let output = self.classify(batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl InferenceStep for Classifier {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.classify(batch)
    }
}

/// One sequence and its class.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `SEQ × width` values, row-major.
    pub x: Vec<f32>,
    /// The teacher's class.
    pub label: i64,
}

/// A batch on a device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, SEQ, width]`.
    pub x: Tensor<3>,
    /// `[batch]`.
    pub labels: Tensor<1, Int>,
}

/// Stacks samples into a [`Batch`].
#[derive(Debug, Clone, Default)]
pub struct SampleBatcher;

impl Batcher<Sample, Batch> for SampleBatcher {
    fn batch(&self, items: Vec<Sample>, device: &Device) -> Batch {
        let count = items.len();
        let width = items.first().map_or(D_MODEL, |item| item.x.len() / SEQ);
        let values: Vec<f32> = items.iter().flat_map(|item| item.x.clone()).collect();
        let labels: Vec<i64> = items.iter().map(|item| item.label).collect();
        Batch {
            x: Tensor::from_data(TensorData::new(values, [count, SEQ, width]), device),
            labels: Tensor::from_data(TensorData::new(labels, [count]), device),
        }
    }
}

impl SampleBatcher {
    /// A batch of `samples` on `device`.
    pub fn batch_of(&self, samples: &[Sample], device: &Device) -> Batch {
        self.batch(samples.to_vec(), device)
    }
}

/// The base model (seeded with `seed`) and `train + valid` samples labelled by its teacher.
pub fn base_and_data(
    device: &Device,
    seed: u64,
    train: usize,
    valid: usize,
) -> (Classifier, Vec<Sample>, Vec<Sample>) {
    base_and_data_of_width(device, seed, train, valid, D_MODEL)
}

/// [`base_and_data`] for a model of width `d_model`.
pub fn base_and_data_of_width(
    device: &Device,
    seed: u64,
    train: usize,
    valid: usize,
    d_model: usize,
) -> (Classifier, Vec<Sample>, Vec<Sample>) {
    device.seed(seed);
    let base = Classifier::with_width(device, d_model);
    let mut teacher = base.clone();
    // The change's size keeps its effect on the scores about the same at every width.
    let std = 0.4 * (D_MODEL as f64 / d_model as f64).sqrt();
    for weight in [
        &mut teacher.attention.query.weight,
        &mut teacher.attention.value.weight,
    ] {
        let u = Tensor::<2>::random([d_model, 4], Distribution::Normal(0.0, std), device);
        let v = Tensor::<2>::random([4, d_model], Distribution::Normal(0.0, std), device);
        *weight = weight.clone().map(|w| w + u.matmul(v));
    }
    let teacher = teacher.valid();
    let mut rng = SplitMix(seed ^ 0x5eed);
    let samples: Vec<Vec<f32>> = (0..train + valid)
        .map(|_| (0..SEQ * d_model).map(|_| rng.normal()).collect())
        .collect();
    let inner = device.clone().inner();
    let mut labelled = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(256) {
        let batch = SampleBatcher.batch(
            chunk
                .iter()
                .map(|x| Sample {
                    x: x.clone(),
                    label: 0,
                })
                .collect(),
            &inner,
        );
        let labels = teacher.logits(batch.x).argmax(1).flatten::<1>(0, 1);
        let labels = labels
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .unwrap();
        for (x, label) in chunk.iter().zip(labels) {
            labelled.push(Sample {
                x: x.clone(),
                label,
            });
        }
    }
    let valid_samples = labelled.split_off(train);
    (base, labelled, valid_samples)
}

/// The adapters the example trains: rank 8 on the attention's four projections.
pub fn lora_config() -> LoraConfig {
    LoraConfig::new(8)
        .with_alpha(Some(16.0))
        .with_targets(Targets::attention())
}

/// `base` with the example's adapters.
pub fn adapted(base: Classifier) -> Classifier {
    let (model, _) = lora_config()
        .apply(base)
        .expect("the attention is adaptable");
    assert!(!model.lora_adapters().is_empty());
    model
}

/// A small deterministic generator for the inputs (SplitMix64, Box–Muller normals).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}
