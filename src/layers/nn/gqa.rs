//! [`GroupedQueryAttention`]: causal-LM self-attention with grouped key/value heads and RoPE,
//! as in Llama, Mistral and Qwen, with `LoraLinear` projections.

use burn::config::Config;
use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::{Dropout, DropoutConfig, Initializer};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, Tensor, assert_shape};

use super::{RotaryConfig, RotaryEmbedding};
use crate::layers::{LoraLinear, LoraLinearConfig, MixedBatch};

/// Configuration to create a [`GroupedQueryAttention`] with
/// [`init`](GroupedQueryAttentionConfig::init).
///
/// A Llama-style attention: `GroupedQueryAttentionConfig::new(d_model, n_heads, n_heads_kv)
/// .with_rope(Some(RotaryConfig::new(max_sequence_length)))`. With `n_heads_kv == n_heads` it
/// is multi-head attention, with `n_heads_kv == 1` multi-query attention.
#[derive(Config, Debug)]
pub struct GroupedQueryAttentionConfig {
    /// The model size: the input and output features.
    pub d_model: usize,
    /// The number of query heads.
    pub n_heads: usize,
    /// The number of key/value heads, each shared by `n_heads / n_heads_kv` query heads.
    pub n_heads_kv: usize,
    /// The size of each head; `d_model / n_heads` when `None`.
    #[config(default = "None")]
    pub d_head: Option<usize>,
    /// Whether the four projections have a bias (Llama: none; Qwen2 has them on Q, K and V
    /// only: set `output.bias` to `None` after `init`).
    #[config(default = false)]
    pub bias: bool,
    /// Dropout on the attention weights.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Rotary position embeddings on the queries and keys; none when `None`.
    #[config(default = "None")]
    pub rope: Option<RotaryConfig>,
    /// The initializer of the projections, [`LoraLinearConfig`]'s by default.
    #[config(default = "Initializer::KaimingUniform{gain:1.0/f64::sqrt(3.0), fan_out_only:false}")]
    pub initializer: Initializer,
}

impl GroupedQueryAttentionConfig {
    /// Builds the attention.
    ///
    /// # Panics
    ///
    /// Panics if `n_heads` or `n_heads_kv` is zero, if `n_heads` is not a multiple of
    /// `n_heads_kv`, if `d_head` is `None` and `d_model` is not a multiple of `n_heads`, or if
    /// RoPE is asked for with an odd `d_head` (and as [`RotaryConfig::init`]).
    pub fn init(&self, device: &Device) -> GroupedQueryAttention {
        assert!(
            self.n_heads > 0 && self.n_heads_kv > 0,
            "grouped-query attention needs heads: n_heads = {}, n_heads_kv = {}",
            self.n_heads,
            self.n_heads_kv
        );
        assert!(
            self.n_heads.is_multiple_of(self.n_heads_kv),
            "n_heads = {} is not a multiple of n_heads_kv = {}",
            self.n_heads,
            self.n_heads_kv
        );
        let d_head = match self.d_head {
            Some(d_head) => d_head,
            None => {
                assert!(
                    self.d_model.is_multiple_of(self.n_heads),
                    "d_model = {} is not a multiple of n_heads = {}; set d_head",
                    self.d_model,
                    self.n_heads
                );
                self.d_model / self.n_heads
            }
        };
        assert!(d_head > 0, "d_head must be positive");
        let linear = |d_input, d_output| {
            LoraLinearConfig::new(d_input, d_output)
                .with_bias(self.bias)
                .with_initializer(self.initializer.clone())
                .init(device)
        };
        GroupedQueryAttention {
            query: linear(self.d_model, self.n_heads * d_head),
            key: linear(self.d_model, self.n_heads_kv * d_head),
            value: linear(self.d_model, self.n_heads_kv * d_head),
            output: linear(self.n_heads * d_head, self.d_model),
            rope: self.rope.as_ref().map(|rope| rope.init(d_head, device)),
            dropout: DropoutConfig::new(self.dropout).init(),
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_heads_kv: self.n_heads_kv,
            d_head,
        }
    }
}

/// Self-attention with `n_heads` query heads over `n_heads_kv` key/value heads, rotary
/// position embeddings, and `LoraLinear` projections.
///
/// Its parameter paths are Burn's attention names (`query`, `key`, `value`, `output`, as in
/// `burn::nn::attention::CrossAttention`), so [`Targets::attention`](crate::Targets::attention)
/// selects the projections; Hugging Face calls them `q_proj`, `k_proj`, `v_proj`, `o_proj`.
///
/// Each key/value head serves `n_heads / n_heads_kv` consecutive query heads (Hugging Face's
/// `repeat_kv`). Scores are scaled by `1/√d_head`; masking and the softmax run in f32 whatever
/// the model's float type, as in Hugging Face's eager attention.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct GroupedQueryAttention {
    /// Query projection, `[d_model, n_heads·d_head]`.
    pub query: LoraLinear,
    /// Key projection, `[d_model, n_heads_kv·d_head]`.
    pub key: LoraLinear,
    /// Value projection, `[d_model, n_heads_kv·d_head]`.
    pub value: LoraLinear,
    /// Output projection, `[n_heads·d_head, d_model]`.
    pub output: LoraLinear,
    /// The rotary tables applied to queries and keys: constants, in no record.
    pub rope: Option<RotaryEmbedding>,
    /// Dropout on the attention weights.
    pub dropout: Dropout,
    /// The model size.
    pub d_model: usize,
    /// The number of query heads.
    pub n_heads: usize,
    /// The number of key/value heads.
    pub n_heads_kv: usize,
    /// The size of each head.
    pub d_head: usize,
}

