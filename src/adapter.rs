//! The adapter state attached to a weight: Burn's [`Reparameterization`] for LoRA.
//!
//! A weight `W: [d_in, d_out]` that burn-lora adapts carries a [`LoraState`] on its `Param`. The
//! state holds one or more named [`LoraAdapter`]s, each a pair `A: [d_in, r]`, `B: [r, d_out]`
//! with a scale `s`. Two ways to compute with it:
//!
//! - **dense composition** ([`Reparameterization::apply`]): `Param::val()` returns
//!   `W + Σ s·A·B`. Any Burn layer, a plain `nn::Linear` included, is adapted this way without a
//!   code change; it costs a `[d_in, d_out]` product and sum on every forward.
//! - **activation path** ([`LoraState::forward`]): `y + Σ s·(dropout(x)·A)·B`, used by
//!   [`LoraLinear`](crate::LoraLinear). It never builds a weight-sized tensor, and the frozen
//!   base receives no gradient.
//!
//! An adapter with a magnitude vector is DoRA ([`crate::dora`]): its update rescales each output
//! feature of `W + s·A·B` to the trained magnitude.
//!
//! Weights are seen in the factor layout `[d_in, d_out]` ([`crate::layer`]), so the same math
//! serves linear layers, embeddings and convolutions.
//!
//! This file knows the math of one adapted weight, and nothing about model paths.

use core::cell::RefCell;

use burn::module::{Module, Param, Reparameterization};
use burn::nn::Dropout;
use burn::tensor::module::linear;
use burn::tensor::{DType, FloatDType, Tensor};

use crate::LoraError;
use crate::dora;
use crate::layer::{from_factor_layout, to_factor_layout};

/// The name of the adapter that [`LoraConfig::apply`](crate::LoraConfig::apply) attaches.
pub const DEFAULT_ADAPTER: &str = "default";

/// One named low-rank update `ΔW = scale · A · B` of a weight.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// The down projection `A`, of shape `[d_in, rank]` (PEFT's `lora_A`, transposed).
    pub lora_a: Param<Tensor<2>>,
    /// The up projection `B`, of shape `[rank, d_out]` (PEFT's `lora_B`, transposed). It starts at
    /// zero, so a new adapter leaves the model's output unchanged.
    pub lora_b: Param<Tensor<2>>,
    /// DoRA's magnitude `m`, one entry per output feature (`[d_out]`, PEFT's
    /// `lora_magnitude_vector`); `None` for plain LoRA. It trains with `A` and `B`.
    pub magnitude: Option<Param<Tensor<1>>>,
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
}

impl LoraAdapter {
    /// The rank `r`: the number of columns of `A`.
    pub fn rank(&self) -> usize {
        self.lora_a.lazy_shape().dims::<2>()[1]
    }

    /// The low-rank update `scale · A · B`, of shape `[d_in, d_out]`, computed in f32.
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
        let delta = self.delta();
        match &self.magnitude {
            None => delta,
            Some(magnitude) => {
                // The norm's sum is taken apart from the output's, detached, so that autodiff
                // records nothing weight-sized for it (PEFT detaches it too).
                let norm_input = base.clone() + delta.clone().detach();
                let factor = dora::magnitude_factor(magnitude.val(), &norm_input);
                (base.clone() + delta) * factor.unsqueeze_dim(0) - base.clone()
            }
        }
    }

    /// `factor · scale · A · B` in f32. The factor goes on `A` (`[d_in, r]`) before the
    /// product, so no pass over a weight-sized tensor is spent on scaling.
    pub(crate) fn scaled_delta(&self, factor: f64) -> Tensor<2> {
        let a = to_f32(self.lora_a.val());
        let b = to_f32(self.lora_b.val());
        a.mul_scalar(self.scale * factor).matmul(b)
    }

    /// The adapter's contribution `scale · (dropout(x)·A)·B` for activations `x: [..., d_in]`.
    ///
    /// The scale multiplies the `[..., rank]` intermediate, the smallest tensor on the path.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let hidden = linear(self.dropout.forward(input), self.lora_a.val(), None);
        linear(hidden.mul_scalar(self.scale), self.lora_b.val(), None)
    }

    /// The number of values the adapter trains: `rank · (d_in + d_out)`, plus `d_out`
    /// magnitudes for DoRA.
    pub fn num_params(&self) -> usize {
        let magnitude = self
            .magnitude
            .as_ref()
            .map_or(0, |m| m.lazy_shape().num_elements());
        self.lora_a.lazy_shape().num_elements()
            + self.lora_b.lazy_shape().num_elements()
            + magnitude
    }

    /// The adapter with `A`, `B` (and DoRA's magnitude) taking gradients or not.
    pub(crate) fn with_trainable(self, trainable: bool) -> Self {
        Self {
            lora_a: self.lora_a.set_require_grad(trainable),
            lora_b: self.lora_b.set_require_grad(trainable),
            magnitude: self.magnitude.map(|m| m.set_require_grad(trainable)),
            trainable,
            ..self
        }
    }

    /// Whether the forward passes add this adapter: active and not folded into the base.
    pub fn contributes(&self) -> bool {
        self.active && !self.merged
    }
}

