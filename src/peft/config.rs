//! `adapter_config.json`: PEFT's description of a LoRA adapter, read strictly and written in
//! PEFT's own field names.

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::LoraError;

/// PEFT's `target_modules`: a list of names (a module matches when its path equals a name or
/// ends with `.name`) or one regex that must match the whole path.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names, matched as path suffixes.
    Names(Vec<String>),
    /// One regex, matched against the whole path (Python's `re.fullmatch`).
    Regex(String),
}

/// The LoRA settings of a PEFT adapter, as `adapter_config.json` holds them.
///
/// Unknown fields are kept in [`extra`](Self::extra) and written back, since PEFT adds fields
/// often. Fields that would change what the adapter means (`modules_to_save`, an unconverted
/// base-rewriting init...) are refused by [`from_json`](Self::from_json).
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
    /// Every other field, kept as read.
    pub extra: Map<String, Value>,
}

/// Fields this module reads itself; everything else goes to `extra`.
const KNOWN: [&str; 16] = [
    "peft_type",
    "use_dora",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "base_model_name_or_path",
    "task_type",
    "bias",
    "fan_in_fan_out",
];

impl AdapterConfig {
    /// A config with PEFT's defaults and rank `r`.
    pub fn new(r: usize, lora_alpha: f64) -> Self {
        Self {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            base_model_name_or_path: None,
            task_type: None,
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
        let unsupported = |feature: String| LoraError::UnsupportedAdapter {
            path: path.to_string(),
            feature,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|error| invalid(format!("not JSON: {error}")))?;
        let Value::Object(fields) = value else {
            return Err(invalid(format!(
                "expected a JSON object, found {}",
                kind(&value)
            )));
        };
        let field = Fields {
            fields: &fields,
            invalid: &invalid,
        };

        match field.string("peft_type")? {
            Some(peft_type) if peft_type == "LORA" => {}
            Some(other) => return Err(unsupported(format!("peft_type \"{other}\" (only LORA)"))),
            None => return Err(invalid("missing field `peft_type`".into())),
        }
        refuse_unsupported(&fields, &unsupported)?;

        let r = field
            .positive_integer("r")?
            .ok_or_else(|| invalid("missing field `r`".into()))?;
        let lora_alpha = field
            .positive_number("lora_alpha")?
            .ok_or_else(|| invalid("missing field `lora_alpha`".into()))?;
        let lora_dropout = field.number("lora_dropout")?.unwrap_or(0.0);
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(invalid(format!(
                "`lora_dropout` must be in [0, 1), found {lora_dropout}"
            )));
        }
        let mut rank_pattern = Vec::new();
        for (key, value) in field.object("rank_pattern")? {
            let rank = value.as_u64().filter(|&rank| rank > 0).ok_or_else(|| {
                invalid(format!(
                    "`rank_pattern[\"{key}\"]` must be a positive integer, found {value}"
                ))
            })?;
            rank_pattern.push((key.clone(), rank as usize));
        }
        let mut alpha_pattern = Vec::new();
        for (key, value) in field.object("alpha_pattern")? {
            let alpha = value
                .as_f64()
                .filter(|alpha| alpha.is_finite() && *alpha > 0.0)
                .ok_or_else(|| {
                    invalid(format!(
                        "`alpha_pattern[\"{key}\"]` must be a positive number, found {value}"
                    ))
                })?;
            alpha_pattern.push((key.clone(), alpha));
        }
        let layers_to_transform = match fields.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| {
                invalid(format!(
                    "`layers_to_transform` must be a layer index, found {n}"
                ))
            })? as usize]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|item| item.as_u64().map(|i| i as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        invalid("`layers_to_transform` must hold layer indices".into())
                    })?,
            ),
            Some(other) => {
                return Err(invalid(format!(
                    "`layers_to_transform` must be an integer or a list, found {}",
                    kind(other)
                )));
            }
        };
        let layers_pattern = field
            .modules("layers_pattern")?
            .map(|modules| match modules {
                TargetModules::Names(names) => names,
                TargetModules::Regex(name) => vec![name],
            });
        if field.string("bias")?.is_some_and(|bias| bias != "none") {
            return Err(unsupported(format!(
                "bias = {} (trained base biases)",
                fields["bias"]
            )));
        }
        field.boolean("fan_in_fan_out")?;

        Ok(Self {
            r,
            lora_alpha,
            lora_dropout,
            use_rslora: field.boolean("use_rslora")?.unwrap_or(false),
            use_dora: field.boolean("use_dora")?.unwrap_or(false),
            target_modules: field.modules("target_modules")?,
            exclude_modules: field.modules("exclude_modules")?,
            layers_to_transform,
            layers_pattern,
            rank_pattern,
            alpha_pattern,
            base_model_name_or_path: field.string("base_model_name_or_path")?,
            task_type: field.string("task_type")?,
            extra: fields
                .iter()
                .filter(|(key, _)| !KNOWN.contains(&key.as_str()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        })
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
            ("modules_to_save", Value::Null),
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
            ("bias", json!("none")),
            ("fan_in_fan_out", json!(false)),
            ("target_modules", modules(&self.target_modules)),
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
            Some((key, rank)) => (*rank, Some(key.as_str())),
            None => (self.r, None),
        }
    }

    /// The alpha PEFT gives the module at `peft_path`: the first matching `alpha_pattern`,
    /// else `lora_alpha`.
    pub fn alpha_for(&self, peft_path: &str) -> f64 {
        pattern_match(&self.alpha_pattern, peft_path)
            .map(|(_, alpha)| *alpha)
            .unwrap_or(self.lora_alpha)
    }

    /// The scale of an adapter of `rank` and `alpha` under this config.
    pub fn scale(&self, rank: usize, alpha: f64) -> f64 {
        match self.use_rslora {
            true => alpha / (rank as f64).sqrt(),
            false => alpha / rank as f64,
        }
    }
}

