//! Small dense f64 matrices on the host, for the adapter algebra that needs a factorization.
//!
//! Combining adapters by SVD works on matrices of the adapters' total rank (tens of columns),
//! never on a weight-sized one, so plain host code is fast enough, exact to f64, and the same
//! on every backend.

use burn::tensor::{Device, Tensor, TensorData};

/// A row-major `rows × cols` matrix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f64>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            values: vec![0.0; rows * cols],
        }
    }

    pub fn identity(size: usize) -> Self {
        let mut matrix = Self::zeros(size, size);
        for i in 0..size {
            matrix.set(i, i, 1.0);
        }
        matrix
    }

    /// A copy of a 2-D tensor's values, read as f32 whatever its dtype.
    pub fn from_tensor(tensor: Tensor<2>) -> Self {
        let [rows, cols] = tensor.dims();
        let values = crate::adapter::to_f32(tensor)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("a tensor cast to f32 holds f32 values");
        Self {
            rows,
            cols,
            values: values.into_iter().map(f64::from).collect(),
        }
    }

    /// The matrix as an f32 tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> Tensor<2> {
        let values: Vec<f32> = self.values.iter().map(|&v| v as f32).collect();
        Tensor::from_data(TensorData::new(values, [self.rows, self.cols]), device)
    }

    pub fn get(&self, row: usize, col: usize) -> f64 {
        self.values[row * self.cols + col]
    }

    pub fn set(&mut self, row: usize, col: usize, value: f64) {
        self.values[row * self.cols + col] = value;
    }

    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            values: self.values.iter().map(|v| v * factor).collect(),
            ..self.clone()
        }
    }

    pub fn add(&self, other: &Self) -> Self {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        Self {
            values: self
                .values
                .iter()
                .zip(&other.values)
                .map(|(a, b)| a + b)
                .collect(),
            ..self.clone()
        }
    }

    pub fn transpose(&self) -> Self {
        let mut out = Self::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.set(c, r, self.get(r, c));
            }
        }
        out
    }

    pub fn matmul(&self, other: &Self) -> Self {
        assert_eq!(self.cols, other.rows);
        let mut out = Self::zeros(self.rows, other.cols);
        for r in 0..self.rows {
            for k in 0..self.cols {
                let left = self.get(r, k);
                if left == 0.0 {
                    continue;
                }
                for c in 0..other.cols {
                    out.values[r * other.cols + c] += left * other.get(k, c);
                }
            }
        }
        out
    }

    /// `[self | other]`: the columns of both.
    pub fn hcat(&self, other: &Self) -> Self {
        assert_eq!(self.rows, other.rows);
        let mut out = Self::zeros(self.rows, self.cols + other.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.set(r, c, self.get(r, c));
            }
            for c in 0..other.cols {
                out.set(r, self.cols + c, other.get(r, c));
            }
        }
        out
    }

    /// `[self; other]`: the rows of both.
    pub fn vcat(&self, other: &Self) -> Self {
        assert_eq!(self.cols, other.cols);
        let mut values = self.values.clone();
        values.extend_from_slice(&other.values);
        Self {
            rows: self.rows + other.rows,
            cols: self.cols,
            values,
        }
    }

    fn column(&self, col: usize) -> Vec<f64> {
        (0..self.rows).map(|r| self.get(r, col)).collect()
    }

    fn set_column(&mut self, col: usize, values: &[f64]) {
        for (r, &value) in values.iter().enumerate() {
            self.set(r, col, value);
        }
    }

    /// `‖self · other‖²_F` from the two Gram matrices, without forming the product:
    /// `trace((selfᵀ·self)·(other·otherᵀ))`. Costs `O(k²·(m + n))` for an `m×k` by `k×n`
    /// product.
    pub fn product_norm_squared(&self, other: &Self) -> f64 {
        let left = self.transpose().matmul(self);
        let right = other.matmul(&other.transpose());
        let mut trace = 0.0;
        for i in 0..left.rows {
            for j in 0..left.cols {
                trace += left.get(i, j) * right.get(j, i);
            }
        }
        trace.max(0.0)
    }

    /// Thin QR by modified Gram–Schmidt, orthogonalized twice for accuracy: `self = Q·R` with
    /// `Q` of orthonormal columns. Columns that add no new direction are dropped from `Q`, so
    /// `Q` has as many columns as the numerical rank.
    pub fn qr(&self) -> (Self, Self) {
        let scale = self.values.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
        let tolerance = scale * 1e-12 * (self.rows.max(self.cols) as f64);
        let mut basis: Vec<Vec<f64>> = Vec::new();
        let mut coefficients: Vec<Vec<f64>> = Vec::new(); // per basis vector, one per column
        for col in 0..self.cols {
            let mut v = self.column(col);
            let mut projections = vec![0.0; basis.len()];
            for _ in 0..2 {
                for (q, projection) in basis.iter().zip(projections.iter_mut()) {
                    let dot: f64 = q.iter().zip(&v).map(|(a, b)| a * b).sum();
                    *projection += dot;
                    v.iter_mut().zip(q).for_each(|(x, qi)| *x -= dot * qi);
                }
            }
            for (row, projection) in coefficients.iter_mut().zip(&projections) {
                row[col] = *projection;
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > tolerance {
                v.iter_mut().for_each(|x| *x /= norm);
                basis.push(v);
                let mut row = vec![0.0; self.cols];
                row[col] = norm;
                coefficients.push(row);
            }
        }
        let mut q = Self::zeros(self.rows, basis.len());
        for (col, vector) in basis.iter().enumerate() {
            q.set_column(col, vector);
        }
        let r = Self {
            rows: coefficients.len(),
            cols: self.cols,
            values: coefficients.concat(),
        };
        (q, r)
    }

    /// Singular value decomposition by one-sided Jacobi rotations: `self = U·diag(σ)·Vᵀ`, the
    /// singular values in decreasing order. Meant for small matrices.
    pub fn svd(&self) -> (Self, Vec<f64>, Self) {
        let mut work = self.clone();
        let mut v = Self::identity(self.cols);
        for _sweep in 0..60 {
            let mut rotated = false;
            for p in 0..self.cols {
                for q in p + 1..self.cols {
                    let (col_p, col_q) = (work.column(p), work.column(q));
                    let alpha: f64 = col_p.iter().map(|x| x * x).sum();
                    let beta: f64 = col_q.iter().map(|x| x * x).sum();
                    let gamma: f64 = col_p.iter().zip(&col_q).map(|(a, b)| a * b).sum();
                    if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                        continue;
                    }
                    rotated = true;
                    let zeta = (beta - alpha) / (2.0 * gamma);
                    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let c = 1.0 / (1.0 + t * t).sqrt();
                    let s = c * t;
                    rotate(&mut work, p, q, c, s);
                    rotate(&mut v, p, q, c, s);
                }
            }
            if !rotated {
                break;
            }
        }
        let mut order: Vec<(f64, usize)> = (0..self.cols)
            .map(|col| {
                let norm = work.column(col).iter().map(|x| x * x).sum::<f64>().sqrt();
                (norm, col)
            })
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut u = Self::zeros(self.rows, self.cols);
        let mut v_sorted = Self::zeros(self.cols, self.cols);
        let mut sigma = Vec::with_capacity(self.cols);
        for (rank, &(norm, col)) in order.iter().enumerate() {
            sigma.push(norm);
            if norm > 0.0 {
                let column: Vec<f64> = work.column(col).iter().map(|x| x / norm).collect();
                u.set_column(rank, &column);
            }
            v_sorted.set_column(rank, &v.column(col));
        }
        (u, sigma, v_sorted)
    }
}

