//! The fused LoRA linear: `y = x·W + b + s·(dropout(x)·A)·B` as one backend operation.
//!
//! The lowest layer of the crate: tensors in, tensors out, no adapters and no paths.
//!
//! Composed from Burn's tensor operations, the LoRA path writes `(x·A)·B` into a second buffer
//! of the output's size and adds it to `x·W + b`; autodiff then adds `dy·Wᵀ` and
//! `s·(dy·Bᵀ)·Aᵀ` for the input's gradient, another buffer and pass of the input's size.
//! [`lora_linear`] does both in one buffer each, through Burn's backend-extension mechanism:
//!
//! - **forward**: `h = x_d·A` (`[m, r]`), then one output buffer filled with `b`, then
//!   `s·h·B` and `x·W` accumulated into it by the matrix product itself;
//! - **backward** (a hand-written autodiff step): `g = s·dy·Bᵀ` (`[m, r]`), `dA = x_dᵀ·g`,
//!   `dB = s·hᵀ·dy`, and `dx = dy·Wᵀ + g·Aᵀ` accumulated into one buffer when no dropout
//!   separates `x_d` from `x`. No tensor of the weight's size exists unless the weight itself
//!   trains, and `h` is kept from the forward pass.
//!
//! Two kernels serve it:
//!
//! - **flex** (f32 and f64, contiguous or strided operands): `gemm`'s accumulate, as above. A
//!   quantized weight (QLoRA) is dequantized one panel at a time inside the product, forward
//!   and backward, and no float copy of it is kept.
//! - **CubeCL** (the `wgpu` feature; f32, f16 and bf16): Burn's own matrix product writes
//!   `x·W`, then one kernel adds `s·h·B` and the bias to it in place, with `r` products per
//!   entry summed in f32. The output is
//!   read and written once, and `h·B` never gets a buffer of its own. Under Burn's kernel fusion
//!   the whole sum is one lazy operation. The backward is the same hand-written step as on flex.
//!   A quantized weight stays quantized in the autodiff state and is dequantized where it is
//!   multiplied.
//!
//! Every other backend, dtype (f16, bf16) or device computes [`lora_linear_reference`], the
//! same formula from Burn's operations; tests hold the two equal on every backend.

#[cfg(feature = "wgpu")]
mod cube;
#[cfg(any(feature = "flex", feature = "wgpu"))]
mod extension;

use burn::tensor::module;
use burn::tensor::{DType, Device, Tensor};

/// `x·W + b + s·(x_d·A)·B`, the output of a linear layer with one LoRA adapter, where `x_d` is
/// `dropped`, the input after the adapter's dropout, or `x` itself when `dropped` is `None`.
/// Pass `None` when the adapter has no dropout: the input's gradient then comes out of one
/// buffer.
///
/// Where [`fuses`] says so (flex in f32 or f64, wgpu in f32, f16 or bf16) this runs the fused operation
/// described in the [module docs](self), forward and backward; elsewhere it computes
/// [`lora_linear_reference`]. Both give the same values and gradients (within 1e-5 in the
/// crate's tests).
///
/// # Shapes
///
/// - input, dropped: `[..., d_input]`
/// - weight: `[d_input, d_output]`
/// - bias: `[d_output]`
/// - lora_a: `[d_input, r]`
/// - lora_b: `[r, d_output]`
/// - output: `[..., d_output]`
///
/// # Panics
///
/// Panics if the shapes do not agree.
pub fn lora_linear<const D: usize>(
    input: Tensor<D>,
    dropped: Option<Tensor<D>>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    check_shapes(
        &input,
        dropped.as_ref(),
        &weight,
        bias.as_ref(),
        &lora_a,
        &lora_b,
    );
    #[cfg(any(feature = "flex", feature = "wgpu"))]
    if extension::fusable(
        &input,
        dropped.as_ref(),
        &weight,
        bias.as_ref(),
        &lora_a,
        &lora_b,
    ) {
        return extension::lora_linear(input, dropped, weight, bias, lora_a, lora_b, scale);
    }
    composed(input, dropped, weight, bias, lora_a, lora_b, scale)
}

