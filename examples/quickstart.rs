//! burn-lora in one file: adapt a small transformer-like model, train the adapters briefly,
//! merge them, and check that the merged model gives the unmerged output.
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```
//!
//! The task is synthetic, so it runs offline: a "fine-tuned" teacher is the base model with a
//! low-rank change of its query and value projections, and the adapters learn that change.

use burn::module::Module;
use burn::nn::attention::MultiHeadAttentionConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::gelu;
use burn_lora::nn::{MhaInput, MultiHeadAttention};
use burn_lora::{LoraConfig, LoraModule, Targets};

const D_MODEL: usize = 64;
const HEADS: usize = 4;
const SEQ: usize = 16;
const BATCH: usize = 16;

/// A transformer block without norms: attention and a feed-forward layer, with residuals.
/// The attention is burn-lora's LoRA-ready version of Burn's block, so its adapters run on the
/// fast path; the feed-forward layers are plain Burn `Linear`s and stay frozen.
#[derive(Module, Debug)]
struct Block {
    attention: MultiHeadAttention,
    up: Linear,
    down: Linear,
}

impl Block {
    fn new(device: &Device) -> Self {
        Self {
            attention: MultiHeadAttentionConfig::new(D_MODEL, HEADS)
                .with_dropout(0.0)
                .init(device)
                .into(),
            up: LinearConfig::new(D_MODEL, 4 * D_MODEL).init(device),
            down: LinearConfig::new(4 * D_MODEL, D_MODEL).init(device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attention.forward(MhaInput::self_attn(x)).context;
        x.clone() + self.down.forward(gelu(self.up.forward(x)))
    }
}

#[derive(Module, Debug)]
struct Model {
    blocks: Vec<Block>,
}

impl Model {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.blocks.iter().fold(x, |x, block| block.forward(x))
    }
}

fn main() -> Result<(), burn_lora::LoraError> {
    let device = Device::default().autodiff();
    device.seed(0);
    let base = Model {
        blocks: (0..2).map(|_| Block::new(&device)).collect(),
    };

    // The target behaviour: the base with a rank-4 change of every query and value weight.
    let mut teacher = base.clone();
    for block in &mut teacher.blocks {
        for weight in [
            &mut block.attention.query.weight,
            &mut block.attention.value.weight,
        ] {
            let u = Tensor::<2>::random([D_MODEL, 4], Distribution::Normal(0.0, 0.15), &device);
            let v = Tensor::<2>::random([4, D_MODEL], Distribution::Normal(0.0, 0.15), &device);
            *weight = weight.clone().map(|w| w + u.matmul(v));
        }
    }
    let x = Tensor::<3>::random(
        [BATCH, SEQ, D_MODEL],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let target = teacher.forward(x.clone()).detach();

    let config = LoraConfig::new(8)
        .with_alpha(Some(16.0))
        .with_targets(Targets::attention());
    let (mut model, report) = config.apply(base)?;
    println!("{report}\n");

    let mut optimizer = AdamWConfig::new().with_weight_decay(0.0).init();
    let start = std::time::Instant::now();
    for step in 0..=150 {
        let loss = (model.forward(x.clone()) - target.clone())
            .powi_scalar(2)
            .mean();
        if step % 25 == 0 {
            println!(
                "step {step:>3}  loss {:.6}",
                loss.clone().into_scalar::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(5e-3, model, grads);
    }
    println!("trained in {:.1?}\n", start.elapsed());

    // Inference: merging folds s·A·B into each weight, so the merged model is a plain model.
    let model = model.valid();
    let x = x.inner();
    let unmerged = model.forward(x.clone());
    let merged_model = model.merge_lora()?;
    let merged = merged_model.forward(x.clone());
    let difference = (merged - unmerged.clone()).abs().max().into_scalar::<f32>();
    let magnitude = unmerged.abs().max().into_scalar::<f32>();
    println!(
        "merged vs unmerged output: max |difference| = {difference:.2e} (outputs up to {magnitude:.2})"
    );

    let plain = merged_model.merge_and_unload_lora()?;
    println!(
        "after merge_and_unload: {} parameters, as the base model ({} with adapters)",
        plain.num_params(),
        model.num_params()
    );
    assert!(
        difference <= 1e-4 * magnitude.max(1.0),
        "merge must not change the output"
    );
    Ok(())
}
