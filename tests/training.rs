//! Training through the adapters: the loss falls, the base stays bit-identical, and only the
//! adapter factors receive gradients.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use burn_lora::{LoraConfig, LoraLinear, Targets};
use common::{base_data, devices, param_ids};

const D_MODEL: usize = 16;

/// A single-head attention block with a frozen feed-forward layer beside it.
#[derive(Module, Debug)]
struct Block {
    query: LoraLinear,
    key: LoraLinear,
    value: LoraLinear,
    output: LoraLinear,
    feed_forward: Linear,
}

impl Block {
    fn new(device: &Device) -> Self {
        let linear = || LinearConfig::new(D_MODEL, D_MODEL).init(device);
        Self {
            query: linear().into(),
            key: linear().into(),
            value: linear().into(),
            output: linear().into(),
            feed_forward: linear(),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let q = self.query.forward(x.clone());
        let k = self.key.forward(x.clone());
        let v = self.value.forward(x.clone());
        let scores = q
            .matmul(k.swap_dims(1, 2))
            .div_scalar((D_MODEL as f64).sqrt());
        let attended = softmax(scores, 2).matmul(v);
        let x = x + self.output.forward(attended);
        x.clone() + self.feed_forward.forward(x).tanh()
    }
}

#[derive(Module, Debug)]
struct Net {
    blocks: Vec<Block>,
}

impl Net {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.blocks.iter().fold(x, |x, block| block.forward(x))
    }
}

/// `W + U·V` with `U: [d, 2]`, `V: [2, d]`: a rank-2 change that rank-4 adapters can learn.
fn shifted(weight: Tensor<2>, device: &Device) -> Tensor<2> {
    let u = Tensor::<2>::random([D_MODEL, 2], Distribution::Normal(0.0, 0.3), device);
    let v = Tensor::<2>::random([2, D_MODEL], Distribution::Normal(0.0, 0.3), device);
    weight + u.matmul(v)
}

#[test]
fn adapters_learn_a_low_rank_change_and_leave_the_base_untouched() {
    for (name, device) in devices() {
        let device = device.autodiff();
        device.seed(42);
        let base = Net {
            blocks: vec![Block::new(&device), Block::new(&device)],
        };

        // The teacher is the base with a known low-rank change of Q and V in every block.
        let mut teacher = base.clone();
        for block in &mut teacher.blocks {
            block.query.weight = block.query.weight.clone().map(|w| shifted(w, &device));
            block.value.weight = block.value.weight.clone().map(|w| shifted(w, &device));
        }
        let x = Tensor::<3>::random([8, 6, D_MODEL], Distribution::Normal(0.0, 1.0), &device);
        let target = teacher.forward(x.clone()).detach();

        // The block is flat: its `output` sits beside `query`, not in an attention module, so
        // it is named rather than left to `Targets::attention()`.
        let config = LoraConfig::new(4)
            .with_alpha(Some(8.0))
            .with_targets(Targets::names(["query", "key", "value", "output"]));
        let (mut model, report) = config.apply(base).unwrap();
        assert_eq!(report.layers.len(), 8);
        let frozen = base_data(&model);
        let ids = param_ids(&model);
        let adapter_ids: Vec<_> = ids
            .iter()
            .filter(|(path, _)| path.ends_with("lora_a") || path.ends_with("lora_b"))
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(adapter_ids.len(), 16);

        let mut optimizer = AdamWConfig::new().with_weight_decay(0.0).init();
        let mut losses = Vec::new();
        for step in 0..200 {
            let loss = (model.forward(x.clone()) - target.clone())
                .powi_scalar(2)
                .mean();
            losses.push(loss.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            if step == 0 {
                assert_eq!(
                    grads.len(),
                    adapter_ids.len(),
                    "{name}: only A and B get gradients"
                );
                for id in &adapter_ids {
                    assert!(
                        grads.get::<2>(*id).is_some(),
                        "{name}: a factor lacks a gradient"
                    );
                }
            }
            model = optimizer.step(1e-2, model, grads);
        }

        let (first, last) = (losses[0], losses[losses.len() - 1]);
        println!(
            "{name}: loss {first:.5} -> {last:.6} ({:.0}x) in 200 AdamW steps",
            first / last
        );
        assert!(
            first > 1e-3,
            "{name}: the task starts with a real loss ({first})"
        );
        assert!(
            last * 10.0 < first,
            "{name}: loss fell from {first} to {last}"
        );
        assert_eq!(
            base_data(&model),
            frozen,
            "{name}: the base is bit-identical"
        );
    }
}
