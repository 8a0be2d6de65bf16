//! [`LoraLinear`]: a drop-in for `burn::nn::Linear` that computes adapters on activations.

use burn::config::Config;
use burn::module::{Content, DisplaySettings, Module, ModuleDisplay, Param};
use burn::nn::{Initializer, Linear, LinearConfig, LinearLayout};
use burn::tensor::{Device, Tensor, assert_shape};

use super::mixed::MixedBatch;
use crate::adapter::LoraState;
use crate::ops;

/// Configuration to create a [`LoraLinear`] layer with [`init`](LoraLinearConfig::init).
///
/// The fields and defaults are those of [`LinearConfig`], so the layer starts exactly as a
/// `Linear` would.
#[derive(Config, Debug)]
pub struct LoraLinearConfig {
    /// The size of the input features.
    pub d_input: usize,
    /// The size of the output features.
    pub d_output: usize,
    /// If a bias should be applied during the linear transformation.
    #[config(default = true)]
    pub bias: bool,
    /// The type of function used to initialize neural network parameters.
    #[config(default = "Initializer::KaimingUniform{gain:1.0/f64::sqrt(3.0), fan_out_only:false}")]
    pub initializer: Initializer,
    /// The layout in which the weight is stored.
    #[config(default = "LinearLayout::Row")]
    pub layout: LinearLayout,
}

impl LoraLinearConfig {
    /// Initialize a new [`LoraLinear`] module, without adapters.
    pub fn init(&self, device: &Device) -> LoraLinear {
        LinearConfig::new(self.d_input, self.d_output)
            .with_bias(self.bias)
            .with_initializer(self.initializer.clone())
            .with_layout(self.layout)
            .init(device)
            .into()
    }
}

/// A linear layer `y = x·W + b` that LoRA adapters attach to on the fast path.
///
/// It has the parameters of [`Linear`] under the same names (`weight` `[d_input, d_output]`,
/// `bias` `[d_output]`), so a checkpoint saved from a model built with `Linear` loads into the
/// same model built with `LoraLinear`, and [`LoraConfig::apply`](crate::LoraConfig::apply)
/// targets it the same way.
///
/// With an unmerged adapter on its weight, [`forward`](Self::forward) computes
/// `x·W + b + s·(dropout(x)·A)·B` from the stored base `W`: it never builds `W + s·A·B`, and
/// no gradient of `W`'s size exists in training. With no adapter, or with every adapter merged,
/// it is exactly a `Linear`.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct LoraLinear {
    /// The frozen base weight, of shape `[d_input, d_output]`. Adapters attach to it.
    pub weight: Param<Tensor<2>>,
    /// The bias, of shape `[d_output]`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl From<Linear> for LoraLinear {
    fn from(linear: Linear) -> Self {
        Self {
            weight: linear.weight,
            bias: linear.bias,
        }
    }
}

impl From<LoraLinear> for Linear {
    fn from(linear: LoraLinear) -> Self {
        Self {
            weight: linear.weight,
            bias: linear.bias,
        }
    }
}

impl LoraLinear {
    /// Applies the layer, adapters included, to `input`.
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
        let bias = self.bias.as_ref().map(Param::val);
        let Some(state) = self.weight.reparameterization::<LoraState>() else {
            // No adapter of ours: the effective weight, which may carry another
            // reparameterization (Burn's `apply_lora`, quantization...).
            let weight = self.weight.val();
            let [d_input, _] = weight.dims();
            assert_shape!(input, [.., d_input]);
            return ops::linear(input, weight, bias);
        };
        let weight = self.weight.base();
        let [d_input, _] = weight.dims();
        assert_shape!(input, [.., d_input]);
        state.forward(input, weight, bias)
    }

    /// Applies the layer with each sample's own adapter, as `batch` routes them: sample `i`
    /// gets `x·W + b + sᵢ·(x·Aᵢ)·Bᵢ`, or `x·W + b` when it has none or this layer lacks its
    /// adapter. The result equals running each sample alone with only its adapter active.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, ..., d_input]`
    /// - output: `[batch, ..., d_output]`
    ///
    /// # Panics
    ///
    /// Panics if the last axis of `input` is not `d_input`, if the first is not
    /// `batch.len()`, if an adapter of this layer is merged (the base would already hold
    /// it), or if the layer is in `modules_to_save` (one copy of it serves a whole batch);
    /// [`LoraModule::mixed_batch`](crate::LoraModule::mixed_batch) checks both up front.
    pub fn forward_mixed<const D: usize>(&self, input: Tensor<D>, batch: &MixedBatch) -> Tensor<D> {
        let bias = self.bias.as_ref().map(Param::val);
        let Some(state) = self.weight.reparameterization::<LoraState>() else {
            return self.forward(input);
        };
        let weight = self.weight.base();
        let [d_input, _] = weight.dims();
        assert_shape!(input, [.., d_input]);
        assert_eq!(
            input.dims()[0],
            batch.len(),
            "forward_mixed: the batch routes {} samples, the input has {}",
            batch.len(),
            input.dims()[0]
        );
        assert!(
            state.adapters.iter().all(|adapter| !adapter.merged),
            "forward_mixed needs unmerged adapters; call unmerge_lora first"
        );
        state.forward_mixed(input, weight, bias, batch)
    }
}