/// `x·W + b`, a linear layer without adapters. Over a quantized weight on flex (a QLoRA base
/// layer that carries no adapter) it runs the same tiled kernel as [`lora_linear`], forward and
/// backward, so no float copy of the weight is made or kept; otherwise it is Burn's
/// [`linear`](burn::tensor::module::linear).
///
/// # Shapes
///
/// - input: `[..., d_input]`
/// - weight: `[d_input, d_output]`
/// - bias: `[d_output]`
/// - output: `[..., d_output]`
///
/// # Panics
///
/// Panics if the shapes do not agree.
pub fn linear<const D: usize>(
    input: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if matches!(weight.dtype(), DType::QFloat(_)) && extension::on_flex(&weight.device()) {
        // A rank-0 adapter: the kernel's low-rank term vanishes.
        let [d_input, d_output] = weight.dims();
        let device = weight.device();
        let lora_a = Tensor::zeros([d_input, 0], (&device, input.dtype()));
        let lora_b = Tensor::zeros([0, d_output], (&device, input.dtype()));
        if extension::fusable(&input, None, &weight, bias.as_ref(), &lora_a, &lora_b) {
            return extension::lora_linear(input, None, weight, bias, lora_a, lora_b, 0.0);
        }
    }
    module::linear(input, weight, bias)
}

/// [`lora_linear`] composed from Burn's operations: `linear(x, W, b) + s·(x_d·A)·B`, with the
/// scale on the `[.., r]` intermediate. The reference the fused operation is tested against,
/// and the path on every backend without it.
///
/// # Shapes
///
/// As [`lora_linear`].
///
/// # Panics
///
/// Panics if the shapes do not agree.
pub fn lora_linear_reference<const D: usize>(
    input: Tensor<D>,
    dropped: Option<Tensor<D>>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    check_shapes(
        &input,
        dropped.as_ref(),
        &weight,
        bias.as_ref(),
        &lora_a,
        &lora_b,
    );
    composed(input, dropped, weight, bias, lora_a, lora_b, scale)
}

/// [`lora_linear_reference`] on operands whose shapes are checked.
fn composed<const D: usize>(
    input: Tensor<D>,
    dropped: Option<Tensor<D>>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    let dropped = dropped.unwrap_or_else(|| input.clone());
    let hidden = module::linear(dropped, lora_a, None).mul_scalar(scale);
    module::linear(input, weight, bias) + module::linear(hidden, lora_b, None)
}

/// Whether [`lora_linear`] runs the fused operation for operands of `dtype` on `device`, with
/// or without autodiff: a flex device in f32 or f64, or (with the `wgpu` feature) a CubeCL
/// device in f32, f16 or bf16. Anything else (another backend, f16/bf16 on flex) runs
/// [`lora_linear_reference`]. The weight may also be quantized (QLoRA) over f32 operands.
///
/// ```
/// use burn::tensor::{DType, Device};
///
/// assert!(burn_lora::ops::fuses(&Device::flex().autodiff(), DType::F32));
/// assert!(!burn_lora::ops::fuses(&Device::flex(), DType::BF16));
/// ```
pub fn fuses(device: &Device, dtype: DType) -> bool {
    #[cfg(any(feature = "flex", feature = "wgpu"))]
    return extension::serves(device, dtype);
    #[cfg(not(any(feature = "flex", feature = "wgpu")))]
    {
        let _ = (device, dtype);
        false
    }
}

fn check_shapes<const D: usize>(
    input: &Tensor<D>,
    dropped: Option<&Tensor<D>>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    lora_a: &Tensor<2>,
    lora_b: &Tensor<2>,
) {
    let [d_input, d_output] = weight.dims();
    let [a_input, rank] = lora_a.dims();
    let [b_rank, b_output] = lora_b.dims();
    assert_eq!(
        input.dims()[D - 1],
        d_input,
        "lora_linear: the input's last axis is {}, the weight's d_input {d_input}",
        input.dims()[D - 1]
    );
    if let Some(dropped) = dropped {
        assert_eq!(
            input.dims(),
            dropped.dims(),
            "lora_linear: input and dropped input differ"
        );
    }
    assert_eq!(
        (a_input, b_rank, b_output),
        (d_input, rank, d_output),
        "lora_linear: A is [{a_input}, {rank}] and B [{b_rank}, {b_output}] for a [{d_input}, {d_output}] weight"
    );
    if let Some(bias) = bias {
        assert_eq!(
            bias.dims(),
            [d_output],
            "lora_linear: the bias is not [{d_output}]"
        );
    }
}
