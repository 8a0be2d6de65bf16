//! DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024), as PEFT computes it, as pure
//! tensor functions.
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
//!
//! Every function takes tensors: the weight `W` (factor layout, f32), the low-rank update
//! `Δ = s·A·B` and the magnitude. [`Adapter`](crate::Adapter) calls them.

use burn::tensor::{FloatDType, Tensor};

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

/// The smallest norm DoRA divides by. An output feature whose weights are all zero (pruned,
/// or zero-initialised) has norm 0; its magnitude starts at 0 too, so `0 / ε` keeps it at 0
/// instead of NaN.
const NORM_FLOOR: f64 = 1e-12;

/// `m / ‖adapted‖`, in f32, the norm detached and floored: the factor each output feature is
/// scaled by.
pub(crate) fn magnitude_factor(magnitude: Tensor<1>, adapted: &Tensor<2>) -> Tensor<1> {
    magnitude.cast(FloatDType::F32) / output_norms(&adapted.clone().detach()).clamp_min(NORM_FLOOR)
}

/// How DoRA changes the weight `base`: `(W + Δ)·diag(m / ‖W + Δ‖) − W`.
pub(crate) fn weight_update(base: &Tensor<2>, delta: Tensor<2>, magnitude: Tensor<1>) -> Tensor<2> {
    // The norm's sum is taken apart from the output's, detached, so that autodiff records
    // nothing weight-sized for it (PEFT detaches it too).
    let norm_input = base.clone() + delta.clone().detach();
    let factor = magnitude_factor(magnitude, &norm_input);
    (base.clone() + delta) * factor.unsqueeze_dim(0) - base.clone()
}

/// DoRA's contribution to a linear layer's output, added to `x·W + b`, given the factor
/// `f = m / ‖W + s·A·B‖` (broadcast over the output's last axis), the base output `x·W` and the
/// low-rank output `s·(x·A)·B`: `(f − 1)⊙(x·W) + f⊙s·(x·A)·B` (PEFT's `DoraLinearLayer`).
pub(crate) fn output_update<const D: usize>(
    factor: Tensor<D>,
    base_output: Tensor<D>,
    low_rank: Tensor<D>,
) -> Tensor<D> {
    // Written as `f⊙(x·W + s·(x·A)·B) − x·W`: one product with `f`, so autodiff keeps one
    // activation-sized tensor for it instead of two.
    factor * (base_output.clone() + low_rank) - base_output
}

/// `weight` with a DoRA update merged in, and the norms it divided by, which [`unmerge`] needs.
pub(crate) fn merge(
    weight: Tensor<2>,
    delta: Tensor<2>,
    magnitude: Tensor<1>,
) -> (Tensor<2>, Tensor<1>) {
    let adapted = weight + delta;
    let norms = output_norms(&adapted).clamp_min(NORM_FLOOR);
    let factor = magnitude.cast(FloatDType::F32) / norms.clone();
    (adapted * factor.unsqueeze_dim(0), norms)
}

/// `weight` with a merged DoRA update taken back out: `W = W' / diag(m / n) − Δ`, with the
/// norms `n` the merge recorded. A zero magnitude makes this NaN; the caller checks.
pub(crate) fn unmerge(
    weight: Tensor<2>,
    delta: Tensor<2>,
    magnitude: Tensor<1>,
    norms: Tensor<1>,
) -> Tensor<2> {
    let factor = magnitude.cast(FloatDType::F32) / norms;
    weight / factor.unsqueeze_dim(0) - delta
}
