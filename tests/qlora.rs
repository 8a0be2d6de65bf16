//! QLoRA: adapters in f32 over a base quantized with Burn's QFloat dtypes, on every backend of
//! the build, with each backend's own storage for 8-bit symmetric values.

mod common;

use burn::module::{Module, Quantizer};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::quantization::{Calibration, QuantScheme, QuantValue};
use burn::tensor::{DType, Distribution};
use burn_lora::{
    LoraConfig, LoraError, LoraLinear, LoraModule, Targets, merge_quantized, quantize_base,
};
use common::{HostTensor, Projections, devices, randomize};

const D_IN: usize = 32;
const D_OUT: usize = 24;

/// The test's two projections, `D_IN` to `D_OUT`.
fn projections(device: &Device) -> Projections {
    Projections::new(D_IN, D_OUT, device)
}

fn scheme(device: &Device) -> QuantScheme {
    device
        .settings()
        .quantization
        .scheme
        .with_value(QuantValue::Q8S)
}

fn quantizer(device: &Device) -> Quantizer {
    Quantizer::new(Calibration::MinMax, scheme(device))
}

fn is_quantized<const D: usize>(tensor: &Tensor<D>) -> bool {
    matches!(tensor.dtype(), DType::QFloat(_))
}

fn config() -> LoraConfig {
    LoraConfig::new(4)
        .with_alpha(Some(8.0))
        .with_targets(Targets::attention_qv())
}

#[test]
fn only_linear_weights_are_quantized_and_the_adapters_stay_float() {
    for (name, device) in devices() {
        device.seed(1);
        let model = quantize_base(projections(&device), &mut quantizer(&device)).unwrap();
        assert!(is_quantized(&model.query.weight.val()), "{name}");
        assert!(is_quantized(&model.value.weight.val()), "{name}");
        let bias = model.query.bias.as_ref().unwrap().val();
        assert!(!is_quantized(&bias), "{name}: biases stay float");

        let (model, _) = config().apply(model).unwrap();
        let state = model
            .query
            .weight
            .reparameterization::<burn_lora::LoraState>()
            .unwrap();
        assert_eq!(state.adapters[0].lora_a.val().dtype(), DType::F32, "{name}");
        // A quantized weight takes a quarter of the bytes or less (one byte a value on the CPU
        // backends, packed on the GPU), plus its scale.
        let bytes = model.query.weight.base().into_data().bytes().len();
        assert!(bytes * 3 < D_IN * D_OUT * 4, "{name}: {bytes} bytes");
        // Quantizing again finds nothing left to do.
        assert_eq!(
            quantize_base(model, &mut quantizer(&device)).unwrap_err(),
            LoraError::NothingToQuantize
        );
    }
}

#[test]
fn the_forward_adds_the_adapters_to_the_dequantized_base() {
    for (name, device) in devices() {
        device.seed(2);
        let model = quantize_base(projections(&device), &mut quantizer(&device)).unwrap();
        let (model, _) = config().apply(model).unwrap();
        let model = randomize(model, "lora_b", 0.2);
        let x = Tensor::<2>::random([5, D_IN], Distribution::Default, &device);
        let host_x = HostTensor::from(x.clone());
        for layer in ["query", "value"] {
            let (weight, bias) = match layer {
                "query" => (&model.query.weight, &model.query.bias),
                _ => (&model.value.weight, &model.value.bias),
            };
            let adapter = &weight
                .reparameterization::<burn_lora::LoraState>()
                .unwrap()
                .adapters[0];
            let a = HostTensor::from(adapter.lora_a.val());
            let b = HostTensor::from(adapter.lora_b.val());
            let expected = host_x
                .matmul(&HostTensor::from(weight.base().dequantize()).add(&a.matmul(&b).scale(2.0)))
                .add_row(&HostTensor::from(bias.as_ref().unwrap().val()));
            let output = match layer {
                "query" => model.query.forward(x.clone()),
                _ => model.value.forward(x.clone()),
            };
            let error = HostTensor::from(output).error_vs_max(&expected);
            assert!(error <= 1e-5, "{name}/{layer}: off by {error}");
        }
    }
}

#[test]
fn training_moves_the_adapters_and_never_the_quantized_base() {
    for (name, device) in devices() {
        let device = device.autodiff();
        device.seed(3);
        let base = projections(&device);
        let mut teacher = base.clone();
        let change = common::low_rank_change(D_IN, D_OUT, 0.3, &device);
        teacher.query.weight = teacher.query.weight.clone().map(|w| w + change.clone());
        let x = Tensor::<2>::random([64, D_IN], Distribution::Normal(0.0, 1.0), &device);
        let target = teacher.forward(x.clone()).detach();

        let model = quantize_base(base, &mut quantizer(&device)).unwrap();
        let (mut model, _) = config().apply(model).unwrap();
        let stored = (
            model.query.weight.base().into_data(),
            model.value.weight.base().into_data(),
        );
        let mut optimizer = burn::optim::AdamWConfig::new()
            .with_weight_decay(0.0)
            .init();
        let mut losses = Vec::new();
        for _ in 0..150 {
            let loss = (model.forward(x.clone()) - target.clone())
                .powi_scalar(2)
                .mean();
            losses.push(loss.clone().into_scalar::<f32>());
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
            assert_eq!(grads.len(), 4, "{name}: gradients reach A and B only");
            model = optimizer.step(1e-2, model, grads);
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last * 5.0 < first, "{name}: loss {first} -> {last}");
        assert_eq!(model.query.weight.base().into_data(), stored.0, "{name}");
        assert_eq!(model.value.weight.base().into_data(), stored.1, "{name}");
    }
}

