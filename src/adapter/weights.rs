//! [`Adapter`]: one named low-rank update of one weight, and the math of it alone.
//!
//! An adapter is a pair `A: [d_in, r]`, `B: [r, d_out]` with a scale `s`, and, for DoRA, a
//! magnitude per output feature. Weights are seen in the factor layout `[d_in, d_out]`
//! ([`layout`](super::layout)), so the same math serves linear layers, embeddings and
//! convolutions. This file knows nothing about model paths.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::module::linear;
use burn::tensor::{FloatDType, Tensor};

use super::dora;
use super::layout::{float_dtype, to_f32};
use crate::LoraError;
use crate::config::scaling::alpha_for_scale;
use crate::ops;

/// The name of the adapter that [`LoraConfig::apply`](crate::LoraConfig::apply) attaches.
pub const DEFAULT_ADAPTER: &str = "default";

/// One named low-rank update `ΔW = scale · A · B` of a weight (one entry of PEFT's
/// `lora_A[adapter_name]`, `lora_B[adapter_name]`).
#[derive(Module, Debug)]
pub struct Adapter {
    /// The down projection `A`, of shape `[d_in, rank]` (PEFT's `lora_A`, transposed).
    pub lora_a: Param<Tensor<2>>,
    /// The up projection `B`, of shape `[rank, d_out]` (PEFT's `lora_B`, transposed). It starts at
    /// zero, so a new adapter leaves the model's output unchanged.
    pub lora_b: Param<Tensor<2>>,
    /// DoRA's magnitude `m`, one entry per output feature (`[d_out]`, PEFT's
    /// `lora_magnitude_vector`); `None` for plain LoRA. It trains with `A` and `B`.
    pub magnitude: Option<Param<Tensor<1>>>,
    /// The bias of `B` (`[d_out]`, PEFT's `lora_B.bias` with `lora_bias = true`): the adapter
    /// adds `scale · bias` to the layer's output, and a merge adds it to the layer's own bias.
    /// It starts at zero and trains with `A` and `B`. `None` for plain LoRA.
    pub lora_bias: Option<Param<Tensor<1>>>,
    /// The factor applied to `A·B`: `alpha / rank`, or `alpha / √rank` with rsLoRA.
    pub scale: f64,
    /// The alpha the scale came from, kept for reports and adapter files.
    pub alpha: f64,
    /// Dropout on the adapter's input. It acts only on the activation path, in training.
    pub dropout: Dropout,
    /// Whether the scale came from rsLoRA's `alpha / √rank` rather than `alpha / rank`.
    pub use_rslora: bool,
    /// The adapter's name (`"default"` unless named otherwise).
    pub name: String,
    /// Whether the adapter takes part in the forward pass. Several active adapters add up.
    pub active: bool,
    /// Whether `A` and `B` take gradients. Kept beside the parameters' own setting, which a
    /// device without autodiff does not report.
    pub trainable: bool,
    /// Whether `scale·A·B` is currently folded into the stored base weight.
    pub merged: bool,
    /// For a merged DoRA adapter: the norms `‖W + s·A·B‖` per output feature that the merge
    /// divided by, which unmerging multiplies back (as PEFT caches them).
    pub merged_norm: Option<Tensor<1>>,
    /// The number of experts `E` of the expert bank the adapter adapts (a 3-D parameter that
    /// [`Targets::parameters`](crate::Targets::parameters) selects), 1 for any other weight.
    /// Each expert `e` has its own rank-`r` update from columns `e·r..(e+1)·r` of `A`
    /// (`[d_in, E·r]`) and the same rows of `B` (`[E·r, d_out]`), and the delta stacks the
    /// experts' `[d_in, d_out]` updates into `[E·d_in, d_out]`.
    pub experts: usize,
    /// For an adapter that started from the base's own directions (PiSSA, OLoRA): the factors
    /// it started from, whose `s·A₀·B₀` was taken out of the base. Saving to PEFT files turns
    /// the adapter into a plain delta against the original base with them.
    pub residual_init: Option<ResidualInit>,
}

/// The starting factors of an adapter whose init moved part of the base into it (PiSSA, OLoRA):
/// the stored base is `W - s·A₀·B₀`.
#[derive(Module, Debug)]
pub struct ResidualInit {
    /// `A₀`, `[d_in, rank]`.
    pub lora_a: Tensor<2>,
    /// `B₀`, `[rank, d_out]`.
    pub lora_b: Tensor<2>,
    /// The init's name in PEFT's `init_lora_weights`: `"pissa"` or `"olora"`.
    pub method: String,
    /// The original base `W` (factor layout, its own dtype), which
    /// [`unload_lora`](crate::LoraModule::unload_lora) restores bit for bit. A constant, not in
    /// records.
    pub base: Tensor<2>,
}

