//! [`TransformerDecoder`] and [`TransformerDecoderLayer`] with `LoraLinear` projections.

use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::{Dropout, LayerNorm};
use burn::tensor::{Bool, Tensor};

use super::{MhaInput, MultiHeadAttention, PositionWiseFeedForward};
use crate::layers::MixedBatch;

/// Burn's transformer decoder, built from [`TransformerDecoderLayer`]s with LoRA-ready
/// self-attention, cross-attention and feed-forward blocks.
///
/// Build it from Burn's config: `TransformerDecoderConfig::new(..).init(&device).into()`. Its
/// parameter paths are Burn's (`layers.<i>.self_attn.query`, `layers.<i>.cross_attn.value`,
/// `layers.<i>.pwff.linear_inner`, ...). Burn's autoregressive cache is not ported: decode by
/// running [`forward`](Self::forward) on the whole prefix with a causal `target_mask_attn`.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct TransformerDecoder {
    /// The layers, applied in order.
    pub layers: Vec<TransformerDecoderLayer>,
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

impl From<burn::nn::transformer::TransformerDecoder> for TransformerDecoder {
    fn from(decoder: burn::nn::transformer::TransformerDecoder) -> Self {
        Self {
            layers: decoder.layers.into_iter().map(Into::into).collect(),
            d_model: decoder.d_model,
            d_ff: decoder.d_ff,
            n_heads: decoder.n_heads,
            n_layers: decoder.n_layers,
            dropout: decoder.dropout,
            norm_first: decoder.norm_first,
            quiet_softmax: decoder.quiet_softmax,
        }
    }
}

/// The input of [`TransformerDecoder::forward`], as Burn's `TransformerDecoderInput`: the
/// target sequence, the encoder's output (the memory), and optional masks for each.
#[derive(Debug, Clone)]
pub struct TransformerDecoderInput {
    target: Tensor<3>,
    target_mask_pad: Option<Tensor<2, Bool>>,
    target_mask_attn: Option<Tensor<3, Bool>>,
    memory: Tensor<3>,
    memory_mask_pad: Option<Tensor<2, Bool>>,
    memory_mask_attn: Option<Tensor<3, Bool>>,
}

impl TransformerDecoderInput {
    /// The target sequence `[batch, seq_target, d_model]` and the memory it attends to,
    /// `[batch, seq_memory, d_model]`.
    pub fn new(target: Tensor<3>, memory: Tensor<3>) -> Self {
        Self {
            target,
            target_mask_pad: None,
            target_mask_attn: None,
            memory,
            memory_mask_pad: None,
            memory_mask_attn: None,
        }
    }

    /// Mask padded memory positions: `[batch, seq_memory]`, true where the memory is padding.
    pub fn memory_mask_pad(mut self, mask_pad: Tensor<2, Bool>) -> Self {
        self.memory_mask_pad = Some(mask_pad);
        self
    }

    /// Mask cross-attention: `[batch, seq_target, seq_memory]`, true where a target position
    /// may not look.
    pub fn memory_mask_attn(mut self, mask_attn: Tensor<3, Bool>) -> Self {
        self.memory_mask_attn = Some(mask_attn);
        self
    }

    /// Mask padded target positions: `[batch, seq_target]`, true where the target is padding.
    pub fn target_mask_pad(mut self, mask_pad: Tensor<2, Bool>) -> Self {
        self.target_mask_pad = Some(mask_pad);
        self
    }

    /// Mask self-attention: `[batch, seq_target, seq_target]`, true where a position may not
    /// look (a causal mask: `burn::nn::attention::generate_autoregressive_mask`).
    pub fn target_mask_attn(mut self, mask_attn: Tensor<3, Bool>) -> Self {
        self.target_mask_attn = Some(mask_attn);
        self
    }

    /// The target sequence: after [`TransformerDecoderLayer::forward`], that layer's output.
    pub fn into_target(self) -> Tensor<3> {
        self.target
    }
}

impl TransformerDecoder {
    /// Applies every layer in turn.
    ///
    /// # Shapes
    ///
    /// - target: `[batch, seq_target, d_model]`; memory: `[batch, seq_memory, d_model]`
    /// - output: `[batch, seq_target, d_model]`
    ///
    /// # Panics
    ///
    /// Panics if the inputs' last axis is not `d_model`, or if the target and the memory
    /// disagree on batch size.
    pub fn forward(&self, input: TransformerDecoderInput) -> Tensor<3> {
        self.forward_routed(input, None)
    }

    /// [`forward`](Self::forward) with each sample through its own adapter in every layer, as
    /// `batch` routes them.
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
    pub fn forward_mixed(&self, input: TransformerDecoderInput, batch: &MixedBatch) -> Tensor<3> {
        self.forward_routed(input, Some(batch))
    }

    /// [`forward_mixed`](Self::forward_mixed) with a batch, [`forward`](Self::forward) without.
    pub(crate) fn forward_routed(
        &self,
        input: TransformerDecoderInput,
        routing: Option<&MixedBatch>,
    ) -> Tensor<3> {
        self.layers
            .iter()
            .fold(input, |input, layer| layer.forward_routed(input, routing))
            .target
    }
}

