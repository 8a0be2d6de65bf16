//! Host linear algebra in f64 for the adapter math that needs a factorization: PiSSA's and
//! OLoRA's inits from a base weight, combining adapters by SVD, and the error of a combination.
//!
//! Matrices are [`faer::Mat<f64>`], a weight `W` seen in the factor layout `[d_in, d_out]`.
//! faer runs in f64, in parallel on all cores (rayon), with cache-blocked Householder QR, a
//! divide-and-conquer thin SVD and blocked GEMM, so that factorizing a whole weight (PiSSA's
//! init) stays practical, and every result is the same on every backend.
//!
//! Everything weight-sized is touched only by GEMMs and one factorization; combinations work on
//! thin factors `U: [d_in, R]`, `V: [R, d_out]` and never form a `[d_in, d_out]` product.

use burn::tensor::{Device, Tensor, TensorData};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::svd::{ComputeSvdVectors, svd, svd_scratch};
use faer::{Accum, Mat, MatRef, Par};

/// A 2-D tensor's values as an f64 matrix, read row-major (the tensor is expected in f32).
pub(crate) fn from_tensor(tensor: Tensor<2>) -> Mat<f64> {
    let [rows, cols] = tensor.dims();
    let values = tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("a tensor converted to f32 holds f32 values");
    Mat::from_fn(rows, cols, |i, j| f64::from(values[i * cols + j]))
}

/// The matrix as an f32 tensor on `device`.
pub(crate) fn to_tensor(matrix: MatRef<'_, f64>, device: &Device) -> Tensor<2> {
    let (rows, cols) = matrix.shape();
    let mut values = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            values.push(matrix[(i, j)] as f32);
        }
    }
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