/// The adapters attached to one weight, as Burn's [`Reparameterization`].
///
/// Its parameters appear under the weight's path, as
/// `<module>.weight.lora.adapters.<i>.lora_a` and `….lora_b`, so the optimizer, records,
/// `to_device`, `valid` and `freeze` all reach them like any other parameter.
#[derive(Module, Debug)]
pub struct LoraState {
    /// The adapters, in the order they were added.
    pub adapters: Vec<LoraAdapter>,
    /// False while [`disable_adapters`](crate::LoraModule::disable_adapters) is in force: the
    /// layer then computes with its base weight alone.
    pub enabled: bool,
}

impl Reparameterization for LoraState {
    const NAME: &'static str = "lora";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        if detaching::capture(self) {
            return base;
        }
        if self.contributing().next().is_none() {
            return base;
        }
        // DoRA needs the base itself; plain LoRA only its shape.
        let stored = match self.contributing().any(LoraAdapter::is_dora) {
            true => Some(to_f32(to_factor_layout(base.clone().detach()))),
            false => None,
        };
        let update = self
            .contributing()
            .map(|adapter| match &stored {
                Some(stored) => adapter.weight_update(stored),
                None => adapter.delta(),
            })
            .reduce(|sum, update| sum + update)
            .expect("a contributing adapter");
        let dtype = float_dtype(base.dtype());
        let update: Tensor<D> = from_factor_layout(update.cast(dtype), base.shape());
        base + update
    }
}

impl LoraState {
    /// A state holding `adapters`, enabled.
    pub(crate) fn new(adapters: Vec<LoraAdapter>) -> Self {
        Self {
            adapters,
            enabled: true,
        }
    }

    /// The adapters the forward passes add: active, unmerged, and the state enabled.
    pub fn contributing(&self) -> impl Iterator<Item = &LoraAdapter> {
        let enabled = self.enabled;
        self.adapters
            .iter()
            .filter(move |adapter| enabled && adapter.contributes())
    }

