//! [`LoraState`]: the adapters of one weight, attached to its `Param` as Burn's
//! [`Reparameterization`].
//!
//! Two ways to compute with it:
//!
//! - **dense composition** ([`Reparameterization::apply`]): `Param::val()` returns
//!   `W + Σ s·A·B`. Any Burn layer, a plain `nn::Linear` included, is adapted this way without a
//!   code change; it costs a `[d_in, d_out]` product and sum on every forward.
//! - **activation path** ([`LoraState::forward`]): `x·W + b + Σ s·(dropout(x)·A)·B`, used by
//!   [`LoraLinear`](crate::LoraLinear). It never builds a weight-sized tensor, and the frozen
//!   base receives no gradient.

use burn::module::{Module, Reparameterization};
use burn::tensor::Tensor;
use burn::tensor::module::linear;

use super::capture;
use super::layout::{float_dtype, from_factor_layout, to_f32, to_factor_layout};
use super::saved::SavedCopy;
use super::weights::Adapter;
use crate::LoraError;
use crate::config::ParamLayout;
use crate::ops;

/// The adapters attached to one weight, as Burn's [`Reparameterization`].
///
/// Its parameters appear under the weight's path, as
/// `<module>.weight.burn_lora.adapters.<i>.lora_a` and `….lora_b`, so the optimizer, records,
/// `to_device`, `valid` and `freeze` all reach them like any other parameter. Its name,
/// `"burn_lora"`, differs from the `"lora"` of Burn's own `apply_lora`, so each crate knows its
/// own states.
#[derive(Module, Debug)]
pub struct LoraState {
    /// The adapters, in the order they were added.
    pub adapters: Vec<Adapter>,
    /// False while [`disable_adapters`](crate::LoraModule::disable_adapters) is in force: the
    /// layer then computes with its base weight alone.
    pub enabled: bool,
    /// While adapters are merged: the stored base as it was before the merge (factor layout,
    /// its own dtype), which unmerging restores bit for bit. A constant, like the `merged`
    /// flags: not a parameter, not in records. It costs one copy of the weight while merged;
    /// [`merge_and_unload_lora`](crate::LoraModule::merge_and_unload_lora) keeps none.
    pub merged_base: Option<Tensor<2>>,
    /// While adapters with a bias on `B` are merged: the layer's bias as it was before the
    /// merge, which unmerging restores bit for bit. A constant, like
    /// [`merged_base`](Self::merged_base).
    pub merged_bias: Option<Tensor<1>>,
    /// The adapters' own copies of this parameter, when its module is in `modules_to_save`
    /// (a classifier head): the active adapter's copy replaces the parameter in the forward
    /// pass. A parameter holds copies or low-rank adapters, never both.
    pub copies: Vec<SavedCopy>,
    /// The layout of the raw parameter the state sits on when
    /// [`Targets::parameters`](crate::Targets::parameters) selected it (an expert bank), `None`
    /// on a layer's weight.
    #[module(skip)]
    pub param_layout: Option<ParamLayout>,
}

impl Reparameterization for LoraState {
    const NAME: &'static str = "burn_lora";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        if capture::record(self) {
            return base;
        }
        if let Some(copy) = self.active_copy() {
            return copy.apply_to(base);
        }
        if self.contributing().next().is_none() {
            return base;
        }
        // DoRA needs the base itself; plain LoRA only its shape.
        let stored = match self.contributing().any(Adapter::is_dora) {
            true => Some(to_f32(to_factor_layout(
                base.clone().detach(),
                self.param_layout,
            ))),
            false => None,
        };
        let update = self
            .contributing()
            .map(|adapter| match &stored {
                Some(stored) => adapter.weight_update(stored),
                None => adapter.delta(),
            })
            .reduce(|sum, update| sum + update)
            .expect("a contributing adapter");
        let dtype = float_dtype(base.dtype());
        let update: Tensor<D> =
            from_factor_layout(update.cast(dtype), base.shape(), self.param_layout);
        base + update
    }
}