/// PiSSA's factors of `weight: [d_in, d_out]` from its top-`rank` singular triplets
/// `W ≈ U·diag(σ)·Vᵀ`: `A = U_r·diag(√(σ_r/scale))` (`[d_in, rank]`) and
/// `B = diag(√(σ_r/scale))·V_rᵀ` (`[rank, d_out]`), so `scale·A·B` is the best rank-`rank`
/// approximation of `W`. `scale` must be positive.
///
/// With `sketch: None` the triplets come from faer's exact SVD. With `Some((sketch, niter))` they
/// come from a randomized SVD (Halko, Martinsson and Tropp 2011): the range of `W·sketch`
/// (`sketch: [d_out, k]`, `k ≥ rank`, Gaussian), refined by `niter` power iterations with a thin
/// QR after each half step, then the exact SVD of the small projection `Qᵀ·W` (`[k, d_out]`).
///
/// When `W` has fewer than `rank` directions (numerically nonzero singular values), the
/// remaining columns of `A` and rows of `B` are zero.
///
/// # Panics
///
/// When the sketch does not have `d_out` rows, or the SVD does not converge (non-finite values).
pub(crate) fn pissa_factors(
    weight: MatRef<'_, f64>,
    rank: usize,
    scale: f64,
    sketch: Option<(MatRef<'_, f64>, usize)>,
) -> (Mat<f64>, Mat<f64>) {
    let (d_in, d_out) = weight.shape();
    if rank == 0 || d_in == 0 || d_out == 0 {
        return (Mat::zeros(d_in, rank), Mat::zeros(rank, d_out));
    }
    match sketch {
        None => exact_pissa(weight, rank, scale),
        Some((sketch, niter)) => randomized_pissa(weight, rank, scale, sketch, niter),
    }
}

/// PiSSA's factors from faer's SVD, computing singular vectors on the smaller side only: the
/// other side's `U_r·diag(σ_r)` (or `V_r·diag(σ_r)`) is one thin GEMM, `W·V_r` (or `Wᵀ·U_r`),
/// which keeps `scale·A·B = W·V_r·V_rᵀ` exact to rounding even for small `σ`.
fn exact_pissa(weight: MatRef<'_, f64>, rank: usize, scale: f64) -> (Mat<f64>, Mat<f64>) {
    let (d_in, d_out) = weight.shape();
    let size_hint = d_in.max(d_out);
    if d_in >= d_out {
        // W = U·Σ·Vᵀ: V from the SVD, U_r·Σ_r = W·V_r.
        let (sigma, v) = right_singular_vectors(weight);
        let kept = kept_triplets(&sigma, rank, size_hint);
        let v_r = v.subcols(0, kept);
        let u_sigma = product(weight, v_r);
        let left: Vec<f64> = sigma[..kept]
            .iter()
            .map(|s| 1.0 / (s * scale).sqrt())
            .collect();
        let right: Vec<f64> = sigma[..kept].iter().map(|s| (s / scale).sqrt()).collect();
        assemble(u_sigma.as_ref(), &left, v_r, &right, rank)
    } else {
        // Wᵀ = V·Σ·Uᵀ: U from the SVD of Wᵀ, V_r·Σ_r = Wᵀ·U_r.
        let (sigma, u) = right_singular_vectors(weight.transpose());
        let kept = kept_triplets(&sigma, rank, size_hint);
        let u_r = u.subcols(0, kept);
        let v_sigma = product(weight.transpose(), u_r);
        let left: Vec<f64> = sigma[..kept].iter().map(|s| (s / scale).sqrt()).collect();
        let right: Vec<f64> = sigma[..kept]
            .iter()
            .map(|s| 1.0 / (s * scale).sqrt())
            .collect();
        assemble(u_r, &left, v_sigma.as_ref(), &right, rank)
    }
}

/// PiSSA's factors from a randomized SVD started from `sketch` and refined by `niter` power
/// iterations.
fn randomized_pissa(
    weight: MatRef<'_, f64>,
    rank: usize,
    scale: f64,
    sketch: MatRef<'_, f64>,
    niter: usize,
) -> (Mat<f64>, Mat<f64>) {
    let (d_in, d_out) = weight.shape();
    assert_eq!(
        sketch.nrows(),
        d_out,
        "a randomized SVD's sketch has one row per column of the weight"
    );
    let mut range = thin_qr(product(weight, sketch).as_ref()).0;
    for _ in 0..niter {
        let back = thin_qr(product(weight.transpose(), range.as_ref()).as_ref()).0;
        range = thin_qr(product(weight, back.as_ref()).as_ref()).0;
    }
    if range.ncols() == 0 {
        return (Mat::zeros(d_in, rank), Mat::zeros(rank, d_out));
    }
    // W ≈ Q·(Qᵀ·W), and Qᵀ·W = Ũ·Σ·Vᵀ is small: W ≈ (Q·Ũ)·Σ·Vᵀ.
    let projection = product(range.transpose(), weight);
    let decomposition = projection
        .thin_svd()
        .expect("the SVD of a finite matrix converges");
    let sigma = singular_values(&decomposition);
    let kept = kept_triplets(&sigma, rank, d_in.max(d_out));
    let u = product(range.as_ref(), decomposition.U().subcols(0, kept));
    let roots: Vec<f64> = sigma[..kept].iter().map(|s| (s / scale).sqrt()).collect();
    assemble(
        u.as_ref(),
        &roots,
        decomposition.V().subcols(0, kept),
        &roots,
        rank,
    )
}

/// OLoRA's factors of `weight: [d_in, d_out]`: PyTorch's weight is `Wᵀ = Q·R` (Householder QR,
/// with `R`'s diagonal made nonnegative), `A = R_rᵀ` (`[d_in, rank]`, the first `rank` rows of
/// `R`, transposed) and `B = Q_rᵀ` (`[rank, d_out]`, the first `rank` columns of `Q`,
/// transposed), unscaled as in PEFT's `olora_init`.
///
/// The first `rank` columns of `Q` and rows of `R` depend only on the first `rank` columns of
/// `Wᵀ`, so this costs `O(d_in·d_out·rank)`: a thin QR of that `[d_out, rank]` block gives `Q_r`,
/// then `R_r = Q_rᵀ·Wᵀ`, that is `A = W·Q_r`.
///
/// Returns `Err(max_rank)` when `rank > min(d_in, d_out)`, or when the first `rank` columns of
/// `Wᵀ` are numerically dependent (a diagonal entry of `R` at most
/// `1e-12 · max|W| · max(d_in, d_out)`); `max_rank` is the number of independent leading columns.
pub(crate) fn olora_factors(
    weight: MatRef<'_, f64>,
    rank: usize,
) -> Result<(Mat<f64>, Mat<f64>), usize> {
    let (d_in, d_out) = weight.shape();
    let limit = d_in.min(d_out);
    let checked = rank.min(limit);
    if checked == 0 {
        return match rank {
            0 => Ok((Mat::zeros(d_in, 0), Mat::zeros(0, d_out))),
            _ => Err(0),
        };
    }
    // Wᵀ's first `checked` columns are W's first `checked` rows.
    let (q, r) = thin_qr(weight.subrows(0, checked).transpose());
    let tolerance = 1e-12 * weight.norm_max() * d_in.max(d_out) as f64;
    if let Some(dependent) = (0..checked).find(|&k| r[(k, k)].abs() <= tolerance) {
        return Err(dependent);
    }
    if rank > limit {
        return Err(limit);
    }
    // A = R_rᵀ = W·Q_r; its leading block is R's triangle, taken exactly from the QR.
    let mut a = product(weight, q.as_ref());
    for k in 0..rank {
        for j in 0..rank {
            a[(j, k)] = r[(k, j)];
        }
    }
    Ok((a, q.transpose().to_owned()))
}

/// Thin factors `U = [c₁A₁ | … | cₖAₖ]` (`[d_in, Σr]`) and `V = [B₁; …; Bₖ]` (`[Σr, d_out]`), with
/// `U·V = Σ cᵢ·Aᵢ·Bᵢ` exactly. Empty input gives two `0×0` matrices.
///
/// # Panics
///
/// When the factors' shapes do not chain (`Aᵢ: [d_in, rᵢ]`, `Bᵢ: [rᵢ, d_out]`).
pub(crate) fn exact_factors(factors: &[(Mat<f64>, Mat<f64>, f64)]) -> (Mat<f64>, Mat<f64>) {
    let Some((first_a, first_b, _)) = factors.first() else {
        return (Mat::zeros(0, 0), Mat::zeros(0, 0));
    };
    let (d_in, d_out) = (first_a.nrows(), first_b.ncols());
    let total: usize = factors.iter().map(|(a, _, _)| a.ncols()).sum();
    let mut u = Mat::<f64>::zeros(d_in, total);
    let mut v = Mat::<f64>::zeros(total, d_out);
    let mut offset = 0;
    for (a, b, coefficient) in factors {
        assert!(
            a.nrows() == d_in && b.ncols() == d_out && a.ncols() == b.nrows(),
            "adapter factors of one weight have shapes [d_in, r] and [r, d_out]"
        );
        for k in 0..a.ncols() {
            for i in 0..d_in {
                u[(i, offset + k)] = *coefficient * a[(i, k)];
            }
            for j in 0..d_out {
                v[(offset + k, j)] = b[(k, j)];
            }
        }
        offset += a.ncols();
    }
    (u, v)
}

/// The best rank-`rank` factors `A: [d_in, rank]`, `B: [rank, d_out]` of `U·V` without forming
/// it: thin QRs `U = Q_U·R_U` and `Vᵀ = Q_V·R_V`, the SVD of the small core `R_U·R_Vᵀ = L·Σ·Mᵀ`,
/// then `A = Q_U·L_r·√Σ_r` and `B = √Σ_r·M_rᵀ·Q_Vᵀ`. Zero-padded when `U·V` has a lower rank.
///
/// # Panics
///
/// When `U`'s columns do not match `V`'s rows, or the SVD does not converge (non-finite values).
pub(crate) fn truncated_factors(
    u: MatRef<'_, f64>,
    v: MatRef<'_, f64>,
    rank: usize,
) -> (Mat<f64>, Mat<f64>) {
    assert_eq!(u.ncols(), v.nrows(), "the thin factors U·V chain");
    let (d_in, inner, d_out) = (u.nrows(), u.ncols(), v.ncols());
    if rank == 0 || inner == 0 || d_in == 0 || d_out == 0 {
        return (Mat::zeros(d_in, rank), Mat::zeros(rank, d_out));
    }
    let (q_u, r_u) = thin_qr(u);
    let (q_v, r_v) = thin_qr(v.transpose());
    let core = product(r_u.as_ref(), r_v.transpose());
    let decomposition = core
        .thin_svd()
        .expect("the SVD of a finite matrix converges");
    let sigma = singular_values(&decomposition);
    let kept = kept_triplets(&sigma, rank, d_in.max(d_out).max(inner));
    let left = product(q_u.as_ref(), decomposition.U().subcols(0, kept));
    let right = product(q_v.as_ref(), decomposition.V().subcols(0, kept));
    let roots: Vec<f64> = sigma[..kept].iter().map(|s| s.sqrt()).collect();
    assemble(left.as_ref(), &roots, right.as_ref(), &roots, rank)
}

/// The best rank-`rank` factors `A: [d_in, rank]`, `B: [rank, d_out]` of the matrix `m`, from
/// its thin SVD `m = L·Σ·Mᵀ`: `A = L_r·√Σ_r`, `B = √Σ_r·M_rᵀ`. Zero-padded when `m` has a
/// lower rank.
///
/// # Panics
///
/// When the SVD does not converge (non-finite values).
pub(crate) fn truncated_matrix(m: MatRef<'_, f64>, rank: usize) -> (Mat<f64>, Mat<f64>) {
    let (d_in, d_out) = m.shape();
    if rank == 0 || d_in == 0 || d_out == 0 {
        return (Mat::zeros(d_in, rank), Mat::zeros(rank, d_out));
    }
    let decomposition = m.thin_svd().expect("the SVD of a finite matrix converges");
    let sigma = singular_values(&decomposition);
    let kept = kept_triplets(&sigma, rank, d_in.max(d_out));
    let roots: Vec<f64> = sigma[..kept].iter().map(|s| s.sqrt()).collect();
    assemble(
        decomposition.U().subcols(0, kept),
        &roots,
        decomposition.V().subcols(0, kept),
        &roots,
        rank,
    )
}

/// `c·A·B` as a `[d_in, d_out]` matrix.
pub(crate) fn scaled_product(a: MatRef<'_, f64>, b: MatRef<'_, f64>, c: f64) -> Mat<f64> {
    let mut m = product(a, b);
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            m[(i, j)] *= c;
        }
    }
    m
}

