//! The error type of burn-lora.

use thiserror::Error;

/// Everything that can go wrong when configuring, attaching, merging or removing LoRA adapters.
///
/// Each variant carries what is needed to act on it: the offending value, the module path, the
/// expected and the found shape.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum LoraError {
    /// The rank was 0; LoRA needs at least one low-rank direction.
    #[error("LoRA rank must be at least 1, got 0")]
    ZeroRank,

    /// The rank is larger than the smaller side of a target weight, so `A·B` could not be low-rank.
    #[error(
        "rank {rank} is larger than min(d_in, d_out) = {max_rank} of `{path}` (weight [{d_in}, {d_out}])"
    )]
    RankTooLarge {
        /// Module path of the target.
        path: String,
        /// The requested rank.
        rank: usize,
        /// The largest rank the target allows.
        max_rank: usize,
        /// Input features of the target.
        d_in: usize,
        /// Output features of the target.
        d_out: usize,
    },

    /// Alpha must be a finite, strictly positive number.
    #[error("LoRA alpha must be finite and > 0, got {alpha}")]
    InvalidAlpha {
        /// The rejected alpha.
        alpha: f64,
    },

    /// Dropout must lie in `[0, 1)`.
    #[error("LoRA dropout must be in [0, 1), got {dropout}")]
    InvalidDropout {
        /// The rejected dropout probability.
        dropout: f64,
    },

    /// A [`Target::Regex`](crate::Target::Regex) does not compile.
    #[error("target regex /{pattern}/ is invalid: {message}")]
    InvalidRegex {
        /// The pattern as written.
        pattern: String,
        /// What the regex parser said.
        message: String,
    },

    /// The configuration names no target at all.
    #[error("the LoRA config has no target modules")]
    NoTargets,

    /// A target pattern matched no linear layer of the model.
    #[error(
        "target {target} matched no linear layer; linear layers in this model include: [{}]",
        .candidates.join(", ")
    )]
    UnmatchedTarget {
        /// The pattern, as written in the config.
        target: String,
        /// A few linear-layer paths that do exist, closest to the pattern first.
        candidates: Vec<String>,
    },

    /// A parameter of the model already carries a reparameterization (our adapters, Burn's
    /// `apply_lora`, or another one), so adapters cannot be attached again.
    #[error(
        "`{path}` already carries a `{kind}` reparameterization; apply LoRA to a model without adapters"
    )]
    AlreadyAdapted {
        /// Path of the parameter.
        path: String,
        /// Name of the reparameterization found there.
        kind: String,
    },

    /// Merging would put NaN or Inf into a weight (PEFT's `safe_merge`).
    #[error(
        "merging adapter `{adapter}` into `{path}` would produce NaN or Inf; nothing was merged"
    )]
    NonFiniteMerge {
        /// Module path of the weight.
        path: String,
        /// Name of the adapter.
        adapter: String,
    },

    /// Merge was asked for, but every adapter is merged already.
    #[error("every LoRA adapter is already merged; unmerge before merging again")]
    AlreadyMerged,

    /// Unmerge was asked for, but no adapter is merged.
    #[error("nothing to unmerge: no LoRA adapter is merged")]
    NothingMerged,

    /// The operation needs adapters, and the model carries none.
    #[error("the model carries no LoRA adapters")]
    NoAdapters,
}
