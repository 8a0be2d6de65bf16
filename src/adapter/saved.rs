//! [`SavedCopy`]: one parameter of a module that an adapter trains in full (PEFT's
//! `modules_to_save`, such as a classifier head), or chosen rows of it (PEFT's trainable tokens,
//! `trainable_token_indices`), as a copy beside the frozen original.

use burn::module::{Module, Param};
use burn::tensor::{Device, IndexingUpdateOp, Int, Shape, Tensor, TensorData};

use super::layout::float_dtype;

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
    /// For trainable tokens: the rows of the parameter the copy holds (token ids of an
    /// embedding, in order), `[rows, width]` flattened; the other rows stay the original's.
    /// `None` for a copy of the whole parameter.
    pub rows: Option<Vec<usize>>,
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
            rows: None,
        }
    }

    /// A copy of the rows `rows` of `original` (`[rows, width]`, the rows already selected) for
    /// adapter `name`: trainable tokens. Inactive and frozen until the caller says otherwise.
    pub(crate) fn of_rows(name: &str, original: Tensor<2>, rows: Vec<usize>) -> Self {
        Self {
            rows: Some(rows),
            ..Self::new(name, original)
        }
    }

    /// `base` (the parameter as stored) with this copy in place: the whole copy, or for
    /// trainable tokens the base with the copy's rows written over it. The gradient reaches the
    /// copy, not the base.
    pub fn apply_to<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        let Some(rows) = &self.rows else {
            return self.value_as(base.shape());
        };
        let shape = base.shape();
        let (height, count) = (shape[0], rows.len());
        let width = shape.num_elements() / height.max(1);
        let indices = row_indices(rows, &base.device());
        let base: Tensor<2> = base.detach().reshape([height, width]);
        let values = self
            .value
            .val()
            .reshape([count, width])
            .cast(float_dtype(base.dtype()));
        base.select_assign(0, indices, values, IndexingUpdateOp::Assign)
            .reshape(shape)
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

/// `rows` as an index tensor on `device`.
pub(crate) fn row_indices(rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let ids: Vec<i64> = rows.iter().map(|&row| row as i64).collect();
    Tensor::from_data(TensorData::new(ids, [rows.len()]), device)
}

/// Why `rows` cannot be the rows of trainable tokens of a parameter with `height` rows (an
/// embedding's vocabulary), if they cannot: none, one twice, or one past the end.
pub(crate) fn check_rows(rows: &[usize], height: usize) -> Result<(), String> {
    if rows.is_empty() {
        return Err("no token ids".into());
    }
    if let Some(&id) = rows.iter().find(|&&id| id >= height) {
        return Err(format!("token id {id} is past the vocabulary of {height}"));
    }
    let mut sorted = rows.to_vec();
    sorted.sort_unstable();
    match sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(format!("token id {} is listed twice", pair[0])),
        None => Ok(()),
    }
}
