//! One adapted linear layer and its baselines, shared by `benches/linear.rs` (criterion) and
//! `benches/paired.rs` (interleaved rounds) through `#[path]`.

#![allow(dead_code)] // each includer uses a part

use burn::module::{Lora, Module};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn_lora::{LoraConfig, LoraLinear, LoraState, Targets, ops};

/// `(batch, seq, d_model, rank)`: the shapes the issue asks for.
pub const SHAPES: [(usize, usize, usize, usize); 2] = [(32, 128, 1024, 8), (4, 128, 4096, 16)];

#[derive(Module, Debug)]
pub struct Fast {
    pub layer: LoraLinear,
}

/// The same adapted layer computed by `ops::lora_linear_reference`: Burn's operations
/// composed, the path before the fused operation (and on backends without it).
#[derive(Module, Debug)]
pub struct Composed {
    pub layer: LoraLinear,
}

#[derive(Module, Debug)]
pub struct Plain {
    pub layer: Linear,
}

pub trait Layer: Module {
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;
}

impl Layer for Fast {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.layer.forward(x)
    }
}

impl Layer for Composed {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let state = self
            .layer
            .weight
            .reparameterization::<LoraState>()
            .expect("adapted");
        let adapter = &state.adapters[0];
        let bias = self.layer.bias.as_ref().map(|bias| bias.val());
        let (lora_a, lora_b) = (adapter.lora_a.val(), adapter.lora_b.val());
        let weight = self.layer.weight.base();
        ops::lora_linear_reference(x, None, weight, bias, lora_a, lora_b, adapter.scale)
    }
}

impl Layer for Plain {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.layer.forward(x)
    }
}

pub fn lora_config(rank: usize) -> LoraConfig {
    LoraConfig::new(rank)
        .with_alpha(Some(2.0 * rank as f64))
        .with_targets(Targets::names(["layer"]))
}

pub fn base(d_model: usize, device: &Device) -> Linear {
    LinearConfig::new(d_model, d_model).init(device)
}

pub fn lora(d_model: usize, rank: usize, device: &Device) -> Fast {
    let (model, _) = lora_config(rank)
        .apply(Fast {
            layer: base(d_model, device).into(),
        })
        .expect("valid config");
    model
}

/// `nn::Linear` carrying our adapter: dense composition through `Param::val()`.
pub fn dense(d_model: usize, rank: usize, device: &Device) -> Plain {
    let (model, _) = lora_config(rank)
        .apply(Plain {
            layer: base(d_model, device),
        })
        .expect("valid config");
    model
}

/// `nn::Linear` with Burn 0.22's built-in `apply_lora`.
pub fn burn_apply_lora(d_model: usize, rank: usize, device: &Device) -> Plain {
    Plain {
        layer: base(d_model, device),
    }
    .apply_lora(Lora::new(rank, 2.0 * rank as f64))
}