impl LoraState {
    /// A state holding `adapters`, enabled.
    pub(crate) fn new(adapters: Vec<Adapter>) -> Self {
        Self {
            adapters,
            enabled: true,
            merged_base: None,
            merged_bias: None,
            copies: Vec::new(),
            param_layout: None,
        }
    }

    /// The state with the layout of the raw parameter it sits on.
    pub(crate) fn with_param_layout(self, param_layout: Option<ParamLayout>) -> Self {
        Self {
            param_layout,
            ..self
        }
    }

    /// Whether the state holds neither adapters nor copies (it is then dropped).
    pub(crate) fn is_empty(&self) -> bool {
        self.adapters.is_empty() && self.copies.is_empty()
    }

    /// The `ParamId` of the state's first parameter: its first adapter's `A`, or its first
    /// copy. A model walk meets it first.
    pub(crate) fn first_param_id(&self) -> Option<burn::module::ParamId> {
        match self.adapters.first() {
            Some(adapter) => Some(adapter.lora_a.id),
            None => self.copies.first().map(|copy| copy.value.id),
        }
    }

    /// The copy that replaces this parameter in the forward pass: the active adapter's, while
    /// the state is enabled.
    pub fn active_copy(&self) -> Option<&SavedCopy> {
        match self.enabled {
            true => self.copies.iter().find(|copy| copy.active),
            false => None,
        }
    }

    /// The adapters the forward passes add: active, unmerged, and the state enabled.
    pub fn contributing(&self) -> impl Iterator<Item = &Adapter> {
        let enabled = self.enabled;
        self.adapters
            .iter()
            .filter(move |adapter| enabled && adapter.contributes())
    }

    /// The adapter called `name`, if this weight has one.
    pub fn adapter(&self, name: &str) -> Option<&Adapter> {
        self.adapters.iter().find(|adapter| adapter.name == name)
    }

    /// The output of a linear layer with stored weight `weight` and `bias` for input `x`, every
    /// contributing adapter included: `x·W + b + Σ s·(dropout(x)·A)·B`, and for a DoRA adapter
    /// `(f - 1)⊙(x·W) + f⊙s·(dropout(x)·A)·B` with `f = m / ‖W + s·A·B‖`, as PEFT computes it.
    ///
    /// No tensor of the weight's size is built, except DoRA's norm, which needs `W + s·A·B`.
    ///
    /// # Shapes
    ///
    /// - input: `[..., d_in]`
    /// - weight: `[d_in, d_out]`
    /// - output: `[..., d_out]`
    pub fn forward<const D: usize>(
        &self,
        input: Tensor<D>,
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
    ) -> Tensor<D> {
        let weight = match self.active_copy() {
            Some(copy) => copy.apply_to(weight),
            None => weight,
        };
        if !self.contributing().any(Adapter::is_dora) {
            // The first adapter shares the base's output buffer (the fused operation); any
            // further one adds its own.
            let mut adapters = self.contributing();
            let output = match adapters.next() {
                Some(first) => first.linear_output(input.clone(), weight, bias),
                None => ops::linear(input.clone(), weight, bias),
            };
            return adapters.fold(output, |output, adapter| {
                output + adapter.forward(input.clone())
            });
        }
        let base_output = linear(input.clone(), weight.clone(), None);
        let mut output = match bias {
            Some(bias) => base_output.clone() + bias.unsqueeze(),
            None => base_output.clone(),
        };
        let stored = to_f32(weight.clone().detach());
        for adapter in self.contributing() {
            output = output
                + match &adapter.magnitude {
                    None => adapter.forward(input.clone()),
                    Some(magnitude) => adapter.dora_output(
                        magnitude.val(),
                        input.clone(),
                        &weight,
                        &stored,
                        base_output.clone(),
                    ),
                };
        }
        output
    }

