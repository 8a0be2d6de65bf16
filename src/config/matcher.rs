//! The one compiled matcher: [`Targets`] and PEFT's pattern keys, ready to match many module
//! paths.
//!
//! [`LoraConfig`](crate::LoraConfig)'s targets and rank/alpha patterns, and the
//! `target_modules`, `exclude_modules`, `rank_pattern` and `alpha_pattern` of a PEFT
//! `adapter_config.json`, all compile to these types, so a path is selected by one rule
//! whichever of them asked.
//!
//! Regexes follow Python's `re` dialect as far as PEFT's configs use it, lookarounds included
//! (`fancy-regex`). A regex that gives up on a pathological path (its backtracking limit)
//! matches nothing there.

use fancy_regex::Regex;

use super::targets::{Target, Targets, layer_index};
use crate::LoraError;

impl Target {
    /// Compile the target once, checking a regex.
    pub(crate) fn compile(&self) -> Result<CompiledTarget, LoraError> {
        Ok(match self {
            Target::Name(name) => CompiledTarget::Names(vec![name.clone()]),
            Target::AnyName(names) => CompiledTarget::Names(names.clone()),
            Target::Regex(pattern) => CompiledTarget::Regex(anchored(pattern, pattern)?),
            Target::AllLinear => CompiledTarget::AllLinear,
            Target::ModuleType(module_type) => CompiledTarget::ModuleType(module_type.clone()),
        })
    }
}

/// `pattern` compiled to match whole paths only; `shown` is the pattern as the user wrote it.
fn anchored(pattern: &str, shown: &str) -> Result<Regex, LoraError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|error| LoraError::InvalidRegex {
        pattern: shown.to_string(),
        message: error.to_string(),
    })
}

/// A [`Target`] ready to match many paths.
#[derive(Debug, Clone)]
pub(crate) enum CompiledTarget {
    /// Names, matched exactly or as dotted suffixes.
    Names(Vec<String>),
    /// An anchored regex.
    Regex(Regex),
    /// Every linear layer.
    AllLinear,
    /// Every module of one type.
    ModuleType(String),
    /// A key of PEFT's `rank_pattern` or `alpha_pattern` (`get_pattern_key`): the path equals
    /// the key, or the key, read as a regex, matches a dotted suffix of it. A key that is no
    /// valid regex matches by equality alone, as in PEFT's Python.
    PatternKey {
        /// The key as written.
        key: String,
        /// `^(?:.*\.)?(?:key)$`, when the key compiles.
        suffix: Option<Regex>,
    },
}

impl CompiledTarget {
    /// The matcher of one `rank_pattern` or `alpha_pattern` key of a PEFT config. A key that
    /// is no regex matches by equality (PEFT's own fallback);
    /// [`pattern_key_checked`](Self::pattern_key_checked) refuses it instead.
    pub(crate) fn pattern_key(key: &str) -> Self {
        let suffix = anchored(&format!(r"(?:.*\.)?(?:{key})"), key).ok();
        CompiledTarget::PatternKey {
            key: key.to_string(),
            suffix,
        }
    }

    /// [`pattern_key`](Self::pattern_key), with [`LoraError::InvalidRegex`] for a key that
    /// does not compile.
    pub(crate) fn pattern_key_checked(key: &str) -> Result<Self, LoraError> {
        let suffix = anchored(&format!(r"(?:.*\.)?(?:{key})"), key)?;
        Ok(CompiledTarget::PatternKey {
            key: key.to_string(),
            suffix: Some(suffix),
        })
    }

    /// Whether the target selects the module at `path` of type `module_type` (`Linear`,
    /// `LoraLinear`, `Embedding`, `Conv2d`...).
    pub(crate) fn matches_module(&self, path: &str, module_type: &str) -> bool {
        match self {
            CompiledTarget::Names(names) => names.iter().any(|name| name_matches(name, path)),
            CompiledTarget::Regex(regex) => regex.is_match(path).unwrap_or(false),
            CompiledTarget::AllLinear => matches!(module_type, "Linear" | "LoraLinear"),
            CompiledTarget::ModuleType(wanted) => wanted == module_type,
            CompiledTarget::PatternKey { key, suffix } => {
                key == path
                    || suffix
                        .as_ref()
                        .is_some_and(|regex| regex.is_match(path).unwrap_or(false))
            }
        }
    }
}

