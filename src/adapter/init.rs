//! Where a new adapter's factors start: random (`A` random, `B` zero; for embeddings the
//! other way round, as PEFT does) or from the base weight itself (PiSSA, OLoRA), which then
//! leaves the residual `W - s·A·B` as the stored base.
//!
//! PiSSA and OLoRA factor the whole weight on the host in f64 ([`linalg`](super::linalg)):
//! PiSSA by a thin SVD (exact) or a randomized one (`PissaNiter`), OLoRA by a QR of the leading
//! columns only, `O(d_in·d_out·r)`.

use burn::tensor::{Device, Distribution, FloatDType, Tensor};

use super::layout::{LayerKind, to_f32};
use super::linalg;
use crate::{LoraError, LoraInit};

/// A new adapter's starting factors, in the factor layout, and the residual base for an init
/// that rewrites it.
pub(crate) struct Start {
    pub lora_a: Tensor<2>,
    pub lora_b: Tensor<2>,
    /// `W - s·A·B`, f32, for PiSSA and OLoRA.
    pub residual: Option<Tensor<2>>,
}

/// Where a new adapter starts: its layer's kind, module path and the adapter's name (for
/// errors), its rank and scale.
pub(crate) struct Site<'a> {
    pub kind: LayerKind,
    pub path: &'a str,
    pub adapter: &'a str,
    pub rank: usize,
    /// The experts of an expert bank (1 otherwise): the base is `[experts·d_in, d_out]` and
    /// each expert gets its own rank-`rank` block of `A` and `B`.
    pub experts: usize,
    pub scale: f64,
}

/// The starting factors of the adapter at `site`, whose stored base is `base` (factor
/// layout), in `dtype`.
pub(crate) fn start(
    init: LoraInit,
    site: &Site<'_>,
    base: &Tensor<2>,
    dtype: FloatDType,
) -> Result<Start, LoraError> {
    let (kind, rank, path, scale, adapter) =
        (site.kind, site.rank, site.path, site.scale, site.adapter);
    let device = base.device();
    let [rows, d_out] = base.dims();
    let experts = site.experts.max(1);
    let d_in = rows / experts;
    let random = |distribution| Tensor::<2>::random([d_in, experts * rank], distribution, &device);
    let (lora_a, lora_b): (Tensor<2>, Tensor<2>) = match (init, kind) {
        (LoraInit::KaimingUniform | LoraInit::Gaussian, LayerKind::Embedding) => (
            Tensor::zeros([d_in, rank], &device),
            Tensor::random([rank, d_out], Distribution::Normal(0.0, 1.0), &device),
        ),
        (LoraInit::KaimingUniform, _) => {
            let bound = 1.0 / (d_in as f64).sqrt();
            let a = random(Distribution::Uniform(-bound, bound));
            (a, Tensor::zeros([experts * rank, d_out], &device))
        }
        (LoraInit::Gaussian, _) => {
            let a = random(Distribution::Normal(0.0, 1.0 / rank as f64));
            (a, Tensor::zeros([experts * rank, d_out], &device))
        }
        (LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora, LayerKind::Linear) => {
            let weight = linalg::from_tensor(to_f32(base.clone()));
            let (a, b) = match init {
                LoraInit::Pissa => linalg::pissa_factors(weight.as_ref(), rank, scale, None),
                LoraInit::PissaNiter(niter) => {
                    let sketch = linalg::from_tensor(random_sketch(d_out, rank, &device));
                    let sketch = Some((sketch.as_ref(), niter));
                    linalg::pissa_factors(weight.as_ref(), rank, scale, sketch)
                }
                _ => linalg::olora_factors(weight.as_ref(), rank).map_err(|max_rank| {
                    LoraError::RankTooLarge {
                        path: path.to_string(),
                        rank,
                        max_rank,
                        d_in,
                        d_out,
                    }
                })?,
            };
            let residual = linalg::residual(weight.as_ref(), a.as_ref(), b.as_ref(), scale);
            return Ok(Start {
                lora_a: linalg::to_tensor(a.as_ref(), &device).cast(dtype),
                lora_b: linalg::to_tensor(b.as_ref(), &device).cast(dtype),
                residual: Some(linalg::to_tensor(residual.as_ref(), &device)),
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

/// The columns a randomized SVD starts from: `rank` plus an oversampling of 8 (at most
/// `cols`), Gaussian, drawn on `device` so that the device's seed fixes them.
fn random_sketch(cols: usize, rank: usize, device: &Device) -> Tensor<2> {
    let width = (rank + 8).min(cols);
    Tensor::<2>::random([cols, width], Distribution::Normal(0.0, 1.0), device)
}