/// `‖U·V − X·Y‖_F / ‖X·Y‖_F` (plain `‖U·V − X·Y‖_F` when `X·Y = 0`), from Gram matrices without
/// forming any `[d_in, d_out]` product: `‖P·Q‖²_F = trace((PᵀP)·(QQᵀ))` with `P = [U | −X]` and
/// `Q = [V; Y]`, and `‖X·Y‖²_F` from the same Grams' corner blocks. Rounding makes it about
/// `1e-8` at best, as a square root of a difference of squares.
///
/// # Panics
///
/// When the shapes do not chain (`U: [d_in, r]`, `V: [r, d_out]`, `X: [d_in, s]`,
/// `Y: [s, d_out]`).
pub(crate) fn relative_product_error(
    u: MatRef<'_, f64>,
    v: MatRef<'_, f64>,
    x: MatRef<'_, f64>,
    y: MatRef<'_, f64>,
) -> f64 {
    assert!(
        u.ncols() == v.nrows()
            && x.ncols() == y.nrows()
            && u.nrows() == x.nrows()
            && v.ncols() == y.ncols(),
        "both products have shape [d_in, d_out]"
    );
    let (d_in, d_out) = (u.nrows(), v.ncols());
    let (first, second) = (u.ncols(), x.ncols());
    let total = first + second;
    let p = Mat::from_fn(d_in, total, |i, j| match j < first {
        true => u[(i, j)],
        false => -x[(i, j - first)],
    });
    let q = Mat::from_fn(total, d_out, |i, j| match i < first {
        true => v[(i, j)],
        false => y[(i - first, j)],
    });
    let gram_p = product(p.transpose(), p.as_ref());
    let gram_q = product(q.as_ref(), q.transpose());
    let trace = |range: core::ops::Range<usize>| {
        let mut sum = 0.0_f64;
        for i in range.clone() {
            for j in range.clone() {
                sum += gram_p[(i, j)] * gram_q[(j, i)];
            }
        }
        sum.max(0.0)
    };
    let difference = trace(0..total);
    let exact = trace(first..total);
    match exact > 0.0 {
        true => (difference / exact).sqrt(),
        false => difference.sqrt(),
    }
}