/// Whether `path` is `name` or ends in `.name`.
fn name_matches(name: &str, path: &str) -> bool {
    path == name
        || path
            .strip_suffix(name)
            .is_some_and(|prefix| prefix.ends_with('.'))
}

/// The first of `patterns` (PEFT pattern keys, or [`LoraConfig`](crate::LoraConfig)'s rank and
/// alpha patterns) that selects the module at `path`, with its index and value.
pub(crate) fn first_match<T: Copy>(
    patterns: &[(CompiledTarget, T)],
    path: &str,
    module_type: &str,
) -> Option<(usize, T)> {
    patterns
        .iter()
        .enumerate()
        .find(|(_, (target, _))| target.matches_module(path, module_type))
        .map(|(index, (_, value))| (index, *value))
}

impl Targets {
    /// Whether a linear layer at `path` is selected: an `include` target matches, no `exclude`
    /// target does, and its layer index passes `layers_to_transform`.
    ///
    /// # Errors
    ///
    /// [`LoraError::InvalidRegex`] for a regex target that does not compile.
    pub fn matches(&self, path: &str) -> Result<bool, LoraError> {
        Ok(self.compile()?.included_by_module(path, "Linear").is_some())
    }

    /// Compile every regex once, for matching many paths.
    pub(crate) fn compile(&self) -> Result<CompiledTargets, LoraError> {
        let compile_all = |targets: &[Target]| -> Result<Vec<CompiledTarget>, LoraError> {
            targets.iter().map(Target::compile).collect()
        };
        Ok(CompiledTargets {
            parameters: compile_all(&self.parameters)?,
            include: compile_all(&self.include)?,
            exclude: compile_all(&self.exclude)?,
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
        })
    }
}

/// [`Targets`] with every regex compiled.
#[derive(Debug, Clone)]
pub(crate) struct CompiledTargets {
    parameters: Vec<CompiledTarget>,
    include: Vec<CompiledTarget>,
    exclude: Vec<CompiledTarget>,
    layers_to_transform: Option<Vec<usize>>,
    layers_pattern: Option<Vec<String>>,
}

