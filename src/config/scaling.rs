//! The one scaling formula of LoRA and its inverse.
//!
//! An adapter's update is `s·A·B` with `s = alpha / r`, or `s = alpha / √r` under rsLoRA
//! (Kalajdzievski 2023), which keeps high ranks learning. PEFT files store `r` and `alpha`, so
//! writing an adapter whose scale must survive a change of rank (a PiSSA conversion at `2r`, a
//! file whose single `use_rslora` differs from a module's own) needs the inverse.

/// The scale `alpha / rank`, or `alpha / √rank` with rsLoRA.
pub(crate) fn scale(rank: usize, alpha: f64, use_rslora: bool) -> f64 {
    alpha / denominator(rank, use_rslora)
}

/// The alpha that gives `scale` at `rank`: the inverse of [`scale`].
pub(crate) fn alpha_for_scale(scale: f64, rank: usize, use_rslora: bool) -> f64 {
    scale * denominator(rank, use_rslora)
}

fn denominator(rank: usize, use_rslora: bool) -> f64 {
    let rank = rank as f64;
    match use_rslora {
        true => rank.sqrt(),
        false => rank,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_gives_back_the_alpha() {
        for use_rslora in [false, true] {
            for (rank, alpha) in [(1, 1.0), (8, 16.0), (16, 3.5), (64, 128.0)] {
                let s = scale(rank, alpha, use_rslora);
                let back = alpha_for_scale(s, rank, use_rslora);
                assert!(
                    (back - alpha).abs() <= 1e-12 * alpha,
                    "{rank} {alpha} {use_rslora}"
                );
            }
        }
        assert_eq!(scale(8, 16.0, false), 2.0);
        assert_eq!(scale(16, 16.0, true), 4.0);
    }
}
