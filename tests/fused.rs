//! The fused LoRA linear (`burn_lora::ops::lora_linear`) against its reference composed from
//! Burn's operations (`lora_linear_reference`) and a naive f64 formula: outputs and every
//! gradient, with and without bias, dropout, autodiff, trainable base, on strided operands and
//! on every backend and dtype (where the fused kernel does not run, the reference does).

mod common;

use burn::prelude::*;
use burn::tensor::{DType, Distribution, TensorData, Tolerance};
use burn_lora::ops::{lora_linear, lora_linear_reference};

/// Fused against reference, f32: both sum the same products in different orders.
const TOLERANCE: f32 = 1e-5;

struct Operands {
    input: Tensor<3>,
    mask: Option<Tensor<3>>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scale: f64,
    /// The loss is `sum(output · probe)`, so every output entry gets its own gradient.
    probe: Tensor<3>,
}

fn operands(device: &Device, bias: bool, dropout: bool, d_in: usize, d_out: usize) -> Operands {
    device.seed(7);
    let normal = Distribution::Normal(0.0, 0.5);
    let rank = 4;
    Operands {
        input: Tensor::random([2, 5, d_in], normal, device),
        // A fixed dropout mask (keep 1/2, scaled by 2), so both paths drop the same entries.
        mask: dropout.then(|| {
            Tensor::<3>::random([2, 5, d_in], Distribution::Bernoulli(0.5), device).mul_scalar(2.0)
        }),
        weight: Tensor::random([d_in, d_out], normal, device),
        bias: bias.then(|| Tensor::random([d_out], normal, device)),
        lora_a: Tensor::random([d_in, rank], normal, device),
        lora_b: Tensor::random([rank, d_out], normal, device),
        scale: 1.75,
        probe: Tensor::random([2, 5, d_out], Distribution::Normal(0.0, 1.0), device),
    }
}

/// Which operands train.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    input: bool,
    weight: bool,
    bias: bool,
}

const ADAPTER_ONLY: Tracked = Tracked {
    input: true,
    weight: false,
    bias: false,
};

const EVERYTHING: Tracked = Tracked {
    input: true,
    weight: true,
    bias: true,
};

type Op = fn(
    Tensor<3>,
    Option<Tensor<3>>,
    Tensor<2>,
    Option<Tensor<1>>,
    Tensor<2>,
    Tensor<2>,
    f64,
) -> Tensor<3>;

/// The output and the gradients of `sum(output · probe)` for x, W, b, A, B (those tracked).
fn run(op: Op, operands: &Operands, tracked: Tracked) -> Vec<(&'static str, TensorData)> {
    let training = operands.input.device().is_autodiff();
    let autodiff = |tensor: Tensor<2>, train: bool| match train && training {
        true => tensor.require_grad(),
        false => tensor,
    };
    let input = match tracked.input && training {
        true => operands.input.clone().require_grad(),
        false => operands.input.clone(),
    };
    let weight = autodiff(operands.weight.clone(), tracked.weight);
    let bias = operands
        .bias
        .clone()
        .map(|bias| match tracked.bias && training {
            true => bias.require_grad(),
            false => bias,
        });
    let lora_a = autodiff(operands.lora_a.clone(), true);
    let lora_b = autodiff(operands.lora_b.clone(), true);
    let dropped = operands.mask.clone().map(|mask| input.clone() * mask);
    let output = op(
        input.clone(),
        dropped,
        weight.clone(),
        bias.clone(),
        lora_a.clone(),
        lora_b.clone(),
        operands.scale,
    );
    let mut results = vec![("output", output.clone().into_data())];
    if !output.device().is_autodiff() {
        return results;
    }
    let grads = (output * operands.probe.clone()).sum().backward();
    results.push(("dA", lora_a.grad(&grads).unwrap().into_data()));
    results.push(("dB", lora_b.grad(&grads).unwrap().into_data()));
    if tracked.input {
        results.push(("dx", input.grad(&grads).unwrap().into_data()));
    }
    if tracked.weight {
        results.push(("dW", weight.grad(&grads).unwrap().into_data()));
    }
    if let (true, Some(bias)) = (tracked.bias, &bias) {
        results.push(("db", bias.grad(&grads).unwrap().into_data()));
    }
    results
}

