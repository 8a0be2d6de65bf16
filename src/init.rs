//! Where a new adapter's factors start: random (`A` random, `B` zero; for embeddings the
//! other way round, as PEFT does) or from the base weight itself (PiSSA, OLoRA), which then
//! leaves the residual `W - s·A·B` as the stored base.

use burn::tensor::{Distribution, FloatDType, Tensor};

use crate::linalg::Matrix;
use crate::{AdaptedLayer, LayerKind, LoraError, LoraInit};

/// A new adapter's starting factors, in the factor layout, and the residual base for an init
/// that rewrites it.
pub(crate) struct Start {
    pub lora_a: Tensor<2>,
    pub lora_b: Tensor<2>,
    /// `W - s·A·B`, f32, for PiSSA and OLoRA.
    pub residual: Option<Tensor<2>>,
}

/// The starting factors for the adapter `adapter` of `scale` on `layer`, whose stored base is
/// `base` (factor layout), in `dtype`.
pub(crate) fn start(
    init: LoraInit,
    layer: &AdaptedLayer,
    base: &Tensor<2>,
    scale: f64,
    dtype: FloatDType,
    adapter: &str,
) -> Result<Start, LoraError> {
    let (kind, rank, path) = (layer.kind, layer.rank, layer.path.as_str());
    let device = base.device();
    let [d_in, d_out] = base.dims();
    let random = |distribution| Tensor::<2>::random([d_in, rank], distribution, &device);
    let (lora_a, lora_b): (Tensor<2>, Tensor<2>) = match (init, kind) {
        (LoraInit::KaimingUniform | LoraInit::Gaussian, LayerKind::Embedding) => (
            Tensor::zeros([d_in, rank], &device),
            Tensor::random([rank, d_out], Distribution::Normal(0.0, 1.0), &device),
        ),
        (LoraInit::KaimingUniform, _) => {
            let bound = 1.0 / (d_in as f64).sqrt();
            let a = random(Distribution::Uniform(-bound, bound));
            (a, Tensor::zeros([rank, d_out], &device))
        }
        (LoraInit::Gaussian, _) => {
            let a = random(Distribution::Normal(0.0, 1.0 / rank as f64));
            (a, Tensor::zeros([rank, d_out], &device))
        }
        (LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora, LayerKind::Linear) => {
            let weight = Matrix::from_tensor(base.clone());
            let (a, b) = match init {
                LoraInit::Pissa => pissa(&weight.svd(), rank, scale),
                LoraInit::PissaNiter(niter) => {
                    let sketch = random_sketch(weight.cols, rank, &device);
                    pissa(&weight.randomized_svd(&sketch, niter), rank, scale)
                }
                _ => olora(&weight, rank, path)?,
            };
            let residual = weight.add(&a.matmul(&b).scaled(-scale));
            return Ok(Start {
                lora_a: a.to_tensor(&device).cast(dtype),
                lora_b: b.to_tensor(&device).cast(dtype),
                residual: Some(residual.to_tensor(&device)),
            });
        }
        (LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora, _) => {
            return Err(LoraError::UnsupportedVariant {
                what: format!(
                    "the {} init on a {} layer (it applies to linear layers)",
                    init.peft_name(),
                    kind.label()
                ),
                path: path.to_string(),
                adapter: adapter.to_string(),
            });
        }
    };
    Ok(Start {
        lora_a: lora_a.cast(dtype),
        lora_b: lora_b.cast(dtype),
        residual: None,
    })
}

/// PiSSA's factors from the SVD `W = U·diag(σ)·Vᵀ` of `W: [d_in, d_out]` (factor layout):
/// `A = U_r·diag(√(σ_r / s))` and `B = diag(√(σ_r / s))·V_rᵀ`, so `s·A·B` is the best rank-`r`
/// approximation of `W`. This is PEFT's `pissa_init` transposed (PyTorch's weight is `Wᵀ`).
fn pissa((u, sigma, v): &(Matrix, Vec<f64>, Matrix), rank: usize, scale: f64) -> (Matrix, Matrix) {
    let mut a = Matrix::zeros(u.rows, rank);
    let mut b = Matrix::zeros(rank, v.rows);
    // A randomized SVD of a weight of numerical rank below `rank` has fewer columns: the
    // factors' remaining columns stay zero.
    for (k, value) in sigma.iter().enumerate().take(rank.min(u.cols)) {
        let root = (value / scale).sqrt();
        for row in 0..u.rows {
            a.set(row, k, u.get(row, k) * root);
        }
        for col in 0..v.rows {
            b.set(k, col, v.get(col, k) * root);
        }
    }
    (a, b)
}

/// The columns a randomized SVD starts from: `rank` plus an oversampling of 8 (at most
/// `cols`), Gaussian, drawn on `device` so that the device's seed fixes them.
fn random_sketch(cols: usize, rank: usize, device: &burn::tensor::Device) -> Matrix {
    let width = (rank + 8).min(cols);
    Matrix::from_tensor(Tensor::<2>::random(
        [cols, width],
        Distribution::Normal(0.0, 1.0),
        device,
    ))
}

/// OLoRA's factors of `W: [d_in, d_out]` (factor layout): PyTorch's weight `Wᵀ = Q·R`, and
/// `A = R_rᵀ` (the first `r` rows of `R`), `B = Q_rᵀ` (the first `r` columns of `Q`), unscaled
/// as in PEFT's `olora_init`.
fn olora(weight: &Matrix, rank: usize, path: &str) -> Result<(Matrix, Matrix), LoraError> {
    let (q, r) = weight.transpose().qr();
    if q.cols < rank {
        return Err(LoraError::RankTooLarge {
            path: path.to_string(),
            rank,
            max_rank: q.cols,
            d_in: weight.rows,
            d_out: weight.cols,
        });
    }
    let mut a = Matrix::zeros(weight.rows, rank);
    let mut b = Matrix::zeros(rank, weight.cols);
    for k in 0..rank {
        for row in 0..weight.rows {
            a.set(row, k, r.get(k, row));
        }
        for col in 0..weight.cols {
            b.set(k, col, q.get(col, k));
        }
    }
    Ok((a, b))
}