/// `W − scale·A·B`, the residual base that PiSSA and OLoRA leave, in one GEMM.
///
/// # Panics
///
/// When the shapes do not chain (`W: [d_in, d_out]`, `A: [d_in, r]`, `B: [r, d_out]`).
pub(crate) fn residual(
    weight: MatRef<'_, f64>,
    a: MatRef<'_, f64>,
    b: MatRef<'_, f64>,
    scale: f64,
) -> Mat<f64> {
    assert!(
        a.nrows() == weight.nrows() && b.ncols() == weight.ncols() && a.ncols() == b.nrows(),
        "the factors of W's update have shapes [d_in, r] and [r, d_out]"
    );
    let mut out = weight.to_owned();
    if a.ncols() > 0 && out.nrows() > 0 && out.ncols() > 0 {
        matmul(out.as_mut(), Accum::Add, a, b, -scale, parallelism());
    }
    out
}

/// The parallelism of the GEMMs and the SVD here: every thread of rayon's current pool. faer's
/// own QR and small SVDs use its global setting, which is the same unless changed with
/// `faer::set_global_parallelism`.
fn parallelism() -> Par {
    Par::rayon(0)
}

/// `lhs · rhs`, in parallel.
fn product(lhs: MatRef<'_, f64>, rhs: MatRef<'_, f64>) -> Mat<f64> {
    assert_eq!(lhs.ncols(), rhs.nrows(), "a matrix product's shapes chain");
    let mut out = Mat::<f64>::zeros(lhs.nrows(), rhs.ncols());
    if lhs.ncols() > 0 && out.nrows() > 0 && out.ncols() > 0 {
        matmul(out.as_mut(), Accum::Replace, lhs, rhs, 1.0, parallelism());
    }
    out
}

/// Thin Householder QR `matrix = Q·R`: `Q: [m, min(m, n)]` with orthonormal columns and
/// `R: [min(m, n), n]` upper trapezoidal, its diagonal made nonnegative (so that a matrix of full
/// column rank has one answer, the Gram–Schmidt one).
fn thin_qr(matrix: MatRef<'_, f64>) -> (Mat<f64>, Mat<f64>) {
    let (m, n) = matrix.shape();
    let size = m.min(n);
    if size == 0 {
        return (Mat::zeros(m, 0), Mat::zeros(0, n));
    }
    let decomposition = matrix.qr();
    let mut q = decomposition.compute_thin_Q();
    let mut r = decomposition.thin_R().to_owned();
    for k in 0..size {
        if r[(k, k)] < 0.0 {
            for i in 0..m {
                q[(i, k)] = -q[(i, k)];
            }
            for j in 0..n {
                r[(k, j)] = -r[(k, j)];
            }
        }
    }
    (q, r)
}

/// The singular values of `matrix: [m, n]` with `m ≥ n`, nonincreasing, and its right singular
/// vectors `V: [n, n]`, without computing the left ones (the larger side).
fn right_singular_vectors(matrix: MatRef<'_, f64>) -> (Vec<f64>, Mat<f64>) {
    let (m, n) = matrix.shape();
    debug_assert!(m >= n, "the right singular vectors are the smaller side");
    let size = m.min(n);
    let mut v = Mat::<f64>::zeros(n, size);
    if size == 0 {
        return (Vec::new(), v);
    }
    let mut sigma = Diag::<f64>::zeros(size);
    let par = parallelism();
    let mut buffer = MemBuffer::new(svd_scratch::<f64>(
        m,
        n,
        ComputeSvdVectors::No,
        ComputeSvdVectors::Thin,
        par,
        Default::default(),
    ));
    svd(
        matrix,
        sigma.as_mut(),
        None,
        Some(v.as_mut()),
        par,
        MemStack::new(&mut buffer),
        Default::default(),
    )
    .expect("the SVD of a finite matrix converges");
    let values = (0..size).map(|k| sigma[k]).collect();
    (values, v)
}