impl Matrix {
    /// A truncated SVD `self ≈ U·diag(σ)·Vᵀ` by randomized subspace iteration (Halko, Martinsson
    /// and Tropp 2011): the range of `self·sketch` refined by `niter` power iterations, then an
    /// exact SVD of the small projection. `U` and `V` have as many columns as `sketch`.
    pub fn randomized_svd(&self, sketch: &Self, niter: usize) -> (Self, Vec<f64>, Self) {
        let mut range = self.matmul(sketch).qr().0;
        for _ in 0..niter {
            let back = self.transpose().matmul(&range).qr().0;
            range = self.matmul(&back).qr().0;
        }
        // self ≈ Q·(Qᵀ·self); the projection is small: [k, cols], k = sketch's width.
        let projection = range.transpose().matmul(self);
        let (u_small, sigma, v_small) = projection.transpose().svd();
        // projectionᵀ = U'·Σ·V'ᵀ, so self ≈ (Q·V')·Σ·U'ᵀ.
        (range.matmul(&v_small), sigma, u_small)
    }
}

/// Rotate columns `p` and `q` of `matrix` by the Jacobi rotation `(c, s)`.
fn rotate(matrix: &mut Matrix, p: usize, q: usize, c: f64, s: f64) {
    for r in 0..matrix.rows {
        let (x, y) = (matrix.get(r, p), matrix.get(r, q));
        matrix.set(r, p, c * x - s * y);
        matrix.set(r, q, s * x + c * y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut matrix = Matrix::zeros(rows, cols);
        for value in matrix.values.iter_mut() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *value = ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5;
        }
        matrix
    }

    fn max_difference(a: &Matrix, b: &Matrix) -> f64 {
        a.values
            .iter()
            .zip(&b.values)
            .fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn qr_reconstructs_with_orthonormal_q() {
        let a = sample(9, 4, 1);
        let (q, r) = a.qr();
        assert!(max_difference(&q.matmul(&r), &a) < 1e-12);
        assert!(max_difference(&q.transpose().matmul(&q), &Matrix::identity(4)) < 1e-12);
    }

    #[test]
    fn randomized_svd_finds_the_top_of_a_decaying_spectrum() {
        // A 40×30 matrix with singular values 2⁰, 2⁻¹, …: known directions, known values.
        let (q_left, _) = sample(40, 30, 4).qr();
        let (q_right, _) = sample(30, 30, 5).qr();
        let mut scaled = q_left.clone();
        for c in 0..30 {
            for r in 0..40 {
                scaled.set(r, c, q_left.get(r, c) * 0.5f64.powi(c as i32));
            }
        }
        let a = scaled.matmul(&q_right.transpose());
        let (u, sigma, v) = a.randomized_svd(&sample(30, 12, 6), 4);
        for (k, value) in sigma.iter().take(4).enumerate() {
            assert!(
                (value - 0.5f64.powi(k as i32)).abs() < 1e-10,
                "σ{k} = {value}"
            );
            // The singular vectors, up to sign.
            let dot_u: f64 = (0..40).map(|r| u.get(r, k) * q_left.get(r, k)).sum();
            let dot_v: f64 = (0..30).map(|r| v.get(r, k) * q_right.get(r, k)).sum();
            assert!((dot_u.abs() - 1.0).abs() < 1e-10 && (dot_v.abs() - 1.0).abs() < 1e-10);
        }
    }

    #[test]
    fn qr_drops_dependent_columns() {
        let a = sample(6, 2, 2);
        let doubled = a.hcat(&a.scaled(2.0));
        let (q, r) = doubled.qr();
        assert_eq!(q.cols, 2);
        assert!(max_difference(&q.matmul(&r), &doubled) < 1e-12);
    }

    #[test]
    fn svd_reconstructs_with_sorted_values() {
        let a = sample(5, 5, 3);
        let (u, sigma, v) = a.svd();
        let mut us = u.clone();
        for (c, value) in sigma.iter().enumerate() {
            for r in 0..us.rows {
                us.set(r, c, u.get(r, c) * value);
            }
        }
        assert!(max_difference(&us.matmul(&v.transpose()), &a) < 1e-12);
        assert!(sigma.windows(2).all(|w| w[0] >= w[1]));
        let frobenius: f64 = a.values.iter().map(|x| x * x).sum();
        let sum_sigma: f64 = sigma.iter().map(|s| s * s).sum();
        assert!((frobenius - sum_sigma).abs() < 1e-12);
    }

    #[test]
    fn product_norm_matches_the_formed_product() {
        let (a, b) = (sample(7, 3, 4), sample(3, 5, 5));
        let formed: f64 = a.matmul(&b).values.iter().map(|x| x * x).sum();
        assert!((a.product_norm_squared(&b) - formed).abs() < 1e-12);
    }
}
