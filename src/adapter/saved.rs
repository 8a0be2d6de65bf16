//! [`SavedCopy`]: one parameter of a module that an adapter trains in full (PEFT's
//! `modules_to_save`, such as a classifier head), as a copy beside the frozen original.

use burn::module::{Module, Param};
use burn::tensor::{Shape, Tensor};

/// An adapter's own copy of one parameter of a module in `modules_to_save`.
///
/// PEFT keeps the original module and gives each adapter a trainable copy of it; the copy of
/// the active adapter replaces the original in the forward pass. burn-lora keeps the copy of
/// each parameter (weight, bias, a norm's `gamma`...) in the [`LoraState`](super::LoraState) of
/// that parameter, flattened, so one type serves parameters of every rank.
#[derive(Module, Debug)]
pub struct SavedCopy {
    /// The copy's values, flattened; the original parameter's shape gives them back their form.
    pub value: Param<Tensor<1>>,
    /// The adapter the copy belongs to.
    pub name: String,
    /// Whether the copy replaces the original in the forward pass.
    pub active: bool,
    /// Whether the copy takes gradients.
    pub trainable: bool,
}

impl SavedCopy {
    /// A copy of `original` for adapter `name`: a new parameter (its own `ParamId`), inactive
    /// and frozen until the caller says otherwise.
    pub(crate) fn new<const D: usize>(name: &str, original: Tensor<D>) -> Self {
        let count = original.shape().num_elements();
        Self {
            value: Param::from_tensor(original.detach().reshape([count])).set_require_grad(false),
            name: name.to_string(),
            active: false,
            trainable: false,
        }
    }

    /// The copy with gradients on or off.
    pub(crate) fn with_trainable(self, trainable: bool) -> Self {
        Self {
            value: self.value.set_require_grad(trainable),
            trainable,
            ..self
        }
    }

    /// The copy in the shape of the parameter it copies.
    pub fn value_as<const D: usize>(&self, shape: Shape) -> Tensor<D> {
        self.value.val().reshape(shape)
    }
}