/// The singular values of a computed SVD, nonincreasing.
fn singular_values(decomposition: &faer::linalg::solvers::Svd<f64>) -> Vec<f64> {
    let sigma = decomposition.S();
    (0..sigma.dim()).map(|k| sigma[k]).collect()
}

/// How many of the leading (nonincreasing) singular values to keep for `rank`: at most `rank`,
/// and only those above rounding, `σ₀·ε·size_hint` (`size_hint`: the largest dimension involved).
fn kept_triplets(sigma: &[f64], rank: usize, size_hint: usize) -> usize {
    let largest = sigma.first().copied().unwrap_or(0.0);
    let tolerance = largest * f64::EPSILON * size_hint as f64;
    sigma
        .iter()
        .take(rank)
        .take_while(|&&value| value > tolerance && value > 0.0)
        .count()
}

/// `A: [left.nrows(), rank]` whose column `k` is `left`'s column `k` times `left_scale[k]`, and
/// `B: [rank, right.nrows()]` whose row `k` is `right`'s column `k` times `right_scale[k]`; the
/// columns and rows past `left_scale.len()` are zero.
fn assemble(
    left: MatRef<'_, f64>,
    left_scale: &[f64],
    right: MatRef<'_, f64>,
    right_scale: &[f64],
    rank: usize,
) -> (Mat<f64>, Mat<f64>) {
    let kept = left_scale.len();
    debug_assert!(kept <= rank && right_scale.len() == kept);
    let a = Mat::from_fn(left.nrows(), rank, |i, k| match k < kept {
        true => left[(i, k)] * left_scale[k],
        false => 0.0,
    });
    let b = Mat::from_fn(rank, right.nrows(), |k, j| match k < kept {
        true => right[(j, k)] * right_scale[k],
        false => 0.0,
    });
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `rows × cols` matrix of uniform values in `[-0.5, 0.5)` from a small LCG.
    fn sample(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        Mat::from_fn(rows, cols, |_, _| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        })
    }

    /// `a · b` by the triple loop.
    fn naive_product(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
        assert_eq!(a.ncols(), b.nrows());
        Mat::from_fn(a.nrows(), b.ncols(), |i, j| {
            (0..a.ncols()).map(|k| a[(i, k)] * b[(k, j)]).sum::<f64>()
        })
    }

    /// The largest entry of `|a − b|`.
    fn max_difference(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
        assert_eq!(a.shape(), b.shape());
        let mut largest = 0.0_f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                largest = largest.max((a[(i, j)] - b[(i, j)]).abs());
            }
        }
        largest
    }

    /// `‖a‖_F` by the loop.
    fn naive_frobenius(a: MatRef<'_, f64>) -> f64 {
        let mut sum = 0.0_f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                sum += a[(i, j)] * a[(i, j)];
            }
        }
        sum.sqrt()
    }

    /// `value · a`.
    fn scaled(a: MatRef<'_, f64>, value: f64) -> Mat<f64> {
        Mat::from_fn(a.nrows(), a.ncols(), |i, j| value * a[(i, j)])
    }

    /// A `rows × cols` matrix (`rows ≥ cols`) with singular values `2⁰, 2⁻¹, …` and known
    /// singular vectors: `(W, U, V)` with `W = Σ 2⁻ᵏ·uₖ·vₖᵀ`.
    fn decaying(rows: usize, cols: usize) -> (Mat<f64>, Mat<f64>, Mat<f64>) {
        let left = thin_qr(sample(rows, cols, 4).as_ref()).0;
        let right = thin_qr(sample(cols, cols, 5).as_ref()).0;
        let weight = Mat::from_fn(rows, cols, |i, j| {
            (0..cols)
                .map(|k| 0.5f64.powi(k as i32) * left[(i, k)] * right[(j, k)])
                .sum::<f64>()
        });
        (weight, left, right)
    }

    /// The naive best rank-`rank` approximation `Σ_{k<rank} 2⁻ᵏ·uₖ·vₖᵀ` from known vectors.
    fn best_approximation(left: &Mat<f64>, right: &Mat<f64>, rank: usize) -> Mat<f64> {
        Mat::from_fn(left.nrows(), right.nrows(), |i, j| {
            (0..rank)
                .map(|k| 0.5f64.powi(k as i32) * left[(i, k)] * right[(j, k)])
                .sum::<f64>()
        })
    }

    /// A naive one-sided Jacobi SVD of `m`: `(σ, U·Σ, V)` with the columns sorted by `σ`,
    /// nonincreasing.
    fn jacobi_svd(m: MatRef<'_, f64>) -> (Vec<f64>, Mat<f64>, Mat<f64>) {
        let (rows, cols) = m.shape();
        let mut work = m.to_owned();
        let mut v = Mat::<f64>::identity(cols, cols);
        for _sweep in 0..100 {
            let mut rotated = false;
            for p in 0..cols {
                for q in p + 1..cols {
                    let (mut alpha, mut beta, mut gamma) = (0.0_f64, 0.0_f64, 0.0_f64);
                    for i in 0..rows {
                        alpha += work[(i, p)] * work[(i, p)];
                        beta += work[(i, q)] * work[(i, q)];
                        gamma += work[(i, p)] * work[(i, q)];
                    }
                    if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                        continue;
                    }
                    rotated = true;
                    let zeta = (beta - alpha) / (2.0 * gamma);
                    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let c = 1.0 / (1.0 + t * t).sqrt();
                    let s = c * t;
                    for i in 0..rows {
                        let (x, y) = (work[(i, p)], work[(i, q)]);
                        work[(i, p)] = c * x - s * y;
                        work[(i, q)] = s * x + c * y;
                    }
                    for i in 0..cols {
                        let (x, y) = (v[(i, p)], v[(i, q)]);
                        v[(i, p)] = c * x - s * y;
                        v[(i, q)] = s * x + c * y;
                    }
                }
            }
            if !rotated {
                break;
            }
        }
        let mut order: Vec<(f64, usize)> = (0..cols)
            .map(|j| {
                (
                    (0..rows)
                        .map(|i| work[(i, j)] * work[(i, j)])
                        .sum::<f64>()
                        .sqrt(),
                    j,
                )
            })
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        let sigma = order.iter().map(|&(value, _)| value).collect();
        let u_sigma = Mat::from_fn(rows, cols, |i, k| work[(i, order[k].1)]);
        let v_sorted = Mat::from_fn(cols, cols, |i, k| v[(i, order[k].1)]);
        (sigma, u_sigma, v_sorted)
    }

    #[test]
    fn thin_qr_reconstructs_tall_and_wide_matrices() {
        for (rows, cols) in [(9, 4), (4, 9), (5, 5)] {
            let matrix = sample(rows, cols, 1);
            let (q, r) = thin_qr(matrix.as_ref());
            let size = rows.min(cols);
            assert_eq!((q.shape(), r.shape()), ((rows, size), (size, cols)));
            let reconstructed = naive_product(q.as_ref(), r.as_ref());
            assert!(max_difference(reconstructed.as_ref(), matrix.as_ref()) < 1e-12);
            let gram = naive_product(q.transpose(), q.as_ref());
            let identity = Mat::<f64>::identity(size, size);
            assert!(max_difference(gram.as_ref(), identity.as_ref()) < 1e-12);
            for k in 0..size {
                assert!(r[(k, k)] >= 0.0);
                for j in 0..k {
                    assert_eq!(r[(k, j)], 0.0);
                }
            }
        }
    }

    #[test]
    fn exact_pissa_is_the_best_rank_r_approximation() {
        let (weight, left, right) = decaying(40, 30);
        let (rank, scale) = (5, 2.0);
        // Both orientations: W (tall) and Wᵀ (wide) take the two branches.
        let cases = [
            (weight.clone(), left.clone(), right.clone()),
            (weight.transpose().to_owned(), right, left),
        ];
        for (weight, left, right) in cases {
            let (a, b) = pissa_factors(weight.as_ref(), rank, scale, None);
            assert_eq!(a.shape(), (weight.nrows(), rank));
            assert_eq!(b.shape(), (rank, weight.ncols()));
            let approximation = scaled(naive_product(a.as_ref(), b.as_ref()).as_ref(), scale);
            let best = best_approximation(&left, &right, rank);
            assert!(max_difference(approximation.as_ref(), best.as_ref()) < 1e-10);
            // AᵀA = BBᵀ = diag(σ/scale): A·B = Ũ·diag(σ/scale)·Ṽᵀ with orthonormal Ũ and Ṽ, so
            // A·B's singular values are σ₀/scale, …, σ_{r−1}/scale.
            let expected = Mat::from_fn(rank, rank, |i, j| match i == j {
                true => 0.5f64.powi(i as i32) / scale,
                false => 0.0,
            });
            let gram_a = naive_product(a.transpose(), a.as_ref());
            let gram_b = naive_product(b.as_ref(), b.transpose());
            assert!(max_difference(gram_a.as_ref(), expected.as_ref()) < 1e-10);
            assert!(max_difference(gram_b.as_ref(), expected.as_ref()) < 1e-10);
            // The residual base is W minus that approximation.
            let rest = residual(weight.as_ref(), a.as_ref(), b.as_ref(), scale);
            let expected_rest = Mat::from_fn(weight.nrows(), weight.ncols(), |i, j| {
                weight[(i, j)] - approximation[(i, j)]
            });
            assert!(max_difference(rest.as_ref(), expected_rest.as_ref()) < 1e-12);
        }
    }

    #[test]
    fn randomized_pissa_matches_exact_on_a_decaying_spectrum() {
        let (weight, _, _) = decaying(40, 30);
        let (rank, scale) = (4, 0.5);
        for weight in [weight.clone(), weight.transpose().to_owned()] {
            let sketch = sample(weight.ncols(), 12, 6);
            let (a, b) = pissa_factors(weight.as_ref(), rank, scale, Some((sketch.as_ref(), 4)));
            let (exact_a, exact_b) = pissa_factors(weight.as_ref(), rank, scale, None);
            let randomized = naive_product(a.as_ref(), b.as_ref());
            let exact = naive_product(exact_a.as_ref(), exact_b.as_ref());
            assert!(max_difference(randomized.as_ref(), exact.as_ref()) < 1e-8);
        }
    }

    #[test]
    fn pissa_pads_with_zeros_past_the_available_directions() {
        let weight = sample(6, 3, 7);
        for sketch in [None, Some(sample(3, 3, 8))] {
            let sketch = sketch.as_ref().map(|s| (s.as_ref(), 2));
            let (a, b) = pissa_factors(weight.as_ref(), 5, 1.0, sketch);
            assert_eq!((a.shape(), b.shape()), ((6, 5), (5, 3)));
            for k in 3..5 {
                assert!((0..6).all(|i| a[(i, k)] == 0.0));
                assert!((0..3).all(|j| b[(k, j)] == 0.0));
            }
            let product = naive_product(a.as_ref(), b.as_ref());
            assert!(max_difference(product.as_ref(), weight.as_ref()) < 1e-12);
        }
        let (a, b) = pissa_factors(weight.as_ref(), 0, 1.0, None);
        assert_eq!((a.shape(), b.shape()), ((6, 0), (0, 3)));
    }

    #[test]
    fn olora_reproduces_the_leading_columns_of_the_transposed_weight() {
        for (d_in, d_out, rank) in [(12, 9, 4), (6, 10, 3), (5, 5, 5)] {
            let weight = sample(d_in, d_out, 9);
            let (a, b) = olora_factors(weight.as_ref(), rank).expect("independent columns");
            assert_eq!((a.shape(), b.shape()), ((d_in, rank), (rank, d_out)));
            // B = Q_rᵀ has orthonormal rows.
            let gram = naive_product(b.as_ref(), b.transpose());
            let identity = Mat::<f64>::identity(rank, rank);
            assert!(max_difference(gram.as_ref(), identity.as_ref()) < 1e-12);
            // Q_r·R_r[:, :r] = Wᵀ[:, :r], with R_r = Aᵀ upper triangular, diagonal ≥ 0.
            let leading = Mat::from_fn(d_out, rank, |i, j| {
                (0..rank).map(|k| b[(k, i)] * a[(j, k)]).sum::<f64>()
            });
            let expected = Mat::from_fn(d_out, rank, |i, j| weight[(j, i)]);
            assert!(max_difference(leading.as_ref(), expected.as_ref()) < 1e-12);
            for k in 0..rank {
                assert!(a[(k, k)] > 0.0);
                for j in 0..k {
                    assert_eq!(a[(j, k)], 0.0);
                }
            }
            // R_r = Q_rᵀ·Wᵀ, that is A = W·Bᵀ.
            let projected = naive_product(weight.as_ref(), b.transpose());
            assert!(max_difference(a.as_ref(), projected.as_ref()) < 1e-12);
        }
    }

    #[test]
    fn olora_rejects_dependent_leading_columns_and_too_large_ranks() {
        let mut weight = sample(12, 9, 10);
        for j in 0..9 {
            weight[(2, j)] = 2.0 * weight[(0, j)];
        }
        assert_eq!(olora_factors(weight.as_ref(), 4).err(), Some(2));
        assert!(olora_factors(weight.as_ref(), 2).is_ok());
        let weight = sample(12, 9, 11);
        assert_eq!(olora_factors(weight.as_ref(), 10).err(), Some(9));
        let wide = sample(5, 9, 12);
        assert_eq!(olora_factors(wide.as_ref(), 6).err(), Some(5));
        let zero = Mat::<f64>::zeros(4, 3);
        assert_eq!(olora_factors(zero.as_ref(), 1).err(), Some(0));
        let (a, b) = olora_factors(weight.as_ref(), 0).expect("rank 0 is empty");
        assert_eq!((a.shape(), b.shape()), ((12, 0), (0, 9)));
    }

    #[test]
    fn exact_and_linear_combinations_match_their_sums() {
        let factors = vec![
            (sample(7, 2, 13), sample(2, 5, 14), 0.7),
            (sample(7, 2, 15), sample(2, 5, 16), -1.3),
        ];
        let (u, v) = exact_factors(&factors);
        assert_eq!((u.shape(), v.shape()), ((7, 4), (4, 5)));
        let mut expected = Mat::<f64>::zeros(7, 5);
        for (a, b, c) in &factors {
            let term = naive_product(a.as_ref(), b.as_ref());
            for j in 0..5 {
                for i in 0..7 {
                    expected[(i, j)] += c * term[(i, j)];
                }
            }
        }
        let combined = naive_product(u.as_ref(), v.as_ref());
        assert!(max_difference(combined.as_ref(), expected.as_ref()) < 1e-12);

        let (u, v) = exact_factors(&[]);
        assert_eq!((u.shape(), v.shape()), ((0, 0), (0, 0)));
    }

    #[test]
    fn truncated_factors_match_the_svd_truncation_of_the_product() {
        let (u, v) = (sample(20, 6, 17), sample(6, 15, 18));
        let rank = 3;
        let (a, b) = truncated_factors(u.as_ref(), v.as_ref(), rank);
        assert_eq!((a.shape(), b.shape()), ((20, rank), (rank, 15)));
        let formed = naive_product(u.as_ref(), v.as_ref());
        let (sigma, u_sigma, right) = jacobi_svd(formed.as_ref());
        let truncation = Mat::from_fn(20, 15, |i, j| {
            (0..rank)
                .map(|k| u_sigma[(i, k)] * right[(j, k)])
                .sum::<f64>()
        });
        let approximation = naive_product(a.as_ref(), b.as_ref());
        assert!(max_difference(approximation.as_ref(), truncation.as_ref()) < 1e-10);
        // The split is √σ on each side: AᵀA = BBᵀ = diag(σ_r).
        let gram_a = naive_product(a.transpose(), a.as_ref());
        let gram_b = naive_product(b.as_ref(), b.transpose());
        let expected = Mat::from_fn(rank, rank, |i, j| match i == j {
            true => sigma[i],
            false => 0.0,
        });
        assert!(max_difference(gram_a.as_ref(), expected.as_ref()) < 1e-10);
        assert!(max_difference(gram_b.as_ref(), expected.as_ref()) < 1e-10);
    }

    #[test]
    fn truncated_factors_pad_a_product_of_lower_rank() {
        let (u, v) = (sample(20, 2, 19), sample(2, 15, 20));
        let (a, b) = truncated_factors(u.as_ref(), v.as_ref(), 4);
        assert_eq!((a.shape(), b.shape()), ((20, 4), (4, 15)));
        for k in 2..4 {
            assert!((0..20).all(|i| a[(i, k)] == 0.0));
            assert!((0..15).all(|j| b[(k, j)] == 0.0));
        }
        let formed = naive_product(u.as_ref(), v.as_ref());
        let approximation = naive_product(a.as_ref(), b.as_ref());
        assert!(max_difference(approximation.as_ref(), formed.as_ref()) < 1e-10);
        // Dependent columns: [U | U]·[V; V] = 2·U·V has rank 2 with four inner columns.
        let doubled_u = Mat::from_fn(20, 4, |i, j| u[(i, j % 2)]);
        let doubled_v = Mat::from_fn(4, 15, |i, j| v[(i % 2, j)]);
        let (a, b) = truncated_factors(doubled_u.as_ref(), doubled_v.as_ref(), 3);
        let approximation = naive_product(a.as_ref(), b.as_ref());
        let expected = scaled(formed.as_ref(), 2.0);
        assert!(max_difference(approximation.as_ref(), expected.as_ref()) < 1e-10);
    }

    #[test]
    fn relative_product_error_matches_the_formed_products() {
        let (u, v) = (sample(7, 3, 21), sample(3, 5, 22));
        let (x, y) = (sample(7, 2, 23), sample(2, 5, 24));
        let uv = naive_product(u.as_ref(), v.as_ref());
        let xy = naive_product(x.as_ref(), y.as_ref());
        let difference = Mat::from_fn(7, 5, |i, j| uv[(i, j)] - xy[(i, j)]);
        let expected = naive_frobenius(difference.as_ref()) / naive_frobenius(xy.as_ref());
        let error = relative_product_error(u.as_ref(), v.as_ref(), x.as_ref(), y.as_ref());
        assert!((error - expected).abs() < 1e-12, "{error} vs {expected}");
        // X·Y = 0: the plain norm of U·V.
        let zero = Mat::<f64>::zeros(7, 2);
        let error = relative_product_error(u.as_ref(), v.as_ref(), zero.as_ref(), y.as_ref());
        assert!((error - naive_frobenius(uv.as_ref())).abs() < 1e-12);
        // Equal products, written differently.
        let error = relative_product_error(
            scaled(u.as_ref(), 2.0).as_ref(),
            scaled(v.as_ref(), 0.5).as_ref(),
            u.as_ref(),
            v.as_ref(),
        );
        assert!(error < 1e-6, "{error}");
    }

    #[test]
    fn tensors_round_trip_row_major() {
        let device = Device::flex();
        let values: Vec<f32> = (0..6).map(|v| v as f32 * 0.25 - 1.0).collect();
        let tensor = Tensor::<2>::from_data(TensorData::new(values.clone(), [2, 3]), &device);
        let matrix = from_tensor(tensor);
        assert_eq!(matrix.shape(), (2, 3));
        for i in 0..2 {
            for j in 0..3 {
                assert_eq!(matrix[(i, j)], f64::from(values[i * 3 + j]));
            }
        }
        let back = to_tensor(matrix.as_ref(), &device);
        assert_eq!(back.dims(), [2, 3]);
        assert_eq!(from_tensor(back), matrix);
    }
}
