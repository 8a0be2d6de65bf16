//! Weighted combinations of adapters into a new adapter, PEFT's `add_weighted_adapter`.
//!
//! For one weight, with adapters `i` of scale `sᵢ` and user weights `wᵢ`, the exact combined
//! update is `ΔW = Σ cᵢ·Aᵢ·Bᵢ` with `cᵢ = wᵢ·sᵢ`. Writing `U = [c₁A₁ | … | cₖAₖ]` and
//! `V = [B₁; …; Bₖ]` gives `ΔW = U·V`, of rank at most `R = Σ rᵢ`: every combination works on
//! these thin factors and never forms a `[d_in, d_out]` matrix.
//!
//! PEFT's pruning combinations (TIES, DARE, magnitude pruning) work entry by entry: on the
//! factors `Aᵢ` and `Bᵢ` separately (with `linear`'s weights), or, in their `_svd` forms, on the
//! whole `ΔWᵢ`, which are then formed, merged and truncated back to a rank.

use burn::tensor::Tensor;
use faer::Mat;

use crate::LoraError;
use crate::adapter::layout::{float_dtype, to_f32};
use crate::adapter::linalg;
use crate::adapter::merging::{self, MaskRng, Pruning};
use crate::adapter::{Adapter, LoraState, MajoritySign};

/// How [`add_weighted_adapter`](crate::LoraModule::add_weighted_adapter) combines adapters:
/// PEFT's `combination_type`, with its arguments.
///
/// With adapters `i` of scale `sᵢ`, user weights `wᵢ` and `cᵢ = wᵢ·sᵢ`:
/// - `Linear`, `Ties`, `MagnitudePrune`, `DareLinear` and `DareTies` combine the factors:
///   `A = rule(Aᵢ; sign(cᵢ)·√|cᵢ|)` and `B = rule(Bᵢ; √|cᵢ|)`, with sources of one rank;
/// - `Cat` stacks the factors (exact);
/// - `Svd` and the `…Svd` forms apply their rule to the whole updates `sᵢ·Aᵢ·Bᵢ` with the
///   weights `wᵢ`, then keep the best rank-`rank` approximation.
///
/// The rules (PEFT's `merge_utils`): magnitude pruning keeps the `⌊density·n⌋` entries of
/// largest magnitude of each source; DARE keeps each entry with probability `density` and
/// divides it by `density`; TIES elects each entry's sign over the pruned sources and averages
/// the weighted entries that agree. `density` lies in `[0, 1]` (`(0, 1]` for DARE); 1 prunes
/// nothing. DARE draws its masks from `seed` (and each layer's path), so a seed reproduces a
/// combination exactly.
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
    /// PEFT's `ties` on the factors: magnitude pruning, sign election, mean of the agreeing.
    Ties {
        /// The share of each source's entries kept.
        density: f64,
        /// How each entry's sign is elected.
        majority_sign: MajoritySign,
    },
    /// PEFT's `ties_svd`: TIES on the whole updates, truncated to `rank`.
    TiesSvd {
        /// The rank of the new adapter.
        rank: usize,
        /// The share of each source's entries kept.
        density: f64,
        /// How each entry's sign is elected.
        majority_sign: MajoritySign,
    },
    /// PEFT's `magnitude_prune` on the factors: magnitude pruning, then the weighted sum.
    MagnitudePrune {
        /// The share of each source's entries kept.
        density: f64,
    },
    /// PEFT's `magnitude_prune_svd`: magnitude pruning of the whole updates, weighted sum,
    /// truncated to `rank`.
    MagnitudePruneSvd {
        /// The rank of the new adapter.
        rank: usize,
        /// The share of each source's entries kept.
        density: f64,
    },
    /// PEFT's `dare_linear` on the factors: random pruning with rescaling, weighted sum.
    DareLinear {
        /// The probability that an entry is kept.
        density: f64,
        /// The seed of the random masks.
        seed: u64,
    },
    /// PEFT's `dare_linear_svd`: DARE on the whole updates, weighted sum, truncated to `rank`.
    DareLinearSvd {
        /// The rank of the new adapter.
        rank: usize,
        /// The probability that an entry is kept.
        density: f64,
        /// The seed of the random masks.
        seed: u64,
    },
    /// PEFT's `dare_ties` on the factors: random pruning with rescaling, then TIES's election
    /// and mean.
    DareTies {
        /// The probability that an entry is kept.
        density: f64,
        /// How each entry's sign is elected.
        majority_sign: MajoritySign,
        /// The seed of the random masks.
        seed: u64,
    },
    /// PEFT's `dare_ties_svd`: `DareTies` on the whole updates, truncated to `rank`.
    DareTiesSvd {
        /// The rank of the new adapter.
        rank: usize,
        /// The probability that an entry is kept.
        density: f64,
        /// How each entry's sign is elected.
        majority_sign: MajoritySign,
        /// The seed of the random masks.
        seed: u64,
    },
}

