//! Which modules of a model get adapters: PEFT's `target_modules`, on Burn module paths.
//!
//! A Burn module path joins field names and list indices with dots, as in
//! `encoder.layers.3.mha.query`. The rules, which are PEFT's:
//!
//! - [`Target::Name`] matches a path exactly or as a dotted suffix: `query` matches `query` and
//!   `….mha.query`, but not `….subquery`.
//! - [`Target::Regex`] must match the **whole** path. It is its own variant, so a name in a list
//!   is never read as a regex by accident (a common PEFT surprise).
//! - [`Target::AllLinear`] selects every linear layer by its module type, whatever its name, and
//!   [`Target::ModuleType`] every module of one type (`Embedding`, `Conv2d`, `Linear`...).
//! - [`Targets::exclude`] removes matches; [`Targets::layers_to_transform`] keeps only the
//!   layers with the given indices, read from the path segment after
//!   [`Targets::layers_pattern`] (`layers.3`, `h.3`, `blocks.3`).
//!
//! - [`Targets::parameters`] selects raw parameters by their path (`<module>.<parameter>`),
//!   PEFT's `target_parameters`: the expert banks of a mixture of experts, 3-D parameters that
//!   no linear layer owns. [`Targets::parameter_layout`] says which axis of such a parameter is
//!   its input.
//!
//! This file holds the targets as data; `matcher` compiles them. It knows about paths and
//! nothing about tensors.

use burn::config::Config;

/// One entry of [`Targets`].
#[derive(Config, Debug, PartialEq)]
pub enum Target {
    /// A module name: matches a path equal to it or ending in `.` + name (PEFT's rule).
    Name(String),
    /// Several spellings of the same module, such as Burn's `query` and Hugging Face's
    /// `q_proj`. It matches where any of them does, and it counts as matched when one did, so a
    /// preset that covers both naming schemes does not fail on a model that uses only one.
    AnyName(Vec<String>),
    /// A regular expression that must match the whole module path, e.g.
    /// `layers\.[0-3]\.mha\.(query|value)`.
    Regex(String),
    /// Every linear layer (`Linear` or `LoraLinear`), found by module type, not by name.
    AllLinear,
    /// Every module whose type is this one, as its struct is named: `Embedding`, `Conv2d`,
    /// `Linear`, `LoraLinear`. LoRA adapts linear layers, embeddings and 2-D convolutions.
    ModuleType(String),
}

impl Target {
    /// The target as written in reports and errors: `` `query` ``, `` `query` | `q_proj` ``,
    /// `regex /…/` or `all linear layers`.
    pub fn label(&self) -> String {
        match self {
            Target::Regex(pattern) => format!("regex /{pattern}/"),
            Target::AllLinear => "all linear layers".to_string(),
            Target::ModuleType(module_type) => format!("every `{module_type}`"),
            _ => {
                let quoted: Vec<String> = self
                    .names()
                    .iter()
                    .map(|name| format!("`{name}`"))
                    .collect();
                quoted.join(" | ")
            }
        }
    }

    /// The names this target looks for, used to suggest paths when it matched nothing.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Target::Name(name) => vec![name.as_str()],
            Target::AnyName(names) => names.iter().map(String::as_str).collect(),
            Target::Regex(pattern) => vec![pattern.as_str()],
            Target::AllLinear => Vec::new(),
            Target::ModuleType(module_type) => vec![module_type.as_str()],
        }
    }

    /// Whether this target names modules by type rather than by path.
    pub fn is_by_type(&self) -> bool {
        matches!(self, Target::AllLinear | Target::ModuleType(_))
    }
}

/// How a targeted parameter ([`Targets::parameters`]) stores its weights: which of its last two
/// axes is the input. A 3-D parameter is a bank of experts, one `[d_out, d_in]` or `[d_in, d_out]`
/// matrix per expert along its first axis.
#[derive(Config, Debug, PartialEq, Copy, Eq, Hash)]
pub enum ParamLayout {
    /// `[experts, d_out, d_in]`, or `[d_out, d_in]` for a 2-D parameter: PyTorch's `nn.Linear`
    /// orientation, which most transformers mixtures of experts use (Mixtral, Qwen-MoE,
    /// OLMoE...) and a port that loads their checkpoints keeps. PEFT's default (the module's
    /// `is_transposed` is false).
    OutIn,
    /// `[experts, d_in, d_out]`, or `[d_in, d_out]`: Burn's `Linear` orientation, and that of
    /// the mixtures of experts whose module sets `is_transposed` in transformers (GPT-OSS).
    InOut,
}