    /// The adapter called `name`, if this weight has one.
    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters.iter().find(|adapter| adapter.name == name)
    }

    /// The output of a linear layer with stored weight `weight` and `bias` for input `x`, every
    /// contributing adapter included: `x·W + b + Σ s·(dropout(x)·A)·B`, and for a DoRA adapter
    /// `(f - 1)⊙(x·W) + f⊙s·(dropout(x)·A)·B` with `f = m / ‖W + s·A·B‖`, as PEFT computes it.
    ///
    /// No tensor of the weight's size is built, except DoRA's norm, which needs `W + s·A·B`.
    ///
    /// # Shapes
    ///
    /// - input: `[..., d_in]`
    /// - weight: `[d_in, d_out]`
    /// - output: `[..., d_out]`
    pub fn forward<const D: usize>(
        &self,
        input: Tensor<D>,
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
    ) -> Tensor<D> {
        if !self.contributing().any(LoraAdapter::is_dora) {
            let output = linear(input.clone(), weight, bias);
            return self.contributing().fold(output, |output, adapter| {
                output + adapter.forward(input.clone())
            });
        }
        let base_output = linear(input.clone(), weight.clone(), None);
        let mut output = match bias {
            Some(bias) => base_output.clone() + bias.unsqueeze(),
            None => base_output.clone(),
        };
        let stored = to_f32(weight.clone().detach());
        for adapter in self.contributing() {
            output = output
                + match &adapter.magnitude {
                    None => adapter.forward(input.clone()),
                    Some(magnitude) => dora::linear_update(
                        adapter,
                        magnitude.val(),
                        input.clone(),
                        &weight,
                        &stored,
                        base_output.clone(),
                    ),
                };
        }
        output
    }

    /// The base (factor layout `[d_in, d_out]`) with the named adapters merged in (`merge`) or
    /// taken out (`!merge`), computed in f32 and cast back to the base's dtype. Adapters merge
    /// in order and unmerge in reverse order, so DoRA adapters, whose merge depends on the
    /// weight they merge into, come back out exactly. Records each merged DoRA adapter's norms
    /// in it. Refuses a result with NaN or Inf.
    pub(crate) fn fold_into_base(
        &mut self,
        path: &str,
        base: Tensor<2>,
        adapters: &[usize],
        merge: bool,
    ) -> Result<Tensor<2>, LoraError> {
        let dtype = base.dtype();
        let mut weight = to_f32(base);
        let order: Vec<usize> = match merge {
            true => adapters.to_vec(),
            false => adapters.iter().rev().copied().collect(),
        };
        for index in order {
            let adapter = &mut self.adapters[index];
            let updated = match merge {
                true => dora::merge(adapter, weight),
                false => dora::unmerge(adapter, weight, path)?,
            };
            if !updated.clone().is_finite().all().into_scalar::<bool>() {
                return Err(LoraError::NonFiniteMerge {
                    path: path.to_string(),
                    adapter: adapter.name.clone(),
                });
            }
            weight = updated;
        }
        Ok(weight.cast(float_dtype(dtype)))
    }
}

/// A float copy of `tensor` in f32, dequantizing a quantized one (which `cast` refuses).
pub(crate) fn to_f32<const D: usize>(tensor: Tensor<D>) -> Tensor<D> {
    match tensor.dtype() {
        DType::QFloat(_) => tensor.dequantize().cast(FloatDType::F32),
        _ => tensor.cast(FloatDType::F32),
    }
}

/// The float dtype to compute in beside a tensor of `dtype`: the same, or f32 for a quantized
/// one.
pub(crate) fn float_dtype(dtype: DType) -> FloatDType {
    if dtype.is_float() {
        FloatDType::from(dtype)
    } else {
        FloatDType::F32
    }
}

/// Taking [`LoraState`]s off a model, which Burn's traversal does not allow directly.
///
/// A `ModuleMapper` sees a weight with its reparameterization detached, and `materialize` folds
/// every reparameterization into its weight. So, to take the states off without changing any
/// weight, `materialize` runs with a thread-local capture switched on: each state's `apply`
/// records the state and returns the base unchanged. `materialize` runs on the calling thread,
/// which makes the thread-local sound.
pub(crate) mod detaching {
    use super::*;

    thread_local! {
        static CAPTURED: RefCell<Option<Vec<LoraState>>> = const { RefCell::new(None) };
    }

    /// Record `state` if a capture is running; true when it did.
    pub(super) fn capture(state: &LoraState) -> bool {
        CAPTURED.with(|captured| match captured.borrow_mut().as_mut() {
            Some(states) => {
                states.push(state.clone());
                true
            }
            None => false,
        })
    }

    /// The model without its LoRA states, every weight left exactly as stored, and the states,
    /// in traversal order.
    pub(crate) fn detach_states<M: Module>(model: M) -> (M, Vec<LoraState>) {
        capturing(|| model.materialize())
    }

    /// Run `work` with the capture on: the states whose `apply` ran, and `work`'s result.
    pub(crate) fn capturing<T>(work: impl FnOnce() -> T) -> (T, Vec<LoraState>) {
        let previous = CAPTURED.with(|captured| captured.borrow_mut().replace(Vec::new()));
        let result = work();
        let states = CAPTURED.with(|captured| {
            let mut captured = captured.borrow_mut();
            let states = captured.take().unwrap_or_default();
            *captured = previous;
            states
        });
        (result, states)
    }
}