impl CompiledTargets {
    /// The indices of the `include` targets that select the module at `path` of type
    /// `module_type`, or `None` when none does or the module is excluded or outside
    /// `layers_to_transform`.
    pub(crate) fn included_by_module(&self, path: &str, module_type: &str) -> Option<Vec<usize>> {
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

    /// The indices of the `parameters` targets that select the parameter at `path`, or `None`
    /// when none does.
    pub(crate) fn included_parameter(&self, path: &str) -> Option<Vec<usize>> {
        let hits: Vec<usize> = (self.parameters.iter().enumerate())
            .filter(|(_, target)| target.matches_module(path, ""))
            .map(|(index, _)| index)
            .collect();
        (!hits.is_empty()).then_some(hits)
    }

    fn in_selected_layer(&self, path: &str) -> bool {
        let Some(layers) = &self.layers_to_transform else {
            return true;
        };
        layer_index(path, self.layers_pattern.as_deref())
            .is_some_and(|index| layers.contains(&index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::layer_index;

    fn selects(targets: &Targets, path: &str) -> bool {
        targets
            .compile()
            .unwrap()
            .included_by_module(path, "Linear")
            .is_some()
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
        // Matching a path with it is the same error, not a panic.
        let error = targets.matches("layers.0.q_proj").unwrap_err();
        assert!(matches!(error, LoraError::InvalidRegex { .. }));
    }

    #[test]
    fn all_linear_goes_by_type_and_exclude_wins() {
        let compiled = Targets::all_linear()
            .excluding(["lm_head"])
            .compile()
            .unwrap();
        assert!(
            compiled
                .included_by_module("anything.at.all", "Linear")
                .is_some()
        );
        assert!(compiled.included_by_module("embedding", "").is_none());
        assert!(compiled.included_by_module("lm_head", "Linear").is_none());
        assert!(
            compiled
                .included_by_module("decoder.lm_head", "Linear")
                .is_none()
        );
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
            assert!(attention.matches(path).unwrap(), "{path}");
        }
        assert!(!attention.matches("enc.pwff.linear_inner").unwrap());
        assert!(!Targets::attention_qv().matches("enc.mha.key").unwrap());
        let feed_forward = Targets::feed_forward();
        for path in ["enc.pwff.linear_inner", "mlp.gate_proj", "mlp.fc2"] {
            assert!(feed_forward.matches(path).unwrap(), "{path}");
        }
        assert!(!feed_forward.matches("enc.mha.query").unwrap());
    }

    #[test]
    fn presets_are_right_on_real_models() {
        let attention = Targets::attention();
        // Burn's Llama port: `wq/wk/wv/wo` are adapted, its `output` head is not.
        for path in [
            "layers.0.attention.wq",
            "layers.0.attention.wk",
            "layers.0.attention.wv",
            "layers.0.attention.wo",
            "dec.layers.1.cross_attn.output",
            "bert.encoder.layer.0.attention.self.query",
            "bert.encoder.layer.0.attention.output.dense",
        ] {
            assert!(attention.matches(path).unwrap(), "{path}");
        }
        for path in [
            "output",
            "model.output",
            "lm_head",
            "bert.encoder.layer.0.output.dense",
            "blocks.0.mlp.output",
        ] {
            assert!(!attention.matches(path).unwrap(), "{path}");
        }
        let feed_forward = Targets::feed_forward();
        for path in [
            "layers.0.feed_forward.swiglu.linear_inner",
            "layers.0.feed_forward.w2",
            "bert.encoder.layer.0.intermediate.dense",
            "bert.encoder.layer.0.output.dense",
        ] {
            assert!(feed_forward.matches(path).unwrap(), "{path}");
        }
        for path in [
            "bert.encoder.layer.0.attention.output.dense",
            "output",
            "lm_head",
        ] {
            assert!(!feed_forward.matches(path).unwrap(), "{path}");
        }
        let gpt2 = Targets::gpt2_attention();
        assert!(gpt2.matches("transformer.h.3.attn.c_attn").unwrap());
        assert!(gpt2.matches("transformer.h.3.attn.c_proj").unwrap());
        assert!(!gpt2.matches("transformer.h.3.mlp.c_proj").unwrap());
        let mlp = Targets::gpt2_feed_forward();
        assert!(mlp.matches("transformer.h.3.mlp.c_fc").unwrap());
        assert!(mlp.matches("transformer.h.3.mlp.c_proj").unwrap());
        assert!(!mlp.matches("transformer.h.3.attn.c_proj").unwrap());
        // `all-linear` leaves the output head out, wherever the model puts it.
        let all = Targets::all_linear();
        for path in ["lm_head", "model.lm_head", "output", "classifier", "score"] {
            assert!(!all.matches(path).unwrap(), "{path}");
        }
        for path in [
            "layers.0.attention.output",
            "blocks.0.output",
            "pooler.dense",
        ] {
            assert!(all.matches(path).unwrap(), "{path}");
        }
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

    #[test]
    fn pattern_keys_match_equal_paths_and_dotted_regex_suffixes() {
        let key = CompiledTarget::pattern_key("v_proj");
        assert!(key.matches_module("layers.0.self_attn.v_proj", ""));
        assert!(key.matches_module("v_proj", ""));
        assert!(!key.matches_module("layers.0.xv_proj", ""));
        let regex = CompiledTarget::pattern_key(r"layers\.[01]\.mlp\.down_proj");
        assert!(regex.matches_module("model.layers.1.mlp.down_proj", ""));
        assert!(!regex.matches_module("model.layers.2.mlp.down_proj", ""));
        // A key that is no regex still matches itself.
        let broken = CompiledTarget::pattern_key("q_proj(");
        assert!(broken.matches_module("q_proj(", ""));
        assert!(!broken.matches_module("layers.0.q_proj", ""));
    }

    #[test]
    fn python_lookarounds_compile_and_match() {
        // A real PEFT pattern: every q_proj except the first layer's.
        let target = Target::Regex(r"^(?!.*layers\.0\.).*q_proj$".into())
            .compile()
            .unwrap();
        assert!(target.matches_module("model.layers.1.self_attn.q_proj", "Linear"));
        assert!(!target.matches_module("model.layers.0.self_attn.q_proj", "Linear"));
        assert!(CompiledTarget::pattern_key_checked("q_proj(").is_err());
        let key = CompiledTarget::pattern_key_checked(r"(?<=mlp\.)down_proj").unwrap();
        assert!(key.matches_module("layers.3.mlp.down_proj", ""));
        assert!(!key.matches_module("layers.3.attn.down_proj", ""));
    }
}
