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
//! This file knows about paths and nothing about tensors.

use burn::config::Config;
use regex::Regex;

use crate::LoraError;

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

    /// Compile the target once, checking a regex.
    pub fn compile(&self) -> Result<CompiledTarget, LoraError> {
        Ok(match self {
            Target::Name(name) => CompiledTarget::Names(vec![name.clone()]),
            Target::AnyName(names) => CompiledTarget::Names(names.clone()),
            Target::Regex(pattern) => {
                CompiledTarget::Regex(Regex::new(&format!("^(?:{pattern})$")).map_err(|error| {
                    LoraError::InvalidRegex {
                        pattern: pattern.clone(),
                        message: error.to_string(),
                    }
                })?)
            }
            Target::AllLinear => CompiledTarget::AllLinear,
            Target::ModuleType(module_type) => CompiledTarget::ModuleType(module_type.clone()),
        })
    }
}

/// A [`Target`] ready to match many paths.
#[derive(Debug, Clone)]
pub enum CompiledTarget {
    /// Names, matched exactly or as dotted suffixes.
    Names(Vec<String>),
    /// An anchored regex.
    Regex(Regex),
    /// Every linear layer.
    AllLinear,
    /// Every module of one type.
    ModuleType(String),
}

impl CompiledTarget {
    /// Whether the target selects the module at `path`; `is_linear` says whether it is a
    /// linear layer, which is all that [`Target::AllLinear`] looks at. A
    /// [`Target::ModuleType`] sees a linear layer as a `Linear`.
    pub fn matches(&self, path: &str, is_linear: bool) -> bool {
        let module_type = if is_linear { "Linear" } else { "" };
        self.matches_module(path, module_type)
    }

    /// Whether the target selects the module at `path` of type `module_type` (`Linear`,
    /// `LoraLinear`, `Embedding`, `Conv2d`...).
    pub fn matches_module(&self, path: &str, module_type: &str) -> bool {
        match self {
            CompiledTarget::Names(names) => names.iter().any(|name| name_matches(name, path)),
            CompiledTarget::Regex(regex) => regex.is_match(path),
            CompiledTarget::AllLinear => matches!(module_type, "Linear" | "LoraLinear"),
            CompiledTarget::ModuleType(wanted) => wanted == module_type,
        }
    }
}

fn name_matches(name: &str, path: &str) -> bool {
    path == name
        || path
            .strip_suffix(name)
            .is_some_and(|prefix| prefix.ends_with('.'))
}

