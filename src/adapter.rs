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
//! This file knows the math of one adapted weight, and nothing about model paths.

use core::cell::RefCell;

use burn::module::{Module, Param, Reparameterization};
use burn::nn::Dropout;
use burn::tensor::module::linear;
use burn::tensor::{DType, FloatDType, Tensor};

use crate::LoraError;

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
}

impl LoraAdapter {
    /// The rank `r`: the number of columns of `A`.
    pub fn rank(&self) -> usize {
        self.lora_a.lazy_shape().dims::<2>()[1]
    }

    /// The dense update `scale · A · B`, of shape `[d_in, d_out]`, computed in f32.
    ///
    /// This is the merge delta; the fast forward path never needs it.
    pub fn delta(&self) -> Tensor<2> {
        self.scaled_delta(1.0)
    }

    /// `factor · scale · A · B` in f32. The factor goes on `A` (`[d_in, r]`) before the
    /// product, so no pass over a weight-sized tensor is spent on scaling.
    pub(crate) fn scaled_delta(&self, factor: f64) -> Tensor<2> {
        let a = self.lora_a.val().cast(FloatDType::F32);
        let b = self.lora_b.val().cast(FloatDType::F32);
        a.mul_scalar(self.scale * factor).matmul(b)
    }

    /// The adapter's contribution `scale · (dropout(x)·A)·B` for activations `x: [..., d_in]`.
    ///
    /// The scale multiplies the `[..., rank]` intermediate, the smallest tensor on the path.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let hidden = linear(self.dropout.forward(input), self.lora_a.val(), None);
        linear(hidden.mul_scalar(self.scale), self.lora_b.val(), None)
    }

    /// The number of values in `A` and `B`, `rank · (d_in + d_out)`.
    pub fn num_params(&self) -> usize {
        self.lora_a.lazy_shape().num_elements() + self.lora_b.lazy_shape().num_elements()
    }

    /// The adapter with `A` and `B` taking gradients or not.
    pub(crate) fn with_trainable(self, trainable: bool) -> Self {
        Self {
            lora_a: self.lora_a.set_require_grad(trainable),
            lora_b: self.lora_b.set_require_grad(trainable),
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
        let mut deltas = self.contributing().map(LoraAdapter::delta);
        let Some(first) = deltas.next() else {
            return base;
        };
        let delta = deltas.fold(first, |sum, delta| sum + delta);
        let delta = delta.cast(float_dtype(base.dtype())).reshape(base.shape());
        base + delta
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

    /// Add every contributing adapter's output for input `x` to the base output `y`.
    ///
    /// # Shapes
    ///
    /// - input: `[..., d_in]`
    /// - output: `[..., d_out]`, returned with the same shape
    pub fn forward<const D: usize>(&self, input: Tensor<D>, output: Tensor<D>) -> Tensor<D> {
        self.contributing().fold(output, |output, adapter| {
            output + adapter.forward(input.clone())
        })
    }

    /// The base with `sign · Σ scale·A·B` of the named adapters added, computed in f32 and cast
    /// back to the base's dtype. Refuses a result with NaN or Inf.
    pub(crate) fn fold_into_base(
        &self,
        path: &str,
        base: Tensor<2>,
        adapters: &[usize],
        sign: f64,
    ) -> Result<Tensor<2>, LoraError> {
        let dtype = base.dtype();
        let mut weight = base.cast(FloatDType::F32);
        for &index in adapters {
            let adapter = &self.adapters[index];
            let updated = weight.clone() + adapter.scaled_delta(sign);
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

fn float_dtype(dtype: DType) -> FloatDType {
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
