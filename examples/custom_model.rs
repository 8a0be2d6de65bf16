//! Your own model, adapted: a small GPT-style decoder written in plain Burn structs, whose
//! projections are `LoraLinear`.
//!
//! ```sh
//! cargo run --release --example custom_model
//! ```
//!
//! 1. "Pretrain" the decoder briefly on task A: predict the token after `t` as `t + 1`.
//! 2. Print the LoRA plan, then adapt the query and value projections at rank 4.
//! 3. Fine-tune the adapters on task B (`t + 3`) and report accuracy before and after.
//! 4. Merge the adapters and save the plain, fine-tuned model.

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};
use burn_lora::{LoraConfig, LoraLinear, LoraModule, Targets};

const VOCAB: usize = 32;
const D_MODEL: usize = 64;
const HEADS: usize = 4;
const SEQ: usize = 16;
const BATCH: usize = 32;

#[derive(Module, Debug)]
struct CausalSelfAttention {
    query: LoraLinear,
    key: LoraLinear,
    value: LoraLinear,
    output: LoraLinear,
}

impl CausalSelfAttention {
    fn new(device: &Device) -> Self {
        let projection = || LinearConfig::new(D_MODEL, D_MODEL).init(device).into();
        Self {
            query: projection(),
            key: projection(),
            value: projection(),
            output: projection(),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let heads = |t: Tensor<3>| {
            t.reshape([batch, seq, HEADS, D_MODEL / HEADS])
                .swap_dims(1, 2)
        };
        let q = heads(self.query.forward(x.clone()));
        let k = heads(self.key.forward(x.clone()));
        let v = heads(self.value.forward(x.clone()));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .div_scalar(((D_MODEL / HEADS) as f64).sqrt());
        let future = generate_autoregressive_mask(batch, seq, &x.device()).unsqueeze_dim(1);
        let weights = softmax(scores.mask_fill(future, -1e4), 3);
        let context = weights
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, D_MODEL]);
        self.output.forward(context)
    }
}

#[derive(Module, Debug)]
struct Mlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
}

#[derive(Module, Debug)]
struct DecoderBlock {
    norm_1: LayerNorm,
    attention: CausalSelfAttention,
    norm_2: LayerNorm,
    mlp: Mlp,
}

impl DecoderBlock {
    fn new(device: &Device) -> Self {
        Self {
            norm_1: LayerNormConfig::new(D_MODEL).init(device),
            attention: CausalSelfAttention::new(device),
            norm_2: LayerNormConfig::new(D_MODEL).init(device),
            mlp: Mlp {
                fc1: LinearConfig::new(D_MODEL, 4 * D_MODEL).init(device).into(),
                fc2: LinearConfig::new(4 * D_MODEL, D_MODEL).init(device).into(),
            },
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attention.forward(self.norm_1.forward(x));
        let hidden = gelu(self.mlp.fc1.forward(self.norm_2.forward(x.clone())));
        x + self.mlp.fc2.forward(hidden)
    }
}

#[derive(Module, Debug)]
struct Gpt {
    token_embedding: Embedding,
    position_embedding: Embedding,
    blocks: Vec<DecoderBlock>,
    norm: LayerNorm,
    lm_head: LoraLinear,
}

impl Gpt {
    fn new(device: &Device) -> Self {
        Self {
            token_embedding: EmbeddingConfig::new(VOCAB, D_MODEL).init(device),
            position_embedding: EmbeddingConfig::new(SEQ, D_MODEL).init(device),
            blocks: (0..2).map(|_| DecoderBlock::new(device)).collect(),
            norm: LayerNormConfig::new(D_MODEL).init(device),
            lm_head: LinearConfig::new(D_MODEL, VOCAB).init(device).into(),
        }
    }

    /// Logits `[batch * seq, vocab]` for tokens `[batch, seq]`.
    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [batch, seq] = tokens.dims();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &tokens.device())
            .unsqueeze::<2>()
            .repeat_dim(0, batch);
        let x = self.token_embedding.forward(tokens) + self.position_embedding.forward(positions);
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        self.lm_head
            .forward(self.norm.forward(x))
            .reshape([batch * seq, VOCAB])
    }
}

/// Random sequences in which each token is the previous one plus `shift`, modulo the vocabulary:
/// inputs `[batch, seq]` and next-token targets `[batch * seq]`.
fn batch(shift: i64, device: &Device) -> (Tensor<2, Int>, Tensor<1, Int>) {
    let starts = Tensor::<2, Int>::random(
        [BATCH, 1],
        burn::tensor::Distribution::Uniform(0.0, VOCAB as f64),
        device,
    );
    let steps = Tensor::<1, Int>::arange(0..SEQ as i64 + 1, device).unsqueeze::<2>() * shift;
    let sequence = (starts + steps).remainder_scalar(VOCAB as i64);
    let inputs = sequence.clone().slice([0..BATCH, 0..SEQ]);
    let targets = sequence
        .slice([0..BATCH, 1..SEQ + 1])
        .reshape([BATCH * SEQ]);
    (inputs, targets)
}

/// Next-token accuracy on a held-out batch.
fn accuracy(model: &Gpt, (inputs, targets): &(Tensor<2, Int>, Tensor<1, Int>)) -> f32 {
    let (inputs, targets) = (inputs.clone(), targets.clone());
    let predicted = model.forward(inputs).argmax(1).reshape([BATCH * SEQ]);
    predicted.equal(targets).float().mean().into_scalar::<f32>()
}

fn train(mut model: Gpt, shift: i64, steps: usize, lr: f64, device: &Device) -> Gpt {
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut optimizer = AdamWConfig::new().init();
    for step in 0..steps {
        let (inputs, targets) = batch(shift, device);
        let loss = loss_fn.forward(model.forward(inputs), targets);
        if step % 50 == 0 || step + 1 == steps {
            println!(
                "  step {step:>3}  loss {:.4}",
                loss.clone().into_scalar::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(lr, model, grads);
    }
    model
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::default().autodiff();
    device.seed(0);

    let held_out_a = batch(1, &device);
    let held_out_b = batch(3, &device);

    println!("pretraining on task A (next = t + 1), all parameters");
    let base = train(Gpt::new(&device), 1, 200, 3e-3, &device);
    println!(
        "base accuracy: task A {:.1}%, task B {:.1}%\n",
        100.0 * accuracy(&base, &held_out_a),
        100.0 * accuracy(&base, &held_out_b)
    );

    let config = LoraConfig::new(4)
        .with_alpha(Some(8.0))
        .with_targets(Targets::attention_qv());
    println!("LoRA plan:\n{}\n", config.plan(&base)?);
    let (model, _) = config.apply(base)?;

    println!("fine-tuning the adapters on task B (next = t + 3)");
    let model = train(model, 3, 200, 1e-2, &device);
    println!(
        "adapted accuracy: task B {:.1}%\n",
        100.0 * accuracy(&model, &held_out_b)
    );

    let merged = model.merge_and_unload_lora()?;
    println!(
        "merged accuracy: task B {:.1}% ({} parameters, as the base)",
        100.0 * accuracy(&merged, &held_out_b),
        merged.num_params()
    );
    let path = std::env::temp_dir().join("burn-lora-custom-model-merged.bpk");
    merged.save_file(&path)?;
    println!(
        "saved the merged model: {} ({} bytes)",
        path.display(),
        std::fs::metadata(&path)?.len()
    );
    Ok(())
}
