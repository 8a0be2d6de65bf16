//! [`PositionWiseFeedForward`] with `LoraLinear` layers.

use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::Dropout;
use burn::nn::activation::Activation;
use burn::tensor::{Tensor, assert_shape};

use crate::layers::{LoraLinear, MixedBatch};

/// Burn's position-wise feed-forward block, `linear_outer(dropout(act(linear_inner(x))))`, with
/// `LoraLinear` layers.
///
/// Build it from Burn's config: `PositionWiseFeedForwardConfig::new(d_model, d_ff).init(&device).into()`.
/// [`Targets::feed_forward`](crate::Targets::feed_forward) selects both layers.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct PositionWiseFeedForward {
    /// The first layer, `[d_model, d_ff]`.
    pub linear_inner: LoraLinear,
    /// The second layer, `[d_ff, d_model]`.
    pub linear_outer: LoraLinear,
    /// Dropout after the activation.
    pub dropout: Dropout,
    /// The activation between the layers (Gelu by default). Skipped by module traversal, as in
    /// Burn's block.
    #[module(skip)]
    pub activation: Activation,
}

impl From<burn::nn::transformer::PositionWiseFeedForward> for PositionWiseFeedForward {
    fn from(pwff: burn::nn::transformer::PositionWiseFeedForward) -> Self {
        Self {
            linear_inner: pwff.linear_inner.into(),
            linear_outer: pwff.linear_outer.into(),
            dropout: pwff.dropout,
            activation: pwff.activation,
        }
    }
}

impl PositionWiseFeedForward {
    /// Applies the block.
    ///
    /// # Shapes
    ///
    /// - input: `[..., d_model]`
    /// - output: `[..., d_model]`
    ///
    /// # Panics
    ///
    /// Panics if the last axis of `input` is not `d_model`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        self.forward_routed(input, None)
    }

    /// [`forward`](Self::forward) with each sample through its own adapter, as `batch` routes
    /// them (see [`LoraLinear::forward_mixed`]).
    ///
    /// # Shapes
    ///
    /// - input: `[batch, ..., d_model]`
    /// - output: `[batch, ..., d_model]`
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
        let [d_model, _] = self.linear_inner.weight.shape().dims();
        assert_shape!(input, [.., d_model]);
        let inner = self.linear_inner.forward_routed(input, routing);
        let hidden = self.activation.forward(inner);
        self.linear_outer
            .forward_routed(self.dropout.forward(hidden), routing)
    }
}

impl ModuleDisplay for PositionWiseFeedForward {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        let [d_model, d_ff] = self.linear_inner.weight.shape().dims();
        content
            .add("d_model", &d_model)
            .add("d_ff", &d_ff)
            .add("prob", &self.dropout.prob)
            .optional()
    }
}
