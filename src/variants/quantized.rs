//! QLoRA: adapters in full precision over a quantized, frozen base.
//!
//! [`quantize_base`] stores the weights of the base's linear layers in one of Burn's QFloat
//! dtypes (8-bit, 4-bit...); biases, norms, embeddings and the adapter factors stay in float.
//! Nothing else changes: [`LoraLinear`](crate::LoraLinear) multiplies by the quantized weight
//! and adds the low-rank path, and gradients reach only the adapters, as in QLoRA (Dettmers et
//! al. 2023). On flex the product goes through [`ops::lora_linear`](crate::ops::lora_linear)
//! (and [`ops::linear`](crate::ops::linear) for base layers without an adapter): the weight is
//! dequantized one cache-sized panel at a time inside the matmul, forward and again in the
//! backward, so no float copy of it is made or kept. Other backends dequantize the whole weight
//! inside Burn's matmul.
//!
//! Merging into a quantized weight is where PEFT users get bitten: folding `s·A·B` into 4-bit
//! weights and rounding again changes the outputs. So merging here always dequantizes, merges
//! in f32 and leaves the weight in f32; [`merge_quantized`] says which weights that happened to,
//! and re-quantizes them only when asked, with the error measured per layer.

use core::fmt;

use burn::module::{Module, ParamGroup, ParamId, Quantizer};
use burn::tensor::Tensor;

use crate::adapter::LayerKind;
use crate::adapter::layout::to_f32;
use crate::model::snapshot::Snapshot;
use crate::model::survey::{Survey, module_path_of};
use crate::{LoraError, LoraModule};

/// Quantize the weights of every linear layer of `model` that `quantizer`'s parameter group
/// selects (all, by default), with its calibration and scheme: QLoRA's frozen base. Biases,
/// norms, embeddings, convolutions and adapter factors keep their float dtype.
///
/// Call it before or after attaching adapters; it never touches them. Which QFloat schemes a
/// device stores depends on its backend: flex stores 8-, 4- and 2-bit integer values one per
/// byte, ndarray 8-bit symmetric values only.
///
/// # Errors
///
/// [`LoraError::AlreadyAdapted`] for a foreign reparameterization (Burn's `apply_lora`), and
/// [`LoraError::NothingToQuantize`] when no linear weight is selected.
pub fn quantize_base<M: Module>(model: M, quantizer: &mut Quantizer) -> Result<M, LoraError> {
    let survey = Survey::of(&model);
    if let Some((path, kind)) = survey.foreign_reparameterization() {
        return Err(LoraError::AlreadyAdapted {
            path: path.clone(),
            kind: kind.clone(),
        });
    }
    let ids: Vec<ParamId> = survey
        .params
        .iter()
        .filter(|site| site.kind() == Some(LayerKind::Linear) && !site.quantized)
        .filter(|site| quantizer.group.matches(&site.id, Some(&site.path)))
        .map(|site| site.id)
        .collect();
    if ids.is_empty() {
        return Err(LoraError::NothingToQuantize);
    }
    let group = core::mem::replace(&mut quantizer.group, ParamGroup::from_ids(ids));
    let model = model.quantize_weights(quantizer);
    quantizer.group = group;
    Ok(model)
}

/// What [`merge_quantized`] did to each quantized weight.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuantizedMergeReport {
    /// One entry per adapted weight that was quantized before the merge.
    pub layers: Vec<QuantizedMerge>,
}

/// One quantized weight that an adapter was merged into.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedMerge {
    /// Module path of the layer.
    pub path: String,
    /// Whether the merged weight was quantized again; otherwise it stays in f32.
    pub requantized: bool,
    /// For a re-quantized weight: the largest `|W_q - W|` over its values, against the f32
    /// merged weight `W`.
    pub max_abs_error: Option<f64>,
    /// For a re-quantized weight: `‖W_q - W‖ / ‖W‖` (Frobenius).
    pub relative_error: Option<f64>,
}

