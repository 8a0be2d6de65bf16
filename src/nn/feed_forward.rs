//! [`PositionWiseFeedForward`] with `LoraLinear` layers.

use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::Dropout;
use burn::nn::activation::Activation;
use burn::tensor::{Tensor, assert_shape};

use crate::LoraLinear;

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
        let [d_model, _] = self.linear_inner.weight.shape().dims();
        assert_shape!(input, [.., d_model]);
        let hidden = self.activation.forward(self.linear_inner.forward(input));
        self.linear_outer.forward(self.dropout.forward(hidden))
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
