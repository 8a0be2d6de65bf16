//! [`SwiGlu`] with `LoraLinear` layers.

use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::tensor::activation::silu;
use burn::tensor::{Tensor, assert_shape};

use crate::layers::{LoraLinear, MixedBatch};

/// Burn's SwiGLU unit, `silu(linear_inner(x)) * linear_outer(x)`, with `LoraLinear` layers.
///
/// Build it from Burn's config: `SwiGluConfig::new(d_input, d_output).init(&device).into()`.
/// In a Llama-style MLP, `linear_inner` is Hugging Face's `gate_proj` and `linear_outer` its
/// `up_proj`; [`Targets::feed_forward`](crate::Targets::feed_forward) selects both.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct SwiGlu {
    /// The gate, passed through SiLU, `[d_input, d_output]`.
    pub linear_inner: LoraLinear,
    /// The value the gate multiplies, `[d_input, d_output]`.
    pub linear_outer: LoraLinear,
}

impl From<burn::nn::SwiGlu> for SwiGlu {
    fn from(swiglu: burn::nn::SwiGlu) -> Self {
        Self {
            linear_inner: swiglu.linear_inner.into(),
            linear_outer: swiglu.linear_outer.into(),
        }
    }
}

impl SwiGlu {
    /// Applies the unit.
    ///
    /// # Shapes
    ///
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    ///
    /// # Panics
    ///
    /// Panics if the last axis of `input` is not `d_input`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        self.forward_routed(input, None)
    }

    /// [`forward`](Self::forward) with each sample through its own adapter, as `batch` routes
    /// them (see [`LoraLinear::forward_mixed`]).
    ///
    /// # Shapes
    ///
    /// - input: `[batch, ..., d_input]`
    /// - output: `[batch, ..., d_output]`
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward), and if `batch` routes another number of samples or an
    /// adapter of a layer is merged.
    pub fn forward_mixed<const D: usize>(&self, input: Tensor<D>, batch: &MixedBatch) -> Tensor<D> {
        self.forward_routed(input, Some(batch))
    }

    /// [`forward_mixed`](Self::forward_mixed) with a batch, [`forward`](Self::forward) without.
    pub(crate) fn forward_routed<const D: usize>(
        &self,
        input: Tensor<D>,
        routing: Option<&MixedBatch>,
    ) -> Tensor<D> {
        let [d_input, _] = self.linear_inner.weight.shape().dims();
        assert_shape!(input, [.., d_input]);
        let gate = silu(self.linear_inner.forward_routed(input.clone(), routing));
        gate.mul(self.linear_outer.forward_routed(input, routing))
    }
}

impl ModuleDisplay for SwiGlu {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        let [d_input, d_output] = self.linear_inner.weight.shape().dims();
        content
            .add("d_input", &d_input)
            .add("d_output", &d_output)
            .add("bias", &self.linear_inner.bias.is_some())
            .optional()
    }
}