impl Adapter {
    /// A plain LoRA adapter `name` with factors `A: [d_in, rank]`, `B: [rank, d_out]`, active
    /// and trainable, unmerged. Every adapter the crate makes starts here; DoRA's magnitude
    /// and a residual init are added with [`with_magnitude`](Self::with_magnitude) and
    /// [`with_residual_init`](Self::with_residual_init).
    pub(crate) fn new(
        name: &str,
        lora_a: Tensor<2>,
        lora_b: Tensor<2>,
        scale: f64,
        alpha: f64,
        use_rslora: bool,
        dropout: f64,
    ) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            magnitude: None,
            lora_bias: None,
            scale,
            alpha,
            dropout: DropoutConfig::new(dropout).init(),
            use_rslora,
            name: name.to_string(),
            active: true,
            trainable: true,
            merged: false,
            merged_norm: None,
            experts: 1,
            residual_init: None,
        }
    }

    /// The adapter of an expert bank of `experts` experts ([`experts`](Self::experts)): its
    /// factors must hold `experts` blocks of the rank.
    pub(crate) fn with_experts(self, experts: usize) -> Self {
        Self { experts, ..self }
    }

    /// The adapter with DoRA's magnitude `m: [d_out]`.
    pub(crate) fn with_magnitude(self, magnitude: Tensor<1>) -> Self {
        Self {
            magnitude: Some(Param::from_tensor(magnitude)),
            ..self
        }
    }

    /// The adapter with a bias on `B` (`[d_out]`, PEFT's `lora_bias`).
    pub(crate) fn with_lora_bias(self, lora_bias: Tensor<1>) -> Self {
        Self {
            lora_bias: Some(Param::from_tensor(lora_bias)),
            ..self
        }
    }

    /// `scale · bias` of `B`, in `dtype`, when the adapter has one.
    pub(crate) fn scaled_bias(&self, dtype: burn::tensor::DType) -> Option<Tensor<1>> {
        let bias = self.lora_bias.as_ref()?.val();
        Some(bias.mul_scalar(self.scale).cast(float_dtype(dtype)))
    }

    /// The adapter, remembering the factors its init took out of the base.
    pub(crate) fn with_residual_init(self, residual_init: Option<ResidualInit>) -> Self {
        Self {
            residual_init,
            ..self
        }
    }

    /// The rank `r`: the number of columns of `A` (per expert, for an expert bank).
    pub fn rank(&self) -> usize {
        self.lora_a.lazy_shape().dims::<2>()[1] / self.experts.max(1)
    }

    /// The low-rank update `scale · A · B`, of shape `[d_in, d_out]`, computed in f32 (for an
    /// expert bank, each expert's `scale · A_e · B_e` stacked into `[E·d_in, d_out]`).
    ///
    /// This is plain LoRA's merge delta; the fast forward path never needs it. A DoRA adapter
    /// changes the weight by more than this: see [`weight_update`](Self::weight_update).
    pub fn delta(&self) -> Tensor<2> {
        self.scaled_delta(1.0)
    }

    /// Whether this is a DoRA adapter (it has a magnitude vector).
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// How this adapter changes a weight whose stored base is `base` (factor layout
    /// `[d_in, d_out]`, f32): `s·A·B` for LoRA, and `(W + s·A·B)·diag(m / ‖W + s·A·B‖) - W` for
    /// DoRA, with the norm detached from the gradient as in PEFT.
    pub fn weight_update(&self, base: &Tensor<2>) -> Tensor<2> {
        match &self.magnitude {
            None => self.delta(),
            Some(magnitude) => dora::weight_update(base, self.delta(), magnitude.val()),
        }
    }

    /// `factor · scale · A · B` in f32. The factor goes on `A` (`[d_in, r]`) before the
    /// product, so no pass over a weight-sized tensor is spent on scaling.
    pub(crate) fn scaled_delta(&self, factor: f64) -> Tensor<2> {
        let a = to_f32(self.lora_a.val()).mul_scalar(self.scale * factor);
        let b = to_f32(self.lora_b.val());
        if self.experts <= 1 {
            return a.matmul(b);
        }
        // One batched product over the experts: [E, d_in, r] · [E, r, d_out].
        let (experts, rank) = (self.experts, self.rank());
        let [d_in, _] = a.dims();
        let [_, d_out] = b.dims();
        let a = a.reshape([d_in, experts, rank]).swap_dims(0, 1);
        let b = b.reshape([experts, rank, d_out]);
        a.matmul(b).reshape([experts * d_in, d_out])
    }

    /// The adapter's contribution `scale · ((dropout(x)·A)·B + b_B)` for activations
    /// `x: [..., d_in]`, where `b_B` is the bias of `B` if it has one.
    ///
    /// The scale multiplies the `[..., rank]` intermediate, the smallest tensor on the path.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let dtype = input.dtype();
        let output = self.low_rank_output(self.dropout.forward(input));
        match self.scaled_bias(dtype) {
            Some(bias) => output + bias.unsqueeze(),
            None => output,
        }
    }

    /// `x·W + b + s·(dropout(x)·A)·B`: a linear layer's output with this adapter, through the
    /// fused operation of [`ops::lora_linear`].
    pub(crate) fn linear_output<const D: usize>(
        &self,
        input: Tensor<D>,
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
    ) -> Tensor<D> {
        let dropped = (self.dropout.prob > 0.0).then(|| self.dropout.forward(input.clone()));
        let (lora_a, lora_b) = (self.lora_a.val(), self.lora_b.val());
        // The bias of `B` joins the layer's: the fused operation adds both in one pass.
        let bias = match (bias, self.scaled_bias(input.dtype())) {
            (Some(bias), Some(extra)) => Some(bias + extra),
            (bias, extra) => bias.or(extra),
        };
        ops::lora_linear(input, dropped, weight, bias, lora_a, lora_b, self.scale)
    }

    /// `s·(x·A)·B`, the scale on the `[.., r]` intermediate.
    fn low_rank_output<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let hidden = linear(input, self.lora_a.val(), None).mul_scalar(self.scale);
        linear(hidden, self.lora_b.val(), None)
    }

    /// A DoRA adapter's contribution to a linear layer's output, added to `x·W + b`, where
    /// `weight` is the stored `W`, `stored` its f32 copy (detached) and `base_output = x·W`.
    /// With dropout, the base term takes the dropped input too, as in PEFT.
    pub(crate) fn dora_output<const D: usize>(
        &self,
        magnitude: Tensor<1>,
        input: Tensor<D>,
        weight: &Tensor<2>,
        stored: &Tensor<2>,
        base_output: Tensor<D>,
    ) -> Tensor<D> {
        let dtype = FloatDType::from(input.dtype());
        // Detached before the norm, as PEFT does: autodiff then records nothing of the
        // weight-sized sum, which would otherwise stay alive until the backward pass.
        let adapted = stored.clone() + self.delta().detach();
        let factor: Tensor<D> = dora::magnitude_factor(magnitude, &adapted)
            .cast(dtype)
            .unsqueeze();
        match self.dropout.prob > 0.0 {
            true => {
                let input = self.dropout.forward(input);
                let base_output = linear(input.clone(), weight.clone(), None);
                let low_rank = self.low_rank_output(input);
                dora::output_update(factor, base_output, low_rank)
            }
            false => dora::output_update(factor, base_output, self.low_rank_output(input)),
        }
    }

    /// `weight` (factor layout, f32) with this adapter merged in. A DoRA adapter records the
    /// norms it divided by, for [`unmerge_from`](Self::unmerge_from).
    pub(crate) fn merge_into(&mut self, weight: Tensor<2>) -> Tensor<2> {
        match &self.magnitude {
            None => weight + self.delta(),
            Some(magnitude) => {
                let (merged, norms) = dora::merge(weight, self.delta(), magnitude.val());
                self.merged_norm = Some(norms);
                merged
            }
        }
    }

    /// `weight` (factor layout, f32) with this merged adapter taken back out.
    ///
    /// # Errors
    ///
    /// [`LoraError::DoraNormMissing`] for a DoRA adapter whose merge norms are gone.
    pub(crate) fn unmerge_from(
        &mut self,
        weight: Tensor<2>,
        path: &str,
    ) -> Result<Tensor<2>, LoraError> {
        let Some(magnitude) = &self.magnitude else {
            return Ok(weight - self.delta());
        };
        let Some(norms) = self.merged_norm.take() else {
            return Err(LoraError::DoraNormMissing {
                path: path.to_string(),
                adapter: self.name.clone(),
            });
        };
        Ok(dora::unmerge(weight, self.delta(), magnitude.val(), norms))
    }

    /// The magnitude a new DoRA adapter starts from: the norms of the weight it adapts
    /// (factor layout), with its initial update (zero, unless `B` starts non-zero) included.
    pub(crate) fn initial_magnitude(&self, weight: &Tensor<2>) -> Tensor<1> {
        dora::output_norms(&(to_f32(weight.clone()) + self.delta()))
    }

    /// The number of values the adapter trains: `rank · (d_in + d_out)`, plus `d_out`
    /// magnitudes for DoRA and `d_out` for a bias on `B`.
    pub fn num_params(&self) -> usize {
        let vector =
            |v: &Option<Param<Tensor<1>>>| v.as_ref().map_or(0, |v| v.lazy_shape().num_elements());
        self.lora_a.lazy_shape().num_elements()
            + self.lora_b.lazy_shape().num_elements()
            + vector(&self.magnitude)
            + vector(&self.lora_bias)
    }

    /// The adapter with `A`, `B` (and DoRA's magnitude) taking gradients or not.
    pub(crate) fn with_trainable(self, trainable: bool) -> Self {
        Self {
            lora_a: self.lora_a.set_require_grad(trainable),
            lora_b: self.lora_b.set_require_grad(trainable),
            magnitude: self.magnitude.map(|m| m.set_require_grad(trainable)),
            lora_bias: self.lora_bias.map(|b| b.set_require_grad(trainable)),
            trainable,
            ..self
        }
    }

    /// This adapter zero-padded to `rank` (at least its own): `A·B`, the scale and every flag
    /// unchanged, the alpha restated for the new rank, and the parameters keeping their ids
    /// with the new shapes (`[d_in, rank]`, `[rank, d_out]`).
    pub(crate) fn padded(self, rank: usize) -> Self {
        let experts = self.experts;
        let (lora_a, lora_b) = pad_factors(self.lora_a.val(), self.lora_b.val(), rank, experts);
        let trainable = self.trainable;
        Self {
            lora_a: self.lora_a.map(|_| lora_a).set_require_grad(trainable),
            lora_b: self.lora_b.map(|_| lora_b).set_require_grad(trainable),
            alpha: alpha_for_scale(self.scale, rank, self.use_rslora),
            ..self
        }
    }

    /// This adapter with `other`'s factors (zero-padded to this adapter's rank, which must be at
    /// least `other`'s), scale and DoRA magnitude: its own parameters keep their ids and
    /// shapes, and its name, flags and dropout stay.
    pub(crate) fn swapped(self, other: Adapter) -> Self {
        let rank = self.rank();
        let (lora_a, lora_b) =
            pad_factors(other.lora_a.val(), other.lora_b.val(), rank, self.experts);
        let trainable = self.trainable;
        let magnitude = match (self.magnitude, other.magnitude) {
            (Some(mine), Some(theirs)) => {
                Some(mine.map(|_| theirs.val()).set_require_grad(trainable))
            }
            (mine, _) => mine,
        };
        let lora_bias = match (self.lora_bias, other.lora_bias) {
            (Some(mine), Some(theirs)) => {
                Some(mine.map(|_| theirs.val()).set_require_grad(trainable))
            }
            (mine, _) => mine,
        };
        Self {
            lora_a: self.lora_a.map(|_| lora_a).set_require_grad(trainable),
            lora_b: self.lora_b.map(|_| lora_b).set_require_grad(trainable),
            magnitude,
            lora_bias,
            scale: other.scale,
            alpha: alpha_for_scale(other.scale, rank, other.use_rslora),
            use_rslora: other.use_rslora,
            ..self
        }
    }

    /// Whether the forward passes add this adapter: active and not folded into the base.
    pub fn contributes(&self) -> bool {
        self.active && !self.merged
    }
}

