//! `adapter_config.json`: PEFT's description of a LoRA adapter, read strictly and written in
//! PEFT's own field names.
//!
//! Reading is two steps: serde derives parse the fields PEFT defines (each error names the
//! field's path, such as `rank_pattern.v_proj`), keeping every unknown field as it was, then
//! [`AdapterConfig::validate`] refuses values and features burn-lora cannot honour. The module
//! selection a config describes (`target_modules`, `exclude_modules`, `layers_to_transform`,
//! `rank_pattern`...) is matched by the crate's one matcher, the one [`Targets`] use.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::matcher::{CompiledTarget, first_match};
use crate::config::scaling;
use crate::{LoraError, Target, Targets};

/// PEFT's `target_modules`: a list of names (a module matches when its path equals a name or
/// ends with `.name`) or one regex that must match the whole path.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names, matched as path suffixes.
    Names(Vec<String>),
    /// One regex, matched against the whole path (Python's `re.fullmatch`).
    Regex(String),
}

impl TargetModules {
    /// The same selection as [`Target`]s: each name a [`Target::Name`], a regex a
    /// [`Target::Regex`].
    pub fn to_targets(&self) -> Vec<Target> {
        match self {
            TargetModules::Names(names) => names.iter().cloned().map(Target::Name).collect(),
            TargetModules::Regex(pattern) => vec![Target::Regex(pattern.clone())],
        }
    }
}