/// PEFT's pattern lookup (`get_pattern_key`): a key matches a module path that equals it or
/// ends with `.key`, the key read as a regex. The first key in file order wins.
fn pattern_match<'a, T>(patterns: &'a [(String, T)], path: &str) -> Option<&'a (String, T)> {
    patterns.iter().find(|(key, _)| {
        key == path
            || Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                .map(|regex| regex.is_match(path))
                .unwrap_or(false)
    })
}

/// Whether PEFT's `target_modules` (and `exclude_modules`) select the module at `peft_path`.
pub(crate) fn modules_match(modules: &TargetModules, peft_path: &str) -> Option<bool> {
    match modules {
        TargetModules::Names(names) => Some(
            names
                .iter()
                .any(|name| peft_path == name || peft_path.ends_with(&format!(".{name}"))),
        ),
        TargetModules::Regex(pattern) => Regex::new(&format!("^(?:{pattern})$"))
            .ok()
            .map(|regex| regex.is_match(peft_path)),
    }
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
        (
            "modules_to_save",
            "modules_to_save (fully trained modules beside the adapter)",
        ),
        ("lora_bias", "LoRA biases (lora_bias = true)"),
        ("layer_replication", "layer_replication"),
        (
            "target_parameters",
            "target_parameters (adapters on raw parameters)",
        ),
        (
            "trainable_token_indices",
            "trainable_token_indices (trainable embedding rows)",
        ),
        ("use_qalora", "QALoRA (use_qalora = true)"),
        ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ];
    for (key, feature) in refused {
        if set(key) {
            return Err(unsupported(format!("{feature}: {}", fields[key])));
        }
    }
    if let Some(Value::String(init)) = fields.get("init_lora_weights") {
        let lower = init.to_lowercase();
        let rewrites_base = ["pissa", "olora", "loftq", "corda"]
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

/// Typed access to the config's fields, each error naming the field and what was found.
struct Fields<'a> {
    fields: &'a Map<String, Value>,
    invalid: &'a dyn Fn(String) -> LoraError,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key).filter(|value| !value.is_null())
    }

    fn wrong(&self, key: &str, expected: &str, found: &Value) -> LoraError {
        (self.invalid)(format!(
            "`{key}` must be {expected}, found {} {found}",
            kind(found)
        ))
    }

    fn string(&self, key: &str) -> Result<Option<String>, LoraError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, LoraError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(*flag)),
            Some(other) => Err(self.wrong(key, "true or false", other)),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, LoraError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => match value.as_f64().filter(|n| n.is_finite()) {
                Some(number) => Ok(Some(number)),
                None => Err(self.wrong(key, "a number", value)),
            },
        }
    }

    fn positive_number(&self, key: &str) -> Result<Option<f64>, LoraError> {
        match self.number(key)? {
            Some(number) if number <= 0.0 => {
                Err(self.wrong(key, "a positive number", &self.fields[key]))
            }
            other => Ok(other),
        }
    }

    fn positive_integer(&self, key: &str) -> Result<Option<usize>, LoraError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => match value.as_u64().filter(|&n| n > 0) {
                Some(number) => Ok(Some(number as usize)),
                None => Err(self.wrong(key, "a positive integer", value)),
            },
        }
    }

    fn object(&self, key: &str) -> Result<Vec<(&String, &Value)>, LoraError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(items)) => Ok(items.iter().collect()),
            Some(other) => Err(self.wrong(key, "an object", other)),
        }
    }

    fn modules(&self, key: &str) -> Result<Option<TargetModules>, LoraError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(regex)) => Ok(Some(TargetModules::Regex(regex.clone()))),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(|names| Some(TargetModules::Names(names)))
                .ok_or_else(|| self.wrong(key, "a list of strings", &self.fields[key])),
            Some(other) => Err(self.wrong(key, "a string or a list of strings", other)),
        }
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
            error.to_string().contains("`r` must be a positive integer"),
            "{error}"
        );
        let error = AdapterConfig::from_json(r#"{"peft_type": "LORA", "r": 8}"#, "c").unwrap_err();
        assert!(error.to_string().contains("lora_alpha"), "{error}");
    }

    #[test]
    fn unsupported_features_are_refused() {
        let base = r#""peft_type": "LORA", "r": 8, "lora_alpha": 16"#;
        for (extra, word) in [
            (r#""modules_to_save": ["classifier"]"#, "modules_to_save"),
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
}
