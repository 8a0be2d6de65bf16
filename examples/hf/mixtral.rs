//! Mixtral (`MixtralForCausalLM`): Llama's attention and norms, with a sparse mixture of experts
//! in place of the feed-forward block. Its experts are stored as transformers 5 stores them, two
//! 3-D parameters per layer, which PEFT adapts with `target_parameters`.
//!
//! | Hugging Face | this port |
//! |---|---|
//! | Llama's names ([`llama`](super::llama)) | Llama's port names |
//! | `model.layers.N.mlp.gate` (the router, `[experts, hidden]`) | `layers.N.mlp.gate` (`Linear`) |
//! | `model.layers.N.mlp.experts.gate_up_proj` (`[experts, 2·intermediate, hidden]`) | `layers.N.mlp.experts.gate_up_proj` (`Param<Tensor<3>>`, same layout) |
//! | `model.layers.N.mlp.experts.down_proj` (`[experts, hidden, intermediate]`) | `layers.N.mlp.experts.down_proj` |
//!
//! `save_pretrained` still writes Mixtral in its original per-expert layout
//! (`model.layers.N.block_sparse_moe.experts.E.w1.weight` for the gate, `w3` for up, `w2` for
//! down, and `block_sparse_moe.gate` for the router), as the checkpoints on the hub are, and
//! transformers fuses them when it loads; [`load`] does the same. A fused checkpoint (what
//! [`checkpoint`] saves) loads as it is.
//!
//! The expert banks keep PyTorch's `[experts, d_out, d_in]` layout: burn-lora's
//! [`ParamLayout::OutIn`](burn_lora::ParamLayout::OutIn), the default. The router keeps each
//! token's `num_experts_per_tok` most probable experts and renormalizes their probabilities, as
//! transformers does; this port then runs every expert on every token and weights the
//! unselected ones by zero, which gives the same sums at this size (a production port would
//! gather each expert's tokens).

use std::path::Path;

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn_lora::nn::GroupedQueryAttention;
use burn_lora::peft::KeyMap;
use burn_lora::store::HfCheckpoint;
use burn_lora::{LoraLinear, LoraLinearConfig, ParamLayout, Targets};
use serde::Deserialize;

use super::llama::{LlamaConfig, attention_residual, causal_lm_logits};