/// The LoRA settings of a PEFT adapter, as `adapter_config.json` holds them.
///
/// Unknown fields are kept in [`extra`](Self::extra) and written back, since PEFT adds fields
/// often. Fields that would change what the adapter means (an unconverted base-rewriting
/// init, QALoRA...) are refused by [`from_json`](Self::from_json).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `r`: the default rank.
    pub r: usize,
    /// `lora_alpha`: the default alpha.
    pub lora_alpha: f64,
    /// `lora_dropout`.
    pub lora_dropout: f64,
    /// `use_rslora`: scale `alpha/√r` instead of `alpha/r`.
    pub use_rslora: bool,
    /// `use_dora`: the adapters are DoRA, with a `lora_magnitude_vector` per module.
    pub use_dora: bool,
    /// `lora_bias`: `lora_B` has a bias (`lora_B.bias`, `[d_out]`) per module, added as
    /// `scale · bias`.
    pub lora_bias: bool,
    /// `target_modules`, if given.
    pub target_modules: Option<TargetModules>,
    /// `exclude_modules`, if given.
    pub exclude_modules: Option<TargetModules>,
    /// `layers_to_transform`, if given.
    pub layers_to_transform: Option<Vec<usize>>,
    /// `layers_pattern`, if given.
    pub layers_pattern: Option<Vec<String>>,
    /// `rank_pattern`: `(pattern, rank)` in file order.
    pub rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`: `(pattern, alpha)` in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// `task_type`, such as `CAUSAL_LM`.
    pub task_type: Option<String>,
    /// `modules_to_save`: modules the adapter trains in full, such as a classifier head. Their
    /// copies are in the weights file under the modules' own keys (`…classifier.weight`).
    pub modules_to_save: Option<Vec<String>>,
    /// `trainable_token_indices`: per embedding module (a name, exact or dotted suffix), the
    /// token ids whose rows the adapter trains, in file order. PEFT's list form names
    /// `embed_tokens`. The rows are in the weights file as
    /// `…<module>.token_adapter.trainable_tokens_delta`, `[ids, dim]`.
    pub trainable_token_indices: Vec<(String, Vec<usize>)>,
    /// `target_parameters`: raw parameters with adapters (a mixture of experts' expert banks),
    /// each a parameter path matched exactly or as a dotted suffix, in file order. Their
    /// factors are keyed by the owning module, with one `base_layer.` more for each targeted
    /// parameter of that module registered after it (PEFT nests its wrappers).
    pub target_parameters: Vec<String>,
    /// Every other field, kept as read.
    pub extra: Map<String, Value>,
}

/// The fields of `adapter_config.json` as serde reads them; `null` reads as absent.
#[derive(Deserialize)]
struct ConfigFile {
    peft_type: Option<String>,
    r: Option<Rank>,
    lora_alpha: Option<f64>,
    lora_dropout: Option<f64>,
    use_rslora: Option<bool>,
    use_dora: Option<bool>,
    lora_bias: Option<bool>,
    target_modules: Option<TargetModules>,
    exclude_modules: Option<TargetModules>,
    layers_to_transform: Option<OneOrMany<usize>>,
    layers_pattern: Option<OneOrMany<String>>,
    #[serde(default, deserialize_with = "ordered")]
    rank_pattern: Vec<(String, Rank)>,
    #[serde(default, deserialize_with = "ordered")]
    alpha_pattern: Vec<(String, f64)>,
    base_model_name_or_path: Option<String>,
    task_type: Option<String>,
    modules_to_save: Option<Vec<String>>,
    trainable_token_indices: Option<Value>,
    target_parameters: Option<Vec<String>>,
    bias: Option<String>,
    fan_in_fan_out: Option<bool>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// A rank: a positive integer.
#[derive(Clone, Copy)]
struct Rank(usize);

impl<'de> Deserialize<'de> for Rank {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Rank;
            fn expecting(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
                f.write_str("a positive integer")
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Rank, E> {
                match usize::try_from(value) {
                    Ok(rank) if rank > 0 => Ok(Rank(rank)),
                    _ => Err(E::invalid_value(
                        serde::de::Unexpected::Unsigned(value),
                        &self,
                    )),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Rank, E> {
                match u64::try_from(value) {
                    Ok(value) => self.visit_u64(value),
                    Err(_) => Err(E::invalid_value(
                        serde::de::Unexpected::Signed(value),
                        &self,
                    )),
                }
            }
        }
        deserializer.deserialize_u64(Visitor)
    }
}

/// PEFT's fields that take one value or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(value) => vec![value],
            OneOrMany::Many(values) => values,
        }
    }
}

/// A JSON object read as `(key, value)` pairs in file order (PEFT's patterns are ordered: the
/// first matching key wins).
fn ordered<'de, D, T>(deserializer: D) -> Result<Vec<(String, T)>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Visitor<T>(core::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
        type Value = Vec<(String, T)>;
        fn expecting(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
            f.write_str("an object")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::new();
            while let Some((key, value)) = map.next_entry::<String, T>()? {
                pairs.push((key, value));
            }
            Ok(pairs)
        }
    }
    deserializer.deserialize_any(Visitor(core::marker::PhantomData))
}

impl AdapterConfig {
    /// A config with PEFT's defaults and rank `r`.
    pub fn new(r: usize, lora_alpha: f64) -> Self {
        Self {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            lora_bias: false,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            base_model_name_or_path: None,
            task_type: None,
            modules_to_save: None,
            trainable_token_indices: Vec::new(),
            target_parameters: Vec::new(),
            extra: Map::new(),
        }
    }

    /// Parse `adapter_config.json` text; `path` names the file in errors.
    ///
    /// # Errors
    ///
    /// [`LoraError::InvalidConfig`] for invalid JSON, a missing `r`, `lora_alpha` or
    /// `peft_type`, or a field of the wrong type; [`LoraError::UnsupportedAdapter`] for a
    /// non-LoRA `peft_type` or a feature burn-lora does not load.
    pub fn from_json(text: &str, path: &str) -> Result<Self, LoraError> {
        let invalid = |message: String| LoraError::InvalidConfig {
            path: path.to_string(),
            message,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|error| invalid(format!("not JSON: {error}")))?;
        if !value.is_object() {
            return Err(invalid(format!(
                "expected a JSON object, found {}",
                kind(&value)
            )));
        }
        let file: ConfigFile = serde_path_to_error::deserialize(value)
            .map_err(|error| invalid(format!("`{}`: {}", error.path(), error.inner())))?;
        let unsupported = |feature: String| LoraError::UnsupportedAdapter {
            path: path.to_string(),
            feature,
        };
        let config = Self::from_file(file, &invalid, &unsupported)?;
        config.validate(path)?;
        Ok(config)
    }

    /// The fields serde read, with PEFT's defaults for the absent ones. Refuses a `peft_type`
    /// other than `LORA` and trained base biases, which no field of [`AdapterConfig`] holds.
    fn from_file(
        file: ConfigFile,
        invalid: &dyn Fn(String) -> LoraError,
        unsupported: &dyn Fn(String) -> LoraError,
    ) -> Result<Self, LoraError> {
        match file.peft_type.as_deref() {
            Some("LORA") => {}
            Some(other) => return Err(unsupported(format!("peft_type \"{other}\" (only LORA)"))),
            None => return Err(invalid("missing field `peft_type`".into())),
        }
        if let Some(bias) = file.bias.filter(|bias| bias != "none") {
            return Err(unsupported(format!(
                "bias = \"{bias}\" (trained base biases)"
            )));
        }
        // Only its type is checked: an adapter file never depends on the base's layout.
        let _ = file.fan_in_fan_out;
        let (use_dora, lora_bias) = (
            file.use_dora.unwrap_or(false),
            file.lora_bias.unwrap_or(false),
        );
        if use_dora && lora_bias {
            // PEFT refuses to make such an adapter.
            return Err(unsupported(
                "lora_bias = true with use_dora = true (PEFT does not support DoRA with a bias \
                 on lora_B)"
                    .into(),
            ));
        }
        Ok(Self {
            r: file.r.ok_or_else(|| invalid("missing field `r`".into()))?.0,
            lora_alpha: file
                .lora_alpha
                .ok_or_else(|| invalid("missing field `lora_alpha`".into()))?,
            lora_dropout: file.lora_dropout.unwrap_or(0.0),
            use_rslora: file.use_rslora.unwrap_or(false),
            use_dora,
            lora_bias,
            target_modules: file.target_modules,
            exclude_modules: file.exclude_modules,
            layers_to_transform: file.layers_to_transform.map(OneOrMany::into_vec),
            layers_pattern: file.layers_pattern.map(OneOrMany::into_vec),
            rank_pattern: file
                .rank_pattern
                .into_iter()
                .map(|(key, rank)| (key, rank.0))
                .collect(),
            alpha_pattern: file.alpha_pattern,
            base_model_name_or_path: file.base_model_name_or_path,
            task_type: file.task_type,
            modules_to_save: file.modules_to_save,
            trainable_token_indices: token_indices(file.trainable_token_indices, invalid)?,
            target_parameters: file.target_parameters.unwrap_or_default(),
            extra: file.extra,
        })
    }

    /// Check the values, and refuse the features burn-lora cannot reproduce that
    /// [`extra`](Self::extra) holds; `path` names the file in errors.
    /// [`from_json`](Self::from_json) calls it.
    ///
    /// # Errors
    ///
    /// [`LoraError::InvalidConfig`] for a value out of range, and
    /// [`LoraError::UnsupportedAdapter`] for a refused feature.
    pub fn validate(&self, path: &str) -> Result<(), LoraError> {
        let invalid = |message: String| LoraError::InvalidConfig {
            path: path.to_string(),
            message,
        };
        let unsupported = |feature: String| LoraError::UnsupportedAdapter {
            path: path.to_string(),
            feature,
        };
        refuse_unsupported(&self.extra, &unsupported)?;
        if !self.target_parameters.is_empty() {
            // PEFT's ParamWrapper refuses these: the update composes into the parameter.
            let refused = [
                (self.lora_dropout != 0.0, "lora_dropout"),
                (self.use_dora, "use_dora"),
                (self.lora_bias, "lora_bias"),
            ];
            if let Some((_, field)) = refused.into_iter().find(|(set, _)| *set) {
                return Err(unsupported(format!(
                    "{field} with target_parameters (PEFT does not support it either)"
                )));
            }
        }
        if self.r == 0 {
            return Err(invalid("`r` must be a positive integer, found 0".into()));
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return Err(invalid(format!(
                "`lora_alpha` must be a positive number, found {}",
                self.lora_alpha
            )));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(format!(
                "`lora_dropout` must be in [0, 1), found {}",
                self.lora_dropout
            )));
        }
        for (key, alpha) in &self.alpha_pattern {
            if !alpha.is_finite() || *alpha <= 0.0 {
                return Err(invalid(format!(
                    "`alpha_pattern[\"{key}\"]` must be a positive number, found {alpha}"
                )));
            }
        }
        // A pattern that does not compile would silently give its modules the default rank
        // or alpha: refuse it, naming it.
        let keys = self
            .rank_pattern
            .iter()
            .map(|(key, _)| ("rank_pattern", key))
            .chain(
                self.alpha_pattern
                    .iter()
                    .map(|(key, _)| ("alpha_pattern", key)),
            );
        for (field, key) in keys {
            if let Err(error) = CompiledTarget::pattern_key_checked(key) {
                return Err(invalid(format!("`{field}` key \"{key}\": {error}")));
            }
        }
        if let Some(targets) = self.targets()
            && let Err(error) = targets.compile()
        {
            return Err(invalid(format!(
                "`target_modules` or `exclude_modules`: {error}"
            )));
        }
        Ok(())
    }

    /// The config as PEFT writes it, pretty-printed.
    pub fn to_json(&self) -> String {
        let modules = |modules: &Option<TargetModules>| match modules {
            None => Value::Null,
            Some(TargetModules::Names(names)) => json!(names),
            Some(TargetModules::Regex(regex)) => json!(regex),
        };
        let mut fields = Map::new();
        // Defaults PEFT writes, which `extra` may override with what a read file held.
        for (key, value) in [
            ("inference_mode", json!(true)),
            ("init_lora_weights", json!(true)),
            ("revision", Value::Null),
        ] {
            fields.insert(key.to_string(), value);
        }
        fields.extend(self.extra.clone());
        let pairs = |pairs: Vec<(String, Value)>| Value::Object(pairs.into_iter().collect());
        for (key, value) in [
            ("peft_type", json!("LORA")),
            ("task_type", json!(self.task_type)),
            (
                "base_model_name_or_path",
                json!(self.base_model_name_or_path),
            ),
            ("r", json!(self.r)),
            ("lora_alpha", number(self.lora_alpha)),
            ("lora_dropout", number(self.lora_dropout)),
            ("use_rslora", json!(self.use_rslora)),
            ("use_dora", json!(self.use_dora)),
            ("lora_bias", json!(self.lora_bias)),
            ("bias", json!("none")),
            ("fan_in_fan_out", json!(false)),
            ("target_modules", modules(&self.target_modules)),
            ("modules_to_save", json!(self.modules_to_save)),
            (
                "trainable_token_indices",
                match self.trainable_token_indices.is_empty() {
                    true => Value::Null,
                    false => pairs(
                        (self.trainable_token_indices.iter())
                            .map(|(module, ids)| (module.clone(), json!(ids)))
                            .collect(),
                    ),
                },
            ),
            (
                "target_parameters",
                match self.target_parameters.is_empty() {
                    true => Value::Null,
                    false => json!(self.target_parameters),
                },
            ),
            ("exclude_modules", modules(&self.exclude_modules)),
            ("layers_to_transform", json!(self.layers_to_transform)),
            ("layers_pattern", json!(self.layers_pattern)),
            (
                "rank_pattern",
                pairs(
                    self.rank_pattern
                        .iter()
                        .map(|(key, rank)| (key.clone(), json!(rank)))
                        .collect(),
                ),
            ),
            (
                "alpha_pattern",
                pairs(
                    self.alpha_pattern
                        .iter()
                        .map(|(key, alpha)| (key.clone(), number(*alpha)))
                        .collect(),
                ),
            ),
        ] {
            fields.insert(key.to_string(), value);
        }
        serde_json::to_string_pretty(&Value::Object(fields)).expect("JSON values serialize")
    }

    /// The rank PEFT gives the module at `peft_path`: the first matching `rank_pattern`, else `r`.
    pub fn rank_for(&self, peft_path: &str) -> (usize, Option<&str>) {
        match pattern_match(&self.rank_pattern, peft_path) {
            Some(index) => (
                self.rank_pattern[index].1,
                Some(&self.rank_pattern[index].0),
            ),
            None => (self.r, None),
        }
    }

    /// The alpha PEFT gives the module at `peft_path`: the first matching `alpha_pattern`,
    /// else `lora_alpha`.
    pub fn alpha_for(&self, peft_path: &str) -> f64 {
        pattern_match(&self.alpha_pattern, peft_path)
            .map_or(self.lora_alpha, |index| self.alpha_pattern[index].1)
    }

    /// The scale of an adapter of `rank` and `alpha` under this config.
    pub fn scale(&self, rank: usize, alpha: f64) -> f64 {
        scaling::scale(rank, alpha, self.use_rslora)
    }

    /// The modules the config selects, as [`Targets`]: `target_modules`, `exclude_modules`,
    /// `layers_to_transform` and `layers_pattern`. `None` without `target_modules`.
    pub fn targets(&self) -> Option<Targets> {
        let include = self.target_modules.as_ref()?.to_targets();
        let exclude = self
            .exclude_modules
            .as_ref()
            .map(TargetModules::to_targets)
            .unwrap_or_default();
        Some(
            Targets::new(include)
                .with_exclude(exclude)
                .with_layers_to_transform(self.layers_to_transform.clone())
                .with_layers_pattern(self.layers_pattern.clone())
                .with_parameters(
                    (self.target_parameters.iter())
                        .map(|name| crate::Target::Name(name.clone()))
                        .collect(),
                ),
        )
    }

    /// Whether `target_parameters` selects the parameter at `peft_path` (its PEFT name,
    /// `<module>.<parameter>`): a name equal to it or a dotted suffix of it, as PEFT matches.
    pub fn selects_parameter(&self, peft_path: &str) -> bool {
        (self.target_parameters.iter()).any(|name| {
            peft_path == name
                || peft_path
                    .strip_suffix(name.as_str())
                    .is_some_and(|prefix| prefix.ends_with('.'))
        })
    }

    /// Whether the config selects the module at `peft_path` (its PEFT name); `None` when it
    /// has no `target_modules` or holds a regex that does not compile (which
    /// [`validate`](Self::validate) refuses).
    pub fn selects(&self, peft_path: &str) -> Option<bool> {
        let compiled = self.targets()?.compile().ok()?;
        Some(compiled.included_by_module(peft_path, "").is_some())
    }
}

