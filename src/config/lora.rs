//! What the user asks for: [`LoraConfig`], PEFT's `LoraConfig` in Burn's config style.

use burn::config::Config;

use super::scaling;
use super::targets::{Target, Targets};
use crate::LoraError;

/// How the adapter factors start. Every init leaves the adapted model's output equal to the
/// base's at the start.
///
/// For an embedding, the random inits follow PEFT: `A` starts at zero and `B ~ N(0, 1)`.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum LoraInit {
    /// PEFT's default: `A` Kaiming-uniform with `a = √5`, which for `A: [d_in, r]` is
    /// `U(-1/√d_in, 1/√d_in)`, and `B = 0`.
    KaimingUniform,
    /// `A ~ N(0, (1/r)²)` and `B = 0`, PEFT's `init_lora_weights="gaussian"`.
    Gaussian,
    /// PiSSA (Meng et al. 2024): `A` and `B` start from the top-`r` singular vectors of `W`,
    /// scaled by the square roots of their singular values over `s`, and the stored base
    /// becomes the residual `W - s·A·B`. Training then moves the principal directions. Linear
    /// layers only; the SVD is exact (PEFT's `init_lora_weights="pissa"`), which costs
    /// `O(d³)` per weight: for wide weights use [`PissaNiter`](Self::PissaNiter).
    Pissa,
    /// PiSSA with a randomized top-`r` SVD (Halko et al.) of `niter` subspace iterations, PEFT's
    /// `init_lora_weights="pissa_niter_<niter>"`: `O(d_in·d_out·r·niter)` instead of `O(d³)`,
    /// and close to the exact SVD when the spectrum decays (4 iterations are usual).
    PissaNiter(usize),
    /// OLoRA (Büyükakyüz 2024): `A` and `B` start from the QR factors of `W` (the first `r`
    /// rows of `R` and columns of `Q`), and the stored base becomes `W - s·A·B`. Linear layers
    /// only (PEFT's `init_lora_weights="olora"`).
    Olora,
}

impl LoraInit {
    /// Whether the init moves part of the base weight into the adapter (PiSSA, OLoRA).
    pub fn rewrites_base(self) -> bool {
        matches!(self, Self::Pissa | Self::PissaNiter(_) | Self::Olora)
    }

    /// The name PEFT's `init_lora_weights` uses for it.
    pub fn peft_name(self) -> String {
        match self {
            Self::KaimingUniform => "true".into(),
            Self::Gaussian => "gaussian".into(),
            Self::Pissa => "pissa".into(),
            Self::PissaNiter(niter) => format!("pissa_niter_{niter}"),
            Self::Olora => "olora".into(),
        }
    }
}

/// A rank for the modules one target selects: an entry of PEFT's `rank_pattern`.
#[derive(Config, Debug, PartialEq)]
pub struct RankPattern {
    /// The modules it applies to: a name (exact or dotted suffix) or a whole-path regex.
    pub target: Target,
    /// Their rank.
    pub rank: usize,
}

/// Rows of an embedding that an adapter trains on their own: an entry of PEFT's
/// `trainable_token_indices` (trainable tokens), such as the ids of tokens added to a
/// vocabulary.
#[derive(Config, Debug, PartialEq)]
pub struct TrainableTokens {
    /// The embedding module: a name, matching a module path exactly or as a dotted suffix.
    pub module: String,
    /// The token ids (rows of the embedding's weight) that train, each once.
    pub indices: Vec<usize>,
}

/// An alpha for the modules one target selects: an entry of PEFT's `alpha_pattern`.
#[derive(Config, Debug, PartialEq)]
pub struct AlphaPattern {
    /// The modules it applies to: a name (exact or dotted suffix) or a whole-path regex.
    pub target: Target,
    /// Their alpha.
    pub alpha: f64,
}

