//! The kinds of layer LoRA adapts, and the one layout their adapters share.
//!
//! Every adapter is a pair `A: [d_in, r]`, `B: [r, d_out]` whatever its layer, so merging,
//! DoRA's norms, combining and PEFT files share one code path. What differs is how a weight maps
//! to that `[d_in, d_out]` *factor layout*:
//!
//! - `Linear`: the weight `[d_input, d_output]` is already in it.
//! - `Embedding`: the weight `[n_embedding, d_model]` is too; a token's row of `A` is its
//!   low-rank code, as in PEFT's `lora_embedding_A` (transposed).
//! - `Conv2d`: the weight `[channels_out, channels_in/groups, k1, k2]` flattens to
//!   `[channels_out, channels_in·k1·k2]` and transposes to `[channels_in·k1·k2, channels_out]`.
//!   `A` is then a convolution with the base's kernel, stride and padding into `r` channels, and
//!   `B` a 1×1 convolution out of them, as in PEFT.
//!
//! Adapter math runs in f32 beside a base of any dtype (f16, bf16, or a quantized QFloat);
//! the dtype helpers below are the one place that decides how.

use burn::tensor::{DType, FloatDType, Shape, Tensor};

/// A kind of layer whose `weight` LoRA adapts, recognised by its module type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// `burn::nn::Linear` or [`LoraLinear`](crate::LoraLinear).
    Linear,
    /// `burn::nn::Embedding`. Its adapters compose densely through `Param::val()`.
    Embedding,
    /// `burn::nn::conv::Conv2d`. Its adapters compose densely through `Param::val()`.
    Conv2d,
}

impl LayerKind {
    /// The kind of a module of type `module_type` whose weight has `dims`, if LoRA adapts it.
    pub fn of(module_type: &str, dims: &[usize]) -> Option<Self> {
        match (module_type, dims.len()) {
            ("Linear" | "LoraLinear", 2) => Some(Self::Linear),
            ("Embedding", 2) => Some(Self::Embedding),
            ("Conv2d", 4) => Some(Self::Conv2d),
            _ => None,
        }
    }

    /// A short name for reports: `linear`, `embedding` or `conv2d`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Embedding => "embedding",
            Self::Conv2d => "conv2d",
        }
    }
}

/// The factor dimensions `(d_in, d_out)` of a weight of shape `dims`: the two axes of a 2-D
/// weight, and `(channels_in·k1·k2, channels_out)` for a convolution kernel.
pub(crate) fn factor_dims(dims: &[usize]) -> (usize, usize) {
    match dims.len() {
        2 => (dims[0], dims[1]),
        _ => (dims[1..].iter().product(), dims[0]),
    }
}

/// A weight in the factor layout `[d_in, d_out]`.
pub(crate) fn to_factor_layout<const D: usize>(weight: Tensor<D>) -> Tensor<2> {
    let dims = weight.dims();
    let (d_in, d_out) = factor_dims(&dims);
    match D {
        2 => weight.reshape([d_in, d_out]),
        _ => weight.reshape([d_out, d_in]).transpose(),
    }
}

/// A `[d_in, d_out]` tensor back in the layout of a weight of `shape`.
pub(crate) fn from_factor_layout<const D: usize>(factors: Tensor<2>, shape: Shape) -> Tensor<D> {
    match D {
        2 => factors.reshape(shape),
        _ => factors.transpose().reshape(shape),
    }
}

/// A float copy of `tensor` in f32, dequantizing a quantized one (which `cast` refuses).
pub(crate) fn to_f32<const D: usize>(tensor: Tensor<D>) -> Tensor<D> {
    match tensor.dtype() {
        DType::QFloat(_) => tensor.dequantize().cast(FloatDType::F32),
        _ => tensor.cast(FloatDType::F32),
    }
}

/// The float dtype that goes with a stored tensor of `dtype`: the same for a float tensor, f32
/// for a quantized or integer one. Adapter factors take it, and results are cast back to it.
pub(crate) fn float_dtype(dtype: DType) -> FloatDType {
    match dtype.is_float() {
        true => FloatDType::from(dtype),
        false => FloatDType::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    #[test]
    fn a_conv_kernel_round_trips_and_puts_channels_out_last() {
        let device = Device::flex();
        let kernel = Tensor::<4>::random([5, 3, 2, 2], Distribution::Default, &device);
        let factors = to_factor_layout(kernel.clone());
        assert_eq!(factors.dims(), [12, 5]);
        // Column `o` of the factor layout is output channel `o`'s flattened kernel.
        let channel = kernel.clone().narrow(0, 2, 1).reshape([12]);
        let column = factors.clone().slice([0..12, 2..3]).reshape([12]);
        column
            .into_data()
            .assert_approx_eq::<f32>(&channel.into_data(), Tolerance::absolute(0.0));
        let back: Tensor<4> = from_factor_layout(factors, kernel.shape());
        back.into_data()
            .assert_approx_eq::<f32>(&kernel.into_data(), Tolerance::absolute(0.0));
    }

    #[test]
    fn kinds_follow_module_type_and_rank() {
        assert_eq!(LayerKind::of("Linear", &[4, 2]), Some(LayerKind::Linear));
        assert_eq!(
            LayerKind::of("Embedding", &[10, 4]),
            Some(LayerKind::Embedding)
        );
        assert_eq!(
            LayerKind::of("Conv2d", &[8, 3, 3, 3]),
            Some(LayerKind::Conv2d)
        );
        assert_eq!(LayerKind::of("Conv2d", &[8, 3]), None);
        assert_eq!(LayerKind::of("LayerNorm", &[4]), None);
        assert_eq!(factor_dims(&[8, 3, 3, 3]), (27, 8));
    }
}
