//! Burn's own `TransformerEncoder`, adapted two ways:
//!
//! - in place: `LoraConfig::apply` on Burn's block. Its `Linear` layers compose
//!   `W + s·A·B` on every forward (the dense path).
//! - through `burn_lora::nn::TransformerEncoder`, converted from the same block with `From`.
//!   Its `LoraLinear` layers add `s·(x·A)·B` to `x·W` (the fast path).
//!
//! Both train the same adapters from the same start, so their losses agree; the fast path is
//! quicker.
//!
//! ```sh
//! cargo run --release --example burn_transformer
//! ```

use std::time::{Duration, Instant};

use burn::module::Module;
use burn::nn::transformer::{TransformerEncoderConfig, TransformerEncoderInput as BurnInput};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::nn::{TransformerEncoder, TransformerEncoderInput};
use burn_lora::{LoraConfig, Targets};

const STEPS: usize = 6;

/// Anything with a forward over `[batch, seq, d_model]`.
trait Encoder: Module {
    fn encode(&self, x: Tensor<3>) -> Tensor<3>;
}

impl Encoder for burn::nn::transformer::TransformerEncoder {
    fn encode(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward(BurnInput::new(x))
    }
}

impl Encoder for TransformerEncoder {
    fn encode(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward(TransformerEncoderInput::new(x))
    }
}

/// Train for `STEPS` steps towards `target`; the losses and the mean time of a step after the
/// first (which warms caches up).
fn train<M: Encoder>(mut model: M, x: &Tensor<3>, target: &Tensor<3>) -> (Vec<f32>, Duration) {
    let mut optimizer = AdamWConfig::new().init();
    let mut losses = Vec::new();
    let mut elapsed = Duration::ZERO;
    for step in 0..STEPS {
        let start = Instant::now();
        let loss = (model.encode(x.clone()) - target.clone())
            .powi_scalar(2)
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-3, model, grads);
        losses.push(loss.into_scalar::<f32>());
        if step > 0 {
            elapsed += start.elapsed();
        }
    }
    (losses, elapsed / (STEPS as u32 - 1))
}

fn main() -> Result<(), burn_lora::LoraError> {
    let device = Device::default().autodiff();
    device.seed(0);
    let burn_encoder = TransformerEncoderConfig::new(512, 2048, 8, 4)
        .with_dropout(0.0)
        .init(&device);
    let ours = TransformerEncoder::from(burn_encoder.clone());
    let x = Tensor::<3>::random([8, 128, 512], Distribution::Normal(0.0, 1.0), &device);
    let target = Tensor::<3>::random([8, 128, 512], Distribution::Normal(0.0, 1.0), &device);

    let config = LoraConfig::new(8).with_targets(Targets::attention());
    let (dense, report) = config.apply(burn_encoder)?;
    println!("{report}\n");
    // Both blocks have the same parameter paths, adapters included: loading the record of
    // the adapted Burn block gives ours the very same adapters.
    let (fast, _) = config.apply(ours)?;
    let fast = fast.load_record(dense.clone().into_record());

    let (dense_losses, dense_time) = train(dense, &x, &target);
    let (fast_losses, fast_time) = train(fast, &x, &target);
    println!("step  dense loss  fast loss");
    for (step, (dense, fast)) in dense_losses.iter().zip(&fast_losses).enumerate() {
        println!("{step:>4}  {dense:>10.6}  {fast:>9.6}");
    }
    let gap = dense_losses
        .iter()
        .zip(&fast_losses)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0f32, f32::max);
    println!("\nlargest relative loss difference: {gap:.2e}");
    println!(
        "train step: dense {dense_time:.1?}, fast {fast_time:.1?} (fast / dense = {:.2})",
        fast_time.as_secs_f64() / dense_time.as_secs_f64()
    );
    assert!(gap < 1e-4, "both paths train the same adapters");
    Ok(())
}