/// The index of the first PEFT pattern key (`get_pattern_key`) that matches `path`.
fn pattern_match<T>(patterns: &[(String, T)], path: &str) -> Option<usize> {
    let keys: Vec<(CompiledTarget, usize)> = patterns
        .iter()
        .enumerate()
        .map(|(index, (key, _))| (CompiledTarget::pattern_key(key), index))
        .collect();
    first_match(&keys, path, "").map(|(_, index)| index)
}

/// Refuse the PEFT features whose adapters burn-lora cannot reproduce, before anything loads.
fn refuse_unsupported(
    fields: &Map<String, Value>,
    unsupported: &dyn Fn(String) -> LoraError,
) -> Result<(), LoraError> {
    let set = |key: &str| match fields.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(Value::Object(items)) => !items.is_empty(),
        Some(Value::String(text)) => !text.is_empty(),
        Some(_) => true,
    };
    let refused = [
        ("layer_replication", "layer_replication"),
        ("use_qalora", "QALoRA (use_qalora = true)"),
        ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ];
    for (key, feature) in refused {
        if set(key) {
            return Err(unsupported(format!("{feature}: {}", fields[key])));
        }
    }
    // Variants whose config is `null` unless they are on, and which change what the factors
    // compute: any value at all is refused.
    let variants = [
        (
            "kasa_config",
            "KaSA (kasa_config: a truncated base and a trained diagonal between A and B)",
        ),
        (
            "arrow_config",
            "an Arrow router (arrow_config: it mixes other adapters per token)",
        ),
    ];
    for (key, feature) in variants {
        if !matches!(fields.get(key), None | Some(Value::Null)) {
            return Err(unsupported(format!("{feature}: {}", fields[key])));
        }
    }
    if let Some(Value::String(init)) = fields.get("init_lora_weights") {
        let lower = init.to_lowercase();
        let rewrites_base = ["pissa", "olora", "loftq", "corda", "lora_ga"]
            .iter()
            .any(|method| lower.starts_with(method));
        if rewrites_base {
            return Err(unsupported(format!(
                "init_lora_weights = \"{init}\", which rewrites the base weights; save it from \
                 PEFT with `path_initial_model_for_weight_conversion` (burn-lora's own saves \
                 convert), which makes a plain LoRA delta against the original base"
            )));
        }
    }
    Ok(())
}