/// The modules to adapt: PEFT's `target_modules`, `exclude_modules`, `layers_to_transform` and
/// `layers_pattern`, and the raw parameters to adapt: PEFT's `target_parameters`.
///
/// Build it from names, or start from a preset:
///
/// ```
/// use burn_lora::{Target, Targets};
///
/// # fn main() -> Result<(), burn_lora::LoraError> {
/// let attention = Targets::attention(); // Q, K, V and O, in Burn's and Hugging Face's names
/// assert!(attention.matches("encoder.layers.0.mha.value")?);
///
/// let qv = Targets::names(["q_proj", "v_proj"]);
/// assert!(qv.matches("model.layers.0.self_attn.q_proj")?);
/// assert!(!qv.matches("model.layers.0.self_attn.k_proj")?);
///
/// // The first two layers only, every linear layer but the output head.
/// let early = Targets::all_linear()
///     .excluding(["lm_head"])
///     .with_layers_to_transform(Some(vec![0, 1]))
///     .with_layers_pattern(Some(vec!["layers".into()]));
/// assert!(early.matches("layers.1.mlp.fc1")?);
/// assert!(!early.matches("layers.2.mlp.fc1")?);
/// assert!(!early.matches("lm_head")?);
///
/// let regex = Targets::new(vec![Target::Regex(r"layers\.[0-3]\.attn\.(query|value)".into())]);
/// assert!(regex.matches("layers.3.attn.value")?);
/// assert!(!regex.matches("layers.4.attn.value")?);
/// # Ok(())
/// # }
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct Targets {
    /// The targets; a module is adapted when any of them matches its path.
    pub include: Vec<Target>,
    /// Modules never adapted, even when an `include` target matches them.
    #[config(default = "Vec::new()")]
    pub exclude: Vec<Target>,
    /// Only adapt modules in these layers (by index). `None` adapts every layer.
    #[config(default = "None")]
    pub layers_to_transform: Option<Vec<usize>>,
    /// The path segments that hold the layer list (`layers`, `h`, `blocks`); the index is the
    /// segment after one of them. `None` takes the first numeric segment of the path.
    #[config(default = "None")]
    pub layers_pattern: Option<Vec<String>>,
    /// Raw parameters to adapt, by parameter path (`layers.0.mlp.experts.gate_up_proj`): PEFT's
    /// `target_parameters`. A [`Target::Name`] matches the path exactly or as a dotted suffix
    /// (`mlp.experts.gate_up_proj`), a [`Target::Regex`] the whole path. A matched parameter is
    /// 2-D (one matrix) or 3-D (a bank of experts, each getting its own rank-`r` update), and
    /// its update composes densely through `Param::val()`, as PEFT's `ParamWrapper` does:
    /// no dropout, DoRA, `lora_bias` or PiSSA/OLoRA init. `exclude` and
    /// `layers_to_transform` do not apply to parameters.
    ///
    /// PEFT's files key the factors of several targeted parameters of one module by nesting, in
    /// the order the PyTorch module registers them: a port declares those fields in the same
    /// order (Mixtral's `gate_up_proj` before `down_proj`).
    #[config(default = "Vec::new()")]
    pub parameters: Vec<Target>,
    /// How the [`parameters`](Self::parameters) store their weights.
    #[config(default = "ParamLayout::OutIn")]
    pub parameter_layout: ParamLayout,
}