/// The first output or gradient where the fused path and the reference differ by more than
/// the tolerance, as a message.
fn difference(fused: &[(&str, TensorData)], reference: &[(&str, TensorData)]) -> Option<String> {
    if fused.len() != reference.len() {
        return Some(format!(
            "{} results against {}",
            fused.len(),
            reference.len()
        ));
    }
    for ((name, fused), (_, reference)) in fused.iter().zip(reference) {
        if fused.shape() != reference.shape() {
            return Some(format!(
                "{name}: shape {:?} against {:?}",
                fused.shape(),
                reference.shape()
            ));
        }
        let max = reference
            .iter::<f64>()
            .fold(1.0f64, |max, value| max.max(value.abs()));
        let error = fused
            .iter::<f64>()
            .zip(reference.iter::<f64>())
            .fold(0.0f64, |worst, (a, b)| worst.max((a - b).abs()));
        if error > TOLERANCE as f64 * max || error.is_nan() {
            return Some(format!("{name} differs by {error:e} (scale {max})"));
        }
    }
    None
}

fn assert_same(label: &str, fused: &[(&str, TensorData)], reference: &[(&str, TensorData)]) {
    if let Some(difference) = difference(fused, reference) {
        panic!("{label}: {difference}");
    }
}

fn compare(device: &Device, bias: bool, dropout: bool, tracked: Tracked) {
    let operands = operands(device, bias, dropout, 24, 40);
    let fused = run(lora_linear::<3>, &operands, tracked);
    let reference = run(lora_linear_reference::<3>, &operands, tracked);
    let label = format!("{device:?} bias={bias} dropout={dropout} {tracked:?}");
    assert_same(&label, &fused, &reference);
}

#[test]
fn fused_equals_reference_forward_and_backward_on_every_backend() {
    for (_, device) in common::devices() {
        for bias in [false, true] {
            for dropout in [false, true] {
                compare(&device, bias, dropout, ADAPTER_ONLY);
                compare(&device.clone().autodiff(), bias, dropout, ADAPTER_ONLY);
                compare(&device.clone().autodiff(), bias, dropout, EVERYTHING);
            }
        }
    }
}

#[test]
fn fused_equals_reference_when_only_the_adapter_trains() {
    // The first layer of a model: its input needs no gradient.
    let tracked = Tracked {
        input: false,
        weight: false,
        bias: false,
    };
    for dropout in [false, true] {
        compare(&Device::flex().autodiff(), true, dropout, tracked);
    }
}

#[test]
fn fused_output_equals_a_naive_f64_formula() {
    let device = Device::flex();
    let operands = operands(&device, true, false, 9, 6);
    let output = lora_linear(
        operands.input.clone(),
        None,
        operands.weight.clone(),
        operands.bias.clone(),
        operands.lora_a.clone(),
        operands.lora_b.clone(),
        operands.scale,
    );
    let read = |tensor: TensorData| tensor.iter::<f64>().collect::<Vec<_>>();
    let (x, w, b) = (
        read(operands.input.into_data()),
        read(operands.weight.into_data()),
        read(operands.bias.unwrap().into_data()),
    );
    let (a, bb) = (
        read(operands.lora_a.into_data()),
        read(operands.lora_b.into_data()),
    );
    let (d_in, d_out, rank) = (9, 6, 4);
    let mut expected = Vec::new();
    for row in x.chunks(d_in) {
        for j in 0..d_out {
            let mut value = b[j];
            for k in 0..d_in {
                value += row[k] * w[k * d_out + j];
            }
            for q in 0..rank {
                let hidden: f64 = (0..d_in).map(|k| row[k] * a[k * rank + q]).sum();
                value += operands.scale * hidden * bb[q * d_out + j];
            }
            expected.push(value as f32);
        }
    }
    output.into_data().assert_approx_eq::<f32>(
        &TensorData::new(expected, [2, 5, d_out]),
        Tolerance::absolute(1e-5),
    );
}

#[test]
fn fused_reads_strided_operands_without_copying_them_first() {
    for (_, device) in common::devices() {
        strided_operands(&device.autodiff());
    }
}

