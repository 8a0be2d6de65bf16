//! The transformer block stack the issue measures, shared by `benches/transformer.rs` and
//! `examples/peak_memory.rs`: Burn's `TransformerEncoder`, d = 512, 8 heads, d_ff = 2048,
//! 4 layers, batch 8, seq 128, LoRA rank 8 on Q/K/V/O.

#![allow(dead_code)] // each includer uses a part

use burn::module::Quantizer;
use burn::module::{Lora, Module, ParamGroup};
use burn::nn::transformer::{
    TransformerEncoder as BurnEncoder, TransformerEncoderConfig,
    TransformerEncoderInput as BurnInput,
};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::quantization::{Calibration, QuantValue, ScaleDtype};
use burn_lora::nn::{TransformerEncoder, TransformerEncoderInput};
use burn_lora::{LoraConfig, LoraModule, Targets, quantize_base};

pub const BATCH: usize = 8;
pub const SEQ: usize = 128;
pub const D_MODEL: usize = 512;
pub const D_FF: usize = 2048;
pub const HEADS: usize = 8;
pub const LAYERS: usize = 4;
pub const RANK: usize = 8;

/// A name for the shape, used in bench group names.
pub fn shape_label() -> String {
    format!("{BATCH}x{SEQ}x{D_MODEL}_l{LAYERS}_r{RANK}")
}

/// Anything with a forward over `[batch, seq, d_model]`.
pub trait Encoder: Module {
    fn encode(&self, x: Tensor<3>) -> Tensor<3>;
}

impl Encoder for BurnEncoder {
    fn encode(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward(BurnInput::new(x))
    }
}

impl Encoder for TransformerEncoder {
    fn encode(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward(TransformerEncoderInput::new(x))
    }
}

/// Burn's encoder, no adapters: the plain model and the full fine-tuning baseline.
pub fn plain(device: &Device) -> BurnEncoder {
    TransformerEncoderConfig::new(D_MODEL, D_FF, HEADS, LAYERS)
        .with_dropout(0.0)
        .init(device)
}

/// `burn_lora::nn`'s encoder with rank-8 adapters on Q/K/V/O: the fast path.
pub fn lora(device: &Device) -> TransformerEncoder {
    let config = LoraConfig::new(RANK).with_targets(Targets::attention());
    let (model, _) = config
        .apply(TransformerEncoder::from(plain(device)))
        .expect("valid config");
    model
}

/// DoRA adapters, rank 8, on Q/K/V/O.
pub fn dora(device: &Device) -> TransformerEncoder {
    let config = LoraConfig::new(RANK)
        .with_use_dora(true)
        .with_targets(Targets::attention());
    let (model, _) = config
        .apply(TransformerEncoder::from(plain(device)))
        .expect("valid config");
    model
}

/// QLoRA: every linear weight of the stack quantized to 8-bit symmetric integers (one f32
/// scale per block of 32 values), then rank-8 f32 adapters on Q/K/V/O.
pub fn qlora(device: &Device) -> TransformerEncoder {
    qlora_with(device, QuantValue::Q8S)
}

/// QLoRA over a 4-bit base (symmetric integers, one f32 scale per block of 32 values).
pub fn qlora4(device: &Device) -> TransformerEncoder {
    qlora_with(device, QuantValue::Q4S)
}

fn qlora_with(device: &Device, value: QuantValue) -> TransformerEncoder {
    let scheme = device
        .settings()
        .quantization
        .scheme
        .with_value(value)
        .per_block([32], ScaleDtype::F32);
    let quantized = quantize_base(
        TransformerEncoder::from(plain(device)),
        &mut Quantizer::new(Calibration::MinMax, scheme),
    )
    .expect("linear weights to quantize");
    let config = LoraConfig::new(RANK).with_targets(Targets::attention());
    let (model, _) = config.apply(quantized).expect("valid config");
    model
}

/// The same adapters, merged: what inference runs.
pub fn merged(device: &Device) -> TransformerEncoder {
    lora(device).merge_lora().expect("finite")
}

/// Burn 0.22's built-in `apply_lora` on the same weights, rank 8.
pub fn burn_apply_lora(device: &Device) -> BurnEncoder {
    let group =
        ParamGroup::from_regex(r"\.mha\.(query|key|value|output)\.weight$").expect("valid regex");
    plain(device).apply_lora(Lora::new(RANK, RANK as f64).set_param_group(group))
}

pub fn input(device: &Device) -> Tensor<3> {
    Tensor::random(
        [BATCH, SEQ, D_MODEL],
        Distribution::Normal(0.0, 1.0),
        device,
    )
}

/// The training loss of a step: the mean square of the output.
pub fn loss<M: Encoder>(model: &M, x: &Tensor<3>) -> Tensor<1> {
    model.encode(x.clone()).powi_scalar(2).mean()
}

/// `steps` training steps with AdamW, as a fine-tuning run does them.
pub fn train<M: Encoder>(mut model: M, x: &Tensor<3>, steps: usize) -> M {
    let mut optimizer = AdamWConfig::new().init();
    for _ in 0..steps {
        let loss = loss(&model, x);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-4, model, grads);
    }
    model
}
