//! [`TransformerEncoder`] and [`TransformerEncoderLayer`] with `LoraLinear` projections.

use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::{Dropout, LayerNorm};
use burn::tensor::{Bool, Tensor};

use super::{MhaInput, MultiHeadAttention, PositionWiseFeedForward};
use crate::layers::MixedBatch;

/// Burn's transformer encoder, built from [`TransformerEncoderLayer`]s with LoRA-ready
/// attention and feed-forward blocks.
///
/// Build it from Burn's config: `TransformerEncoderConfig::new(..).init(&device).into()`. Its
/// parameter paths are Burn's (`layers.<i>.mha.query`, `layers.<i>.pwff.linear_inner`, ...).
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct TransformerEncoder {
    /// The layers, applied in order.
    pub layers: Vec<TransformerEncoderLayer>,
    /// The model size.
    pub d_model: usize,
    /// The feed-forward size.
    pub d_ff: usize,
    /// The number of attention heads.
    pub n_heads: usize,
    /// The number of layers.
    pub n_layers: usize,
    /// The dropout probability.
    pub dropout: f64,
    /// Whether layer norms come before (true) or after (false) each residual block.
    pub norm_first: bool,
    /// Whether attention uses quiet softmax.
    pub quiet_softmax: bool,
}

impl From<burn::nn::transformer::TransformerEncoder> for TransformerEncoder {
    fn from(encoder: burn::nn::transformer::TransformerEncoder) -> Self {
        Self {
            layers: encoder.layers.into_iter().map(Into::into).collect(),
            d_model: encoder.d_model,
            d_ff: encoder.d_ff,
            n_heads: encoder.n_heads,
            n_layers: encoder.n_layers,
            dropout: encoder.dropout,
            norm_first: encoder.norm_first,
            quiet_softmax: encoder.quiet_softmax,
        }
    }
}

/// The input of [`TransformerEncoder::forward`], as Burn's `TransformerEncoderInput`.
#[derive(Debug, Clone)]
pub struct TransformerEncoderInput {
    tensor: Tensor<3>,
    mask_pad: Option<Tensor<2, Bool>>,
    mask_attn: Option<Tensor<3, Bool>>,
}

impl TransformerEncoderInput {
    /// The input sequence, `[batch, seq, d_model]`.
    pub fn new(tensor: Tensor<3>) -> Self {
        Self {
            tensor,
            mask_pad: None,
            mask_attn: None,
        }
    }

    /// Mask padded positions: `[batch, seq]`, true where the position is padding.
    pub fn mask_pad(mut self, mask_pad: Tensor<2, Bool>) -> Self {
        self.mask_pad = Some(mask_pad);
        self
    }

    /// Mask attention: `[batch, seq, seq]`, true where a position may not look.
    pub fn mask_attn(mut self, mask_attn: Tensor<3, Bool>) -> Self {
        self.mask_attn = Some(mask_attn);
        self
    }
}

impl TransformerEncoder {
    /// Applies every layer in turn.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    ///
    /// # Panics
    ///
    /// Panics if the input's last axis is not `d_model`.
    pub fn forward(&self, input: TransformerEncoderInput) -> Tensor<3> {
        self.forward_routed(input, None)
    }

    /// [`forward`](Self::forward) with each sample through its own adapter in every layer, as
    /// `batch` routes them: one frozen encoder serving many tasks in one batch.
    ///
    /// # Shapes
    ///
    /// As [`forward`](Self::forward); `batch` routes `batch_size` samples.
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward), and if `batch` routes another number of samples or an
    /// adapter is merged ([`LoraModule::mixed_batch`](crate::LoraModule::mixed_batch) checks
    /// both names and merges up front).
    pub fn forward_mixed(&self, input: TransformerEncoderInput, batch: &MixedBatch) -> Tensor<3> {
        self.forward_routed(input, Some(batch))
    }

    /// [`forward_mixed`](Self::forward_mixed) with a batch, [`forward`](Self::forward) without.
    fn forward_routed(
        &self,
        input: TransformerEncoderInput,
        routing: Option<&MixedBatch>,
    ) -> Tensor<3> {
        self.layers.iter().fold(input.tensor, |x, layer| {
            layer.forward_routed(x, input.mask_pad.clone(), input.mask_attn.clone(), routing)
        })
    }
}