fn strided_operands(device: &Device) {
    // A transposed weight and factors (views with swapped strides), and a sliced input.
    let operands = operands(device, true, false, 16, 12);
    let wide = Tensor::<3>::random([2, 5, 32], Distribution::Normal(0.0, 0.5), device);
    let input = wide.slice([0..2, 0..5, 8..24]);
    let weight_t = operands.weight.clone().transpose().into_data();
    let weight = Tensor::<2>::from_data(weight_t, device).transpose();
    let a_t = Tensor::<2>::from_data(operands.lora_a.clone().transpose().into_data(), device);
    let b_t = Tensor::<2>::from_data(operands.lora_b.clone().transpose().into_data(), device);
    let (lora_a, lora_b) = (
        a_t.transpose().require_grad(),
        b_t.transpose().require_grad(),
    );
    let bias = operands.bias.clone();
    let call = |op: Op| {
        let output = op(
            input.clone(),
            None,
            weight.clone(),
            bias.clone(),
            lora_a.clone(),
            lora_b.clone(),
            operands.scale,
        );
        let grads = output.clone().sum().backward();
        vec![
            ("output", output.into_data()),
            ("dA", lora_a.grad(&grads).unwrap().into_data()),
            ("dB", lora_b.grad(&grads).unwrap().into_data()),
        ]
    };
    assert_same(
        &format!("strided {device:?}"),
        &call(lora_linear::<3>),
        &call(lora_linear_reference::<3>),
    );
}

#[test]
fn fused_serves_f64_and_leaves_half_precision_to_the_reference() {
    for dtype in [DType::F64, DType::F16, DType::BF16] {
        let device = Device::flex();
        let operands = operands(&device, true, true, 8, 8);
        let cast2 = |tensor: Tensor<2>| tensor.cast(dtype);
        let args = || {
            (
                operands.input.clone().cast(dtype),
                operands
                    .mask
                    .clone()
                    .map(|mask| (operands.input.clone() * mask).cast(dtype)),
                cast2(operands.weight.clone()),
                operands.bias.clone().map(|bias| bias.cast(dtype)),
                cast2(operands.lora_a.clone()),
                cast2(operands.lora_b.clone()),
            )
        };
        let (x, d, w, b, la, lb) = args();
        let fused = lora_linear(x, d, w, b, la, lb, operands.scale);
        let (x, d, w, b, la, lb) = args();
        let reference = lora_linear_reference(x, d, w, b, la, lb, operands.scale);
        assert_eq!(fused.dtype(), dtype);
        let tolerance = match dtype {
            DType::F64 => Tolerance::absolute(1e-10),
            _ => Tolerance::absolute(1e-6), // the same path: identical
        };
        fused
            .cast(DType::F64)
            .into_data()
            .assert_approx_eq::<f64>(&reference.cast(DType::F64).into_data(), tolerance);
    }
}

#[test]
fn an_empty_batch_gives_an_empty_output() {
    let device = Device::flex().autodiff();
    let operands = operands(&device, true, false, 8, 8);
    let input = Tensor::<3>::zeros([0, 5, 8], &device);
    let output = lora_linear(
        input,
        None,
        operands.weight,
        operands.bias,
        operands.lora_a,
        operands.lora_b,
        operands.scale,
    );
    assert_eq!(output.dims(), [0, 5, 8]);
}

#[test]
#[allow(deprecated)] // ndarray is deprecated upstream, and still tested here
fn the_fused_kernel_serves_flex_in_f32_and_f64_only() {
    use burn_lora::ops::fuses;
    for device in [Device::flex(), Device::flex().autodiff()] {
        assert!(fuses(&device, DType::F32) && fuses(&device, DType::F64));
        assert!(!fuses(&device, DType::F16) && !fuses(&device, DType::BF16));
    }
    assert!(!fuses(&Device::ndarray(), DType::F32));
    assert!(!fuses(&Device::ndarray().autodiff(), DType::F32));
}

#[cfg(feature = "wgpu")]
#[test]
fn the_cubecl_kernel_serves_wgpu_in_f32_f16_and_bf16() {
    use burn_lora::ops::fuses;
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    for device in [device.clone(), device.autodiff()] {
        assert!(fuses(&device, DType::F32) && fuses(&device, DType::F16));
        assert!(fuses(&device, DType::BF16) && !fuses(&device, DType::F64));
    }
}

