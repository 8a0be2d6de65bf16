//! Weighted combinations of adapters into a new adapter, PEFT's `add_weighted_adapter`.
//!
//! For one weight, with adapters `i` of scale `sᵢ` and user weights `wᵢ`, the exact combined
//! update is `ΔW = Σ cᵢ·Aᵢ·Bᵢ` with `cᵢ = wᵢ·sᵢ`. Writing `U = [c₁A₁ | … | cₖAₖ]` and
//! `V = [B₁; …; Bₖ]` gives `ΔW = U·V`, of rank at most `R = Σ rᵢ`: every combination works on
//! these thin factors and never forms a `[d_in, d_out]` matrix.

use burn::module::Param;

use crate::apply::factor_dtype;
use crate::linalg::Matrix;
use crate::{LoraAdapter, LoraError, LoraState};

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
) -> Result<Option<(LoraAdapter, CombinedLayer)>, LoraError> {
    let present: Vec<(&LoraAdapter, f64)> = sources
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
    let factors: Vec<(Matrix, Matrix, f64)> = present
        .iter()
        .map(|(adapter, coefficient)| {
            (
                Matrix::from_tensor(adapter.lora_a.val()),
                Matrix::from_tensor(adapter.lora_b.val()),
                *coefficient,
            )
        })
        .collect();
    let (exact_a, exact_b) = exact_factors(&factors);

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
            linear_factors(&factors)
        }
        Combination::Cat => (exact_a.clone(), exact_b.clone()),
        Combination::Svd { rank } => {
            if rank == 0 {
                return Err(LoraError::ZeroRank);
            }
            truncated_factors(&exact_a, &exact_b, rank)
        }
    };

    let exact_norm = exact_a.product_norm_squared(&exact_b);
    let difference = lora_a
        .hcat(&exact_a.scaled(-1.0))
        .product_norm_squared(&lora_b.vcat(&exact_b));
    let relative_error = match exact_norm > 0.0 {
        true => (difference / exact_norm).sqrt(),
        false => difference.sqrt(),
    };

    let device = first.lora_a.lazy_device();
    let dtype = factor_dtype(first.lora_a.val().dtype());
    let rank = lora_a.cols;
    let adapter = LoraAdapter {
        lora_a: Param::from_tensor(lora_a.to_tensor(&device).cast(dtype)),
        lora_b: Param::from_tensor(lora_b.to_tensor(&device).cast(dtype)),
        magnitude: None,
        scale: 1.0,
        alpha: rank as f64,
        use_rslora: false,
        dropout: first.dropout.clone(),
        name: name.to_string(),
        active: false,
        trainable: false,
        merged: false,
        merged_norm: None,
        residual_init: None,
    }
    .with_trainable(false);
    let layer = CombinedLayer {
        path: path.to_string(),
        sources: present.iter().map(|(a, _)| a.name.clone()).collect(),
        rank,
        relative_error,
    };
    Ok(Some((adapter, layer)))
}

/// `U = [c₁A₁ | … | cₖAₖ]`, `V = [B₁; …; Bₖ]`, so that `U·V = Σ cᵢ·Aᵢ·Bᵢ` exactly.
fn exact_factors(factors: &[(Matrix, Matrix, f64)]) -> (Matrix, Matrix) {
    let (a0, b0, c0) = &factors[0];
    factors[1..].iter().fold(
        (a0.scaled(*c0), b0.clone()),
        |(u, v), (a, b, coefficient)| (u.hcat(&a.scaled(*coefficient)), v.vcat(b)),
    )
}

/// PEFT's linear combination, with the coefficient split evenly between `A` and `B` and its
/// sign kept on `A`.
fn linear_factors(factors: &[(Matrix, Matrix, f64)]) -> (Matrix, Matrix) {
    let (a0, b0, _) = &factors[0];
    let start = (
        Matrix::zeros(a0.rows, a0.cols),
        Matrix::zeros(b0.rows, b0.cols),
    );
    factors.iter().fold(start, |(sum_a, sum_b), (a, b, c)| {
        let root = c.abs().sqrt();
        (
            sum_a.add(&a.scaled(c.signum() * root)),
            sum_b.add(&b.scaled(root)),
        )
    })
}

/// The best rank-`rank` factors of `U·V`: QR of both thin factors, SVD of the small core
/// `R_U·R_Vᵀ`, the top singular triplets split as `√σ` on each side. Padded with zeros when
/// `U·V` has a lower rank than asked.
fn truncated_factors(u: &Matrix, v: &Matrix, rank: usize) -> (Matrix, Matrix) {
    let (q_u, r_u) = u.qr();
    let (q_v, r_v) = v.transpose().qr();
    let core = r_u.matmul(&r_v.transpose());
    let (left, sigma, right) = core.svd();
    let mut a = Matrix::zeros(u.rows, rank);
    let mut b = Matrix::zeros(rank, v.cols);
    let left = q_u.matmul(&left); // [d_in, k]
    let right = q_v.matmul(&right); // [d_out, k]
    for (k, &value) in sigma.iter().enumerate().take(rank) {
        let root = value.sqrt();
        for r in 0..a.rows {
            a.set(r, k, left.get(r, k) * root);
        }
        for c in 0..b.cols {
            b.set(k, c, right.get(c, k) * root);
        }
    }
    (a, b)
}