/// The fields of a Mixtral `config.json` this port reads: Llama's, and the experts'.
#[derive(Debug, Clone, Deserialize)]
pub struct MixtralConfig {
    /// Everything a Llama config also has.
    #[serde(flatten)]
    pub llama: LlamaConfig,
    /// The experts per layer.
    pub num_local_experts: usize,
    /// The experts each token is routed to.
    pub num_experts_per_tok: usize,
    /// Sliding-window attention; only `null` is supported.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl MixtralConfig {
    /// A model with this architecture and random weights.
    ///
    /// # Errors
    ///
    /// When the config asks for what the port does not have (rope scaling, sliding-window
    /// attention, an activation other than SiLU, more experts per token than experts).
    pub fn init(&self, device: &Device) -> Result<MixtralForCausalLM, String> {
        let llama = &self.llama;
        if llama.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported",
                llama.hidden_act
            ));
        }
        if let Some(window) = self.sliding_window {
            return Err(format!(
                "sliding_window {window} is not supported by this port"
            ));
        }
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_local_experts {
            return Err(format!(
                "num_experts_per_tok {} of {} experts",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        let self_attn = llama.self_attention(device)?;
        let norm = RmsNormConfig::new(llama.hidden_size).with_epsilon(llama.rms_norm_eps);
        let (experts, hidden, intermediate) = (
            self.num_local_experts,
            llama.hidden_size,
            llama.intermediate_size,
        );
        let bank = |dims: [usize; 3]| Param::from_tensor(Tensor::<3>::zeros(dims, device));
        let layers = (0..llama.num_hidden_layers)
            .map(|_| MixtralDecoderLayer {
                input_norm: norm.init(device),
                self_attn: self_attn(),
                post_attention_norm: norm.init(device),
                mlp: MixtralSparseMoeBlock {
                    gate: LinearConfig::new(hidden, experts)
                        .with_bias(false)
                        .init(device),
                    experts: MixtralExperts {
                        gate_up_proj: bank([experts, 2 * intermediate, hidden]),
                        down_proj: bank([experts, hidden, intermediate]),
                    },
                    top_k: self.num_experts_per_tok,
                },
            })
            .collect();
        Ok(MixtralForCausalLM {
            embed_tokens: EmbeddingConfig::new(llama.vocab_size, hidden).init(device),
            layers,
            norm: norm.init(device),
            lm_head: (!llama.tie_word_embeddings).then(|| {
                LoraLinearConfig::new(hidden, llama.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
        })
    }
}

/// Mixtral for causal language modelling.
#[derive(Module, Debug)]
pub struct MixtralForCausalLM {
    /// The token embeddings, `[vocab_size, hidden_size]`.
    pub embed_tokens: Embedding,
    /// The decoder layers.
    pub layers: Vec<MixtralDecoderLayer>,
    /// The final norm.
    pub norm: RmsNorm,
    /// The output head; `None` when tied to `embed_tokens`.
    pub lm_head: Option<LoraLinear>,
}

/// One decoder layer: `x + attn(norm(x))`, then `x + moe(norm(x))`.
#[derive(Module, Debug)]
pub struct MixtralDecoderLayer {
    /// The norm before attention (`input_layernorm`).
    pub input_norm: RmsNorm,
    /// Causal self-attention.
    pub self_attn: GroupedQueryAttention,
    /// The norm before the mixture of experts (`post_attention_layernorm`).
    pub post_attention_norm: RmsNorm,
    /// The mixture of experts.
    pub mlp: MixtralSparseMoeBlock,
}

/// A router and the experts it picks from.
#[derive(Module, Debug)]
pub struct MixtralSparseMoeBlock {
    /// The router: a logit per expert for each token.
    pub gate: Linear,
    /// The experts' weights.
    pub experts: MixtralExperts,
    /// The experts each token is routed to.
    pub top_k: usize,
}

/// Every expert's SwiGLU feed-forward, its weights stacked along the first axis.
#[derive(Module, Debug)]
pub struct MixtralExperts {
    /// The gate and up projections of each expert, `[experts, 2·intermediate, hidden]`: the
    /// first `intermediate` rows are the gate's.
    pub gate_up_proj: Param<Tensor<3>>,
    /// The down projection of each expert, `[experts, hidden, intermediate]`.
    pub down_proj: Param<Tensor<3>>,
}

impl MixtralForCausalLM {
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
            MixtralDecoderLayer::forward,
            &self.norm,
            self.lm_head.as_ref(),
        )
    }
}

impl MixtralDecoderLayer {
    /// Applies the layer; `mask` is true where a position may not look.
    pub fn forward(&self, x: Tensor<3>, mask: Tensor<3, Bool>) -> Tensor<3> {
        let x = attention_residual(&self.input_norm, &self.self_attn, x, mask);
        x.clone() + self.mlp.forward(self.post_attention_norm.forward(x))
    }
}

impl MixtralSparseMoeBlock {
    /// Each token's output: the sum over its `top_k` experts, weighted by their router
    /// probabilities renormalized to sum to one.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let tokens = x.reshape([batch * seq, hidden]);
        let probabilities = softmax(self.gate.forward(tokens.clone()), 1);
        let [count, experts] = probabilities.dims();
        // The k-th largest probability of each token: experts below it get weight zero.
        let threshold = probabilities
            .clone()
            .topk(self.top_k, 1)
            .narrow(1, self.top_k - 1, 1);
        let kept = probabilities
            .clone()
            .greater_equal(threshold.expand([count, experts]));
        let routed = probabilities.mask_fill(kept.bool_not(), 0.0);
        let weights = routed.clone() / routed.sum_dim(1);
        let outputs = self.experts.forward(tokens); // [experts, tokens, hidden]
        let weights: Tensor<3> = weights.transpose().unsqueeze_dim(2);
        (outputs * weights).sum_dim(0).reshape([batch, seq, hidden])
    }
}

impl MixtralExperts {
    /// Every expert's `down(silu(gate(x)) · up(x))` for every token.
    ///
    /// # Shapes
    ///
    /// - tokens: `[tokens, hidden]`
    /// - output: `[experts, tokens, hidden]`
    pub fn forward(&self, tokens: Tensor<2>) -> Tensor<3> {
        let gate_up = self.gate_up_proj.val();
        let [experts, double, hidden] = gate_up.dims();
        let [count, _] = tokens.dims();
        let x = tokens
            .unsqueeze_dim::<3>(0)
            .expand([experts, count, hidden]);
        let projected = x.matmul(gate_up.swap_dims(1, 2));
        let intermediate = double / 2;
        let gate = projected.clone().narrow(2, 0, intermediate);
        let up = projected.narrow(2, intermediate, intermediate);
        (silu(gate) * up).matmul(self.down_proj.val().swap_dims(1, 2))
    }
}

/// Hugging Face's names ↔ this port's: Llama's ([`KeyMap::llama`]); the router and the
/// experts keep their names.
pub fn key_map() -> KeyMap {
    KeyMap::llama()
}

/// What PEFT's `target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`
/// selects in this port, beside any module targets.
pub fn expert_targets() -> Targets {
    Targets::parameter_names(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        .with_parameter_layout(ParamLayout::OutIn)
}

/// The checkpoint's layout: [`key_map`], and a tied `lm_head` the port computes instead.
pub fn checkpoint(config: &MixtralConfig) -> HfCheckpoint {
    let tied = config
        .llama
        .tie_word_embeddings
        .then(|| "lm_head.weight".to_string());
    HfCheckpoint::new(key_map()).ignoring(tied)
}

/// Reads a `save_pretrained` directory: `config.json` and `model.safetensors`.
///
/// # Errors
///
/// When a file is missing or unreadable, the config asks for what the port does not have, or
/// the checkpoint does not fit the model (a parameter missing, a tensor unused, a shape).
pub fn load(dir: &Path, device: &Device) -> Result<(MixtralForCausalLM, MixtralConfig), String> {
    let config: MixtralConfig = super::read_config(dir)?;
    let mut model = config.init(device)?;
    match fused_copy(dir, &config)? {
        None => super::load_weights(dir, &checkpoint(&config), &mut model)?,
        Some(fused) => {
            let loaded = checkpoint(&config)
                .load(fused.join("model.safetensors"), &mut model)
                .map_err(|error| error.to_string());
            let _ = std::fs::remove_dir_all(&fused);
            loaded?;
        }
    }
    Ok((model, config))
}

/// For a checkpoint in the per-expert layout, a temporary directory holding it in the fused
/// layout (every other tensor as it was); `None` for a fused checkpoint.
fn fused_copy(dir: &Path, config: &MixtralConfig) -> Result<Option<std::path::PathBuf>, String> {
    use safetensors::SafeTensors;
    use safetensors::tensor::TensorView;
    let path = dir.join("model.safetensors");
    if !path.exists() {
        // A sharded checkpoint: loaded as it is, so it must be fused already.
        return Ok(None);
    }
    let fail = |error: &dyn std::fmt::Display| format!("{}: {error}", path.display());
    if !(super::checkpoint_keys(&path)?.iter()).any(|key| key.contains(".block_sparse_moe.")) {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| fail(&e))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| fail(&e))?;
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in file.tensors() {
        if name.contains(".block_sparse_moe.experts.") {
            continue; // fused below
        }
        let name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.");
        tensors.push((
            name,
            view.dtype(),
            view.shape().to_vec(),
            view.data().to_vec(),
        ));
    }
    let (experts, hidden, intermediate) = (
        config.num_local_experts,
        config.llama.hidden_size,
        config.llama.intermediate_size,
    );
    for layer in 0..config.llama.num_hidden_layers {
        let mut gate_up = Vec::new();
        let mut down = Vec::new();
        let mut dtype = None;
        for expert in 0..experts {
            let prefix = format!("model.layers.{layer}.block_sparse_moe.experts.{expert}");
            // Row-major, so a bank is its experts' matrices one after another, and an expert's
            // gate_up is w1's rows (the gate) then w3's (up).
            for weight in ["w1", "w3", "w2"] {
                let key = format!("{prefix}.{weight}.weight");
                let view = file
                    .tensor(&key)
                    .map_err(|e| fail(&format!("{key}: {e}")))?;
                if *dtype.get_or_insert(view.dtype()) != view.dtype() {
                    return Err(fail(&format!("{key}: the experts' dtypes differ")));
                }
                match weight {
                    "w2" => down.extend_from_slice(view.data()),
                    _ => gate_up.extend_from_slice(view.data()),
                }
            }
        }
        let dtype = dtype.ok_or_else(|| fail(&"no experts"))?;
        let bank = |name: &str| format!("model.layers.{layer}.mlp.experts.{name}");
        tensors.push((
            bank("gate_up_proj"),
            dtype,
            vec![experts, 2 * intermediate, hidden],
            gate_up,
        ));
        tensors.push((
            bank("down_proj"),
            dtype,
            vec![experts, hidden, intermediate],
            down,
        ));
    }
    let views = (tensors.iter())
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| fail(&format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let out = std::env::temp_dir().join(format!(
        "burn_lora_mixtral_fused_{}_{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&out).map_err(|e| fail(&e))?;
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors"))
        .map_err(|e| fail(&e))?;
    Ok(Some(out))
}