/// f16 on wgpu, where the kernel serves it (it sums the low-rank term in f32 and rounds once):
/// values and gradients equal the reference's within f16's precision, and both are near the f32
/// result on the same (f16-rounded) operands. The products are summed in f16 on some devices,
/// so the bound against f32 is wider than against each other.
#[cfg(feature = "wgpu")]
#[test]
fn half_precision_on_wgpu_is_close_to_f32() {
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff();
    let operands = operands(&device, true, false, 24, 40);
    // The operands rounded to f16 once, then computed in `dtype`.
    let run_in = |op: Op, dtype: DType| {
        let round = |tensor: Tensor<2>| tensor.cast(DType::F16).cast(dtype);
        let leaf2 = |tensor: &Tensor<2>| round(tensor.clone()).detach().require_grad();
        let input = operands.input.clone().cast(DType::F16).cast(dtype);
        let input = input.detach().require_grad();
        let (lora_a, lora_b) = (leaf2(&operands.lora_a), leaf2(&operands.lora_b));
        let weight = leaf2(&operands.weight);
        let bias = (operands.bias.clone()).map(|bias| bias.cast(DType::F16).cast(dtype));
        let output = op(
            input.clone(),
            None,
            weight,
            bias,
            lora_a.clone(),
            lora_b.clone(),
            operands.scale,
        );
        assert_eq!(output.dtype(), dtype);
        let grads = output.clone().sum().backward();
        let f32 = |tensor: Tensor<2>| tensor.cast(DType::F32).into_data();
        let flat = |tensor: Tensor<3>| {
            let width = tensor.dims()[2] as i64;
            f32(tensor.reshape([-1, width]))
        };
        vec![
            ("output", flat(output)),
            ("dx", flat(input.grad(&grads).unwrap())),
            ("dA", f32(lora_a.grad(&grads).unwrap())),
            ("dB", f32(lora_b.grad(&grads).unwrap())),
        ]
    };
    let exact = run_in(lora_linear_reference::<3>, DType::F32);
    let fused = run_in(lora_linear::<3>, DType::F16);
    let reference = run_in(lora_linear_reference::<3>, DType::F16);
    assert_eq!(exact.len(), fused.len());
    for (((name, fused), (_, reference)), (_, exact)) in fused.iter().zip(&reference).zip(&exact) {
        println!("{name}");
        fused.assert_approx_eq::<f32>(reference, Tolerance::rel_abs(1e-2, 1e-2));
        fused.assert_approx_eq::<f32>(exact, Tolerance::rel_abs(2e-2, 2e-2));
        reference.assert_approx_eq::<f32>(exact, Tolerance::rel_abs(2e-2, 2e-2));
    }
}

#[test]
fn on_flex_the_fused_kernel_is_what_runs() {
    the_fused_kernel_is_what_runs(&Device::flex());
}

#[cfg(feature = "wgpu")]
#[test]
fn on_wgpu_the_cubecl_kernel_is_what_runs() {
    the_fused_kernel_is_what_runs(&Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
}

fn the_fused_kernel_is_what_runs(device: &Device) {
    // Values from a fixed generator (not the device's, which concurrent tests share), so the
    // outcome is the same on every run. The two paths sum in different orders, and at least
    // one of 4096 outputs rounds differently, which shows a path other than the reference ran.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut values = |count: usize| -> Vec<f32> {
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    };
    let tensor = |values: Vec<f32>, shape: [usize; 2]| {
        Tensor::<2>::from_data(TensorData::new(values, shape), device)
    };
    let input = tensor(values(64 * 96), [64, 96]);
    let weight = tensor(values(96 * 64), [96, 64]);
    let bias = Tensor::<1>::from_data(TensorData::new(values(64), [64]), device);
    let (lora_a, lora_b) = (
        tensor(values(96 * 8), [96, 8]),
        tensor(values(8 * 64), [8, 64]),
    );
    let args = || {
        (
            input.clone(),
            weight.clone(),
            Some(bias.clone()),
            lora_a.clone(),
            lora_b.clone(),
        )
    };
    let (x, w, b, a, bb) = args();
    let fused = lora_linear(x, None, w, b, a, bb, 0.5).into_data();
    let (x, w, b, a, bb) = args();
    let reference = lora_linear_reference(x, None, w, b, a, bb, 0.5).into_data();
    fused.assert_approx_eq::<f32>(&reference, Tolerance::absolute(1e-5));
    assert_ne!(fused.as_bytes(), reference.as_bytes());
}

mod qlora {
    //! A quantized base (QLoRA): the fused kernel dequantizes the weight panel by panel in the
    //! forward and again in the backward, and keeps no float copy; it must equal Burn's path,
    //! which dequantizes the whole weight.

    use super::*;
    use burn::tensor::quantization::{QuantScheme, QuantValue, ScaleDtype};

