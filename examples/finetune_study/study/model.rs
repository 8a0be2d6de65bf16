//! A small decoder-only transformer built from burn-lora's LoRA-ready encoder blocks with a
//! causal mask, and what the study does with it: the masked next-token loss and greedy decoding.

use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::TransformerEncoderConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn_lora::nn::{TransformerEncoder, TransformerEncoderInput};

use super::corpus::Sequence;

/// The language model's shape.
#[derive(Config, Debug)]
pub struct LanguageModelConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub d_model: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Transformer layers.
    pub n_layers: usize,
    /// Longest sequence.
    pub max_len: usize,
    /// Dropout in every block.
    #[config(default = 0.1)]
    pub dropout: f64,
}

impl LanguageModelConfig {
    pub fn init(&self, device: &Device) -> LanguageModel {
        let encoder =
            TransformerEncoderConfig::new(self.d_model, self.d_ff, self.n_heads, self.n_layers)
                .with_dropout(self.dropout)
                .with_norm_first(true)
                .init(device);
        LanguageModel {
            tokens: EmbeddingConfig::new(self.vocab, self.d_model).init(device),
            positions: EmbeddingConfig::new(self.max_len, self.d_model).init(device),
            encoder: encoder.into(),
            norm: LayerNormConfig::new(self.d_model).init(device),
            head: LinearConfig::new(self.d_model, self.vocab).init(device),
        }
    }
}

/// Token and position embeddings, pre-norm transformer layers under a causal mask, and a
/// head over the vocabulary. Its attention projections are `LoraLinear`s, at
/// `encoder.layers.<i>.mha.{query,key,value,output}`.
#[derive(Module, Debug)]
pub struct LanguageModel {
    pub tokens: Embedding,
    pub positions: Embedding,
    pub encoder: TransformerEncoder,
    pub norm: LayerNorm,
    pub head: Linear,
}

impl LanguageModel {
    /// Next-token logits: `[batch, seq]` token ids to `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .repeat_dim(0, batch);
        let x = self.tokens.forward(tokens) + self.positions.forward(positions);
        let mask = generate_autoregressive_mask(batch, seq, &device);
        let x = self
            .encoder
            .forward(TransformerEncoderInput::new(x).mask_attn(mask));
        self.head.forward(self.norm.forward(x))
    }

    /// The mean cross-entropy over the batch's target positions.
    pub fn loss(&self, batch: &Batch) -> Tensor<1> {
        let logits = self.forward(batch.inputs.clone());
        let [b, s, v] = logits.dims();
        let log_probs = log_softmax(logits.reshape([b * s, v]), 1);
        let picked = log_probs
            .gather(1, batch.labels.clone().reshape([b * s, 1]))
            .reshape([b * s]);
        -(picked * batch.weights.clone()).sum() / batch.target_count as f64
    }

    /// Greedy completions of `prompts`, each stopped at `eos`, after `max_new` tokens or at the
    /// longest sequence the model takes (`eos` excluded). Decodes the whole batch at once; the causal mask keeps each row's
    /// padding out of its predictions.
    pub fn generate(
        &self,
        prompts: &[Vec<usize>],
        eos: usize,
        max_new: usize,
        device: &Device,
    ) -> Vec<Vec<usize>> {
        let mut rows: Vec<Vec<usize>> = prompts.to_vec();
        let mut done = vec![false; rows.len()];
        let max_len = self.positions.weight.dims()[0];
        for _ in 0..max_new {
            if done.iter().all(|d| *d) {
                break;
            }
            let width = rows.iter().map(Vec::len).max().unwrap_or(0);
            let tokens = pad(&rows, width, 0, device);
            let next: Vec<i64> = self
                .forward(tokens)
                .argmax(2)
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .expect("argmax gives integers");
            for (i, row) in rows.iter_mut().enumerate() {
                if done[i] {
                    continue;
                }
                let token = next[i * width + row.len() - 1] as usize;
                if token == eos || row.len() + 1 > max_len {
                    done[i] = true;
                } else {
                    row.push(token);
                }
            }
        }
        rows.into_iter()
            .zip(prompts)
            .map(|(row, prompt)| row[prompt.len()..].to_vec())
            .collect()
    }
}

/// Sequences as tensors: inputs, next-token labels, and a weight of 1 on each target.
#[derive(Clone, Debug)]
pub struct Batch {
    pub inputs: Tensor<2, Int>,
    pub labels: Tensor<2, Int>,
    pub weights: Tensor<1>,
    pub target_count: usize,
}

impl Batch {
    pub fn new(sequences: &[Sequence], device: &Device) -> Self {
        let width = sequences
            .iter()
            .map(|s| s.tokens.len() - 1)
            .max()
            .unwrap_or(1);
        let inputs: Vec<Vec<usize>> = sequences
            .iter()
            .map(|s| s.tokens[..s.tokens.len() - 1].to_vec())
            .collect();
        let labels: Vec<Vec<usize>> = sequences.iter().map(|s| s.tokens[1..].to_vec()).collect();
        let mut weights = vec![0.0f32; sequences.len() * width];
        for (row, sequence) in sequences.iter().enumerate() {
            for (col, target) in sequence.targets.iter().enumerate() {
                weights[row * width + col] = if *target { 1.0 } else { 0.0 };
            }
        }
        let target_count = weights.iter().filter(|w| **w > 0.0).count().max(1);
        Self {
            inputs: pad(&inputs, width, 0, device),
            labels: pad(&labels, width, 0, device),
            weights: Tensor::from_data(TensorData::new(weights, [sequences.len() * width]), device),
            target_count,
        }
    }
}

/// Right-pads each row to `width` with `fill`.
fn pad(rows: &[Vec<usize>], width: usize, fill: usize, device: &Device) -> Tensor<2, Int> {
    let mut flat = Vec::with_capacity(rows.len() * width);
    for row in rows {
        flat.extend(row.iter().map(|t| *t as i64));
        flat.extend(std::iter::repeat_n(fill as i64, width - row.len()));
    }
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}
