//! A checkpoint saved from a model built with `nn::Linear` loads into the same model built with
//! `LoraLinear`, since both have the parameters `weight` and `bias`.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::{LoraConfig, LoraLinear, Targets};
use common::devices;

#[derive(Module, Debug)]
struct PlainModel {
    query: Linear,
    head: Linear,
}

#[derive(Module, Debug)]
struct LoraModel {
    query: LoraLinear,
    head: LoraLinear,
}

impl PlainModel {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.head.forward(self.query.forward(x).tanh())
    }
}

impl LoraModel {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.head.forward(self.query.forward(x).tanh())
    }
}

#[test]
fn a_linear_checkpoint_loads_into_lora_linear_unchanged() {
    for (name, device) in devices() {
        device.seed(10);
        let plain = PlainModel {
            query: LinearConfig::new(12, 8).init(&device),
            head: LinearConfig::new(8, 3).init(&device),
        };
        let path = std::env::temp_dir().join(format!(
            "burn-lora-checkpoint-{name}-{}.bpk",
            std::process::id()
        ));
        plain.clone().save_file(&path).unwrap();

        // Built with other random weights, then loaded.
        device.seed(11);
        let fresh = LoraModel {
            query: LinearConfig::new(12, 8).init(&device).into(),
            head: LinearConfig::new(8, 3).init(&device).into(),
        };
        let loaded = fresh.try_load_file(&path).unwrap();

        let x = Tensor::<2>::random([5, 12], Distribution::Normal(0.0, 1.0), &device);
        let expected = plain.forward(x.clone()).into_data();
        assert_eq!(loaded.forward(x.clone()).into_data(), expected, "{name}");

        // And it adapts on the fast path, still starting from the checkpoint's output.
        let config = LoraConfig::new(2).with_targets(Targets::names(["query"]));
        let (adapted, report) = config.apply(loaded).unwrap();
        assert!(report.layers[0].fast_path);
        assert_eq!(adapted.forward(x).into_data(), expected, "{name}: adapted");
        // Burn reads checkpoint tensors lazily, so the file goes only once they are used.
        std::fs::remove_file(&path).unwrap();
    }
}