    fn schemes(device: &Device) -> Vec<(&'static str, QuantScheme)> {
        let default = device.settings().quantization.scheme;
        vec![
            (
                "q8 per block of 32",
                default
                    .with_value(QuantValue::Q8S)
                    .per_block([32], ScaleDtype::F32),
            ),
            (
                "q4 per block of 16",
                default
                    .with_value(QuantValue::Q4S)
                    .per_block([16], ScaleDtype::F32),
            ),
            (
                "q8 per tensor",
                default
                    .with_value(QuantValue::Q8S)
                    .per_tensor(ScaleDtype::F32),
            ),
        ]
    }

    /// d_out = 1056 takes several panels of flex's kernel in the backward (d_in = 288).
    const PANELS: (usize, usize) = (288, 1056);

    fn compare_quantized(
        device: &Device,
        bias: bool,
        dropout: bool,
        tracked: Tracked,
        (d_in, d_out): (usize, usize),
    ) {
        for (name, scheme) in schemes(device) {
            let mut operands = operands(device, bias, dropout, d_in, d_out);
            operands.weight = operands.weight.clone().quantize_dynamic(&scheme);
            assert!(matches!(operands.weight.dtype(), DType::QFloat(_)));
            let fused = run(lora_linear::<3>, &operands, tracked);
            let reference = run(lora_linear_reference::<3>, &operands, tracked);
            let label = format!("{name} {device:?} bias={bias} dropout={dropout}");
            assert_same(&label, &fused, &reference);
        }
    }

    #[test]
    fn quantized_fused_equals_burns_dequantized_path() {
        let device = Device::flex();
        for bias in [false, true] {
            for dropout in [false, true] {
                compare_quantized(&device, bias, dropout, ADAPTER_ONLY, PANELS);
                let training = device.clone().autodiff();
                compare_quantized(&training, bias, dropout, ADAPTER_ONLY, PANELS);
            }
        }
        // A bias that trains over a frozen quantized weight.
        let tracked = Tracked {
            input: true,
            weight: false,
            bias: true,
        };
        compare_quantized(&device.autodiff(), true, false, tracked, PANELS);
    }

    /// On wgpu the base weight stays quantized in the autodiff state too, and is dequantized
    /// where it is multiplied, forward and backward.
    #[cfg(feature = "wgpu")]
    #[test]
    fn quantized_on_wgpu_equals_burns_dequantized_path() {
        let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        // No panels on wgpu: a small layer covers the path (a software GPU is slow), and
        // dropout is taken in the backward case only.
        compare_quantized(&device, true, false, ADAPTER_ONLY, (64, 96));
        let training = device.autodiff();
        compare_quantized(&training, true, true, ADAPTER_ONLY, (64, 96));
    }

    #[test]
    #[allow(deprecated)] // ndarray is deprecated upstream, and still tested here
    fn other_backends_keep_burns_quantized_path() {
        let device = Device::ndarray().autodiff();
        let scheme = device
            .settings()
            .quantization
            .scheme
            .with_value(QuantValue::Q8S);
        let mut operands = operands(&device, true, false, 32, 32);
        operands.weight = operands.weight.clone().quantize_dynamic(&scheme);
        let fused = run(lora_linear::<3>, &operands, ADAPTER_ONLY);
        let reference = run(lora_linear_reference::<3>, &operands, ADAPTER_ONLY);
        assert_same("ndarray", &fused, &reference);
    }
}

mod quantized_linear {
    //! A quantized base layer without an adapter (QLoRA's feed-forward layers): `ops::linear`
    //! runs the tiled kernel and must equal Burn's `linear` over the same quantized weight.

    use super::*;
    use burn::tensor::module::linear;
    use burn::tensor::quantization::{QuantValue, ScaleDtype};

    #[test]
    fn quantized_linear_equals_burns_linear_with_gradients() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            let scheme = device
                .settings()
                .quantization
                .scheme
                .with_value(QuantValue::Q4S)
                .per_block([32], ScaleDtype::F32);
            let operands = operands(&device, true, false, 96, 544);
            let weight = operands.weight.clone().quantize_dynamic(&scheme);
            let input = match device.is_autodiff() {
                true => operands.input.clone().require_grad(),
                false => operands.input.clone(),
            };
            let outputs = [
                burn_lora::ops::linear(input.clone(), weight.clone(), operands.bias.clone()),
                linear(input.clone(), weight.clone(), operands.bias.clone()),
            ];
            let mut results: Vec<Vec<(&str, TensorData)>> = Vec::new();
            for output in outputs {
                let mut result = vec![("output", output.clone().into_data())];
                if device.is_autodiff() {
                    let grads = (output * operands.probe.clone()).sum().backward();
                    result.push(("dx", input.grad(&grads).unwrap().into_data()));
                }
                results.push(result);
            }
            assert_same(&format!("{device:?}"), &results[0], &results[1]);
        }
    }
}