    /// The layer's bias with the biases of `B` of the adapters at `adapters` merged in
    /// (`merge`: `b + Σ s·b_B`) or taken out (`!merge`); `None` when none of them has one.
    /// Computed in f32 and cast back, refusing NaN or Inf in the bias's dtype; unmerging
    /// restores the bias kept at the merge exactly.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoBiasToMerge`] when an adapter has a bias on `B` and the layer has no
    /// bias (`bias` is `None`), and [`LoraError::NonFiniteMerge`].
    pub(crate) fn fold_into_bias(
        &mut self,
        path: &str,
        bias: Option<Tensor<1>>,
        adapters: &[usize],
        merge: bool,
    ) -> Result<Option<Tensor<1>>, LoraError> {
        let with_bias: Vec<usize> = adapters
            .iter()
            .copied()
            .filter(|&index| self.adapters[index].lora_bias.is_some())
            .collect();
        let Some(&first) = with_bias.first() else {
            return Ok(None);
        };
        let Some(bias) = bias else {
            return Err(LoraError::NoBiasToMerge {
                path: path.to_string(),
                adapter: self.adapters[first].name.clone(),
            });
        };
        if !merge && let Some(original) = self.merged_bias.take() {
            return Ok(Some(original));
        }
        let dtype = float_dtype(bias.dtype());
        let mut sum = to_f32(bias.clone());
        for &index in &with_bias {
            let adapter = &self.adapters[index];
            let term = adapter
                .scaled_bias(burn::tensor::DType::F32)
                .expect("filtered on a bias");
            sum = match merge {
                true => sum + term,
                false => sum - term,
            };
            finite_in(&sum, dtype, path, adapter)?;
        }
        if merge && self.merged_bias.is_none() {
            self.merged_bias = Some(bias);
        }
        Ok(Some(sum.cast(dtype)))
    }

    /// The base (factor layout `[d_in, d_out]`) with the adapters at `adapters` merged in
    /// (`merge`) or taken out (`!merge`).
    ///
    /// A merge computes in f32, casts back to the base's dtype and refuses a result with NaN or
    /// Inf in that dtype (an f16 weight overflows past 65504). It keeps the base it merged into,
    /// and unmerging the merged adapters restores that copy exactly: no rounding drift, whatever
    /// the dtype, DoRA included. Without a copy (a state assembled by hand), unmerging computes
    /// in reverse order, `W − s·A·B` (DoRA: `W'·diag(n / m) − s·A·B` with the recorded norms).
    pub(crate) fn fold_into_base(
        &mut self,
        path: &str,
        base: Tensor<2>,
        adapters: &[usize],
        merge: bool,
    ) -> Result<Tensor<2>, LoraError> {
        if !merge && let Some(original) = self.merged_base.take() {
            for &index in adapters {
                self.adapters[index].merged_norm = None;
            }
            return Ok(original);
        }
        let dtype = float_dtype(base.dtype());
        let stored = base.clone();
        let mut weight = to_f32(base);
        let order: Vec<usize> = match merge {
            true => adapters.to_vec(),
            false => adapters.iter().rev().copied().collect(),
        };
        for index in order {
            let adapter = &mut self.adapters[index];
            let updated = match merge {
                true => adapter.merge_into(weight),
                false => adapter.unmerge_from(weight, path)?,
            };
            finite_in(&updated, dtype, path, adapter)?;
            weight = updated;
        }
        if merge && self.merged_base.is_none() {
            self.merged_base = Some(stored);
        }
        Ok(weight.cast(dtype))
    }
}

/// [`LoraError::NonFiniteMerge`] unless `merged` (f32) is finite in `dtype`, the dtype the
/// parameter is stored in: a sum finite in f32 can overflow f16.
fn finite_in<const D: usize>(
    merged: &Tensor<D>,
    dtype: burn::tensor::FloatDType,
    path: &str,
    adapter: &Adapter,
) -> Result<(), LoraError> {
    let finite = merged.clone().cast(dtype).is_finite().all();
    match finite.into_scalar::<bool>() {
        true => Ok(()),
        false => Err(LoraError::NonFiniteMerge {
            path: path.to_string(),
            adapter: adapter.name.clone(),
        }),
    }
}
