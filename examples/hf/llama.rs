//! Llama (`LlamaForCausalLM`): grouped-query attention with rotary embeddings in Hugging
//! Face's `rotate_half` pairing, RMS norms before each block, and a SwiGLU feed-forward.
//!
//! | Hugging Face | this port |
//! |---|---|
//! | `model.embed_tokens` | `embed_tokens` (`Embedding`) |
//! | `model.layers.N.input_layernorm` | `layers.N.input_norm` (`RmsNorm`) |
//! | `model.layers.N.self_attn.{q,k,v,o}_proj` | `layers.N.self_attn.{query,key,value,output}` ([`GroupedQueryAttention`]) |
//! | `model.layers.N.post_attention_layernorm` | `layers.N.post_attention_norm` (`RmsNorm`) |
//! | `model.layers.N.mlp.gate_proj` | `layers.N.mlp.swiglu.linear_inner` ([`SwiGlu`]) |
//! | `model.layers.N.mlp.up_proj` | `layers.N.mlp.swiglu.linear_outer` |
//! | `model.layers.N.mlp.down_proj` | `layers.N.mlp.down_proj` (`LoraLinear`) |
//! | `model.norm` | `norm` (`RmsNorm`) |
//! | `lm_head` | `lm_head` (`None` with `tie_word_embeddings`: the logits use `embed_tokens`) |
//!
//! Burn's `RmsNorm` computes `x / sqrt(mean(x²) + eps) · gamma` in f32, as Hugging Face's
//! `LlamaRMSNorm` does, and loads its `weight` as `gamma`. Rope scaling (Llama 3.1's `llama3`,
//! `linear`, `dynamic`, `yarn`) is not ported: `load` refuses such a config.

use std::path::Path;

use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::{Embedding, EmbeddingConfig, RmsNorm, RmsNormConfig, SwiGluConfig};
use burn::prelude::*;
use burn_lora::nn::{
    GroupedQueryAttention, GroupedQueryAttentionConfig, RotaryConfig, RotaryLayout, SwiGlu,
};
use burn_lora::peft::KeyMap;
use burn_lora::store::HfCheckpoint;
use burn_lora::{LoraLinear, LoraLinearConfig};
use serde::Deserialize;

/// The fields of a Llama `config.json` this port reads.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// The vocabulary size.
    pub vocab_size: usize,
    /// The model size.
    pub hidden_size: usize,
    /// The feed-forward size.
    pub intermediate_size: usize,
    /// The number of decoder layers.
    pub num_hidden_layers: usize,
    /// The number of query heads.
    pub num_attention_heads: usize,
    /// The number of key/value heads; `num_attention_heads` when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// The head size; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// The positions the rotary tables cover.
    pub max_position_embeddings: usize,
    /// The RMS norms' epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// The rotary base (transformers 4).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// The rotary settings (transformers 5): `rope_theta` and `rope_type`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Rope scaling (transformers 4); only `null` is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether `lm_head` shares `embed_tokens`' weight.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether the attention projections have biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether the feed-forward projections have biases.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The feed-forward activation; only `silu` is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

impl LlamaConfig {
    /// The rotary base, from `rope_parameters` or `rope_theta` (10000 when neither says).
    ///
    /// # Errors
    ///
    /// When the config asks for a rope scaling this port does not have.
    pub fn rope_theta(&self) -> Result<f64, String> {
        let unsupported = |what: &serde_json::Value| {
            Err(format!("rope scaling {what} is not supported by this port"))
        };
        if let Some(parameters) = &self.rope_parameters {
            match parameters.get("rope_type").and_then(|t| t.as_str()) {
                None | Some("default") => {}
                Some(_) => return unsupported(parameters),
            }
            if let Some(theta) = parameters.get("rope_theta").and_then(|t| t.as_f64()) {
                return Ok(theta);
            }
        }
        if let Some(scaling) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return unsupported(scaling);
        }
        Ok(self.rope_theta.unwrap_or(10000.0))
    }

    /// A maker of the decoder layers' self-attention: grouped-query attention with Hugging
    /// Face's rotary embeddings, one rotary table shared by every layer (a clone shares it).
    /// Mixtral and other Llama-like ports build theirs with it too.
    ///
    /// # Errors
    ///
    /// When the config asks for a rope scaling this port does not have.
    pub fn self_attention(
        &self,
        device: &Device,
    ) -> Result<impl Fn() -> GroupedQueryAttention + use<>, String> {
        let attention = GroupedQueryAttentionConfig::new(
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads.unwrap_or(self.num_attention_heads),
        )
        .with_d_head(self.head_dim)
        .with_bias(self.attention_bias);
        let d_head = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        let rope = RotaryConfig::new(self.max_position_embeddings)
            .with_theta(self.rope_theta()? as f32)
            .with_layout(RotaryLayout::Halves)
            .init(d_head, device);
        let device = device.clone();
        Ok(move || GroupedQueryAttention {
            rope: Some(rope.clone()),
            ..attention.init(&device)
        })
    }

    /// A model with this architecture and random weights.
    ///
    /// # Errors
    ///
    /// When the config asks for what the port does not have (rope scaling, an activation other
    /// than SiLU).
    pub fn init(&self, device: &Device) -> Result<LlamaForCausalLM, String> {
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act {:?} is not supported", self.hidden_act));
        }
        let self_attn = self.self_attention(device)?;
        let norm = RmsNormConfig::new(self.hidden_size).with_epsilon(self.rms_norm_eps);
        let layers = (0..self.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                input_norm: norm.init(device),
                self_attn: self_attn(),
                post_attention_norm: norm.init(device),
                mlp: LlamaMlp {
                    swiglu: SwiGluConfig::new(self.hidden_size, self.intermediate_size)
                        .with_bias(self.mlp_bias)
                        .init(device)
                        .into(),
                    down_proj: LoraLinearConfig::new(self.intermediate_size, self.hidden_size)
                        .with_bias(self.mlp_bias)
                        .init(device),
                },
            })
            .collect();
        Ok(LlamaForCausalLM {
            embed_tokens: EmbeddingConfig::new(self.vocab_size, self.hidden_size).init(device),
            layers,
            norm: norm.init(device),
            lm_head: (!self.tie_word_embeddings).then(|| {
                LoraLinearConfig::new(self.hidden_size, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
        })
    }
}

/// Llama for causal language modelling.
#[derive(Module, Debug)]
pub struct LlamaForCausalLM {
    /// The token embeddings, `[vocab_size, hidden_size]`.
    pub embed_tokens: Embedding,
    /// The decoder layers.
    pub layers: Vec<LlamaDecoderLayer>,
    /// The final norm.
    pub norm: RmsNorm,
    /// The output head; `None` when tied to `embed_tokens`.
    pub lm_head: Option<LoraLinear>,
}

/// One decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    /// The norm before attention (`input_layernorm`).
    pub input_norm: RmsNorm,
    /// Causal self-attention.
    pub self_attn: GroupedQueryAttention,
    /// The norm before the feed-forward block (`post_attention_layernorm`).
    pub post_attention_norm: RmsNorm,
    /// The feed-forward block.
    pub mlp: LlamaMlp,
}