/// The modules to adapt: PEFT's `target_modules`, `exclude_modules`, `layers_to_transform` and
/// `layers_pattern`.
///
/// Build it from names, or start from a preset:
///
/// ```
/// use burn_lora::{Target, Targets};
///
/// let attention = Targets::attention(); // Q, K, V and O, in Burn's and Hugging Face's names
/// assert!(attention.matches("encoder.layers.0.mha.value"));
///
/// let qv = Targets::names(["q_proj", "v_proj"]);
/// assert!(qv.matches("model.layers.0.self_attn.q_proj"));
/// assert!(!qv.matches("model.layers.0.self_attn.k_proj"));
///
/// // The first two layers only, every linear layer but the output head.
/// let early = Targets::all_linear()
///     .excluding(["lm_head"])
///     .with_layers_to_transform(Some(vec![0, 1]))
///     .with_layers_pattern(Some(vec!["layers".into()]));
/// assert!(early.matches("layers.1.mlp.fc1"));
/// assert!(!early.matches("layers.2.mlp.fc1"));
/// assert!(!early.matches("lm_head"));
///
/// let regex = Targets::new(vec![Target::Regex(r"layers\.[0-3]\.attn\.(query|value)".into())]);
/// assert!(regex.matches("layers.3.attn.value"));
/// assert!(!regex.matches("layers.4.attn.value"));
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

    /// The attention projections Q, K, V and O.
    ///
    /// Each matches Burn's `MultiHeadAttention` field (`query`, `key`, `value`, `output`) or the
    /// Hugging Face name (`q_proj`, `k_proj`, `v_proj`, `o_proj`).
    pub fn attention() -> Self {
        Self::new(vec![
            any_of(&["query", "q_proj"]),
            any_of(&["key", "k_proj"]),
            any_of(&["value", "v_proj"]),
            any_of(&["output", "o_proj"]),
        ])
    }

    /// The LoRA paper's default: the query and value projections only.
    pub fn attention_qv() -> Self {
        Self::new(vec![
            any_of(&["query", "q_proj"]),
            any_of(&["value", "v_proj"]),
        ])
    }

    /// The feed-forward layers: Burn's `linear_inner` and `linear_outer`, and Hugging Face's
    /// `gate_proj`, `up_proj`, `down_proj`, `fc1` and `fc2`. One target, matched when any of
    /// them is there.
    pub fn feed_forward() -> Self {
        Self::new(vec![any_of(&[
            "linear_inner",
            "linear_outer",
            "gate_proj",
            "up_proj",
            "down_proj",
            "fc1",
            "fc2",
        ])])
    }

    /// Every linear layer, by module type. Add the output head to [`exclude`](Self::exclude)
    /// with [`excluding`](Self::excluding): PEFT's `all-linear` leaves it out too.
    pub fn all_linear() -> Self {
        Self::new(vec![Target::AllLinear])
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

    /// Whether a linear layer at `path` is selected: an `include` target matches, no `exclude`
    /// target does, and its layer index passes `layers_to_transform`.
    ///
    /// # Panics
    ///
    /// Panics on an invalid regex; [`compile`](Self::compile) reports it as an error instead.
    pub fn matches(&self, path: &str) -> bool {
        let compiled = self.compile().expect("valid regex targets");
        compiled.included_by(path, true).is_some()
    }

    /// Compile every regex once, for matching many paths.
    pub fn compile(&self) -> Result<CompiledTargets, LoraError> {
        let compile_all = |targets: &[Target]| -> Result<Vec<CompiledTarget>, LoraError> {
            targets.iter().map(Target::compile).collect()
        };
        Ok(CompiledTargets {
            include: compile_all(&self.include)?,
            exclude: compile_all(&self.exclude)?,
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
        })
    }
}

/// [`Targets`] with every regex compiled.
#[derive(Debug, Clone)]
pub struct CompiledTargets {
    include: Vec<CompiledTarget>,
    exclude: Vec<CompiledTarget>,
    layers_to_transform: Option<Vec<usize>>,
    layers_pattern: Option<Vec<String>>,
}

impl CompiledTargets {
    /// The indices of the `include` targets that select the module at `path`, or `None` when
    /// none does or the module is excluded or outside `layers_to_transform`.
    pub fn included_by(&self, path: &str, is_linear: bool) -> Option<Vec<usize>> {
        let module_type = if is_linear { "Linear" } else { "" };
        self.included_by_module(path, module_type)
    }

    /// [`included_by`](Self::included_by) for a module of type `module_type`.
    pub fn included_by_module(&self, path: &str, module_type: &str) -> Option<Vec<usize>> {
        let hits: Vec<usize> = self
            .include
            .iter()
            .enumerate()
            .filter(|(_, target)| target.matches_module(path, module_type))
            .map(|(index, _)| index)
            .collect();
        let excluded = self
            .exclude
            .iter()
            .any(|target| target.matches_module(path, module_type));
        if hits.is_empty() || excluded || !self.in_selected_layer(path) {
            return None;
        }
        Some(hits)
    }

    /// Whether an `exclude` target names the module at `path`.
    pub fn is_excluded(&self, path: &str, is_linear: bool) -> bool {
        self.exclude
            .iter()
            .any(|target| target.matches(path, is_linear))
    }

