//! The Llama port of `examples/hf` (4 layers, d = 256, 8 query and 2 key-value heads, SwiGLU
//! 688, vocabulary 512; batch 4 × 64 tokens), in one run:
//!
//! - `llama_step`: a training step (forward, backward, AdamW) with LoRA r = 8 on Q, K, V and O
//!   against full fine-tuning;
//! - `gqa_step`: a training step of one grouped-query attention block with LoRA r = 8 on its four
//!   projections, on burn-lora's fast path (`burn_lora::nn::GroupedQueryAttention`) against the
//!   dense path (Burn's `CrossAttention`, adapted in place, composing `W + s·A·B` per forward),
//!   the same weights in both;
//! - `llama_load`: loading the model's safetensors checkpoint (written by `HfCheckpoint::save`)
//!   through `burn::store`, and then a PEFT adapter onto it.
//!
//! ```sh
//! cargo bench --bench hf_llama
//! ```

#[allow(dead_code)] // the bench uses the Llama port only
#[path = "../examples/hf/mod.rs"]
mod hf;
#[path = "support/timing.rs"]
mod timing;

use burn::module::Module;
use burn::nn::attention::CrossAttentionConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::nn::GroupedQueryAttentionConfig;
use burn_lora::peft::{LoadOptions, load_adapter_with, save_adapter_with};
use burn_lora::{LoraConfig, Targets};
use criterion::{Criterion, criterion_group, criterion_main};
use hf::llama::{LlamaConfig, LlamaForCausalLM};

const BATCH: usize = 4;
const SEQ: usize = 64;
const D_MODEL: usize = 256;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;

fn config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 512,
        "hidden_size": D_MODEL,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": SEQ,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false
    }))
    .expect("a Llama config")
}

fn tokens(device: &Device) -> Tensor<2, Int> {
    Tensor::<2>::random([BATCH, SEQ], Distribution::Uniform(0.0, 511.0), device).int()
}

fn lora() -> LoraConfig {
    LoraConfig::new(8)
        .with_alpha(Some(16.0))
        .with_targets(Targets::attention())
}

fn llama_loss(model: &LlamaForCausalLM, tokens: &Tensor<2, Int>) -> Tensor<1> {
    model.forward(tokens.clone()).powi_scalar(2).mean()
}

fn llama_step(c: &mut Criterion) {
    let device = Device::default().autodiff();
    device.seed(0);
    let tokens = tokens(&device);
    let model = config().init(&device).expect("a model");
    let mut group = c.benchmark_group("llama_step_4x256_b4x64");
    timing::time_train_step(&mut group, "full_finetune", &device, model.clone(), |m| {
        llama_loss(m, &tokens)
    });
    let (adapted, _) = lora().apply(model).expect("adapters");
    timing::time_train_step(&mut group, "lora_qkvo_r8", &device, adapted, |m| {
        llama_loss(m, &tokens)
    });
}

fn gqa_step(c: &mut Criterion) {
    let device = Device::default().autodiff();
    device.seed(1);
    let x = Tensor::<3>::random(
        [BATCH, SEQ, D_MODEL],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let burn = CrossAttentionConfig::new(D_MODEL, D_MODEL, HEADS, KV_HEADS, D_MODEL / HEADS)
        .with_dropout(0.0)
        .init(&device);
    let fast = GroupedQueryAttentionConfig::new(D_MODEL, HEADS, KV_HEADS)
        .with_bias(true)
        .init(&device)
        .load_record(burn.clone().into_record());
    // The blocks stand alone: their `output` is at the root, so the four names are given.
    let projections = lora().with_targets(Targets::names(["query", "key", "value", "output"]));
    let (dense, _) = projections.apply(burn).expect("adapters");
    let (fast, _) = projections.apply(fast).expect("adapters");
    let mut group = c.benchmark_group("gqa_step_256_b4x64");
    timing::time_train_step(&mut group, "dense", &device, dense, |m| {
        m.forward(x.clone(), x.clone(), None).powi_scalar(2).mean()
    });
    timing::time_train_step(&mut group, "fast", &device, fast, |m| {
        m.forward(x.clone(), None, 0).powi_scalar(2).mean()
    });
}

fn llama_load(c: &mut Criterion) {
    let device = Device::default();
    device.seed(2);
    let config = config();
    let model = config.init(&device).expect("a model");
    let dir = std::env::temp_dir().join(format!("burn_lora_bench_llama_{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let checkpoint = hf::llama::checkpoint(&config);
    checkpoint
        .save(&model, dir.join("model.safetensors"))
        .expect("saved");
    let (adapted, _) = lora().apply(model.clone()).expect("adapters");
    let adapter_dir = dir.join("adapter");
    let options = burn_lora::peft::SaveOptions::new().with_key_map(hf::llama::key_map());
    save_adapter_with(&adapted, &adapter_dir, "default", &options).expect("saved adapter");

    let mut group = c.benchmark_group("llama_load_4x256");
    group.bench_function("checkpoint", |b| {
        b.iter(|| {
            let mut fresh = config.init(&device).expect("a model");
            checkpoint
                .load(dir.join("model.safetensors"), &mut fresh)
                .expect("loaded");
            fresh
        })
    });
    let load_options = LoadOptions::new().with_key_map(hf::llama::key_map());
    group.bench_function("checkpoint_and_adapter", |b| {
        b.iter(|| {
            let mut fresh = config.init(&device).expect("a model");
            checkpoint
                .load(dir.join("model.safetensors"), &mut fresh)
                .expect("loaded");
            load_adapter_with(&fresh, &adapter_dir, "default", &load_options).expect("adapter")
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = timing::config(3, 20);
    targets = llama_step, gqa_step, llama_load
}
criterion_main!(benches);
