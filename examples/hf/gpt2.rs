//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-norm blocks with a fused query-key-value
//! projection, `gelu_new` (GELU's tanh approximation), and an output head tied to the token
//! embeddings.
//!
//! | Hugging Face | this port |
//! |---|---|
//! | `transformer.wte` | `wte` (`Embedding`; also the output head, transposed) |
//! | `transformer.wpe` | `wpe` (`Embedding`) |
//! | `transformer.h.N.ln_1`, `ln_2` | `blocks.N.ln_1`, `ln_2` (`LayerNorm`) |
//! | `transformer.h.N.attn.c_attn`, `c_proj` | `blocks.N.attn.c_attn`, `c_proj` (`LoraLinear`) |
//! | `transformer.h.N.mlp.c_fc`, `c_proj` | `blocks.N.mlp.c_fc`, `c_proj` (`LoraLinear`) |
//! | `transformer.ln_f` | `ln_f` (`LayerNorm`) |
//!
//! GPT-2's `Conv1D` layers store their weights `[d_in, d_out]`, as Burn does: the checkpoint
//! loads them untransposed ([`FAN_IN_FAN_OUT`]), and PEFT adapters for them are saved with
//! `fan_in_fan_out = true`. The Hub's original `gpt2` checkpoints, saved from `GPT2Model`, have
//! no `transformer.` prefix and carry the causal-mask buffers `attn.bias`; `load` reads both.

use std::path::Path;

use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu_approximate, softmax};
use burn_lora::peft::KeyMap;
use burn_lora::store::HfCheckpoint;
use burn_lora::{LoraLinear, LoraLinearConfig};
use serde::Deserialize;

/// The layers whose checkpoint weights are `[d_in, d_out]` already (`Conv1D`).
pub const FAN_IN_FAN_OUT: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

/// The fields of a GPT-2 `config.json` this port reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    /// The vocabulary size.
    pub vocab_size: usize,
    /// The number of learned positions.
    pub n_positions: usize,
    /// The model size.
    pub n_embd: usize,
    /// The number of blocks.
    pub n_layer: usize,
    /// The number of attention heads.
    pub n_head: usize,
    /// The feed-forward size; `4 · n_embd` when absent.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// The layer norms' epsilon.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// The feed-forward activation; `gelu_new` (or its twin `gelu_pytorch_tanh`) only.
    #[serde(default = "default_activation_function")]
    pub activation_function: String,
    /// Whether scores are divided by `√d_head`.
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Whether scores are also divided by the layer's index + 1; only `false` is supported.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
}

fn default_layer_norm_epsilon() -> f64 {
    1e-5
}

fn default_activation_function() -> String {
    "gelu_new".to_string()
}

fn default_true() -> bool {
    true
}

impl Gpt2Config {
    /// A model with this architecture and random weights.
    ///
    /// # Errors
    ///
    /// When the config asks for what the port does not have.
    pub fn init(&self, device: &Device) -> Result<GPT2LMHeadModel, String> {
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(format!(
                "activation_function {:?} is not supported",
                self.activation_function
            ));
        }
        if self.scale_attn_by_inverse_layer_idx {
            return Err("scale_attn_by_inverse_layer_idx is not supported".to_string());
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        let d_model = self.n_embd;
        let d_ff = self.n_inner.unwrap_or(4 * d_model);
        let norm = LayerNormConfig::new(d_model).with_epsilon(self.layer_norm_epsilon);
        let linear = |d_input, d_output| LoraLinearConfig::new(d_input, d_output).init(device);
        let blocks = (0..self.n_layer)
            .map(|_| Gpt2Block {
                ln_1: norm.init(device),
                attn: Gpt2Attention {
                    c_attn: linear(d_model, 3 * d_model),
                    c_proj: linear(d_model, d_model),
                    n_heads: self.n_head,
                    scale: self.scale_attn_weights,
                },
                ln_2: norm.init(device),
                mlp: Gpt2Mlp {
                    c_fc: linear(d_model, d_ff),
                    c_proj: linear(d_ff, d_model),
                },
            })
            .collect();
        Ok(GPT2LMHeadModel {
            wte: EmbeddingConfig::new(self.vocab_size, d_model).init(device),
            wpe: EmbeddingConfig::new(self.n_positions, d_model).init(device),
            blocks,
            ln_f: norm.init(device),
        })
    }
}

/// GPT-2 for causal language modelling; the output head is `wte`, transposed.
#[allow(clippy::upper_case_acronyms)] // Hugging Face's class name
#[derive(Module, Debug)]
pub struct GPT2LMHeadModel {
    /// The token embeddings, `[vocab_size, n_embd]`.
    pub wte: Embedding,
    /// The position embeddings, `[n_positions, n_embd]`.
    pub wpe: Embedding,
    /// The blocks.
    pub blocks: Vec<Gpt2Block>,
    /// The final norm.
    pub ln_f: LayerNorm,
}