/// One decoder layer: self-attention, cross-attention over the memory, and a feed-forward
/// block, each with a residual connection, dropout and a layer norm.
#[derive(Module, Debug)]
pub struct TransformerDecoderLayer {
    /// Cross-attention over the memory.
    pub cross_attn: MultiHeadAttention,
    /// Self-attention over the target.
    pub self_attn: MultiHeadAttention,
    /// The feed-forward block.
    pub pwff: PositionWiseFeedForward,
    /// With `norm_first`, the norm before cross-attention; otherwise after self-attention.
    pub norm_1: LayerNorm,
    /// With `norm_first`, the norm before the feed-forward block; otherwise after
    /// cross-attention.
    pub norm_2: LayerNorm,
    /// With `norm_first`, the norm before self-attention; otherwise after the feed-forward
    /// block.
    pub norm_3: LayerNorm,
    /// Dropout on each residual branch.
    pub dropout: Dropout,
    /// Whether norms come before the blocks.
    pub norm_first: bool,
}

impl From<burn::nn::transformer::TransformerDecoderLayer> for TransformerDecoderLayer {
    fn from(layer: burn::nn::transformer::TransformerDecoderLayer) -> Self {
        Self {
            cross_attn: layer.cross_attn.into(),
            self_attn: layer.self_attn.into(),
            pwff: layer.pwff.into(),
            norm_1: layer.norm_1,
            norm_2: layer.norm_2,
            norm_3: layer.norm_3,
            dropout: layer.dropout,
            norm_first: layer.norm_first,
        }
    }
}

impl TransformerDecoderLayer {
    /// Applies the layer, as Burn's does: the returned input carries the layer's output as its
    /// target ([`TransformerDecoderInput::into_target`]), and the same memory and masks.
    ///
    /// # Shapes
    ///
    /// - target: `[batch, seq_target, d_model]`; memory: `[batch, seq_memory, d_model]`
    /// - output target: `[batch, seq_target, d_model]`
    ///
    /// # Panics
    ///
    /// Panics if the inputs' last axis is not `d_model`, or if the target and the memory
    /// disagree on batch size.
    pub fn forward(&self, input: TransformerDecoderInput) -> TransformerDecoderInput {
        self.forward_routed(input, None)
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
        input: TransformerDecoderInput,
        batch: &MixedBatch,
    ) -> TransformerDecoderInput {
        self.forward_routed(input, Some(batch))
    }

    /// [`forward_mixed`](Self::forward_mixed) with a batch, [`forward`](Self::forward) without.
    pub(crate) fn forward_routed(
        &self,
        mut input: TransformerDecoderInput,
        routing: Option<&MixedBatch>,
    ) -> TransformerDecoderInput {
        // Burn's order: with norm_first, norm_3 comes before self-attention, norm_1 before
        // cross-attention and norm_2 before the feed-forward block; without it, norm_1 follows
        // self-attention, norm_2 cross-attention and norm_3 the feed-forward block.
        let x = input.target;
        let self_attn_input = match self.norm_first {
            true => self.norm_3.forward(x.clone()),
            false => x.clone(),
        };
        let mut attention = MhaInput::self_attn(self_attn_input);
        if let Some(mask_pad) = &input.target_mask_pad {
            attention = attention.mask_pad(mask_pad.clone());
        }
        if let Some(mask_attn) = &input.target_mask_attn {
            attention = attention.mask_attn(mask_attn.clone());
        }
        let context = self.self_attn.forward_routed(attention, routing).context;
        let mut x = x + self.dropout.forward(context);

        let cross_attn_input = match self.norm_first {
            true => self.norm_1.forward(x.clone()),
            false => {
                x = self.norm_1.forward(x);
                x.clone()
            }
        };
        let memory = input.memory.clone();
        let mut attention = MhaInput::new(cross_attn_input, memory.clone(), memory);
        if let Some(mask_pad) = &input.memory_mask_pad {
            attention = attention.mask_pad(mask_pad.clone());
        }
        if let Some(mask_attn) = &input.memory_mask_attn {
            attention = attention.mask_attn(mask_attn.clone());
        }
        let context = self.cross_attn.forward_routed(attention, routing).context;
        let mut x = x + self.dropout.forward(context);

        let feed_forward_input = match self.norm_first {
            true => self.norm_2.forward(x.clone()),
            false => {
                x = self.norm_2.forward(x);
                x.clone()
            }
        };
        let feed_forward = self.pwff.forward_routed(feed_forward_input, routing);
        let x = x + self.dropout.forward(feed_forward);

        input.target = match self.norm_first {
            true => x,
            false => self.norm_3.forward(x),
        };
        input
    }
}

impl ModuleDisplay for TransformerDecoder {
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
            .add("dropout", &self.dropout)
            .add("norm_first", &self.norm_first)
            .add("quiet_softmax", &self.quiet_softmax)
            .optional()
    }
}
