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
//! - `Parameter`: a raw parameter ([`Targets::parameters`](crate::Targets::parameters)) in the
//!   [`ParamLayout`] it declares. A 2-D one is a single `[d_in, d_out]` matrix. A 3-D one is a
//!   bank of `E` experts, whose factor layout stacks the experts' `[d_in, d_out]` matrices into
//!   `[E·d_in, d_out]`; its adapter holds `E` rank-`r` updates side by side
//!   ([`Adapter::experts`](crate::Adapter::experts)), so merging works on it unchanged.
//!
//! Adapter math runs in f32 beside a base of any dtype (f16, bf16, or a quantized QFloat);
//! the dtype helpers below are the one place that decides how.

use burn::tensor::{DType, FloatDType, Shape, Tensor};

use crate::config::ParamLayout;

/// A kind of layer whose `weight` LoRA adapts, recognised by its module type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// `burn::nn::Linear` or [`LoraLinear`](crate::LoraLinear).
    Linear,
    /// `burn::nn::Embedding`. Its adapters compose densely through `Param::val()`.
    Embedding,
    /// `burn::nn::conv::Conv2d`. Its adapters compose densely through `Param::val()`.
    Conv2d,
    /// A raw 2-D or 3-D parameter that [`Targets::parameters`](crate::Targets::parameters)
    /// selects, such as a mixture of experts' expert bank (PEFT's `target_parameters`). Its
    /// adapters compose densely through `Param::val()`.
    Parameter,
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
            Self::Parameter => "parameter",
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

/// The experts `E` and one expert's `(d_in, d_out)` of a targeted parameter of shape `dims`
/// stored in `layout`; `None` unless it is 2-D (one expert) or 3-D.
pub(crate) fn param_dims(dims: &[usize], layout: ParamLayout) -> Option<(usize, usize, usize)> {
    let (experts, rows, cols) = match dims {
        [rows, cols] => (1, *rows, *cols),
        [experts, rows, cols] => (*experts, *rows, *cols),
        _ => return None,
    };
    Some(match layout {
        ParamLayout::InOut => (experts, rows, cols),
        ParamLayout::OutIn => (experts, cols, rows),
    })
}

/// A weight in the factor layout `[d_in, d_out]`; `param` is the layout of a targeted raw
/// parameter, `None` for a layer's weight. An expert bank comes out as `[E·d_in, d_out]`.
pub(crate) fn to_factor_layout<const D: usize>(
    weight: Tensor<D>,
    param: Option<ParamLayout>,
) -> Tensor<2> {
    let dims = weight.dims();
    match param {
        Some(layout) => {
            let (experts, d_in, d_out) = param_dims(&dims, layout).expect("a 2-D or 3-D parameter");
            let stacked: Tensor<3> = weight.reshape([experts, dims[D - 2], dims[D - 1]]);
            let stacked = match layout {
                ParamLayout::InOut => stacked,
                ParamLayout::OutIn => stacked.swap_dims(1, 2),
            };
            stacked.reshape([experts * d_in, d_out])
        }
        None => {
            let (d_in, d_out) = factor_dims(&dims);
            match D {
                2 => weight.reshape([d_in, d_out]),
                _ => weight.reshape([d_out, d_in]).transpose(),
            }
        }
    }
}

/// A `[d_in, d_out]` tensor back in the layout of a weight of `shape`; `param` as for
/// [`to_factor_layout`].
pub(crate) fn from_factor_layout<const D: usize>(
    factors: Tensor<2>,
    shape: Shape,
    param: Option<ParamLayout>,
) -> Tensor<D> {
    match param {
        Some(layout) => {
            let dims = shape.to_vec();
            let (experts, d_in, d_out) = param_dims(&dims, layout).expect("a 2-D or 3-D parameter");
            let stacked = factors.reshape([experts, d_in, d_out]);
            let stacked = match layout {
                ParamLayout::InOut => stacked,
                ParamLayout::OutIn => stacked.swap_dims(1, 2),
            };
            stacked.reshape(shape)
        }
        None => match D {
            2 => factors.reshape(shape),
            _ => factors.transpose().reshape(shape),
        },
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
        let factors = to_factor_layout(kernel.clone(), None);
        assert_eq!(factors.dims(), [12, 5]);
        // Column `o` of the factor layout is output channel `o`'s flattened kernel.
        let channel = kernel.clone().narrow(0, 2, 1).reshape([12]);
        let column = factors.clone().slice([0..12, 2..3]).reshape([12]);
        column
            .into_data()
            .assert_approx_eq::<f32>(&channel.into_data(), Tolerance::absolute(0.0));
        let back: Tensor<4> = from_factor_layout(factors, kernel.shape(), None);
        back.into_data()
            .assert_approx_eq::<f32>(&kernel.into_data(), Tolerance::absolute(0.0));
    }

    #[test]
    fn an_expert_bank_stacks_each_experts_input_by_output_matrix() {
        let device = Device::flex();
        // [experts, d_out, d_in] = [3, 4, 5]: expert e's matrix in the factor layout is the
        // transpose of bank[e], at rows e·5..(e+1)·5.
        let bank = Tensor::<3>::random([3, 4, 5], Distribution::Default, &device);
        let factors = to_factor_layout(bank.clone(), Some(ParamLayout::OutIn));
        assert_eq!(factors.dims(), [15, 4]);
        let expert = bank.clone().narrow(0, 1, 1).reshape([4, 5]).transpose();
        let rows = factors.clone().slice([5..10, 0..4]);
        rows.into_data()
            .assert_approx_eq::<f32>(&expert.into_data(), Tolerance::absolute(0.0));
        let back: Tensor<3> = from_factor_layout(factors, bank.shape(), Some(ParamLayout::OutIn));
        back.into_data()
            .assert_approx_eq::<f32>(&bank.clone().into_data(), Tolerance::absolute(0.0));
        // [experts, d_in, d_out] is already stacked.
        let stacked = to_factor_layout(bank.clone(), Some(ParamLayout::InOut));
        stacked
            .into_data()
            .assert_approx_eq::<f32>(&bank.reshape([12, 5]).into_data(), Tolerance::absolute(0.0));
        assert_eq!(param_dims(&[3, 4, 5], ParamLayout::OutIn), Some((3, 5, 4)));
        assert_eq!(param_dims(&[4, 5], ParamLayout::InOut), Some((1, 4, 5)));
        assert_eq!(param_dims(&[4], ParamLayout::InOut), None);
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
