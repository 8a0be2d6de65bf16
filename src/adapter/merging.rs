//! PEFT's merge rules for combining adapters entry by entry: magnitude pruning, random pruning
//! with rescaling (DARE), and TIES's sign election with its mean over the agreeing sources. They
//! act on same-shape matrices in f64 (factors, or whole `ΔW`s), whatever their layout: every
//! rule treats a matrix as a flat set of entries.

use faer::Mat;

/// How TIES elects the sign of each entry (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the sources' pruned entries (PEFT's `"total"`).
    #[default]
    Total,
    /// The sign that more sources' pruned entries hold (PEFT's `"frequency"`).
    Frequency,
}

/// How each source is pruned before the merge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pruning {
    /// Keep every entry.
    Keep,
    /// Keep the `⌊density·n⌋` entries of largest magnitude, zero the rest.
    Magnitude(f64),
    /// DARE: keep each entry with probability `density`, divided by `density`; zero the rest.
    Random(f64),
}

/// SplitMix64: DARE's masks, the same on every platform for one seed.
pub(crate) struct MaskRng(u64);

impl MaskRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, 53 bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `matrix` pruned as `pruning` says. A density of 1 or more keeps everything (no rescaling).
pub(crate) fn prune(matrix: &Mat<f64>, pruning: Pruning, rng: &mut MaskRng) -> Mat<f64> {
    match pruning {
        Pruning::Keep => matrix.clone(),
        Pruning::Magnitude(density) | Pruning::Random(density) if density >= 1.0 => matrix.clone(),
        Pruning::Magnitude(density) => {
            let (rows, cols) = matrix.shape();
            let count = rows * cols;
            let keep = (density * count as f64) as usize;
            // Entries by decreasing magnitude; equal magnitudes by position.
            let mut order: Vec<(usize, usize)> = (0..cols)
                .flat_map(|j| (0..rows).map(move |i| (i, j)))
                .collect();
            order.sort_by(|&a, &b| matrix[b].abs().total_cmp(&matrix[a].abs()));
            let mut pruned = Mat::<f64>::zeros(rows, cols);
            for &(i, j) in &order[..keep.min(count)] {
                pruned[(i, j)] = matrix[(i, j)];
            }
            pruned
        }
        Pruning::Random(density) => {
            let (rows, cols) = matrix.shape();
            let mut pruned = Mat::<f64>::zeros(rows, cols);
            for j in 0..cols {
                for i in 0..rows {
                    if rng.uniform() < density {
                        pruned[(i, j)] = matrix[(i, j)] / density;
                    }
                }
            }
            pruned
        }
    }
}

/// `Σ wᵢ·pᵢ` of the pruned sources `pᵢ`, or with `election`, TIES's disjoint merge: each
/// entry's sign is elected over the unweighted `pᵢ` (a zero total elects `+`), and the entry is
/// `Σ wᵢ·pᵢ` over the sources whose entry has that sign, divided by how many they are (at
/// least 1). Pruned (zero) entries never agree.
///
/// # Panics
///
/// When the matrices differ in shape, or `weights` in length from `sources`.
pub(crate) fn merge(
    sources: &[Mat<f64>],
    weights: &[f64],
    pruning: Pruning,
    election: Option<MajoritySign>,
    rng: &mut MaskRng,
) -> Mat<f64> {
    assert_eq!(sources.len(), weights.len(), "one weight per source");
    let Some(first) = sources.first() else {
        return Mat::zeros(0, 0);
    };
    let (rows, cols) = first.shape();
    assert!(
        sources.iter().all(|s| s.shape() == (rows, cols)),
        "merged matrices have one shape"
    );
    let pruned: Vec<Mat<f64>> = sources.iter().map(|s| prune(s, pruning, rng)).collect();
    Mat::from_fn(rows, cols, |i, j| {
        let entries = pruned.iter().map(|p| p[(i, j)]).zip(weights);
        let Some(method) = election else {
            return entries.map(|(value, weight)| weight * value).sum();
        };
        let vote: f64 = match method {
            MajoritySign::Total => pruned.iter().map(|p| p[(i, j)]).sum(),
            MajoritySign::Frequency => pruned.iter().map(|p| sign(p[(i, j)])).sum(),
        };
        let majority = if vote >= 0.0 { 1.0 } else { -1.0 };
        let (sum, agreeing) = entries
            .filter(|(value, _)| sign(*value) == majority)
            .fold((0.0, 0usize), |(sum, n), (value, weight)| {
                (sum + weight * value, n + 1)
            });
        sum / agreeing.max(1) as f64
    })
}