/// PEFT's `trainable_token_indices`: `null`, a list of token ids (for `embed_tokens`), or an
/// object from module names to lists of token ids.
fn token_indices(
    value: Option<Value>,
    invalid: &dyn Fn(String) -> LoraError,
) -> Result<Vec<(String, Vec<usize>)>, LoraError> {
    let ids = |value: &Value, field: &str| -> Result<Vec<usize>, LoraError> {
        let problem = || invalid(format!("`{field}`: expected a list of token ids"));
        let Value::Array(items) = value else {
            return Err(problem());
        };
        items
            .iter()
            .map(|item| item.as_u64().map(|id| id as usize).ok_or_else(problem))
            .collect()
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(list @ Value::Array(_)) => Ok(vec![(
            "embed_tokens".to_string(),
            ids(&list, "trainable_token_indices")?,
        )]),
        Some(Value::Object(modules)) => modules
            .iter()
            .map(|(module, list)| {
                let field = format!("trainable_token_indices.{module}");
                Ok((module.clone(), ids(list, &field)?))
            })
            .collect(),
        Some(other) => Err(invalid(format!(
            "`trainable_token_indices`: expected a list or an object, found {}",
            kind(&other)
        ))),
    }
}

/// What kind of JSON value this is, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A JSON number, written as an integer when it is one (PEFT writes `lora_alpha: 16`).
fn number(value: f64) -> Value {
    match value.fract() == 0.0 && value.abs() < 1e15 {
        true => json!(value as i64),
        false => json!(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_round_trips_through_json() {
        let mut config = AdapterConfig::new(8, 16.0);
        config.use_rslora = true;
        config.use_dora = true;
        config.rank_pattern = vec![("v_proj".into(), 4)];
        config.alpha_pattern = vec![("layers.1.o_proj".into(), 3.5)];
        config.target_modules = Some(TargetModules::Names(vec!["q_proj".into()]));
        let text = config.to_json();
        let mut back = AdapterConfig::from_json(&text, "c").unwrap();
        // Fields PEFT writes and we do not model come back in `extra`.
        assert_eq!(back.extra["init_lora_weights"], json!(true));
        back.extra.clear();
        assert_eq!(back, config);
    }

    #[test]
    fn patterns_follow_peft_suffix_matching() {
        let mut config = AdapterConfig::new(4, 8.0);
        config.rank_pattern = vec![("v_proj".into(), 2), ("layers.1.mlp.down_proj".into(), 6)];
        assert_eq!(config.rank_for("layers.0.self_attn.v_proj").0, 2);
        assert_eq!(config.rank_for("layers.1.mlp.down_proj").0, 6);
        assert_eq!(config.rank_for("layers.0.mlp.down_proj").0, 4);
        // A suffix must start at a segment boundary.
        assert_eq!(config.rank_for("layers.0.xv_proj").0, 4);
    }

    #[test]
    fn wrong_types_name_the_field() {
        let error =
            AdapterConfig::from_json(r#"{"peft_type": "LORA", "r": "8", "lora_alpha": 16}"#, "c")
                .unwrap_err();
        assert!(
            error.to_string().contains("`r`") && error.to_string().contains("a positive integer"),
            "{error}"
        );
        let error = AdapterConfig::from_json(r#"{"peft_type": "LORA", "r": 8}"#, "c").unwrap_err();
        assert!(error.to_string().contains("lora_alpha"), "{error}");
    }

    #[test]
    fn unsupported_features_are_refused() {
        let base = r#""peft_type": "LORA", "r": 8, "lora_alpha": 16"#;
        for (extra, word) in [
            (r#""kasa_config": {}"#, "KaSA"),
            (r#""arrow_config": {"top_k": 2}"#, "Arrow"),
            (r#""init_lora_weights": "lora_ga""#, "rewrites the base"),
            (
                r#""init_lora_weights": "pissa_niter_4""#,
                "rewrites the base",
            ),
            (r#""bias": "all""#, "bias"),
        ] {
            let error = AdapterConfig::from_json(&format!("{{{base}, {extra}}}"), "c").unwrap_err();
            assert!(
                matches!(&error, LoraError::UnsupportedAdapter { feature, .. } if feature.contains(word)),
                "{error}"
            );
        }
        let error = AdapterConfig::from_json(r#"{"peft_type": "IA3", "r": 8}"#, "c").unwrap_err();
        assert!(matches!(error, LoraError::UnsupportedAdapter { .. }));
    }

    #[test]
    fn target_parameters_read_round_trip_and_refuse_what_peft_refuses() {
        let base = r#""peft_type": "LORA", "r": 8, "lora_alpha": 16"#;
        let read = |extra: &str| AdapterConfig::from_json(&format!("{{{base}, {extra}}}"), "c");
        let config = read(r#""target_parameters": ["mlp.experts.gate_up_proj"]"#).unwrap();
        assert_eq!(config.target_parameters, ["mlp.experts.gate_up_proj"]);
        assert!(config.selects_parameter("model.layers.0.mlp.experts.gate_up_proj"));
        assert!(config.selects_parameter("mlp.experts.gate_up_proj"));
        assert!(!config.selects_parameter("model.layers.0.mlp.experts.down_proj"));
        assert!(!config.selects_parameter("xmlp.experts.gate_up_proj"));
        let again = AdapterConfig::from_json(&config.to_json(), "c").unwrap();
        assert_eq!(again.target_parameters, config.target_parameters);
        assert!(
            read(r#""target_parameters": null"#)
                .unwrap()
                .target_parameters
                .is_empty()
        );
        for (extra, word) in [
            (r#""lora_dropout": 0.1"#, "lora_dropout"),
            (r#""use_dora": true"#, "use_dora"),
            (r#""lora_bias": true"#, "lora_bias"),
        ] {
            let error =
                read(&format!(r#"{extra}, "target_parameters": ["experts.w"]"#)).unwrap_err();
            assert!(
                matches!(&error, LoraError::UnsupportedAdapter { feature, .. }
                    if feature.contains(word) && feature.contains("target_parameters")),
                "{error}"
            );
        }
    }

    #[test]
    fn trainable_token_indices_read_in_both_forms_and_round_trip() {
        let base = r#""peft_type": "LORA", "r": 8, "lora_alpha": 16"#;
        let read = |extra: &str| AdapterConfig::from_json(&format!("{{{base}, {extra}}}"), "c");
        let list = read(r#""trainable_token_indices": [1, 2]"#).unwrap();
        assert_eq!(
            list.trainable_token_indices,
            vec![("embed_tokens".to_string(), vec![1, 2])]
        );
        let modules = read(r#""trainable_token_indices": {"embed": [4, 0], "wte": [3]}"#).unwrap();
        assert_eq!(
            modules.trainable_token_indices,
            vec![
                ("embed".to_string(), vec![4, 0]),
                ("wte".to_string(), vec![3])
            ]
        );
        let again = AdapterConfig::from_json(&modules.to_json(), "c").unwrap();
        assert_eq!(
            again.trainable_token_indices,
            modules.trainable_token_indices
        );
        for bad in [
            r#""trainable_token_indices": [1, -2]"#,
            r#""trainable_token_indices": {"embed": 3}"#,
            r#""trainable_token_indices": "embed""#,
        ] {
            let error = read(bad).unwrap_err();
            assert!(
                matches!(&error, LoraError::InvalidConfig { message, .. }
                    if message.contains("trainable_token_indices")),
                "{error}"
            );
        }
    }

    #[test]
    fn polymorphic_fields_take_each_form() {
        let base = r#""peft_type": "LORA", "r": 8, "lora_alpha": 16"#;
        let parse = |extra: &str| AdapterConfig::from_json(&format!("{{{base}, {extra}}}"), "c");
        let config = parse(r#""target_modules": "q_proj|v_proj", "layers_to_transform": 3, "layers_pattern": "layers""#).unwrap();
        assert_eq!(
            config.target_modules,
            Some(TargetModules::Regex("q_proj|v_proj".into()))
        );
        assert_eq!(config.layers_to_transform, Some(vec![3]));
        assert_eq!(config.layers_pattern, Some(vec!["layers".into()]));
        let config = parse(r#""target_modules": ["q_proj"], "layers_to_transform": [0, 2], "layers_pattern": ["h", "layers"]"#).unwrap();
        assert_eq!(
            config.target_modules,
            Some(TargetModules::Names(vec!["q_proj".into()]))
        );
        assert_eq!(config.layers_to_transform, Some(vec![0, 2]));
        // Unknown fields are kept, in file order.
        let config = parse(r#""zeta": 1, "alpha": [2]"#).unwrap();
        let keys: Vec<&String> = config.extra.keys().collect();
        assert_eq!(keys, ["zeta", "alpha"]);
        // A nested error names its whole path.
        let error = parse(r#""alpha_pattern": {"v_proj": "big"}"#).unwrap_err();
        assert!(
            error.to_string().contains("alpha_pattern.v_proj"),
            "{error}"
        );
    }

    #[test]
    fn the_config_selects_modules_with_the_crate_matcher() {
        let mut config = AdapterConfig::new(4, 8.0);
        config.target_modules = Some(TargetModules::Names(vec!["q_proj".into()]));
        config.exclude_modules = Some(TargetModules::Regex(r"layers\.1\..*".into()));
        config.layers_to_transform = Some(vec![0, 1]);
        config.layers_pattern = Some(vec!["layers".into()]);
        assert_eq!(
            config.selects("model.layers.0.self_attn.q_proj"),
            Some(true)
        );
        assert_eq!(config.selects("layers.1.self_attn.q_proj"), Some(false));
        assert_eq!(
            config.selects("model.layers.2.self_attn.q_proj"),
            Some(false)
        );
        assert_eq!(
            config.selects("model.layers.0.self_attn.v_proj"),
            Some(false)
        );
        config.target_modules = Some(TargetModules::Regex("(".into()));
        assert_eq!(config.selects("q_proj"), None);
    }

    #[test]
    fn a_pattern_that_does_not_compile_is_an_error() {
        let base = r#""peft_type": "LORA", "r": 8, "lora_alpha": 16"#;
        for extra in [
            r#""rank_pattern": {"q_proj(": 4}"#,
            r#""alpha_pattern": {"[v_proj": 4}"#,
            r#""target_modules": "q_proj)""#,
        ] {
            let error = AdapterConfig::from_json(&format!("{{{base}, {extra}}}"), "c").unwrap_err();
            assert!(
                matches!(error, LoraError::InvalidConfig { .. }),
                "{extra}: {error}"
            );
        }
        // Lookarounds, which PEFT's configs use, are fine.
        let config = AdapterConfig::from_json(
            &format!(r#"{{{base}, "rank_pattern": {{"(?<!layers\\.0\\.)q_proj": 2}}}}"#),
            "c",
        )
        .unwrap();
        assert_eq!(config.rank_for("layers.1.q_proj").0, 2);
        assert_eq!(config.rank_for("layers.0.q_proj").0, 8);
    }
}