/// One encoder layer: self-attention and a feed-forward block, each with a residual connection,
/// dropout and a layer norm.
#[derive(Module, Debug)]
pub struct TransformerEncoderLayer {
    /// Self-attention.
    pub mha: MultiHeadAttention,
    /// The feed-forward block.
    pub pwff: PositionWiseFeedForward,
    /// With `norm_first`, the norm before the feed-forward block; otherwise after attention.
    pub norm_1: LayerNorm,
    /// With `norm_first`, the norm before attention; otherwise after the feed-forward block.
    pub norm_2: LayerNorm,
    /// Dropout on each residual branch.
    pub dropout: Dropout,
    /// Whether norms come before the blocks.
    pub norm_first: bool,
}

impl From<burn::nn::transformer::TransformerEncoderLayer> for TransformerEncoderLayer {
    fn from(layer: burn::nn::transformer::TransformerEncoderLayer) -> Self {
        Self {
            mha: layer.mha.into(),
            pwff: layer.pwff.into(),
            norm_1: layer.norm_1,
            norm_2: layer.norm_2,
            dropout: layer.dropout,
            norm_first: layer.norm_first,
        }
    }
}

impl TransformerEncoderLayer {
    /// Applies the layer.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, seq, d_model]`
    /// - mask_pad: `[batch, seq]`; mask_attn: `[batch, seq, seq]`
    /// - output: `[batch, seq, d_model]`
    ///
    /// # Panics
    ///
    /// Panics if the input's last axis is not `d_model`.
    pub fn forward(
        &self,
        input: Tensor<3>,
        mask_pad: Option<Tensor<2, Bool>>,
        mask_attn: Option<Tensor<3, Bool>>,
    ) -> Tensor<3> {
        self.forward_routed(input, mask_pad, mask_attn, None)
    }

    /// [`forward`](Self::forward) with each sample through its own adapter, as `batch` routes
    /// them.
    ///
    /// # Shapes
    ///
    /// As [`forward`](Self::forward).
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward), and if `batch` routes another number of samples or an
    /// adapter is merged.
    pub fn forward_mixed(
        &self,
        input: Tensor<3>,
        mask_pad: Option<Tensor<2, Bool>>,
        mask_attn: Option<Tensor<3, Bool>>,
        batch: &MixedBatch,
    ) -> Tensor<3> {
        self.forward_routed(input, mask_pad, mask_attn, Some(batch))
    }

    /// [`forward_mixed`](Self::forward_mixed) with a batch, [`forward`](Self::forward) without.
    fn forward_routed(
        &self,
        input: Tensor<3>,
        mask_pad: Option<Tensor<2, Bool>>,
        mask_attn: Option<Tensor<3, Bool>>,
        routing: Option<&MixedBatch>,
    ) -> Tensor<3> {
        // Burn's order: with norm_first, norm_2 comes before attention and norm_1 before the
        // feed-forward block; without it, norm_1 follows attention and norm_2 the block.
        let attention_input = match self.norm_first {
            true => self.norm_2.forward(input.clone()),
            false => input.clone(),
        };
        let mut attention = MhaInput::self_attn(attention_input);
        if let Some(mask_pad) = mask_pad {
            attention = attention.mask_pad(mask_pad);
        }
        if let Some(mask_attn) = mask_attn {
            attention = attention.mask_attn(mask_attn);
        }
        let context = self.mha.forward_routed(attention, routing).context;
        let mut x = input + self.dropout.forward(context);

        let feed_forward_input = match self.norm_first {
            true => self.norm_1.forward(x.clone()),
            false => {
                x = self.norm_1.forward(x);
                x.clone()
            }
        };
        let feed_forward = self.pwff.forward_routed(feed_forward_input, routing);
        let x = x + self.dropout.forward(feed_forward);
        match self.norm_first {
            true => x,
            false => self.norm_2.forward(x),
        }
    }
}

impl ModuleDisplay for TransformerEncoder {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("d_model", &self.d_model)
            .add("d_ff", &self.d_ff)
            .add("n_heads", &self.n_heads)
            .add("n_layers", &self.n_layers)
            .add("norm_first", &self.norm_first)
            .optional()
    }
}
