//! DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024), as PEFT computes it.
//!
//! A DoRA adapter adds a trainable magnitude `m`, one entry per output feature, to LoRA's
//! `A` and `B`. The adapted weight is the LoRA-updated weight with each output feature rescaled
//! to that magnitude:
//!
//! ```text
//! W' = (W + s·A·B) · diag(m / ‖W + s·A·B‖)
//! ```
//!
//! where `‖·‖` is the L2 norm of each output feature's weights: a column of the factor layout
//! `[d_in, d_out]`, a row of PyTorch's `[out, in]`. As in PEFT (and the paper's section 4.3),
//! the norm is detached from the gradient, which saves the memory of back-propagating through
//! it. `m` starts at the norms of `W`, so a new DoRA adapter (with `B = 0`) starts equal to the
//! base.

use burn::tensor::module::linear;
use burn::tensor::{FloatDType, Tensor};

use crate::adapter::to_f32;
use crate::{LoraAdapter, LoraError};

/// The L2 norm of each output feature of a weight in the factor layout: `[d_in, d_out]` →
/// `[d_out]`.
pub(crate) fn output_norms(weight: &Tensor<2>) -> Tensor<1> {
    let [_, d_out] = weight.dims();
    weight
        .clone()
        .powi_scalar(2)
        .sum_dim(0)
        .sqrt()
        .reshape([d_out])
}

/// `m / ‖adapted‖`, in f32, the norm detached: the factor each output feature is scaled by.
pub(crate) fn magnitude_factor(magnitude: Tensor<1>, adapted: &Tensor<2>) -> Tensor<1> {
    magnitude.cast(FloatDType::F32) / output_norms(&adapted.clone().detach())
}

/// A DoRA adapter's contribution to a linear layer's output, added to `x·W + b`:
/// `(f - 1)⊙(x·W) + f⊙s·(dropout(x)·A)·B` with `f = m / ‖W + s·A·B‖` (PEFT's
/// `DoraLinearLayer.forward`).
pub(crate) fn linear_update<const D: usize>(
    adapter: &LoraAdapter,
    magnitude: Tensor<1>,
    input: Tensor<D>,
    weight: &Tensor<2>,
    stored: &Tensor<2>,
    base_output: Tensor<D>,
) -> Tensor<D> {
    let dtype = FloatDType::from(input.dtype());
    // Detached before the norm, as PEFT does: autodiff then records nothing of the weight-sized
    // sum, which would otherwise stay alive until the backward pass.
    let adapted = stored.clone() + adapter.delta().detach();
    let factor: Tensor<D> = magnitude_factor(magnitude, &adapted)
        .cast(dtype)
        .unsqueeze();
    if adapter.dropout.prob > 0.0 {
        // PEFT applies the dropped input to the base term too.
        let input = adapter.dropout.forward(input);
        let base_output = linear(input.clone(), weight.clone(), None);
        let low_rank = low_rank_output(adapter, input);
        return (factor.clone() - 1.0) * base_output + factor * low_rank;
    }
    // The same update as `f⊙(x·W + s·(x·A)·B) - x·W`: one product with `f`, so autodiff keeps
    // one activation-sized tensor for it instead of two.
    let low_rank = low_rank_output(adapter, input);
    factor * (base_output.clone() + low_rank) - base_output
}

/// `s·(x·A)·B`, the scale on the `[.., r]` intermediate.
fn low_rank_output<const D: usize>(adapter: &LoraAdapter, input: Tensor<D>) -> Tensor<D> {
    let hidden = linear(input, adapter.lora_a.val(), None).mul_scalar(adapter.scale);
    linear(hidden, adapter.lora_b.val(), None)
}

/// `weight` (factor layout, f32) with `adapter` merged in. A DoRA adapter keeps the norms it
/// divided by, for [`unmerge`].
pub(crate) fn merge(adapter: &mut LoraAdapter, weight: Tensor<2>) -> Tensor<2> {
    let adapted = weight + adapter.delta();
    let Some(magnitude) = &adapter.magnitude else {
        return adapted;
    };
    let norms = output_norms(&adapted);
    let factor = magnitude.val().cast(FloatDType::F32) / norms.clone();
    adapter.merged_norm = Some(norms);
    adapted * factor.unsqueeze_dim(0)
}

/// `weight` (factor layout, f32) with the merged `adapter` taken back out:
/// `W = W' / diag(m / n) - s·A·B`, with the norms `n` the merge recorded.
pub(crate) fn unmerge(
    adapter: &mut LoraAdapter,
    weight: Tensor<2>,
    path: &str,
) -> Result<Tensor<2>, LoraError> {
    let Some(magnitude) = &adapter.magnitude else {
        return Ok(weight - adapter.delta());
    };
    let Some(norms) = adapter.merged_norm.take() else {
        return Err(LoraError::DoraNormMissing {
            path: path.to_string(),
            adapter: adapter.name.clone(),
        });
    };
    let factor = magnitude.val().cast(FloatDType::F32) / norms;
    Ok(weight / factor.unsqueeze_dim(0) - adapter.delta())
}

/// The magnitude a new DoRA adapter starts from: the norms of the weight it adapts, with its
/// initial update (zero, unless `B` starts non-zero) included.
pub(crate) fn initial_magnitude(adapter: &LoraAdapter, weight: &Tensor<2>) -> Tensor<1> {
    output_norms(&(to_f32(weight.clone()) + adapter.delta()))
}
