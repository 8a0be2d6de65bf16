//! The LoRA-ready blocks equal Burn's blocks, load Burn's checkpoints, and adapt on the fast
//! path.

mod common;

use burn::module::Module;
use burn::nn::attention::{MhaInput as BurnMhaInput, MultiHeadAttentionConfig};
use burn::nn::transformer::{
    PositionWiseFeedForwardConfig, TransformerEncoderConfig,
    TransformerEncoderInput as BurnEncoderInput,
};
use burn::prelude::*;
use burn::tensor::{Bool, Distribution};
use burn_lora::nn::{
    MhaInput, MultiHeadAttention, PositionWiseFeedForward, TransformerEncoder,
    TransformerEncoderInput,
};
use burn_lora::{LoraConfig, Targets};
use common::{HostTensor, devices, randomize};

fn input(device: &Device) -> Tensor<3> {
    Tensor::random([2, 7, 32], Distribution::Normal(0.0, 1.0), device)
}

/// Pad the last two positions of the second sequence.
fn mask_pad(device: &Device) -> Tensor<2, Bool> {
    Tensor::<2, Int>::from_data([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1]], device).bool()
}

#[test]
fn attention_equals_burns_bit_for_bit() {
    for (name, device) in devices() {
        for quiet_softmax in [false, true] {
            device.seed(20);
            let burn = MultiHeadAttentionConfig::new(32, 4)
                .with_quiet_softmax(quiet_softmax)
                .init(&device);
            let ours = MultiHeadAttention::from(burn.clone());
            let (q, kv) = (input(&device), input(&device));
            let expected = burn.forward(
                BurnMhaInput::new(q.clone(), kv.clone(), kv.clone()).mask_pad(mask_pad(&device)),
            );
            let found = ours.forward(MhaInput::new(q, kv.clone(), kv).mask_pad(mask_pad(&device)));
            assert_eq!(
                found.context.into_data(),
                expected.context.into_data(),
                "{name}"
            );
            assert_eq!(
                found.weights.into_data(),
                expected.weights.into_data(),
                "{name}"
            );
        }
    }
}

#[test]
fn feed_forward_equals_burns_bit_for_bit() {
    for (name, device) in devices() {
        device.seed(21);
        let burn = PositionWiseFeedForwardConfig::new(32, 64).init(&device);
        let ours = PositionWiseFeedForward::from(burn.clone());
        let x = input(&device);
        assert_eq!(
            ours.forward(x.clone()).into_data(),
            burn.forward(x).into_data(),
            "{name}"
        );
    }
}

fn encoder_config(norm_first: bool) -> TransformerEncoderConfig {
    TransformerEncoderConfig::new(32, 64, 4, 2).with_norm_first(norm_first)
}

#[test]
fn the_encoder_equals_burns_bit_for_bit() {
    for (name, device) in devices() {
        for norm_first in [false, true] {
            device.seed(22);
            let burn = encoder_config(norm_first).init(&device);
            let ours = TransformerEncoder::from(burn.clone());
            let x = input(&device);
            let expected =
                burn.forward(BurnEncoderInput::new(x.clone()).mask_pad(mask_pad(&device)));
            let found = ours.forward(TransformerEncoderInput::new(x).mask_pad(mask_pad(&device)));
            assert_eq!(
                found.into_data(),
                expected.into_data(),
                "{name}, norm_first {norm_first}"
            );
        }
    }
}

#[test]
fn the_encoder_loads_a_checkpoint_saved_from_burns() {
    let device = Device::flex();
    device.seed(23);
    let burn = encoder_config(false).init(&device);
    let path = std::env::temp_dir().join(format!("burn-lora-encoder-{}.bpk", std::process::id()));
    burn.clone().save_file(&path).unwrap();

    device.seed(24);
    let fresh = TransformerEncoder::from(encoder_config(false).init(&device));
    let loaded = fresh.try_load_file(&path).unwrap();
    let x = input(&device);
    let expected = burn.forward(BurnEncoderInput::new(x.clone()));
    let found = loaded.forward(TransformerEncoderInput::new(x));
    assert_eq!(found.into_data(), expected.into_data());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn adapted_blocks_take_the_fast_path_and_equal_the_dense_path() {
    for (name, device) in devices() {
        device.seed(25);
        let burn = encoder_config(false).with_dropout(0.0).init(&device);
        let ours = TransformerEncoder::from(burn.clone());
        let config = LoraConfig::new(4).with_targets(Targets::attention());
        let x = input(&device);
        let base = burn.forward(BurnEncoderInput::new(x.clone()));

        let (burn, dense_report) = config.apply(burn).unwrap();
        let burn = randomize(burn, "lora_b", 0.2);
        let (ours, fast_report) = config.apply(ours).unwrap();
        // The adapted blocks share every parameter path, adapters included, so Burn's adapted
        // record loads into ours: both now hold the same A and B.
        let ours = ours.load_record(burn.clone().into_record());

        assert_eq!(dense_report.layers.len(), 8);
        assert!(dense_report.layers.iter().all(|layer| !layer.fast_path));
        assert!(fast_report.layers.iter().all(|layer| layer.fast_path));

        let dense = burn.forward(BurnEncoderInput::new(x.clone()));
        let fast = ours.forward(TransformerEncoderInput::new(x));
        let flat = |t: Tensor<3>| HostTensor::from(t.reshape([14, 32]));
        let (fast, dense) = (flat(fast), flat(dense));
        let moved = dense.error_vs_max(&flat(base));
        assert!(
            moved > 1e-3,
            "{name}: the adapters change the output ({moved:e})"
        );
        let error = fast.error_vs_max(&dense);
        assert!(error < 1e-5, "{name}: fast vs dense {error:e}");
    }
}