/// `-1`, `0` or `1`.
fn sign(value: f64) -> f64 {
    match value {
        v if v > 0.0 => 1.0,
        v if v < 0.0 => -1.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, values: &[f64]) -> Mat<f64> {
        Mat::from_fn(rows, cols, |i, j| values[i * cols + j])
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest_entries() {
        let m = matrix(2, 3, &[0.1, -0.9, 0.3, -0.2, 0.5, 0.05]);
        let mut rng = MaskRng::new(0);
        // ⌊0.5·6⌋ = 3 kept: -0.9, 0.5, 0.3.
        let pruned = prune(&m, Pruning::Magnitude(0.5), &mut rng);
        assert_eq!(pruned, matrix(2, 3, &[0.0, -0.9, 0.3, 0.0, 0.5, 0.0]));
        // ⌊0.3·6⌋ = 1; density 0 prunes everything; 1 keeps everything.
        let one = prune(&m, Pruning::Magnitude(0.3), &mut rng);
        assert_eq!(one, matrix(2, 3, &[0.0, -0.9, 0.0, 0.0, 0.0, 0.0]));
        assert_eq!(
            prune(&m, Pruning::Magnitude(0.0), &mut rng),
            Mat::<f64>::zeros(2, 3)
        );
        assert_eq!(prune(&m, Pruning::Magnitude(1.0), &mut rng), m);
    }

    #[test]
    fn without_pruning_or_election_it_is_the_weighted_sum() {
        let a = matrix(2, 2, &[1.0, -2.0, 0.5, 3.0]);
        let b = matrix(2, 2, &[-1.0, 4.0, 2.0, 0.0]);
        let merged = merge(
            &[a, b],
            &[0.5, -2.0],
            Pruning::Keep,
            None,
            &mut MaskRng::new(0),
        );
        assert_eq!(merged, matrix(2, 2, &[2.5, -9.0, -3.75, 1.5]));
    }

    #[test]
    fn ties_elects_signs_and_averages_the_agreeing_sources() {
        let a = matrix(1, 3, &[1.0, 2.0, -1.0]);
        let b = matrix(1, 3, &[-3.0, 1.0, 0.0]);
        let mut rng = MaskRng::new(0);
        let merged = merge(
            &[a.clone(), b.clone()],
            &[1.0, 0.5],
            Pruning::Keep,
            Some(MajoritySign::Total),
            &mut rng,
        );
        // Entry 0: total -2 elects −, only b agrees: 0.5·(-3) / 1. Entry 1: both +, mean of
        // 1·2 and 0.5·1. Entry 2: total -1 elects −, a alone (b's 0 never counts).
        assert_eq!(merged, matrix(1, 3, &[-1.5, 1.25, -1.0]));
        // By frequency entry 0 ties (one + and one −) and a zero vote elects +: a alone.
        let frequency = merge(
            &[a, b],
            &[1.0, 0.5],
            Pruning::Keep,
            Some(MajoritySign::Frequency),
            &mut rng,
        );
        assert_eq!(frequency, matrix(1, 3, &[1.0, 1.25, -1.0]));
    }

    #[test]
    fn dare_keeps_a_density_share_rescaled_and_is_unbiased() {
        let n = 200;
        let m = Mat::from_fn(n, n, |i, j| 1.0 + ((i * n + j) % 7) as f64);
        let density = 0.3;
        let mut rng = MaskRng::new(42);
        let pruned = prune(&m, Pruning::Random(density), &mut rng);
        let mut kept = 0usize;
        let (mut sum, mut expected) = (0.0, 0.0);
        for j in 0..n {
            for i in 0..n {
                let v = pruned[(i, j)];
                if v != 0.0 {
                    kept += 1;
                    assert!(
                        (v - m[(i, j)] / density).abs() < 1e-12,
                        "kept entries are rescaled"
                    );
                }
                sum += v;
                expected += m[(i, j)];
            }
        }
        // 40,000 Bernoulli(0.3) draws: the kept share is within 4.4 standard deviations
        // (σ = √(p(1-p)/n) ≈ 0.0023) of the density, and the sum within 2% of the original's.
        let share = kept as f64 / (n * n) as f64;
        assert!((share - density).abs() < 0.01, "kept share {share}");
        assert!(
            (sum / expected - 1.0).abs() < 0.02,
            "sum ratio {}",
            sum / expected
        );
        // The same seed draws the same mask; another seed another one.
        assert_eq!(
            prune(&m, Pruning::Random(density), &mut MaskRng::new(42)),
            pruned
        );
        assert_ne!(
            prune(&m, Pruning::Random(density), &mut MaskRng::new(43)),
            pruned
        );
    }
}
