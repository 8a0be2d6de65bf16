//! Mixed batches: each sample through its own adapter equals that sample run alone with only its
//! adapter active.

mod common;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::{LoraConfig, LoraError, LoraLinear, LoraModule, MixedBatch, Targets};
use common::{HostTensor, devices, randomize};

#[derive(Module, Debug)]
struct Net {
    up: LoraLinear,
    down: LoraLinear,
}

impl Net {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down.forward(self.up.forward(x).tanh())
    }

    fn forward_mixed(&self, x: Tensor<3>, batch: &MixedBatch) -> Tensor<3> {
        self.down
            .forward_mixed(self.up.forward_mixed(x, batch).tanh(), batch)
    }
}

/// Three adapters of ranks 2, 4 and 3; `c` adapts only `up`.
fn adapted(device: &Device) -> Net {
    let net = Net {
        up: LinearConfig::new(12, 16).init(device).into(),
        down: LinearConfig::new(16, 12).init(device).into(),
    };
    let both = Targets::names(["up", "down"]);
    let (net, _) = net
        .add_adapter("a", &LoraConfig::new(2).with_targets(both.clone()))
        .unwrap();
    let (net, _) = net
        .add_adapter(
            "b",
            &LoraConfig::new(4).with_alpha(Some(2.0)).with_targets(both),
        )
        .unwrap();
    let (net, _) = net
        .add_adapter(
            "c",
            &LoraConfig::new(3)
                .with_use_rslora(true)
                .with_targets(Targets::names(["up"])),
        )
        .unwrap();
    randomize(net, "lora_b", 0.5)
}

#[test]
fn each_sample_gets_its_own_adapter() {
    for (backend, device) in devices() {
        device.seed(11);
        let net = adapted(&device);
        let routes = [Some("a"), Some("b"), None, Some("c"), Some("a"), Some("b")];
        let x = Tensor::<3>::random([routes.len(), 5, 12], Distribution::Default, &device);
        let batch = net.mixed_batch(&routes).unwrap();
        let mixed = net.forward_mixed(x.clone(), &batch);

        for (i, route) in routes.iter().enumerate() {
            let sample = x.clone().narrow(0, i, 1);
            let alone = match route {
                Some(name) => net.set_active(&[name]).unwrap(),
                None => net.disable_adapters().unwrap(),
            };
            let expected = HostTensor::from(alone.forward(sample));
            let got = HostTensor::from(mixed.clone().narrow(0, i, 1));
            let error = got.error_vs_max(&expected);
            assert!(
                error < 1e-5,
                "{backend}: sample {i} ({route:?}): error {error}"
            );
        }
    }
}

#[test]
fn a_two_dimensional_batch_and_an_all_base_batch_work() {
    let device = Device::flex();
    device.seed(12);
    let net = adapted(&device);
    let x = Tensor::<2>::random([3, 12], Distribution::Default, &device);
    let batch = net.mixed_batch(&[Some("b"), None, Some("b")]).unwrap();
    let mixed = HostTensor::from(net.up.forward_mixed(x.clone(), &batch));
    let only_b = net.set_active(&["b"]).unwrap();
    let expected = HostTensor::from(only_b.up.forward(x.clone()));
    let base = HostTensor::from(net.disable_adapters().unwrap().up.forward(x.clone()));
    for row in [0, 2] {
        let (got, want) = (
            &mixed.values[row * 16..][..16],
            &expected.values[row * 16..][..16],
        );
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5));
    }
    assert_eq!(&mixed.values[16..32], &base.values[16..32]);

    let none = MixedBatch::new(&[None, None, None], &device);
    assert_eq!(
        HostTensor::from(net.up.forward_mixed(x, &none)).values,
        base.values
    );
}

#[test]
fn routing_is_checked_against_the_model() {
    let device = Device::flex();
    let net = adapted(&device);
    assert!(matches!(
        net.mixed_batch(&[Some("a"), Some("nope")]),
        Err(LoraError::UnknownAdapter { name, .. }) if name == "nope"
    ));
    let merged = net.merge_lora().unwrap();
    assert!(matches!(
        merged.mixed_batch(&[Some("a")]),
        Err(LoraError::AdaptersMerged { .. })
    ));
}

#[test]
fn a_transformer_encoder_routes_each_sample_through_every_layer() {
    use burn::nn::transformer::TransformerEncoderConfig;
    use burn_lora::nn::{TransformerEncoder, TransformerEncoderInput};

    for (backend, device) in devices() {
        device.seed(13);
        let encoder: TransformerEncoder = TransformerEncoderConfig::new(16, 32, 2, 2)
            .with_dropout(0.0)
            .init(&device)
            .into();
        let everything = Targets::new(
            [
                Targets::attention().include,
                Targets::feed_forward().include,
            ]
            .concat(),
        );
        let (encoder, _) = encoder
            .add_adapter("a", &LoraConfig::new(2).with_targets(everything.clone()))
            .unwrap();
        let (encoder, _) = encoder
            .add_adapter(
                "b",
                &LoraConfig::new(4).with_targets(Targets::attention_qv()),
            )
            .unwrap();
        let encoder = randomize(encoder, "lora_b", 0.5);

        let routes = [Some("a"), None, Some("b"), Some("a")];
        let x = Tensor::<3>::random([routes.len(), 5, 16], Distribution::Default, &device);
        let batch = encoder.mixed_batch(&routes).unwrap();
        let mixed = encoder.forward_mixed(TransformerEncoderInput::new(x.clone()), &batch);
        for (i, route) in routes.iter().enumerate() {
            let alone = match route {
                Some(name) => encoder.set_active(&[name]).unwrap(),
                None => encoder.disable_adapters().unwrap(),
            };
            let expected = HostTensor::from(
                alone.forward(TransformerEncoderInput::new(x.clone().narrow(0, i, 1))),
            );
            let error = HostTensor::from(mixed.clone().narrow(0, i, 1)).error_vs_max(&expected);
            assert!(
                error < 1e-5,
                "{backend}: sample {i} ({route:?}): error {error}"
            );
        }
    }
}