/// `down_proj(silu(gate_proj(x)) · up_proj(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp {
    /// `gate_proj` (`linear_inner`) and `up_proj` (`linear_outer`).
    pub swiglu: SwiGlu,
    /// The projection back to the model size.
    pub down_proj: LoraLinear,
}

impl LlamaForCausalLM {
    /// The next-token logits of each position.
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab_size]`
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        causal_lm_logits(
            input_ids,
            &self.embed_tokens,
            &self.layers,
            LlamaDecoderLayer::forward,
            &self.norm,
            self.lm_head.as_ref(),
        )
    }
}

/// The logits of a Llama-like causal language model: the token embeddings, each layer under the
/// causal mask (`layer` applies one), the final norm, and the output head (`embed_tokens`'
/// transpose when it is `None`). Mixtral's port runs through it too.
pub fn causal_lm_logits<L>(
    input_ids: Tensor<2, Int>,
    embed_tokens: &Embedding,
    layers: &[L],
    layer: impl Fn(&L, Tensor<3>, Tensor<3, Bool>) -> Tensor<3>,
    norm: &RmsNorm,
    lm_head: Option<&LoraLinear>,
) -> Tensor<3> {
    let [batch, seq] = input_ids.dims();
    let mask = generate_autoregressive_mask(batch, seq, &input_ids.device());
    let x = (layers.iter()).fold(embed_tokens.forward(input_ids), |x, each| {
        layer(each, x, mask.clone())
    });
    let hidden = norm.forward(x);
    match lm_head {
        Some(lm_head) => lm_head.forward(hidden),
        None => super::tied_logits(hidden, embed_tokens),
    }
}

/// `x + attn(norm(x))`, the first half of a Llama-like decoder layer; `mask` is true where a
/// position may not look.
pub fn attention_residual(
    norm: &RmsNorm,
    self_attn: &GroupedQueryAttention,
    x: Tensor<3>,
    mask: Tensor<3, Bool>,
) -> Tensor<3> {
    let attention = self_attn.forward(norm.forward(x.clone()), Some(mask), 0);
    x + attention
}

impl LlamaDecoderLayer {
    /// Applies the layer; `mask` is true where a position may not look.
    pub fn forward(&self, x: Tensor<3>, mask: Tensor<3, Bool>) -> Tensor<3> {
        let x = attention_residual(&self.input_norm, &self.self_attn, x, mask);
        let mlp = &self.mlp;
        let hidden = mlp
            .swiglu
            .forward(self.post_attention_norm.forward(x.clone()));
        x + mlp.down_proj.forward(hidden)
    }
}

/// Hugging Face's names ↔ this port's.
pub fn key_map() -> KeyMap {
    KeyMap::llama()
}

/// The checkpoint's layout: [`key_map`], and the tensors a Llama checkpoint may hold that the
/// port computes instead (rotary caches of older transformers, a tied `lm_head`).
pub fn checkpoint(config: &LlamaConfig) -> HfCheckpoint {
    let rotary = (0..config.num_hidden_layers)
        .map(|i| format!("model.layers.{i}.self_attn.rotary_emb.inv_freq"));
    let tied = config
        .tie_word_embeddings
        .then(|| "lm_head.weight".to_string());
    HfCheckpoint::new(key_map()).ignoring(rotary.chain(tied))
}

/// Reads a `save_pretrained` directory: `config.json` and `model.safetensors`.
///
/// # Errors
///
/// When a file is missing or unreadable, the config asks for what the port does not have, or
/// the checkpoint does not fit the model (a parameter missing, a tensor unused, a shape).
pub fn load(dir: &Path, device: &Device) -> Result<(LlamaForCausalLM, LlamaConfig), String> {
    let config: LlamaConfig = super::read_config(dir)?;
    let mut model = config.init(device)?;
    super::load_weights(dir, &checkpoint(&config), &mut model)?;
    Ok((model, config))
}