#[derive(Module, Debug)]
struct Chain {
    first: LoraLinear,
    second: Linear,
}

impl Chain {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let hidden = burn::tensor::activation::relu(self.first.forward(x));
        self.second.forward(hidden)
    }
}

#[test]
fn gradients_equal_those_over_the_dequantized_base() {
    for (name, device) in devices() {
        let device = device.autodiff();
        device.seed(5);
        let base = Chain {
            first: LinearConfig::new(D_IN, D_OUT).init(&device).into(),
            second: LinearConfig::new(D_OUT, D_IN).init(&device),
        };
        let quantized = quantize_base(base, &mut quantizer(&device)).unwrap();
        // The same model with each quantized weight replaced by its f32 dequantization.
        let mut dense = quantized.clone();
        dense.first.weight = dense.first.weight.clone().map(|w| w.dequantize());
        dense.second.weight = dense.second.weight.clone().map(|w| w.dequantize());
        assert!(!is_quantized(&dense.first.weight.val()), "{name}");
        let config = LoraConfig::new(4).with_targets(Targets::names(["first", "second"]));
        // The same factors on both, set rather than drawn: tests run in parallel threads and
        // share the device's random stream.
        let adapt = |model: Chain| {
            let (model, _) = config.apply(model).unwrap();
            common::fill(common::fill(model, "lora_a", 0.1), "lora_b", -0.2)
        };
        let (quantized, dense) = (adapt(quantized), adapt(dense));

        let x = Tensor::<2>::random([6, D_IN], Distribution::Default, &device);
        let gradients = |model: &Chain| {
            let loss = model.forward(x.clone()).powi_scalar(2).mean();
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), model);
            common::param_ids(model)
                .into_iter()
                .filter(|(path, _)| path.contains(".burn_lora."))
                .map(|(path, id)| {
                    let grad = grads.get::<2>(id).expect("each factor has a gradient");
                    (path, HostTensor::from(grad))
                })
                .collect::<Vec<_>>()
        };
        let (ours, reference) = (gradients(&quantized), gradients(&dense));
        assert_eq!(ours.len(), 4, "{name}");
        for ((path, ours), (_, reference)) in ours.iter().zip(&reference) {
            // The first layer's gradient flows back through the second's quantized weight.
            let error = ours.error_vs_max(reference);
            assert!(error <= 1e-5, "{name}/{path}: gradient off by {error}");
        }
    }
}

#[test]
fn merging_dequantizes_and_requantizing_reports_its_error() {
    for (name, device) in devices() {
        device.seed(4);
        let model = quantize_base(projections(&device), &mut quantizer(&device)).unwrap();
        let (model, _) = config().apply(model).unwrap();
        let model = randomize(model, "lora_b", 0.2);
        let x = Tensor::<2>::random([5, D_IN], Distribution::Default, &device);
        let unmerged = HostTensor::from(model.forward(x.clone()));

        // Without re-quantizing: exact, and the merged weights are f32.
        let (merged, report) = merge_quantized(&model, None).unwrap();
        assert_eq!(report.layers.len(), 2, "{name}: {report}");
        assert!(report.layers.iter().all(|layer| !layer.requantized));
        assert_eq!(merged.query.weight.base().dtype(), DType::F32, "{name}");
        let error = HostTensor::from(merged.forward(x.clone())).error_vs_max(&unmerged);
        assert!(error <= 1e-5, "{name}: merged differs by {error}");
        // Unmerging takes the update out again, in f32.
        let back = merged.unmerge_lora().unwrap();
        let error = HostTensor::from(back.forward(x.clone())).error_vs_max(&unmerged);
        assert!(error <= 1e-5, "{name}: unmerged differs by {error}");

        // Re-quantizing: quantized again, and the report measures the rounding.
        let (requantized, report) = merge_quantized(&model, Some(&mut quantizer(&device))).unwrap();
        assert!(is_quantized(&requantized.query.weight.base()), "{name}");
        assert!(is_quantized(&requantized.value.weight.base()), "{name}");
        for layer in &report.layers {
            let relative = layer.relative_error.unwrap();
            assert!(layer.requantized && relative > 0.0, "{name}: {report}");
            // 8 bits over the weight's range: well under one percent.
            assert!(relative < 1e-2, "{name}: {report}");
        }
        let error = HostTensor::from(requantized.forward(x)).error_vs_max(&unmerged);
        assert!(
            error > 0.0 && error < 2e-2,
            "{name}: re-quantized output off by {error}"
        );
        assert!(report.to_string().contains("re-quantized"), "{report}");
    }
}

#[test]
fn dora_over_a_quantized_base_starts_at_it_and_merges_exactly() {
    for (name, device) in devices() {
        device.seed(6);
        let model = quantize_base(projections(&device), &mut quantizer(&device)).unwrap();
        let x = Tensor::<2>::random([5, D_IN], Distribution::Default, &device);
        let before = HostTensor::from(model.forward(x.clone()));
        let (model, _) = config().with_use_dora(true).apply(model).unwrap();
        let error = HostTensor::from(model.forward(x.clone())).error_vs_max(&before);
        assert!(
            error <= 1e-6,
            "{name}: QDoRA starts off the base by {error}"
        );
        let model = randomize(randomize(model, "lora_b", 0.2), "magnitude", 1.0);
        let adapted = HostTensor::from(model.forward(x.clone()));
        let (merged, report) = merge_quantized(&model, None).unwrap();
        assert_eq!(report.layers.len(), 2, "{name}");
        let error = HostTensor::from(merged.forward(x)).error_vs_max(&adapted);
        assert!(error <= 1e-5, "{name}: merged QDoRA differs by {error}");
    }
}