/// A combination taken apart: the rank it truncates to (the `svd` forms), how it prunes,
/// whether it elects signs, and DARE's seed.
struct Rule {
    svd_rank: Option<usize>,
    pruning: Pruning,
    election: Option<MajoritySign>,
    seed: u64,
}

impl Combination {
    /// PEFT's name for it (`combination_type`).
    pub fn peft_name(&self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cat => "cat",
            Self::Svd { .. } => "svd",
            Self::Ties { .. } => "ties",
            Self::TiesSvd { .. } => "ties_svd",
            Self::MagnitudePrune { .. } => "magnitude_prune",
            Self::MagnitudePruneSvd { .. } => "magnitude_prune_svd",
            Self::DareLinear { .. } => "dare_linear",
            Self::DareLinearSvd { .. } => "dare_linear_svd",
            Self::DareTies { .. } => "dare_ties",
            Self::DareTiesSvd { .. } => "dare_ties_svd",
        }
    }

    /// The rule of an entry-wise combination (`None` for `Cat` and `Svd`, which work on the
    /// thin factors of the exact sum).
    fn rule(&self) -> Option<Rule> {
        let rule = |svd_rank, pruning, election, seed| {
            Some(Rule {
                svd_rank,
                pruning,
                election,
                seed,
            })
        };
        match *self {
            Self::Cat | Self::Svd { .. } => None,
            Self::Linear => rule(None, Pruning::Keep, None, 0),
            Self::Ties {
                density,
                majority_sign,
            } => rule(None, Pruning::Magnitude(density), Some(majority_sign), 0),
            Self::TiesSvd {
                rank,
                density,
                majority_sign,
            } => rule(
                Some(rank),
                Pruning::Magnitude(density),
                Some(majority_sign),
                0,
            ),
            Self::MagnitudePrune { density } => rule(None, Pruning::Magnitude(density), None, 0),
            Self::MagnitudePruneSvd { rank, density } => {
                rule(Some(rank), Pruning::Magnitude(density), None, 0)
            }
            Self::DareLinear { density, seed } => rule(None, Pruning::Random(density), None, seed),
            Self::DareLinearSvd {
                rank,
                density,
                seed,
            } => rule(Some(rank), Pruning::Random(density), None, seed),
            Self::DareTies {
                density,
                majority_sign,
                seed,
            } => rule(None, Pruning::Random(density), Some(majority_sign), seed),
            Self::DareTiesSvd {
                rank,
                density,
                majority_sign,
                seed,
            } => rule(
                Some(rank),
                Pruning::Random(density),
                Some(majority_sign),
                seed,
            ),
        }
    }

    /// Checks the arguments that do not depend on a layer: the density, and a nonzero rank.
    ///
    /// # Errors
    ///
    /// [`LoraError::InvalidDensity`] for a density outside `[0, 1]` (DARE: `(0, 1]`), and
    /// [`LoraError::ZeroRank`] for a truncation to rank 0.
    pub fn validate(&self) -> Result<(), LoraError> {
        let rule = self.rule();
        let svd_rank = match self {
            Self::Svd { rank } => Some(*rank),
            _ => rule.as_ref().and_then(|rule| rule.svd_rank),
        };
        if svd_rank == Some(0) {
            return Err(LoraError::ZeroRank);
        }
        let (density, valid) = match rule.map(|rule| rule.pruning) {
            Some(Pruning::Magnitude(density)) => (density, (0.0..=1.0).contains(&density)),
            Some(Pruning::Random(density)) => (density, density > 0.0 && density <= 1.0),
            None | Some(Pruning::Keep) => return Ok(()),
        };
        match valid {
            true => Ok(()),
            false => Err(LoraError::InvalidDensity {
                combination: self.peft_name(),
                density,
            }),
        }
    }
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
/// The new adapter has scale 1 (`alpha = rank`, no rsLoRA), inactive and frozen. The caller has
/// checked `combination` ([`Combination::validate`]).
pub(crate) fn combine(
    path: &str,
    state: &LoraState,
    sources: &[(&str, f64)],
    name: &str,
    combination: Combination,
) -> Result<Option<(Adapter, CombinedLayer)>, LoraError> {
    // (adapter, user weight), for the sources this layer holds.
    let present: Vec<(&Adapter, f64)> = sources
        .iter()
        .filter_map(|(source, weight)| state.adapter(source).map(|adapter| (adapter, *weight)))
        .collect();
    let Some(&(first, _)) = present.first() else {
        return Ok(None);
    };
    let factors: Vec<(Mat<f64>, Mat<f64>, f64)> = present
        .iter()
        .map(|(adapter, weight)| {
            (
                linalg::from_tensor(to_f32(adapter.lora_a.val())),
                linalg::from_tensor(to_f32(adapter.lora_b.val())),
                weight * adapter.scale,
            )
        })
        .collect();
    // A source that diverged in training (NaN or Inf) makes every combination non-finite, and
    // the SVD forms would not converge on it.
    let finite =
        |m: &Mat<f64>| (0..m.ncols()).all(|j| (0..m.nrows()).all(|i| m[(i, j)].is_finite()));
    if factors
        .iter()
        .any(|(a, b, c)| !c.is_finite() || !finite(a) || !finite(b))
    {
        return Err(LoraError::NonFiniteCombination {
            path: path.to_string(),
            adapter: name.to_string(),
        });
    }
    let (exact_a, exact_b) = linalg::exact_factors(&factors);
    let (d_in, d_out) = (exact_a.nrows(), exact_b.ncols());
    let check_rank = |rank: usize| match rank > d_in.min(d_out) {
        true => Err(LoraError::rank_too_large(path, rank, d_in, d_out)),
        false => Ok(()),
    };
    let check_equal_ranks = || {
        let ranks: Vec<(String, usize)> = present
            .iter()
            .map(|(adapter, _)| (adapter.name.clone(), adapter.rank()))
            .collect();
        match ranks.iter().any(|(_, rank)| *rank != ranks[0].1) {
            true => Err(LoraError::IncompatibleRanks {
                path: path.to_string(),
                ranks,
            }),
            false => Ok(()),
        }
    };

    let (lora_a, lora_b) = match (combination, combination.rule()) {
        (Combination::Cat, _) => (exact_a.clone(), exact_b.clone()),
        (Combination::Svd { rank }, _) => {
            check_rank(rank)?;
            linalg::truncated_factors(exact_a.as_ref(), exact_b.as_ref(), rank)
        }
        (_, Some(rule)) => {
            // Each layer draws its own masks: the seed mixed with the layer's path.
            let mut rng = MaskRng::new(rule.seed ^ path_hash(path));
            match rule.svd_rank {
                None => {
                    check_equal_ranks()?;
                    let a_weights: Vec<f64> = factors
                        .iter()
                        .map(|(_, _, c)| c.signum() * c.abs().sqrt())
                        .collect();
                    let b_weights: Vec<f64> =
                        factors.iter().map(|(_, _, c)| c.abs().sqrt()).collect();
                    let a_sources: Vec<Mat<f64>> = factors.iter().map(|f| f.0.clone()).collect();
                    let b_sources: Vec<Mat<f64>> = factors.iter().map(|f| f.1.clone()).collect();
                    let lora_a = merging::merge(
                        &a_sources,
                        &a_weights,
                        rule.pruning,
                        rule.election,
                        &mut rng,
                    );
                    let lora_b = merging::merge(
                        &b_sources,
                        &b_weights,
                        rule.pruning,
                        rule.election,
                        &mut rng,
                    );
                    (lora_a, lora_b)
                }
                Some(rank) => {
                    check_rank(rank)?;
                    let deltas: Vec<Mat<f64>> = present
                        .iter()
                        .zip(&factors)
                        .map(|((adapter, _), (a, b, _))| {
                            linalg::scaled_product(a.as_ref(), b.as_ref(), adapter.scale)
                        })
                        .collect();
                    let weights: Vec<f64> = present.iter().map(|(_, weight)| *weight).collect();
                    let delta =
                        merging::merge(&deltas, &weights, rule.pruning, rule.election, &mut rng);
                    linalg::truncated_matrix(delta.as_ref(), rank)
                }
            }
        }
        (_, None) => unreachable!("every other combination has a rule"),
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

/// FNV-1a of a layer's path: mixed into DARE's seed, so each layer draws its own masks.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