impl QuantizedMergeReport {
    /// The largest relative error of a re-quantized weight, or 0 when none was.
    pub fn max_relative_error(&self) -> f64 {
        self.layers
            .iter()
            .filter_map(|layer| layer.relative_error)
            .fold(0.0, f64::max)
    }
}

impl fmt::Display for QuantizedMergeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "merged into {} quantized weight(s): dequantized, merged in f32",
            self.layers.len()
        )?;
        for layer in &self.layers {
            match (layer.requantized, layer.relative_error, layer.max_abs_error) {
                (true, Some(relative), Some(max)) => writeln!(
                    f,
                    "  {}: re-quantized, relative error {relative:.3e}, max |error| {max:.3e}",
                    layer.path
                )?,
                _ => writeln!(f, "  {}: left in f32", layer.path)?,
            }
        }
        Ok(())
    }
}

/// [`LoraModule::merge_lora`] for a model with a quantized base, saying what happened to the
/// quantized weights.
///
/// Every adapted quantized weight is dequantized, merged in f32 and left in f32, so the merged
/// model computes exactly what the adapters did. With `requantize`, those weights are quantized
/// again with its calibration and scheme, and the report gives the error this rounding
/// introduced, per layer: re-quantizing trades the merge's exactness for memory.
///
/// # Errors
///
/// Everything [`LoraModule::merge_lora`] refuses.
pub fn merge_quantized<M: LoraModule>(
    model: &M,
    requantize: Option<&mut Quantizer>,
) -> Result<(M, QuantizedMergeReport), LoraError> {
    let before = Snapshot::take(model)?;
    let quantized: Vec<(String, ParamId)> = before
        .states
        .iter()
        .filter(|(_, state)| state.contributing().next().is_some())
        .filter_map(|(path, _)| {
            let site = before
                .survey
                .params
                .iter()
                .find(|site| &site.path == path)?;
            site.quantized.then(|| (path.clone(), site.id))
        })
        .collect();
    let merged = model.merge_lora()?;
    let mut report = QuantizedMergeReport::default();
    let Some(quantizer) = requantize else {
        report.layers = quantized
            .iter()
            .map(|(path, _)| QuantizedMerge {
                path: module_path_of(path).to_string(),
                requantized: false,
                max_abs_error: None,
                relative_error: None,
            })
            .collect();
        return Ok((merged, report));
    };
    let paths: Vec<String> = quantized.iter().map(|(path, _)| path.clone()).collect();
    let exact = Snapshot::take(&merged)?.bases(&paths);
    let ids: Vec<ParamId> = quantized.iter().map(|(_, id)| *id).collect();
    let group = core::mem::replace(&mut quantizer.group, ParamGroup::from_ids(ids));
    // The merged model carries its adapters, whose factors the quantizer must not touch: the
    // group holds the base weights' ids only.
    let requantized = merged.quantize_weights(quantizer);
    quantizer.group = group;
    let rounded = Snapshot::take(&requantized)?.bases(&paths);
    for path in &paths {
        let (max_abs_error, relative_error) = rounding_error(&exact[path], &rounded[path]);
        report.layers.push(QuantizedMerge {
            path: module_path_of(path).to_string(),
            requantized: true,
            max_abs_error: Some(max_abs_error),
            relative_error: Some(relative_error),
        });
    }
    Ok((requantized, report))
}

/// `(max |q - w|, ‖q - w‖ / ‖w‖)`, computed in f32.
fn rounding_error(exact: &Tensor<2>, rounded: &Tensor<2>) -> (f64, f64) {
    let exact = to_f32(exact.clone());
    let difference = to_f32(rounded.clone()) - exact.clone();
    let max = difference.clone().abs().max().into_scalar::<f64>();
    let norm = |t: Tensor<2>| t.powi_scalar(2).sum().into_scalar::<f64>().sqrt();
    let reference = norm(exact);
    let relative = match reference > 0.0 {
        true => norm(difference) / reference,
        false => 0.0,
    };
    (max, relative)
}