impl GroupedQueryAttention {
    /// Applies self-attention to `x`, whose first position is `position_offset` (for RoPE).
    ///
    /// `mask_attn` is true where a query may not look at a key: a causal model passes
    /// `burn::nn::attention::generate_autoregressive_mask(batch, seq, &device)`, ORed with the
    /// padded keys if any. A masked score is set to the f32 minimum before the softmax, so it
    /// gets exactly zero weight, and a query that may look nowhere attends uniformly rather
    /// than giving NaN.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, d_model]`
    /// - mask_attn: `[batch, seq, seq]`
    /// - output: `[batch, seq, d_model]`
    ///
    /// # Panics
    ///
    /// Panics if the last axis of `x` is not `d_model`, if the mask's shape is not
    /// `[batch, seq, seq]`, or if `position_offset + seq` exceeds the RoPE tables.
    pub fn forward(
        &self,
        x: Tensor<3>,
        mask_attn: Option<Tensor<3, Bool>>,
        position_offset: usize,
    ) -> Tensor<3> {
        self.forward_routed(x, mask_attn, position_offset, None)
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
    pub fn forward_mixed(
        &self,
        x: Tensor<3>,
        mask_attn: Option<Tensor<3, Bool>>,
        position_offset: usize,
        batch: &MixedBatch,
    ) -> Tensor<3> {
        self.forward_routed(x, mask_attn, position_offset, Some(batch))
    }

    /// [`forward_mixed`](Self::forward_mixed) with a batch, [`forward`](Self::forward) without.
    pub(crate) fn forward_routed(
        &self,
        x: Tensor<3>,
        mask_attn: Option<Tensor<3, Bool>>,
        position_offset: usize,
        routing: Option<&MixedBatch>,
    ) -> Tensor<3> {
        let [batch_size, seq_length, _] = x.dims();
        assert_shape!(x, [_, _, self.d_model]);

        let query = self.split_heads(self.query.forward_routed(x.clone(), routing), self.n_heads);
        let key = self.split_heads(self.key.forward_routed(x.clone(), routing), self.n_heads_kv);
        let value = self.split_heads(self.value.forward_routed(x, routing), self.n_heads_kv);
        let (query, key) = match &self.rope {
            Some(rope) => (
                rope.apply(query, position_offset),
                rope.apply(key, position_offset),
            ),
            None => (query, key),
        };
        let key = self.repeat_kv(key);
        let value = self.repeat_kv(value);

        let dtype = query.dtype();
        let mut scores = query
            .matmul(key.transpose())
            .mul_scalar((self.d_head as f64).sqrt().recip())
            .cast(DType::F32);
        if let Some(mask_attn) = mask_attn {
            assert_shape!(mask_attn, [batch_size, seq_length, seq_length]);
            let mask = mask_attn.reshape([batch_size, 1, seq_length, seq_length]);
            scores = scores.mask_fill(mask, f32::MIN);
        }
        let weights = self.dropout.forward(softmax(scores, 3).cast(dtype));

        let context = weights.matmul(value).swap_dims(1, 2).reshape([
            batch_size,
            seq_length,
            self.n_heads * self.d_head,
        ]);
        self.output.forward_routed(context, routing)
    }

    /// `[batch, seq, heads·d_head]` to `[batch, heads, seq, d_head]`.
    fn split_heads(&self, x: Tensor<3>, heads: usize) -> Tensor<4> {
        let [batch_size, seq_length, _] = x.dims();
        x.reshape([batch_size, seq_length, heads, self.d_head])
            .swap_dims(1, 2)
    }

    /// `[batch, n_heads_kv, seq, d_head]` to `[batch, n_heads, seq, d_head]`, each key/value
    /// head repeated for its group of consecutive query heads.
    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let group = self.n_heads / self.n_heads_kv;
        if group == 1 {
            return x;
        }
        let [batch_size, heads, seq_length, d_head] = x.dims();
        x.reshape([batch_size, heads, 1, seq_length, d_head])
            .expand([batch_size, heads, group, seq_length, d_head])
            .reshape([batch_size, heads * group, seq_length, d_head])
    }
}

impl ModuleDisplay for GroupedQueryAttention {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("d_model", &self.d_model)
            .add("n_heads", &self.n_heads)
            .add("n_heads_kv", &self.n_heads_kv)
            .add("d_head", &self.d_head)
            .add("dropout", &self.dropout.prob)
            .add("rope", &self.rope.is_some())
            .optional()
    }
}