mod properties {
    //! Random shapes, down to one row, one column and rank 1, with or without bias, dropout,
    //! autodiff and a quantized base: the fused operation always equals the reference.

    use super::*;
    use burn::tensor::quantization::{QuantValue, ScaleDtype};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestCaseError, TestRunner};

    #[derive(Debug, Clone)]
    struct Case {
        rows: usize,
        d_in: usize,
        block: usize,
        blocks: usize,
        rank: usize,
        bias: bool,
        dropout: bool,
        autodiff: bool,
        quantized: Option<QuantValue>,
        seed: u64,
    }

    fn case() -> impl Strategy<Value = Case> {
        let quantized = prop_oneof![
            Just(None),
            Just(Some(QuantValue::Q8S)),
            Just(Some(QuantValue::Q4S))
        ];
        (
            (1usize..=12, 1usize..=40, 1usize..=8, 1usize..=9, 1usize..=9),
            (
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                quantized,
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (rows, d_in, block, blocks, rank),
                    (bias, dropout, autodiff, quantized, seed),
                )| {
                    Case {
                        rows,
                        d_in,
                        block,
                        blocks,
                        rank,
                        bias,
                        dropout,
                        autodiff,
                        quantized,
                        seed,
                    }
                },
            )
    }

    fn check(case: &Case) -> Result<(), TestCaseError> {
        let device = match case.autodiff {
            true => Device::flex().autodiff(),
            false => Device::flex(),
        };
        // A generator of the case's own, not the device's (concurrent tests share that one).
        let mut state = case.seed | 1;
        let mut values = |count: usize| -> Vec<f32> {
            (0..count)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect()
        };
        let d_out = case.block * case.blocks;
        let (rows, d_in, rank) = (case.rows, case.d_in, case.rank);
        let matrix = |values: Vec<f32>, shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(values, shape), &device)
        };
        let mut weight = matrix(values(d_in * d_out), [d_in, d_out]);
        if let Some(value) = case.quantized {
            let scheme = device
                .settings()
                .quantization
                .scheme
                .with_value(value)
                .per_block([case.block as u8], ScaleDtype::F32);
            weight = weight.quantize_dynamic(&scheme);
        }
        let operands = Operands {
            input: Tensor::from_data(
                TensorData::new(values(rows * d_in), [1, rows, d_in]),
                &device,
            ),
            mask: case.dropout.then(|| {
                let keep: Vec<f32> = values(rows * d_in)
                    .into_iter()
                    .map(|value| if value > 0.0 { 2.0 } else { 0.0 })
                    .collect();
                Tensor::from_data(TensorData::new(keep, [1, rows, d_in]), &device)
            }),
            weight,
            bias: case
                .bias
                .then(|| Tensor::from_data(TensorData::new(values(d_out), [d_out]), &device)),
            lora_a: matrix(values(d_in * rank), [d_in, rank]),
            lora_b: matrix(values(rank * d_out), [rank, d_out]),
            scale: 0.75,
            probe: Tensor::from_data(
                TensorData::new(values(rows * d_out), [1, rows, d_out]),
                &device,
            ),
        };
        let fused = run(lora_linear::<3>, &operands, ADAPTER_ONLY);
        let reference = run(lora_linear_reference::<3>, &operands, ADAPTER_ONLY);
        match difference(&fused, &reference) {
            None => Ok(()),
            Some(difference) => Err(TestCaseError::fail(format!("{difference}: {case:?}"))),
        }
    }

    #[test]
    fn random_shapes_fused_equals_reference() {
        let mut runner = TestRunner::new(Config {
            cases: 96,
            failure_persistence: None,
            rng_algorithm: RngAlgorithm::ChaCha,
            rng_seed: RngSeed::Fixed(0xF05E_D11A),
            ..Config::default()
        });
        runner
            .run(&case(), |case| check(&case))
            .expect("every random case agrees");
    }
}