impl Targets {
    /// Targets from plain module names, each matched exactly or as a dotted suffix.
    pub fn names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(
            names
                .into_iter()
                .map(|name| Target::Name(name.into()))
                .collect(),
        )
    }

    /// Raw parameters from their names (PEFT's `target_parameters`), each matched exactly or as
    /// a dotted suffix of a parameter path, and no module targets. For both, build
    /// `Targets::new(modules).with_parameters(parameters)`.
    ///
    /// ```
    /// use burn_lora::{ParamLayout, Targets};
    ///
    /// // Every expert of every layer's mixture of experts, as transformers' Mixtral stores them.
    /// let experts = Targets::parameter_names(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ///     .with_parameter_layout(ParamLayout::OutIn);
    /// assert_eq!(experts.parameters.len(), 2);
    /// ```
    pub fn parameter_names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(Vec::new()).with_parameters(
            names
                .into_iter()
                .map(|name| Target::Name(name.into()))
                .collect(),
        )
    }

    /// The attention projections Q, K, V and O, under every common spelling:
    ///
    /// | | Burn's `nn` blocks | Hugging Face | Burn's Llama port |
    /// |---|---|---|---|
    /// | Q | `query` | `q_proj` | `wq` |
    /// | K | `key` | `k_proj` | `wk` |
    /// | V | `value` | `v_proj` | `wv` |
    /// | O | `output` in an attention module | `o_proj`, BERT's `attention.output.dense` | `wo` |
    ///
    /// An `output` layer is taken for O only inside a module whose name says attention (`mha`,
    /// or a name with `att` in it: `attn`, `self_attn`, `cross_attn`, `attention`), so a model's
    /// output head, such as the `output` of Burn's Llama port, is never adapted. GPT-2's fused
    /// projections have their own preset, [`gpt2_attention`](Self::gpt2_attention).
    pub fn attention() -> Self {
        Self::new(vec![
            any_of(&["query", "q_proj", "wq"]),
            any_of(&["key", "k_proj", "wk"]),
            any_of(&["value", "v_proj", "wv"]),
            Target::Regex(ATTENTION_OUTPUT.to_string()),
        ])
    }

    /// The LoRA paper's default: the query and value projections only.
    pub fn attention_qv() -> Self {
        Self::new(vec![
            any_of(&["query", "q_proj", "wq"]),
            any_of(&["value", "v_proj", "wv"]),
        ])
    }

    /// The feed-forward layers, one target matched when any of them is there:
    ///
    /// - Burn's `linear_inner` and `linear_outer` (`PositionWiseFeedForward`, `SwiGlu`), and
    ///   `w1`, `w2`, `w3` (Burn's Llama port: `swiglu.linear_inner/linear_outer` and `w2`);
    /// - Hugging Face's `gate_proj`, `up_proj`, `down_proj`, `fc1`, `fc2`, and BERT's
    ///   `intermediate.dense` and `output.dense` (not `attention.output.dense`, which is O).
    ///
    /// GPT-2's `mlp.c_fc` and `mlp.c_proj` have their own preset,
    /// [`gpt2_feed_forward`](Self::gpt2_feed_forward).
    pub fn feed_forward() -> Self {
        Self::new(vec![Target::Regex(FEED_FORWARD.to_string())])
    }

    /// GPT-2's attention: the fused query-key-value projection `attn.c_attn` and the output
    /// projection `attn.c_proj` (PEFT's default for GPT-2 is `c_attn` alone).
    pub fn gpt2_attention() -> Self {
        Self::names(["attn.c_attn", "attn.c_proj"])
    }

    /// GPT-2's feed-forward layers, `mlp.c_fc` and `mlp.c_proj`.
    pub fn gpt2_feed_forward() -> Self {
        Self::names(["mlp.c_fc", "mlp.c_proj"])
    }

    /// Every linear layer but the model's output head, as PEFT's `all-linear`: by module type,
    /// excluding `lm_head` wherever it sits, and a top-level `output`, `classifier` or `score`
    /// (the heads of Burn's Llama port and of Hugging Face's classification models). Use
    /// [`Target::AllLinear`] alone to adapt the head too.
    pub fn all_linear() -> Self {
        Self::new(vec![Target::AllLinear])
            .with_exclude(vec![Target::Regex(OUTPUT_HEAD.to_string())])
    }

    /// These targets, with more names to exclude.
    pub fn excluding<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.exclude
            .extend(names.into_iter().map(|name| Target::Name(name.into())));
        self
    }
}

/// The layer index in `path`: the numeric segment after one of `patterns`, or the first numeric
/// segment when there are no patterns.
pub fn layer_index(path: &str, patterns: Option<&[String]>) -> Option<usize> {
    let segments: Vec<&str> = path.split('.').collect();
    match patterns {
        None => segments.iter().find_map(|segment| segment.parse().ok()),
        Some(patterns) => segments.windows(2).find_map(|pair| {
            patterns
                .iter()
                .any(|pattern| pattern == pair[0])
                .then(|| pair[1].parse().ok())
                .flatten()
        }),
    }
}

/// An attention output projection: `o_proj`, `wo`, BERT's `attention.output.dense`, or an
/// `output` whose parent module's name says attention.
const ATTENTION_OUTPUT: &str =
    r"(?:.*\.)?(?:o_proj|wo|attention\.output\.dense|(?:mha|[^.]*att[^.]*)\.output)";

/// The feed-forward layers of Burn's blocks and ports and of Hugging Face's models.
const FEED_FORWARD: &str = concat!(
    r"(?:.*\.)?(?:linear_inner|linear_outer|w1|w2|w3|gate_proj|up_proj|down_proj|fc1|fc2",
    r"|intermediate\.dense|(?<!attention\.)output\.dense)"
);

/// A model's output head: `lm_head` anywhere, or a top-level `output`, `classifier`, `score`.
const OUTPUT_HEAD: &str = r"(?:.*\.)?lm_head|output|classifier|score";

fn any_of(names: &[&str]) -> Target {
    Target::AnyName(names.iter().map(|name| name.to_string()).collect())
}
