//! Reference ports of four Hugging Face architectures, built from burn-lora's LoRA-ready
//! blocks and [`LoraLinear`](burn_lora::LoraLinear): [`llama`] (`LlamaForCausalLM`), [`gpt2`]
//! (`GPT2LMHeadModel`), [`bert`] (`BertForSequenceClassification`) and [`mixtral`]
//! (`MixtralForCausalLM`, a mixture of experts whose expert banks are raw 3-D parameters).
//!
//! Each port has Burn-style module names, a [`KeyMap`](burn_lora::peft::KeyMap) from Hugging
//! Face's names (`key_map()`: complete and invertible, so the same map loads the checkpoint,
//! loads and saves PEFT adapters, and saves a merged model back), and
//! `load(dir, device) -> (model, config)` that reads a `save_pretrained` directory
//! (`config.json` and `model.safetensors`). `tests/hf_ports.rs` checks each against logits
//! computed by transformers.
//!
//! Include it with `#[path = "../examples/hf/mod.rs"] mod hf;` from a test, or
//! `#[path = "hf/mod.rs"] mod hf;` from an example.

pub mod bert;
pub mod gpt2;
pub mod llama;
pub mod mixtral;

use std::path::Path;

use burn::prelude::*;
use burn_lora::store::HfCheckpoint;
use serde::de::DeserializeOwned;

/// `config.json` in `dir`, parsed as `C`.
fn read_config<C: DeserializeOwned>(dir: &Path) -> Result<C, String> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))?;
    serde_json::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))
}

/// Loads the checkpoint in `dir` into `model`: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists; every parameter, or an error.
fn load_weights<M: Module>(
    dir: &Path,
    checkpoint: &HfCheckpoint,
    model: &mut M,
) -> Result<(), String> {
    checkpoint
        .load_dir(dir, model)
        .map_err(|error| error.to_string())
}

/// The tensor names in the safetensors file at `path`, from its header: what a port needs to
/// tell apart two layouts of one architecture.
fn checkpoint_keys(path: &Path) -> Result<Vec<String>, String> {
    use std::io::Read;
    let fail = |error: &dyn std::fmt::Display| format!("{}: {error}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|e| fail(&e))?;
    let mut header = vec![0u8; u64::from_le_bytes(length).min(100 << 20) as usize];
    file.read_exact(&mut header).map_err(|e| fail(&e))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| fail(&e))?;
    Ok(header
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| key != "__metadata__")
        .collect())
}

/// Positions `0..seq` for each of `batch` sequences, `[batch, seq]`.
fn positions(batch: usize, seq: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<1, Int>::arange(0..seq as i64, device)
        .reshape([1, seq])
        .repeat_dim(0, batch)
}

/// The logits of an output head tied to `embedding` (GPT-2, tied Llamas): `hidden · Eᵀ`.
fn tied_logits(hidden: Tensor<3>, embedding: &burn::nn::Embedding) -> Tensor<3> {
    let [batch, seq, d_model] = hidden.dims();
    let weight = embedding.weight.val();
    let [vocab_size, _] = weight.dims();
    hidden
        .reshape([batch * seq, d_model])
        .matmul(weight.transpose())
        .reshape([batch, seq, vocab_size])
}