impl LoraLinear {
    /// [`forward_mixed`](Self::forward_mixed) with a batch, [`forward`](Self::forward) without:
    /// every block of [`nn`](crate::nn) has a `forward_routed` built on this one, so both
    /// forwards share one code path.
    pub(crate) fn forward_routed<const D: usize>(
        &self,
        input: Tensor<D>,
        batch: Option<&MixedBatch>,
    ) -> Tensor<D> {
        match batch {
            Some(batch) => self.forward_mixed(input, batch),
            None => self.forward(input),
        }
    }
}

impl ModuleDisplay for LoraLinear {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        let [d_input, d_output] = self.weight.shape().dims();
        let content = content
            .add("d_input", &d_input)
            .add("d_output", &d_output)
            .add("bias", &self.bias.is_some());
        match self.weight.reparameterization::<LoraState>() {
            Some(state) => {
                let adapters: Vec<String> = state
                    .adapters
                    .iter()
                    .map(|adapter| {
                        let merged = if adapter.merged { ", merged" } else { "" };
                        let inactive = if adapter.active { "" } else { ", inactive" };
                        format!("{} (r={}{merged}{inactive})", adapter.name, adapter.rank())
                    })
                    .collect();
                content.add("adapters", &adapters.join(", ")).optional()
            }
            None => content.optional(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::capture::capturing;
    use crate::{LoraConfig, Targets};
    use burn::tensor::{Distribution, Tolerance};

    #[derive(Module, Debug)]
    struct Pair {
        fast: LoraLinear,
        dense: Linear,
    }

    #[test]
    fn forward_never_composes_the_dense_weight() {
        let device = Device::flex();
        device.seed(0);
        let model = Pair {
            fast: LoraLinearConfig::new(6, 4).init(&device),
            dense: LinearConfig::new(6, 4).init(&device),
        };
        let config = LoraConfig::new(2).with_targets(Targets::names(["fast", "dense"]));
        let (model, _) = config.apply(model).unwrap();
        let x = Tensor::<2>::random([3, 6], Distribution::Default, &device);

        // With the capture on, every `apply` (dense composition) is recorded and skipped.
        let (_, composed) = capturing::<LoraState, _>(|| model.fast.forward(x.clone()));
        assert!(composed.is_empty(), "LoraLinear composed W + s·A·B");
        let (_, composed) = capturing::<LoraState, _>(|| model.dense.forward(x.clone()));
        assert_eq!(
            composed.len(),
            1,
            "a plain Linear composes through Param::val()"
        );
    }

    #[test]
    fn conversions_keep_the_parameters() {
        let device = Device::flex();
        let linear = LinearConfig::new(5, 3).init(&device);
        let (weight_id, weight) = (linear.weight.id, linear.weight.val().into_data());
        let lora: LoraLinear = linear.into();
        assert_eq!(lora.weight.id, weight_id);
        let back: Linear = lora.into();
        back.weight
            .val()
            .into_data()
            .assert_approx_eq::<f32>(&weight, Tolerance::default());
    }

    #[test]
    #[should_panic(expected = "d_input")]
    fn a_wrong_input_width_panics_as_linear_does() {
        let device = Device::flex();
        let layer = LoraLinearConfig::new(4, 2).init(&device);
        let _ = layer.forward(Tensor::<2>::zeros([1, 3], &device));
    }

    #[test]
    fn display_lists_the_adapters() {
        #[derive(Module, Debug)]
        struct One {
            proj: LoraLinear,
        }
        let device = Device::flex();
        let model = One {
            proj: LoraLinearConfig::new(8, 8).init(&device),
        };
        let config = LoraConfig::new(2).with_targets(Targets::names(["proj"]));
        let (model, _) = config.apply(model).unwrap();
        let text = model.to_string();
        assert!(text.contains("default (r=2)"), "{text}");
    }
}
