//! BERT (`BertForSequenceClassification`): embeddings of tokens, positions and segments, a
//! post-norm encoder, which is exactly Burn's `TransformerEncoder` without `norm_first` (here
//! [`burn_lora::nn::TransformerEncoder`]), a pooler on the first token, and a classifier.
//!
//! | Hugging Face | this port |
//! |---|---|
//! | `bert.embeddings.{word,position,token_type}_embeddings` | `embeddings.{word,position,token_type}_embeddings` (`Embedding`) |
//! | `bert.embeddings.LayerNorm` | `embeddings.norm` (`LayerNorm`) |
//! | `bert.encoder.layer.N.attention.self.{query,key,value}` | `encoder.layers.N.mha.{query,key,value}` (`MultiHeadAttention`) |
//! | `bert.encoder.layer.N.attention.output.dense` | `encoder.layers.N.mha.output` |
//! | `bert.encoder.layer.N.attention.output.LayerNorm` | `encoder.layers.N.norm_1` |
//! | `bert.encoder.layer.N.intermediate.dense` | `encoder.layers.N.pwff.linear_inner` (`PositionWiseFeedForward`, exact GELU) |
//! | `bert.encoder.layer.N.output.dense` | `encoder.layers.N.pwff.linear_outer` |
//! | `bert.encoder.layer.N.output.LayerNorm` | `encoder.layers.N.norm_2` |
//! | `bert.pooler.dense` | `pooler` (`LoraLinear`, then tanh) |
//! | `classifier` | `classifier` (`LoraLinear`) |
//!
//! Padded keys are masked with Burn's `min_float` (-1e4), which gives them a weight of exactly
//! zero in f32, as Hugging Face's additive mask of the dtype's minimum does.

use std::path::Path;

use burn::nn::transformer::TransformerEncoderConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn_lora::nn::{TransformerEncoder, TransformerEncoderInput};
use burn_lora::peft::KeyMap;
use burn_lora::store::HfCheckpoint;
use burn_lora::{LoraLinear, LoraLinearConfig};
use serde::Deserialize;

/// The fields of a BERT `config.json` this port reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// The vocabulary size.
    pub vocab_size: usize,
    /// The model size.
    pub hidden_size: usize,
    /// The number of encoder layers.
    pub num_hidden_layers: usize,
    /// The number of attention heads.
    pub num_attention_heads: usize,
    /// The feed-forward size.
    pub intermediate_size: usize,
    /// The number of learned positions.
    pub max_position_embeddings: usize,
    /// The number of segments (`token_type_ids`).
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// The layer norms' epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// The feed-forward activation; only `gelu` (exact) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// The position embeddings; only `absolute` is supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// The labels by index: their number is the classifier's size.
    #[serde(default)]
    pub id2label: Option<serde_json::Map<String, serde_json::Value>>,
    /// The classifier's size, when `id2label` does not say.
    #[serde(default)]
    pub num_labels: Option<usize>,
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_hidden_act() -> String {
    "gelu".to_string()
}

fn default_position_embedding_type() -> String {
    "absolute".to_string()
}

impl BertConfig {
    /// The number of classes: `id2label`'s size, `num_labels`, or transformers' default, 2.
    pub fn num_labels(&self) -> usize {
        self.id2label
            .as_ref()
            .map(|labels| labels.len())
            .or(self.num_labels)
            .unwrap_or(2)
    }

    /// A model with this architecture and random weights.
    ///
    /// # Errors
    ///
    /// When the config asks for what the port does not have.
    pub fn init(&self, device: &Device) -> Result<BertForSequenceClassification, String> {
        if self.hidden_act != "gelu" {
            return Err(format!("hidden_act {:?} is not supported", self.hidden_act));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported",
                self.position_embedding_type
            ));
        }
        let d_model = self.hidden_size;
        let embedding = |count| EmbeddingConfig::new(count, d_model).init(device);
        let encoder = TransformerEncoderConfig::new(
            d_model,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_hidden_layers,
        )
        .with_dropout(0.0)
        .with_norm_first(false)
        .with_layer_norm_eps(self.layer_norm_eps)
        .init(device);
        Ok(BertForSequenceClassification {
            embeddings: BertEmbeddings {
                word_embeddings: embedding(self.vocab_size),
                position_embeddings: embedding(self.max_position_embeddings),
                token_type_embeddings: embedding(self.type_vocab_size),
                norm: LayerNormConfig::new(d_model)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device),
            },
            encoder: encoder.into(),
            pooler: LoraLinearConfig::new(d_model, d_model).init(device),
            classifier: LoraLinearConfig::new(d_model, self.num_labels()).init(device),
        })
    }
}

/// BERT with a classification head on the pooled first token.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification {
    /// The input embeddings.
    pub embeddings: BertEmbeddings,
    /// The encoder: post-norm layers of attention and an exact-GELU feed-forward block.
    pub encoder: TransformerEncoder,
    /// The pooler's projection of the first token, `[hidden_size, hidden_size]`.
    pub pooler: LoraLinear,
    /// The classifier, `[hidden_size, num_labels]`.
    pub classifier: LoraLinear,
}

/// `norm(word + position + token_type)`.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    /// `[vocab_size, hidden_size]`.
    pub word_embeddings: Embedding,
    /// `[max_position_embeddings, hidden_size]`.
    pub position_embeddings: Embedding,
    /// `[type_vocab_size, hidden_size]`.
    pub token_type_embeddings: Embedding,
    /// The norm of their sum.
    pub norm: LayerNorm,
}

impl BertForSequenceClassification {
    /// The class logits of each sequence.
    ///
    /// # Shapes
    ///
    /// - input_ids, token_type_ids: `[batch, seq]`
    /// - attention_mask: `[batch, seq]`, 1 for tokens and 0 for padding
    /// - output: `[batch, num_labels]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        token_type_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
    ) -> Tensor<2> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let embeddings = &self.embeddings;
        let x = embeddings.word_embeddings.forward(input_ids)
            + embeddings
                .position_embeddings
                .forward(super::positions(batch, seq, &device))
            + embeddings.token_type_embeddings.forward(token_type_ids);
        let x = embeddings.norm.forward(x);
        let input = TransformerEncoderInput::new(x).mask_pad(attention_mask.equal_elem(0));
        let hidden = self.encoder.forward(input);
        let [_, _, d_model] = hidden.dims();
        let first = hidden.narrow(1, 0, 1).reshape([batch, d_model]);
        self.classifier.forward(self.pooler.forward(first).tanh())
    }
}

/// Hugging Face's names ↔ this port's. The rules apply in this order when loading and in the
/// reverse order when saving, so that each sees the names the previous one left: the
/// attention's `output.dense` is renamed before the feed-forward block's.
pub fn key_map() -> KeyMap {
    KeyMap::bert()
}

/// The checkpoint's layout: [`key_map`], and the `position_ids` buffer older checkpoints
/// hold, which the port computes instead.
pub fn checkpoint() -> HfCheckpoint {
    HfCheckpoint::new(key_map()).ignoring(["bert.embeddings.position_ids"])
}

/// Reads a `save_pretrained` directory: `config.json` and `model.safetensors`.
///
/// # Errors
///
/// When a file is missing or unreadable, the config asks for what the port does not have, or
/// the checkpoint does not fit the model (a parameter missing, a tensor unused, a shape).
pub fn load(
    dir: &Path,
    device: &Device,
) -> Result<(BertForSequenceClassification, BertConfig), String> {
    let config: BertConfig = super::read_config(dir)?;
    let mut model = config.init(device)?;
    super::load_weights(dir, &checkpoint(), &mut model)?;
    Ok((model, config))
}
