//! Which modules of a model get adapters: PEFT's `target_modules`, on Burn module paths.
//!
//! A Burn module path joins field names and list indices with dots, as in
//! `encoder.layers.3.mha.query`. A [`Target::Name`] matches a path exactly or as a dotted
//! suffix, which is PEFT's rule for names in `target_modules`: `query` matches `query` and
//! `….mha.query`, but not `….subquery`.
//!
//! This file knows about paths and nothing about tensors.

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
}

impl Target {
    /// Whether this target selects the module at `path`.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Target::Name(name) => name_matches(name, path),
            Target::AnyName(names) => names.iter().any(|name| name_matches(name, path)),
        }
    }

    /// The names this target looks for, used to suggest paths when it matched nothing.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Target::Name(name) => vec![name.as_str()],
            Target::AnyName(names) => names.iter().map(String::as_str).collect(),
        }
    }
}

impl Target {
    /// The target as written in reports and errors: `` `query` `` or `` `query` | `q_proj` ``.
    pub fn label(&self) -> String {
        let quoted: Vec<String> = self
            .names()
            .iter()
            .map(|name| format!("`{name}`"))
            .collect();
        quoted.join(" | ")
    }
}

fn name_matches(name: &str, path: &str) -> bool {
    path == name
        || path
            .strip_suffix(name)
            .is_some_and(|prefix| prefix.ends_with('.'))
}

/// The modules to adapt: PEFT's `target_modules`.
///
/// Build it from names, or start from a preset:
///
/// ```
/// use burn_lora::Targets;
///
/// let attention = Targets::attention(); // Q, K, V and O, in Burn's and Hugging Face's names
/// let custom = Targets::names(["q_proj", "v_proj"]);
/// assert!(custom.matches("model.layers.0.self_attn.q_proj"));
/// assert!(!custom.matches("model.layers.0.self_attn.k_proj"));
/// assert!(attention.matches("encoder.layers.0.mha.value"));
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct Targets {
    /// The targets; a module is adapted when any of them matches its path.
    pub include: Vec<Target>,
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

    /// Whether any target selects the module at `path`.
    pub fn matches(&self, path: &str) -> bool {
        self.include.iter().any(|target| target.matches(path))
    }
}

fn any_of(names: &[&str]) -> Target {
    Target::AnyName(names.iter().map(|name| name.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_matches_itself_and_dotted_suffixes_only() {
        let target = Target::Name("proj".into());
        assert!(target.matches("proj"));
        assert!(target.matches("layers.0.proj"));
        // `o_proj` ends in `proj` but not in `.proj`: PEFT does not match it either.
        assert!(!target.matches("layers.0.o_proj"));
        assert!(!target.matches("proj.inner"));
    }

    #[test]
    fn attention_preset_covers_burn_and_hugging_face_names() {
        let targets = Targets::attention();
        for path in [
            "enc.mha.query",
            "enc.mha.key",
            "enc.mha.value",
            "enc.mha.output",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.o_proj",
        ] {
            assert!(targets.matches(path), "{path}");
        }
        assert!(!targets.matches("enc.pwff.linear_inner"));
        assert!(!Targets::attention_qv().matches("enc.mha.key"));
    }

    #[test]
    fn targets_round_trip_through_json() {
        let targets = Targets::attention();
        let json = serde_json::to_string(&targets).unwrap();
        let back: Targets = serde_json::from_str(&json).unwrap();
        assert_eq!(back, targets);
    }
}