    fn in_selected_layer(&self, path: &str) -> bool {
        let Some(layers) = &self.layers_to_transform else {
            return true;
        };
        layer_index(path, self.layers_pattern.as_deref())
            .is_some_and(|index| layers.contains(&index))
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

fn any_of(names: &[&str]) -> Target {
    Target::AnyName(names.iter().map(|name| name.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selects(targets: &Targets, path: &str) -> bool {
        targets.compile().unwrap().included_by(path, true).is_some()
    }

    #[test]
    fn a_name_matches_itself_and_dotted_suffixes_only() {
        let targets = Targets::names(["proj"]);
        assert!(selects(&targets, "proj"));
        assert!(selects(&targets, "layers.0.proj"));
        // `o_proj` ends in `proj` but not in `.proj`: PEFT does not match it either.
        assert!(!selects(&targets, "layers.0.o_proj"));
        assert!(!selects(&targets, "proj.inner"));
    }

    #[test]
    fn a_regex_matches_whole_paths_and_a_name_is_never_a_regex() {
        let regex = Targets::new(vec![Target::Regex(r"layers\.\d+\.q.*".into())]);
        assert!(selects(&regex, "layers.0.query"));
        assert!(
            !selects(&regex, "model.layers.0.query"),
            "anchored at the start"
        );
        // The same text as a name is taken literally and matches nothing here.
        let name = Targets::names([r"layers\.\d+\.q.*"]);
        assert!(!selects(&name, "layers.0.query"));
    }

    #[test]
    fn an_invalid_regex_is_an_error() {
        let targets = Targets::new(vec![Target::Regex("layers.(".into())]);
        let error = targets.compile().unwrap_err();
        assert!(
            matches!(error, LoraError::InvalidRegex { ref pattern, .. } if pattern == "layers.(")
        );
    }

    #[test]
    fn all_linear_goes_by_type_and_exclude_wins() {
        let compiled = Targets::all_linear()
            .excluding(["lm_head"])
            .compile()
            .unwrap();
        assert!(compiled.included_by("anything.at.all", true).is_some());
        assert!(compiled.included_by("embedding", false).is_none());
        assert!(compiled.included_by("lm_head", true).is_none());
        assert!(compiled.included_by("decoder.lm_head", true).is_none());
    }

    #[test]
    fn layers_to_transform_reads_the_index_after_the_pattern() {
        let targets = Targets::names(["query"])
            .with_layers_to_transform(Some(vec![1, 3]))
            .with_layers_pattern(Some(vec!["blocks".into()]));
        assert!(selects(&targets, "encoder.0.blocks.1.query"));
        assert!(!selects(&targets, "encoder.1.blocks.0.query"));
        assert!(
            !selects(&targets, "head.query"),
            "no layer index: not selected"
        );
        let first_number = Targets::names(["query"]).with_layers_to_transform(Some(vec![0]));
        assert!(selects(&first_number, "encoder.0.blocks.1.query"));
        assert_eq!(
            layer_index("h.12.attn.c_attn", Some(&["h".into()])),
            Some(12)
        );
    }

    #[test]
    fn presets_cover_burn_and_hugging_face_names() {
        let attention = Targets::attention();
        for path in [
            "enc.mha.query",
            "enc.mha.key",
            "enc.mha.value",
            "enc.mha.output",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.o_proj",
        ] {
            assert!(attention.matches(path), "{path}");
        }
        assert!(!attention.matches("enc.pwff.linear_inner"));
        assert!(!Targets::attention_qv().matches("enc.mha.key"));
        let feed_forward = Targets::feed_forward();
        for path in ["enc.pwff.linear_inner", "mlp.gate_proj", "mlp.fc2"] {
            assert!(feed_forward.matches(path), "{path}");
        }
        assert!(!feed_forward.matches("enc.mha.query"));
    }

    #[test]
    fn targets_round_trip_through_json() {
        let targets = Targets::all_linear()
            .excluding(["lm_head"])
            .with_layers_to_transform(Some(vec![0, 2]));
        let json = serde_json::to_string(&targets).unwrap();
        let back: Targets = serde_json::from_str(&json).unwrap();
        assert_eq!(back, targets);
    }
}
