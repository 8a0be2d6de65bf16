//! [`MultiHeadAttention`] with `LoraLinear` projections.

use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::Dropout;
use burn::nn::activation::Gelu;
use burn::nn::attention::MhaOutput;
use burn::tensor::activation::{quiet_softmax, softmax};
use burn::tensor::{Bool, Tensor, assert_shape};

use crate::layers::{LoraLinear, MixedBatch};

/// Burn's `MultiHeadAttention` (attention is all you need), with `LoraLinear` projections.
///
/// Build it from Burn's config: `MultiHeadAttentionConfig::new(d_model, n_heads).init(&device).into()`.
/// Its parameter paths are Burn's (`query`, `key`, `value`, `output`), so
/// [`Targets::attention`](crate::Targets::attention) selects the projections.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct MultiHeadAttention {
    /// Query projection, `[d_model, d_model]`.
    pub query: LoraLinear,
    /// Key projection, `[d_model, d_model]`.
    pub key: LoraLinear,
    /// Value projection, `[d_model, d_model]`.
    pub value: LoraLinear,
    /// Output projection, `[d_model, d_model]`.
    pub output: LoraLinear,
    /// Dropout on the attention weights.
    pub dropout: Dropout,
    /// Kept for parity with Burn's block, which carries it.
    pub activation: Gelu,
    /// The model size.
    pub d_model: usize,
    /// The number of heads.
    pub n_heads: usize,
    /// The size of each head, `d_model / n_heads`.
    pub d_k: usize,
    /// The score given to masked positions.
    pub min_float: f64,
    /// Whether to use quiet softmax, which lets a head attend to nothing.
    pub quiet_softmax: bool,
}

impl From<burn::nn::attention::MultiHeadAttention> for MultiHeadAttention {
    fn from(mha: burn::nn::attention::MultiHeadAttention) -> Self {
        Self {
            query: mha.query.into(),
            key: mha.key.into(),
            value: mha.value.into(),
            output: mha.output.into(),
            dropout: mha.dropout,
            activation: mha.activation,
            d_model: mha.d_model,
            n_heads: mha.n_heads,
            d_k: mha.d_k,
            min_float: mha.min_float,
            quiet_softmax: mha.quiet_softmax,
        }
    }
}

/// The input of [`MultiHeadAttention::forward`]: query, key, value and optional masks, as in
/// Burn's `MhaInput`.
#[derive(Debug, Clone)]
pub struct MhaInput {
    query: Tensor<3>,
    key: Tensor<3>,
    value: Tensor<3>,
    mask_pad: Option<Tensor<2, Bool>>,
    mask_attn: Option<Tensor<3, Bool>>,
}

impl MhaInput {
    /// Self-attention: `tensor` is the query, the key and the value.
    pub fn self_attn(tensor: Tensor<3>) -> Self {
        Self::new(tensor.clone(), tensor.clone(), tensor)
    }

    /// Attention of `query` over `key` and `value`.
    pub fn new(query: Tensor<3>, key: Tensor<3>, value: Tensor<3>) -> Self {
        Self {
            query,
            key,
            value,
            mask_pad: None,
            mask_attn: None,
        }
    }

    /// Mask padded positions: `[batch, seq_kv]`, true where the key is padding.
    pub fn mask_pad(mut self, mask_pad: Tensor<2, Bool>) -> Self {
        self.mask_pad = Some(mask_pad);
        self
    }

    /// Mask attention: `[batch, seq_q, seq_kv]`, true where the query may not look.
    pub fn mask_attn(mut self, mask_attn: Tensor<3, Bool>) -> Self {
        self.mask_attn = Some(mask_attn);
        self
    }
}

impl MultiHeadAttention {
    /// Applies multi-head attention.
    ///
    /// # Shapes
    ///
    /// - query: `[batch, seq_q, d_model]`
    /// - key, value: `[batch, seq_kv, d_model]`
    /// - output context: `[batch, seq_q, d_model]`; weights: `[batch, n_heads, seq_q, seq_kv]`
    ///
    /// # Panics
    ///
    /// Panics if the inputs' last axis is not `d_model`, or if the key and value disagree on
    /// batch or length.
    pub fn forward(&self, input: MhaInput) -> MhaOutput {
        self.forward_routed(input, None)
    }

    /// [`forward`](Self::forward) with each sample's projections through its own adapter, as
    /// `batch` routes them (see [`LoraLinear::forward_mixed`]).
    ///
    /// # Shapes
    ///
    /// As [`forward`](Self::forward); `batch` routes `batch_size` samples.
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward), and if `batch` routes another number of samples or an
    /// adapter of a projection is merged.
    pub fn forward_mixed(&self, input: MhaInput, batch: &MixedBatch) -> MhaOutput {
        self.forward_routed(input, Some(batch))
    }

    /// [`forward_mixed`](Self::forward_mixed) with a batch, [`forward`](Self::forward) without.
    pub(crate) fn forward_routed(
        &self,
        input: MhaInput,
        routing: Option<&MixedBatch>,
    ) -> MhaOutput {
        let [batch_size, seq_length_q, d_model] = input.query.dims();
        let [_, seq_length_kv, _] = input.key.dims();
        assert_shape!(input.query, [_, _, self.d_model]);
        assert_shape!(input.key, [batch_size, _, self.d_model]);
        assert_shape!(input.value, [batch_size, seq_length_kv, self.d_model]);

        let query = self.split_heads(self.query.forward_routed(input.query, routing));
        let key = self.split_heads(self.key.forward_routed(input.key, routing));
        let value = self.split_heads(self.value.forward_routed(input.value, routing));

        let scores = query
            .matmul(key.transpose())
            .div_scalar((self.d_k as f32).sqrt());
        let weights = self.weights(scores, input.mask_pad, input.mask_attn);

        let context = weights.clone().matmul(value).swap_dims(1, 2).reshape([
            batch_size,
            seq_length_q,
            d_model,
        ]);
        MhaOutput {
            weights,
            context: self.output.forward_routed(context, routing),
        }
    }

    /// `[batch, seq, d_model]` to `[batch, n_heads, seq, d_k]`.
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [batch_size, seq_length, _] = x.dims();
        x.reshape([batch_size, seq_length, self.n_heads, self.d_k])
            .swap_dims(1, 2)
    }

    fn weights(
        &self,
        mut scores: Tensor<4>,
        mask_pad: Option<Tensor<2, Bool>>,
        mask_attn: Option<Tensor<3, Bool>>,
    ) -> Tensor<4> {
        if let Some(mask_pad) = mask_pad {
            let [batch_size, seq_length] = mask_pad.dims();
            let mask = mask_pad.reshape([batch_size, 1, 1, seq_length]);
            scores = scores.mask_fill(mask, self.min_float);
        }
        if let Some(mask_attn) = mask_attn {
            let [batch_size, seq_length_q, seq_length_kv] = mask_attn.dims();
            let mask = mask_attn.reshape([batch_size, 1, seq_length_q, seq_length_kv]);
            scores = scores.mask_fill(mask, self.min_float);
        }
        let weights = match self.quiet_softmax {
            true => quiet_softmax(scores, 3),
            false => softmax(scores, 3),
        };
        self.dropout.forward(weights)
    }
}

impl ModuleDisplay for MultiHeadAttention {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("d_model", &self.d_model)
            .add("n_heads", &self.n_heads)
            .add("d_k", &self.d_k)
            .add("dropout", &self.dropout.prob)
            .add("quiet_softmax", &self.quiet_softmax)
            .optional()
    }
}