/// One block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Module, Debug)]
pub struct Gpt2Block {
    /// The norm before attention.
    pub ln_1: LayerNorm,
    /// Causal self-attention.
    pub attn: Gpt2Attention,
    /// The norm before the feed-forward block.
    pub ln_2: LayerNorm,
    /// The feed-forward block.
    pub mlp: Gpt2Mlp,
}

/// Causal self-attention with one fused projection to queries, keys and values.
#[derive(Module, Debug)]
pub struct Gpt2Attention {
    /// Queries, keys and values, side by side: `[n_embd, 3·n_embd]`.
    pub c_attn: LoraLinear,
    /// The output projection, `[n_embd, n_embd]`.
    pub c_proj: LoraLinear,
    /// The number of heads.
    pub n_heads: usize,
    /// Whether scores are divided by `√d_head`.
    pub scale: bool,
}

/// `c_proj(gelu_new(c_fc(x)))`.
#[derive(Module, Debug)]
pub struct Gpt2Mlp {
    /// `[n_embd, n_inner]`.
    pub c_fc: LoraLinear,
    /// `[n_inner, n_embd]`.
    pub c_proj: LoraLinear,
}

impl GPT2LMHeadModel {
    /// The next-token logits of each position.
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq]`, `seq ≤ n_positions`
    /// - output: `[batch, seq, vocab_size]`
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let mask = generate_autoregressive_mask(batch, seq, &device);
        let x =
            self.wte.forward(input_ids) + self.wpe.forward(super::positions(batch, seq, &device));
        let x = self.blocks.iter().fold(x, |x, block| {
            let x = x.clone() + block.attn.forward(block.ln_1.forward(x), mask.clone());
            x.clone() + block.mlp.forward(block.ln_2.forward(x))
        });
        super::tied_logits(self.ln_f.forward(x), &self.wte)
    }
}

impl Gpt2Attention {
    /// Applies attention; `mask` is true where a position may not look.
    pub fn forward(&self, x: Tensor<3>, mask: Tensor<3, Bool>) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        let d_head = d_model / self.n_heads;
        let qkv = self.c_attn.forward(x);
        let heads = |index: usize| {
            qkv.clone()
                .narrow(2, index * d_model, d_model)
                .reshape([batch, seq, self.n_heads, d_head])
                .swap_dims(1, 2)
        };
        let (query, key, value) = (heads(0), heads(1), heads(2));
        let mut scores = query.matmul(key.transpose());
        if self.scale {
            scores = scores.div_scalar((d_head as f64).sqrt());
        }
        let scores = scores.mask_fill(mask.reshape([batch, 1, seq, seq]), f32::MIN);
        let context = softmax(scores, 3)
            .matmul(value)
            .swap_dims(1, 2)
            .reshape([batch, seq, d_model]);
        self.c_proj.forward(context)
    }
}

impl Gpt2Mlp {
    /// Applies the block.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.c_proj.forward(gelu_approximate(self.c_fc.forward(x)))
    }
}

/// Hugging Face's names (`GPT2LMHeadModel`'s, with the `transformer.` prefix) ↔ this port's.
pub fn key_map() -> KeyMap {
    KeyMap::gpt2()
}

/// [`key_map`] for the checkpoints saved from `GPT2Model`, without the `transformer.` prefix
/// (the Hub's original `gpt2`).
pub fn bare_key_map() -> KeyMap {
    KeyMap::new().rename("h", "blocks")
}

/// The checkpoint's layout, given its tensor names: the key map of its prefix, the `Conv1D`
/// layers, and what a checkpoint may hold that the port computes instead (the causal-mask
/// buffers of older checkpoints, a tied `lm_head`).
pub fn checkpoint(config: &Gpt2Config, keys: &[String]) -> HfCheckpoint {
    let prefixed = keys.iter().any(|key| key.starts_with("transformer."));
    let (map, prefix) = match prefixed {
        true => (key_map(), "transformer."),
        false => (bare_key_map(), ""),
    };
    let buffers = (0..config.n_layer)
        .flat_map(|i| ["bias", "masked_bias"].map(|buffer| format!("{prefix}h.{i}.attn.{buffer}")));
    HfCheckpoint::new(map)
        .with_fan_in_fan_out(FAN_IN_FAN_OUT)
        .ignoring(buffers.chain(["lm_head.weight".to_string()]))
}

/// Reads a `save_pretrained` directory: `config.json` and `model.safetensors`.
///
/// # Errors
///
/// When a file is missing or unreadable, the config asks for what the port does not have, or
/// the checkpoint does not fit the model (a parameter missing, a tensor unused, a shape).
pub fn load(dir: &Path, device: &Device) -> Result<(GPT2LMHeadModel, Gpt2Config), String> {
    let config: Gpt2Config = super::read_config(dir)?;
    let mut model = config.init(device)?;
    let keys = super::checkpoint_keys(&dir.join("model.safetensors"))?;
    super::load_weights(dir, &checkpoint(&config, &keys), &mut model)?;
    Ok((model, config))
}