/// `A: [d_in, E·r]` and `B: [E·r, d_out]` with zeros appended to each of the `experts` blocks
/// up to `rank` (columns of `A`, rows of `B`), in their dtype: every `A_e·B_e` is unchanged.
fn pad_factors(
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    rank: usize,
    experts: usize,
) -> (Tensor<2>, Tensor<2>) {
    let experts = experts.max(1);
    let [d_in, columns] = lora_a.dims();
    let [_, d_out] = lora_b.dims();
    let r = columns / experts;
    if rank <= r {
        return (lora_a, lora_b);
    }
    let device = lora_a.device();
    let zeros = |shape: [usize; 3], like: &Tensor<2>| {
        Tensor::<3>::zeros(shape, &device).cast(float_dtype(like.dtype()))
    };
    let extra_a = zeros([d_in, experts, rank - r], &lora_a);
    let extra_b = zeros([experts, rank - r, d_out], &lora_b);
    let lora_a = Tensor::cat(vec![lora_a.reshape([d_in, experts, r]), extra_a], 2);
    let lora_b = Tensor::cat(vec![lora_b.reshape([experts, r, d_out]), extra_b], 1);
    (
        lora_a.reshape([d_in, experts * rank]),
        lora_b.reshape([experts * rank, d_out]),
    )
}
