//! [`RotaryEmbedding`]: rotary position embeddings (RoPE) in either pairing of the features.

use burn::config::Config;
use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::tensor::{Device, Tensor, TensorData, assert_shape};

/// Which features of a head RoPE rotates together. Checkpoints are trained with one pairing,
/// and the other gives wrong outputs without any error, so a port must pick its source's.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum RotaryLayout {
    /// Feature `i` pairs with feature `i + d_head/2`: Hugging Face's `rotate_half` (Llama,
    /// Mistral, Qwen, GPT-NeoX).
    Halves,
    /// Feature `2i` pairs with feature `2i + 1`: Meta's original Llama code and Burn's
    /// `RotaryEncoding`.
    Interleaved,
}

/// Configuration to create a [`RotaryEmbedding`] with [`init`](RotaryConfig::init).
#[derive(Config, Debug)]
pub struct RotaryConfig {
    /// The number of positions the tables cover: `position_offset + seq` may not exceed it.
    pub max_sequence_length: usize,
    /// The base of the rotation frequencies, `theta^(-2i / d_head)`.
    #[config(default = 10000.0)]
    pub theta: f32,
    /// Which features rotate together.
    #[config(default = "RotaryLayout::Halves")]
    pub layout: RotaryLayout,
}

impl RotaryConfig {
    /// Builds the cosine and sine tables for heads of size `d_head`, computed in f64 and
    /// stored in the device's float type.
    ///
    /// # Panics
    ///
    /// Panics if `d_head` is odd or zero, `max_sequence_length` is zero, or `theta` is not
    /// positive.
    pub fn init(&self, d_head: usize, device: &Device) -> RotaryEmbedding {
        assert!(
            d_head > 0 && d_head.is_multiple_of(2),
            "RoPE needs an even, non-zero head size, got d_head = {d_head}"
        );
        assert!(
            self.max_sequence_length > 0,
            "RoPE needs max_sequence_length > 0"
        );
        assert!(
            self.theta > 0.0,
            "RoPE needs a positive theta, got {}",
            self.theta
        );
        // theta^(-2i/d_head) for each pair i, and the pair each feature belongs to.
        let frequencies: Vec<f64> = (0..d_head / 2)
            .map(|pair| (self.theta as f64).powf(-((2 * pair) as f64) / d_head as f64))
            .collect();
        let pair_of = |feature: usize| match self.layout {
            RotaryLayout::Halves => feature % (d_head / 2),
            RotaryLayout::Interleaved => feature / 2,
        };
        let mut cos = Vec::with_capacity(self.max_sequence_length * d_head);
        let mut sin = Vec::with_capacity(self.max_sequence_length * d_head);
        for position in 0..self.max_sequence_length {
            for feature in 0..d_head {
                let angle = position as f64 * frequencies[pair_of(feature)];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |values: Vec<f32>| {
            Tensor::from_data(
                TensorData::new(values, [self.max_sequence_length, d_head]),
                device,
            )
        };
        RotaryEmbedding {
            cos: table(cos),
            sin: table(sin),
            layout: self.layout,
        }
    }
}

/// Rotary position embeddings (RoFormer): each pair of features of a query or key at position
/// `p` is rotated by the angle `p·theta^(-2i/d_head)`, so that attention scores depend on
/// relative positions only.
///
/// The tables are constants, not parameters, as Burn's `RotaryEncoding` holds its
/// `freq_complex`: they are in no record, and adapters never target them. A clone shares them,
/// so a model's layers can share one table (`max_sequence_length · d_head` values each).
/// `Interleaved` gives Burn's `RotaryEncoding` outputs; `Halves` gives Hugging Face's.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct RotaryEmbedding {
    /// `cos(p·f)` for each position `p` and feature, `[max_sequence_length, d_head]`.
    pub cos: Tensor<2>,
    /// `sin(p·f)` for each position `p` and feature, `[max_sequence_length, d_head]`.
    pub sin: Tensor<2>,
    /// Which features rotate together.
    #[module(skip)]
    pub layout: RotaryLayout,
}

impl RotaryEmbedding {
    /// Rotates `x` as if its sequence started at position `position_offset`:
    /// `x·cos + rotate(x)·sin`, where `rotate` maps each pair `(a, b)` to `(-b, a)`.
    ///
    /// # Shapes
    ///
    /// - x: `[..., seq, d_head]` (such as `[batch, n_heads, seq, d_head]`)
    /// - output: `[..., seq, d_head]`
    ///
    /// # Panics
    ///
    /// Panics if `x` has fewer than 2 axes, its last axis is not `d_head`, or
    /// `position_offset + seq` exceeds `max_sequence_length`.
    pub fn apply<const D: usize>(&self, x: Tensor<D>, position_offset: usize) -> Tensor<D> {
        let [max_sequence_length, d_head] = self.cos.dims();
        assert_shape!(x, [.., _, d_head]);
        let seq = x.dims()[D - 2];
        assert!(
            position_offset + seq <= max_sequence_length,
            "RoPE tables cover {max_sequence_length} positions; positions {position_offset}..{} \
             were asked for",
            position_offset + seq
        );
        let positions = position_offset..position_offset + seq;
        let dtype = x.dtype();
        let cos = self.cos.clone().slice([positions.clone()]).cast(dtype);
        let sin = self.sin.clone().slice([positions]).cast(dtype);
        let rotated = self.rotate(x.clone());
        x * cos.unsqueeze::<D>() + rotated * sin.unsqueeze::<D>()
    }

    /// Each pair `(a, b)` of the last axis to `(-b, a)`. `Halves` views the axis as
    /// `[2, d_head/2]` (the pairs are columns), `Interleaved` as `[d_head/2, 2]` (rows).
    fn rotate<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let shape = x.shape();
        let d_head = x.dims()[D - 1];
        let rows = shape.num_elements() / d_head;
        let (view, axis) = match self.layout {
            RotaryLayout::Halves => ([rows, 2, d_head / 2], 1),
            RotaryLayout::Interleaved => ([rows, d_head / 2, 2], 2),
        };
        let x = x.reshape(view);
        let first = x.clone().narrow(axis, 0, 1);
        let second = x.narrow(axis, 1, 1);
        Tensor::cat(vec![second.neg(), first], axis).reshape(shape)
    }
}

impl ModuleDisplay for RotaryEmbedding {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        let [max_sequence_length, d_head] = self.cos.dims();
        content
            .add("d_head", &d_head)
            .add("max_sequence_length", &max_sequence_length)
            .add("layout", &format!("{:?}", self.layout))
            .optional()
    }
}
