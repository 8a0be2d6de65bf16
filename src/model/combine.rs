//! Weighted combinations of adapters into a new adapter, PEFT's `add_weighted_adapter`.
//!
//! For one weight, with adapters `i` of scale `sᵢ` and user weights `wᵢ`, the exact combined
//! update is `ΔW = Σ cᵢ·Aᵢ·Bᵢ` with `cᵢ = wᵢ·sᵢ`. Writing `U = [c₁A₁ | … | cₖAₖ]` and
//! `V = [B₁; …; Bₖ]` gives `ΔW = U·V`, of rank at most `R = Σ rᵢ`: every combination works on
//! these thin factors and never forms a `[d_in, d_out]` matrix.

use burn::tensor::Tensor;
use faer::Mat;

use crate::LoraError;
use crate::adapter::layout::{float_dtype, to_f32};
use crate::adapter::linalg;
use crate::adapter::{Adapter, LoraState};

/// How [`add_weighted_adapter`](crate::LoraModule::add_weighted_adapter) combines adapters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Combination {
    /// PEFT's `linear`: `A = Σ ±√|cᵢ|·Aᵢ`, `B = Σ √|cᵢ|·Bᵢ`. Every source must have the same
    /// rank, which the result keeps. Exact for one adapter; with several, the cross terms
    /// `Aᵢ·Bⱼ` make it an approximation, whose error the report gives.
    Linear,
    /// PEFT's `cat`: `A = [c₁A₁ | … | cₖAₖ]`, `B = [B₁; …; Bₖ]`. The ranks add up and the result
    /// is exact.
    Cat,
    /// PEFT's `svd`: the exact `ΔW`, truncated to `rank` by its singular value decomposition,
    /// the best rank-`rank` approximation. The report gives the truncation error.
    Svd {
        /// The rank of the new adapter.
        rank: usize,
    },
}

/// What one layer's combination gave.
#[derive(Debug, Clone, PartialEq)]
pub struct CombinedLayer {
    /// Module path of the layer.
    pub path: String,
    /// The sources present on this layer.
    pub sources: Vec<String>,
    /// Rank of the new adapter.
    pub rank: usize,
    /// `‖ΔW_new − Σ cᵢ·ΔWᵢ‖_F / ‖Σ cᵢ·ΔWᵢ‖_F`, exact up to f64 rounding (about 1e-7).
    pub relative_error: f64,
}

/// The outcome of [`add_weighted_adapter`](crate::LoraModule::add_weighted_adapter).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CombineReport {
    /// One entry per layer that holds at least one source.
    pub layers: Vec<CombinedLayer>,
}

impl CombineReport {
    /// The largest relative error over the layers.
    pub fn max_relative_error(&self) -> f64 {
        self.layers
            .iter()
            .map(|layer| layer.relative_error)
            .fold(0.0, f64::max)
    }
}

/// The combined adapter for one weight's `state`, or `None` when it holds none of the sources.
/// The new adapter has scale 1 (`alpha = rank`, no rsLoRA), inactive and frozen.
pub(crate) fn combine(
    path: &str,
    state: &LoraState,
    sources: &[(&str, f64)],
    name: &str,
    combination: Combination,
) -> Result<Option<(Adapter, CombinedLayer)>, LoraError> {
    let present: Vec<(&Adapter, f64)> = sources
        .iter()
        .filter_map(|(source, weight)| {
            state
                .adapter(source)
                .map(|adapter| (adapter, weight * adapter.scale))
        })
        .collect();
    let Some(&(first, _)) = present.first() else {
        return Ok(None);
    };
    let factors: Vec<(Mat<f64>, Mat<f64>, f64)> = present
        .iter()
        .map(|(adapter, coefficient)| {
            (
                linalg::from_tensor(to_f32(adapter.lora_a.val())),
                linalg::from_tensor(to_f32(adapter.lora_b.val())),
                *coefficient,
            )
        })
        .collect();
    let (exact_a, exact_b) = linalg::exact_factors(&factors);

    let (lora_a, lora_b) = match combination {
        Combination::Linear => {
            let ranks: Vec<(String, usize)> = present
                .iter()
                .map(|(adapter, _)| (adapter.name.clone(), adapter.rank()))
                .collect();
            if ranks.iter().any(|(_, rank)| *rank != ranks[0].1) {
                return Err(LoraError::IncompatibleRanks {
                    path: path.to_string(),
                    ranks,
                });
            }
            linalg::linear_factors(&factors)
        }
        Combination::Cat => (exact_a.clone(), exact_b.clone()),
        Combination::Svd { rank } => {
            let (d_in, d_out) = (exact_a.nrows(), exact_b.ncols());
            if rank == 0 {
                return Err(LoraError::ZeroRank);
            }
            if rank > d_in.min(d_out) {
                return Err(LoraError::rank_too_large(path, rank, d_in, d_out));
            }
            linalg::truncated_factors(exact_a.as_ref(), exact_b.as_ref(), rank)
        }
    };
    let relative_error = linalg::relative_product_error(
        lora_a.as_ref(),
        lora_b.as_ref(),
        exact_a.as_ref(),
        exact_b.as_ref(),
    );

    let device = first.lora_a.lazy_device();
    let dtype = float_dtype(first.lora_a.val().dtype());
    let rank = lora_a.ncols();
    let (lora_a, lora_b) = (
        linalg::to_tensor(lora_a.as_ref(), &device).cast(dtype),
        linalg::to_tensor(lora_b.as_ref(), &device).cast(dtype),
    );
    // Large weights can overflow the factors' dtype (f16 past 65504).
    let finite = |t: &Tensor<2>| t.clone().is_finite().all().into_scalar::<bool>();
    if !finite(&lora_a) || !finite(&lora_b) {
        return Err(LoraError::NonFiniteCombination {
            path: path.to_string(),
            adapter: name.to_string(),
        });
    }
    let adapter = Adapter::new(
        name,
        lora_a,
        lora_b,
        1.0,
        rank as f64,
        false,
        first.dropout.prob,
    )
    .with_trainable(false);
    let layer = CombinedLayer {
        path: path.to_string(),
        sources: present.iter().map(|(a, _)| a.name.clone()).collect(),
        rank,
        relative_error,
    };
    Ok(Some((adapter, layer)))
}