/// Configuration of LoRA adapters: rank, alpha, dropout, init and target modules.
///
/// Field names and meanings follow PEFT's `LoraConfig` (`r`, `lora_alpha`, `lora_dropout`,
/// `use_rslora`, `init_lora_weights`, `target_modules`).
///
/// ```no_run
/// use burn_lora::{LoraConfig, Targets};
///
/// let config = LoraConfig::new(8)
///     .with_alpha(Some(16.0))
///     .with_dropout(0.05)
///     .with_targets(Targets::attention());
/// # let _ = config;
/// ```
#[derive(Config, Debug)]
pub struct LoraConfig {
    /// The rank `r` of each update `A·B`; 4 to 32 is the usual range.
    pub rank: usize,
    /// The numerator of the scale `alpha / r`. `None` means alpha = rank, a scale of 1.
    #[config(default = "None")]
    pub alpha: Option<f64>,
    /// Dropout probability on the adapter input, in `[0, 1)`. Used on the activation path of
    /// [`LoraLinear`](crate::LoraLinear) only.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// rsLoRA: scale by `alpha / √r` instead of `alpha / r`, which keeps high ranks learning.
    #[config(default = false)]
    pub use_rslora: bool,
    /// How `A` and `B` are initialised.
    #[config(default = "LoraInit::KaimingUniform")]
    pub init: LoraInit,
    /// DoRA: add a trainable magnitude per output feature and train the direction with `A·B`
    /// ([`crate::Adapter::magnitude`]). Costs a weight-sized norm per forward.
    #[config(default = false)]
    pub use_dora: bool,
    /// PEFT's `lora_bias`: give `B` a bias (`[d_out]`, starting at zero), added to the layer's
    /// output as `scale · bias` and, in a merge, to the layer's own bias. For
    /// [`LoraLinear`](crate::LoraLinear) layers (every `burn_lora::nn` block), not with DoRA.
    #[config(default = false)]
    pub lora_bias: bool,
    /// The modules that get adapters.
    #[config(default = "Targets::attention()")]
    pub targets: Targets,
    /// Per-module ranks that override `rank`; the first entry that matches a module wins.
    #[config(default = "Vec::new()")]
    pub rank_pattern: Vec<RankPattern>,
    /// Per-module alphas that override `alpha`; the first entry that matches a module wins.
    #[config(default = "Vec::new()")]
    pub alpha_pattern: Vec<AlphaPattern>,
    /// Accept targets (and rank or alpha patterns) that match nothing instead of failing with
    /// [`LoraError::UnmatchedTarget`].
    #[config(default = false)]
    pub allow_unmatched_targets: bool,
    /// PEFT's `modules_to_save`: modules the adapter trains in full, such as a classifier head
    /// that a new task needs. Each name matches a module path exactly or as a dotted suffix.
    /// The adapter gets its own copy of every parameter of such a module, which replaces the
    /// original while the adapter is active; the original stays as it was, for the base model
    /// and the other adapters. A module cannot be both a target and saved.
    #[config(default = "Vec::new()")]
    pub modules_to_save: Vec<String>,
    /// PEFT's `trainable_token_indices`: rows of embeddings that the adapter trains. The
    /// adapter gets its own copy of those rows, starting from the originals, which replaces them
    /// while it is active; the rest of the embedding stays frozen and shared. An embedding with
    /// trainable tokens is neither a target nor saved.
    #[config(default = "Vec::new()")]
    pub trainable_token_indices: Vec<TrainableTokens>,
}

impl LoraConfig {
    /// The alpha in force: the configured one, or the rank.
    pub fn effective_alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// The factor applied to `A·B`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        self.scale_for(self.rank, self.effective_alpha())
    }

    /// The scale of an adapter with this rank and alpha, under this config's rsLoRA setting.
    pub fn scale_for(&self, rank: usize, alpha: f64) -> f64 {
        scaling::scale(rank, alpha, self.use_rslora)
    }

    /// Check the values that do not depend on the model.
    pub fn validate(&self) -> Result<(), LoraError> {
        if self.rank == 0 {
            return Err(LoraError::ZeroRank);
        }
        let alpha = self.effective_alpha();
        if !alpha.is_finite() || alpha <= 0.0 {
            return Err(LoraError::InvalidAlpha { alpha });
        }
        if !self.dropout.is_finite() || !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::InvalidDropout {
                dropout: self.dropout,
            });
        }
        if self.targets.include.is_empty() && self.targets.parameters.is_empty() {
            return Err(LoraError::NoTargets);
        }
        for pattern in &self.rank_pattern {
            if pattern.rank == 0 {
                return Err(LoraError::ZeroRank);
            }
            pattern.target.compile()?;
        }
        for pattern in &self.alpha_pattern {
            if !pattern.alpha.is_finite() || pattern.alpha <= 0.0 {
                return Err(LoraError::InvalidAlpha {
                    alpha: pattern.alpha,
                });
            }
            pattern.target.compile()?;
        }
        self.targets.compile()?;
        Ok(())
    }
}
