//! The error type of burn-lora, and the report a refused adapter file comes with.
//!
//! This is the bottom of the crate: every other module may use it, and it uses none of them.

mod load_report;

use thiserror::Error;

pub use load_report::{DtypeNote, LoadReport, LoadedModule, ShapeMismatch};

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

    /// A target pattern matched no layer of the model that LoRA adapts.
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

    /// One weight sits at several paths of the model (a layer shared by two places), and the
    /// operation would attach, change or fold adapters there. Adapt the layer once, or give
    /// each place its own copy.
    #[error(
        "the weight at `{}` is shared with {}; burn-lora adapts a weight at one path only",
        .paths[0], .paths[1..].join(", ")
    )]
    SharedWeight {
        /// Every path of the shared weight.
        paths: Vec<String>,
    },

    /// An adapter built by combining others would hold NaN or Inf in its dtype.
    #[error(
        "the combined adapter `{adapter}` on `{path}` would hold NaN or Inf; nothing was added"
    )]
    NonFiniteCombination {
        /// Module path of the layer.
        path: String,
        /// The new adapter's name.
        adapter: String,
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

    /// An adapter with a bias on `B` (`lora_bias`) cannot be merged into a layer that has no
    /// bias to hold it, as in PEFT. Nothing was merged; the adapter still computes unmerged.
    #[error(
        "cannot merge adapter `{adapter}` into `{path}`: it has a bias on B (lora_bias) and the \
         layer has no bias; nothing was merged"
    )]
    NoBiasToMerge {
        /// Module path of the layer.
        path: String,
        /// Name of the adapter.
        adapter: String,
    },

    /// Trainable tokens an embedding cannot have: no token ids, an id twice or past the
    /// vocabulary, or a module that is no embedding.
    #[error("trainable tokens of `{path}`: {message}")]
    InvalidTokenIndices {
        /// Module path.
        path: String,
        /// What is wrong.
        message: String,
    },

    /// A parameter that [`Targets::parameters`](crate::Targets::parameters) selects but LoRA
    /// cannot adapt as a raw parameter: neither 2-D nor 3-D, quantized, or the weight of a layer
    /// that a module target adapts too (as PEFT refuses it).
    #[error("target parameter `{path}`: {reason}")]
    InvalidTargetParameter {
        /// Parameter path.
        path: String,
        /// Why it cannot be adapted.
        reason: String,
    },

    /// A DoRA adapter is marked merged but the norms its merge divided by are gone (it was
    /// marked merged by hand, or the model was rebuilt from parts), so it cannot come back out.
    #[error(
        "cannot unmerge the DoRA adapter `{adapter}` of `{path}`: the norms of its merge are not \
         recorded; reload the base weights instead"
    )]
    DoraNormMissing {
        /// Module path of the weight.
        path: String,
        /// Name of the adapter.
        adapter: String,
    },

    /// A LoRA variant was asked for where it does not apply, such as a PiSSA init on an
    /// embedding or a DoRA adapter in a weighted combination.
    #[error("{what} is not supported (adapter `{adapter}` on `{path}`)")]
    UnsupportedVariant {
        /// What was asked for, and where it is supported instead.
        what: String,
        /// Module path of the layer.
        path: String,
        /// Name of the adapter.
        adapter: String,
    },

    /// [`quantize_base`](crate::quantize_base) found no float linear weight in the quantizer's
    /// group.
    #[error("no float linear weight to quantize (none, or none in the quantizer's group)")]
    NothingToQuantize,

    /// A learning-rate setting that must be positive and finite was not.
    #[error("`{name}` must be a positive, finite number, found {value}")]
    InvalidLearningRate {
        /// The setting.
        name: &'static str,
        /// What it was.
        value: f64,
    },

    /// Burn refused a learning-rate schedule config.
    #[error("invalid learning-rate schedule: {0}")]
    InvalidSchedule(String),

    /// Merge was asked for, but every adapter is merged already.
    #[error("every LoRA adapter is already merged; unmerge before merging again")]
    AlreadyMerged,

    /// Unmerge was asked for, but no adapter is merged.
    #[error("nothing to unmerge: no LoRA adapter is merged")]
    NothingMerged,

    /// The operation needs adapters, and the model carries none.
    #[error("the model carries no LoRA adapters")]
    NoAdapters,

    /// An adapter of this name is already attached.
    #[error("an adapter named `{name}` already exists")]
    AdapterExists {
        /// The name.
        name: String,
    },

    /// No weight carries an adapter of this name.
    #[error("no adapter named `{name}`; the model has {available:?}")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The adapters the model has.
        available: Vec<String>,
    },

    /// The operation needs at least one adapter name.
    #[error(
        "no adapter named: give at least one adapter (use disable_adapters to run the base alone)"
    )]
    NoAdapterNamed,

    /// An active adapter cannot be deleted.
    #[error("adapter `{name}` is active; activate other adapters before deleting it")]
    DeleteActive {
        /// The adapter.
        name: String,
    },

    /// The operation cannot run while adapters are folded into the base weights.
    #[error(
        "{operation} needs unmerged adapters, but {merged:?} are merged; call unmerge_lora first"
    )]
    AdaptersMerged {
        /// The operation refused.
        operation: &'static str,
        /// The merged adapters.
        merged: Vec<String>,
    },

    /// Adapters are disabled, so there is nothing to merge.
    #[error("adapters are disabled; call enable_adapters before merging")]
    AdaptersDisabled,

    /// A hot-swap (or its preparation) that does not fit the model: every problem, one per
    /// layer. The model is left as it was.
    #[error("cannot hot-swap adapter `{adapter}` from {source_name}: {}", problems.join("; "))]
    HotswapMismatch {
        /// The adapter being replaced (or padded).
        adapter: String,
        /// Where the new weights come from.
        source_name: String,
        /// What does not fit, per layer.
        problems: Vec<String>,
    },

    /// A pruning combination's density is outside `[0, 1]` (DARE's outside `(0, 1]`) or not a
    /// number.
    #[error("`{combination}` takes a density in [0, 1] (DARE in (0, 1]), not {density}")]
    InvalidDensity {
        /// PEFT's name of the combination.
        combination: &'static str,
        /// The density given.
        density: f64,
    },

    /// A combination weight was NaN or infinite.
    #[error("weight {weight} for adapter `{adapter}` is not finite")]
    InvalidWeight {
        /// The adapter it weights.
        adapter: String,
        /// The weight.
        weight: f64,
    },

    /// A linear combination needs sources of one rank on every layer.
    #[error("`{path}`: a linear combination needs equal ranks, found {ranks:?}; use Cat or Svd")]
    IncompatibleRanks {
        /// Module path of the layer.
        path: String,
        /// `(adapter, rank)` of each source on that layer.
        ranks: Vec<(String, usize)>,
    },

    /// Reading or writing an adapter file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The kind of I/O failure.
        kind: std::io::ErrorKind,
        /// The system's message.
        message: String,
    },

    /// A safetensors file that cannot be parsed (truncated, corrupt header...).
    #[error("{path}: not a valid safetensors file: {message}")]
    InvalidSafetensors {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },

    /// An adapter directory whose weights are not the ones its config was saved with (a save
    /// was interrupted by a crash between its two files, or a file was replaced by hand).
    #[error(
        "{path}: adapter_model.safetensors does not match adapter_config.json (parts of two \
         saves); save the adapter again"
    )]
    TornAdapter {
        /// The adapter's directory.
        path: String,
    },

    /// An adapter name that cannot name a directory of its own, which PEFT's layout of several
    /// adapters gives every adapter but `default` (empty, `.`, `..`, a path separator, a
    /// leading `.`...), or a directory listing two adapters that PEFT would both call
    /// `default`. Nothing was written or loaded.
    #[error("adapter name `{name}` cannot be used in a PEFT adapter directory: {reason}")]
    InvalidAdapterName {
        /// The name.
        name: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// An `adapter_config.json` with invalid JSON, a missing field or a field of the wrong type.
    #[error("{path}: invalid adapter config: {message}")]
    InvalidConfig {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        message: String,
    },

    /// An adapter that uses a feature burn-lora does not load; nothing of it was applied.
    #[error("{path}: unsupported adapter: {feature}")]
    UnsupportedAdapter {
        /// The file.
        path: String,
        /// The feature and its value.
        feature: String,
    },

    /// A strict load found problems; the report lists every one, and nothing was applied.
    #[error("{path}: the adapter does not fit the model:\n{report}")]
    AdapterMismatch {
        /// The adapter's directory.
        path: String,
        /// Everything the loader found.
        report: Box<LoadReport>,
    },

    /// A [`KeyMap`](crate::peft::KeyMap) that does not map a module path back to itself.
    #[error("key map is not invertible: `{burn}` → `{peft}` → `{back}`")]
    KeyMapNotInvertible {
        /// The Burn module path.
        burn: String,
        /// Its PEFT name.
        peft: String,
        /// What the PEFT name maps back to.
        back: String,
    },

    /// An adapter holds NaN or Inf: one to save, or a new DoRA magnitude that overflows the
    /// weight's dtype.
    #[error("adapter `{adapter}` on `{path}` holds NaN or Inf; refusing it")]
    NonFiniteAdapter {
        /// Module path of the layer.
        path: String,
        /// The adapter.
        adapter: String,
    },

    /// A module that is both a LoRA target and in `modules_to_save` (here, or in an adapter
    /// the model already has): its weight would be replaced and adapted at once.
    #[error(
        "`{path}` is both a target and in modules_to_save; an adapter either adapts a module \
         or trains a copy of it"
    )]
    SavedAndTargeted {
        /// Module path.
        path: String,
    },

    /// A checkpoint that does not fit the model: a model parameter it lacks, a tensor the model
    /// does not hold, or a shape or dtype that disagrees.
    #[error("{path}: the checkpoint does not fit the model:\n  {}", problems.join("\n  "))]
    CheckpointMismatch {
        /// The checkpoint file.
        path: String,
        /// Every problem found, one per line.
        problems: Vec<String>,
    },
}

impl LoraError {
    /// [`LoraError::RankTooLarge`] for a rank over `min(d_in, d_out)` on the layer at `path`.
    pub(crate) fn rank_too_large(path: &str, rank: usize, d_in: usize, d_out: usize) -> Self {
        Self::RankTooLarge {
            path: path.to_string(),
            rank,
            max_rank: d_in.min(d_out),
            d_in,
            d_out,
        }
    }
}
