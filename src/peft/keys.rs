//! Names in PEFT files: the tensor keys, and the [`KeyMap`] between Hugging Face module paths
//! and Burn module paths.

use burn::tensor::Tensor;
use regex::Regex;

use crate::LoraError;
use crate::adapter::LayerKind;
use crate::adapter::layout::{factor_dims, param_dims};
use crate::config::ParamLayout;

/// The prefix PEFT puts before every module path in an adapter file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Rewrites module paths between a PEFT file (Hugging Face names, such as
/// `model.layers.0.self_attn.q_proj`) and a Burn model (such as `layers.0.attn.query`).
///
/// Rules apply in order when loading ([`to_burn`](Self::to_burn)) and in reverse order, each
/// inverted, when saving ([`to_peft`](Self::to_peft)). Saving checks that every path maps back
/// to itself, so a map that loses information is an error, not a silently wrong file.
///
/// ```
/// use burn_lora::peft::KeyMap;
///
/// // Hugging Face Llama names → a Burn port's names.
/// let map = KeyMap::new()
///     .rename("model.layers", "layers")
///     .rename("self_attn", "attn")
///     .rename("q_proj", "query")
///     .rename("v_proj", "value");
/// assert_eq!(map.to_burn("model.layers.3.self_attn.q_proj"), "layers.3.attn.query");
/// assert_eq!(map.to_peft("layers.3.attn.value"), "model.layers.3.self_attn.v_proj");
///
/// // A regex rule, with its inverse, for what renames cannot say.
/// let map = KeyMap::new()
///     .regex(r"^h\.(\d+)\.attn\.c_attn$", "blocks.$1.qkv", r"^blocks\.(\d+)\.qkv$", "h.$1.attn.c_attn")
///     .unwrap();
/// assert_eq!(map.to_burn("h.7.attn.c_attn"), "blocks.7.qkv");
/// assert_eq!(map.to_peft("blocks.7.qkv"), "h.7.attn.c_attn");
/// ```
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
enum Rule {
    /// Whole dotted segments `peft` ↔ `burn`.
    Rename { peft: String, burn: String },
    /// A regex rewrite for each direction.
    Regex {
        to_burn: (Regex, String),
        to_peft: (Regex, String),
    },
}

impl KeyMap {
    /// The identity map: Burn paths equal PEFT paths.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rename the whole dotted segments `peft` (as in the file) to `burn` (as in the model),
    /// wherever they occur: `rename("self_attn", "attn")` maps `layers.0.self_attn.q_proj` to
    /// `layers.0.attn.q_proj` but leaves `my_self_attn` alone. Either side may span several
    /// segments (`"model.layers"`) or be empty, to drop or add a prefix.
    pub fn rename(mut self, peft: &str, burn: &str) -> Self {
        self.rules.push(Rule::Rename {
            peft: peft.to_string(),
            burn: burn.to_string(),
        });
        self
    }

    /// A regex rule: `peft_pattern` → `burn_replacement` when loading, and `burn_pattern` →
    /// `peft_replacement` when saving. Replacements use `$1`-style groups, as in
    /// [`Regex::replace`].
    ///
    /// # Errors
    ///
    /// [`LoraError::InvalidRegex`] for a pattern that does not compile.
    pub fn regex(
        mut self,
        peft_pattern: &str,
        burn_replacement: &str,
        burn_pattern: &str,
        peft_replacement: &str,
    ) -> Result<Self, LoraError> {
        let compile = |pattern: &str| {
            Regex::new(pattern).map_err(|error| LoraError::InvalidRegex {
                pattern: pattern.to_string(),
                message: error.to_string(),
            })
        };
        self.rules.push(Rule::Regex {
            to_burn: (compile(peft_pattern)?, burn_replacement.to_string()),
            to_peft: (compile(burn_pattern)?, peft_replacement.to_string()),
        });
        Ok(self)
    }

    /// Hugging Face's Llama names (`LlamaForCausalLM`; Mistral and Qwen2 use the same) ↔ a
    /// port built from [`nn::GroupedQueryAttention`](crate::nn::GroupedQueryAttention) and
    /// [`nn::SwiGlu`](crate::nn::SwiGlu), as `examples/hf/llama.rs` is:
    ///
    /// | Hugging Face | port |
    /// |---|---|
    /// | `model.embed_tokens`, `model.norm`, `lm_head` | `embed_tokens`, `norm`, `lm_head` |
    /// | `model.layers.N.{input,post_attention}_layernorm` | `layers.N.{input,post_attention}_norm` |
    /// | `model.layers.N.self_attn.{q,k,v,o}_proj` | `layers.N.self_attn.{query,key,value,output}` |
    /// | `model.layers.N.mlp.{gate,up}_proj` | `layers.N.mlp.swiglu.linear_{inner,outer}` |
    /// | `model.layers.N.mlp.down_proj` | `layers.N.mlp.down_proj` |
    ///
    /// ```
    /// use burn_lora::peft::KeyMap;
    ///
    /// let map = KeyMap::llama();
    /// assert_eq!(map.to_burn("model.layers.3.self_attn.q_proj"), "layers.3.self_attn.query");
    /// assert_eq!(map.to_peft("layers.0.mlp.swiglu.linear_inner"), "model.layers.0.mlp.gate_proj");
    /// ```
    pub fn llama() -> Self {
        Self::new()
            .rename("model.embed_tokens", "embed_tokens")
            .rename("model.layers", "layers")
            .rename("model.norm", "norm")
            .rename("input_layernorm", "input_norm")
            .rename("post_attention_layernorm", "post_attention_norm")
            .rename("q_proj", "query")
            .rename("k_proj", "key")
            .rename("v_proj", "value")
            .rename("o_proj", "output")
            .rename("gate_proj", "swiglu.linear_inner")
            .rename("up_proj", "swiglu.linear_outer")
    }

    /// Hugging Face's GPT-2 names (`GPT2LMHeadModel`) ↔ a port that keeps GPT-2's layer names
    /// under Burn-style containers, as `examples/hf/gpt2.rs` does: `transformer.wte`,
    /// `transformer.wpe`, `transformer.ln_f` lose their prefix, and `transformer.h.N` becomes
    /// `blocks.N` (its `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`
    /// keep their names). GPT-2's weights are `Conv1D`, stored `[d_in, d_out]`: load them with
    /// [`HfCheckpoint::with_fan_in_fan_out`](crate::store::HfCheckpoint::with_fan_in_fan_out).
    ///
    /// ```
    /// use burn_lora::peft::KeyMap;
    ///
    /// let map = KeyMap::gpt2();
    /// assert_eq!(map.to_burn("transformer.h.1.attn.c_attn"), "blocks.1.attn.c_attn");
    /// assert_eq!(map.to_peft("ln_f"), "transformer.ln_f");
    /// ```
    pub fn gpt2() -> Self {
        Self::new()
            .rename("transformer.wte", "wte")
            .rename("transformer.wpe", "wpe")
            .rename("transformer.h", "blocks")
            .rename("transformer.ln_f", "ln_f")
    }

    /// Hugging Face's BERT names (`BertModel`, `BertForSequenceClassification`) ↔ a port whose
    /// encoder is [`nn::TransformerEncoder`](crate::nn::TransformerEncoder) (BERT's post-norm
    /// layer is Burn's), as `examples/hf/bert.rs` is:
    ///
    /// | Hugging Face | port |
    /// |---|---|
    /// | `bert.embeddings.{word,position,token_type}_embeddings` | `embeddings.…` |
    /// | `bert.embeddings.LayerNorm` | `embeddings.norm` |
    /// | `bert.encoder.layer.N.attention.self.{query,key,value}` | `encoder.layers.N.mha.{query,key,value}` |
    /// | `….attention.output.dense`, `….attention.output.LayerNorm` | `….mha.output`, `….norm_1` |
    /// | `….intermediate.dense`, `….output.dense`, `….output.LayerNorm` | `….pwff.linear_inner`, `….pwff.linear_outer`, `….norm_2` |
    /// | `bert.pooler.dense`, `classifier` | `pooler`, `classifier` |
    ///
    /// The attention's `output.dense` is renamed before the feed-forward's, which it contains.
    ///
    /// ```
    /// use burn_lora::peft::KeyMap;
    ///
    /// let map = KeyMap::bert();
    /// let hf = "bert.encoder.layer.0.attention.output.dense";
    /// assert_eq!(map.to_burn(hf), "encoder.layers.0.mha.output");
    /// assert_eq!(map.to_burn("bert.encoder.layer.0.output.dense"), "encoder.layers.0.pwff.linear_outer");
    /// assert_eq!(map.to_peft("encoder.layers.0.mha.output"), hf);
    /// ```
    pub fn bert() -> Self {
        Self::new()
            .rename("bert.embeddings", "embeddings")
            .rename("embeddings.LayerNorm", "embeddings.norm")
            .rename("bert.encoder.layer", "encoder.layers")
            .rename("bert.pooler.dense", "pooler")
            .rename("attention.self", "mha")
            .rename("attention.output.dense", "mha.output")
            .rename("attention.output.LayerNorm", "norm_1")
            .rename("intermediate.dense", "pwff.linear_inner")
            .rename("output.dense", "pwff.linear_outer")
            .rename("output.LayerNorm", "norm_2")
    }

    /// The Burn module path of a PEFT module path (without `base_model.model.`).
    pub fn to_burn(&self, peft_path: &str) -> String {
        self.rules
            .iter()
            .fold(peft_path.to_string(), |path, rule| match rule {
                Rule::Rename { peft, burn } => rename_segments(&path, peft, burn),
                Rule::Regex { to_burn, .. } => to_burn.0.replace(&path, &to_burn.1).into_owned(),
            })
    }

    /// The PEFT module path (without `base_model.model.`) of a Burn module path.
    pub fn to_peft(&self, burn_path: &str) -> String {
        self.rules
            .iter()
            .rev()
            .fold(burn_path.to_string(), |path, rule| match rule {
                Rule::Rename { peft, burn } => rename_segments(&path, burn, peft),
                Rule::Regex { to_peft, .. } => to_peft.0.replace(&path, &to_peft.1).into_owned(),
            })
    }

    /// The PEFT path of `burn_path`, checked to map back to it.
    pub(crate) fn to_peft_checked(&self, burn_path: &str) -> Result<String, LoraError> {
        let peft = self.to_peft(burn_path);
        let back = self.to_burn(&peft);
        match back == burn_path {
            true => Ok(peft),
            false => Err(LoraError::KeyMapNotInvertible {
                burn: burn_path.to_string(),
                peft,
                back,
            }),
        }
    }
}

/// Replace every occurrence of the segment sequence `from` in `path` by `to`, segment-aligned.
fn rename_segments(path: &str, from: &str, to: &str) -> String {
    let split = |text: &str| -> Vec<String> {
        match text.is_empty() {
            true => Vec::new(),
            false => text.split('.').map(str::to_string).collect(),
        }
    };
    let (segments, from, to) = (split(path), split(from), split(to));
    if from.is_empty() {
        // An empty source adds `to` as a prefix, unless it is there already.
        return match segments.starts_with(&to) {
            true => path.to_string(),
            false => [to, segments].concat().join("."),
        };
    }
    let mut out: Vec<String> = Vec::with_capacity(segments.len());
    let mut index = 0;
    while index < segments.len() {
        if segments[index..].starts_with(&from) {
            out.extend(to.iter().cloned());
            index += from.len();
        } else {
            out.push(segments[index].clone());
            index += 1;
        }
    }
    out.join(".")
}

/// Which tensor of an adapter a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Factor {
    /// `lora_A`, or `lora_embedding_A` on an embedding.
    A,
    /// `lora_B`, or `lora_embedding_B`.
    B,
    /// DoRA's `lora_magnitude_vector`.
    Magnitude,
    /// The bias of `lora_B` (`lora_bias = true`), `[d_out]`.
    Bias,
}

/// The key segment PEFT uses for `factor` on a layer of `kind`.
pub(crate) fn factor_segment(factor: Factor, kind: LayerKind) -> &'static str {
    use LayerKind::Embedding;
    match (factor, kind) {
        (Factor::A, Embedding) => "lora_embedding_A",
        (Factor::B, Embedding) => "lora_embedding_B",
        (Factor::A, _) => "lora_A",
        (Factor::B | Factor::Bias, _) => "lora_B",
        (Factor::Magnitude, _) => "lora_magnitude_vector",
    }
}

/// The shapes PEFT stores `A`, `B` and DoRA's magnitude in, for an adapter of `rank` on a weight
/// of shape `dims` and `kind`: PyTorch's layouts, `A: [r, d_in]` (`[r, c_in, k1, k2]` for a
/// convolution), `B: [d_out, r]` (`[c_out, r, 1, 1]`), the magnitude `[d_out]`
/// (`[1, c_out, 1, 1]`).
///
/// A raw parameter (`param` is its layout) of `E` experts stores `A: [E·r, d_in]` and
/// `B: [d_out, E·r]`, PEFT's `ParamWrapper` layout.
pub(crate) fn peft_shapes(
    kind: LayerKind,
    dims: &[usize],
    rank: usize,
    param: Option<ParamLayout>,
) -> [Vec<usize>; 3] {
    if let Some((experts, d_in, d_out)) = param.and_then(|layout| param_dims(dims, layout)) {
        return [
            vec![experts * rank, d_in],
            vec![d_out, experts * rank],
            vec![d_out],
        ];
    }
    let (d_in, d_out) = factor_dims(dims);
    match kind {
        LayerKind::Conv2d => {
            let mut a_shape = vec![rank];
            a_shape.extend_from_slice(&dims[1..]);
            [a_shape, vec![d_out, rank, 1, 1], vec![1, d_out, 1, 1]]
        }
        _ => [vec![rank, d_in], vec![d_out, rank], vec![d_out]],
    }
}

/// The rows of an expert bank's `B` (`[E·r, d_out]`, transposed from the file) regrouped:
/// `regroup(b, E, r)` takes burn-lora's order, row `e·r + k` for expert `e` and component `k`,
/// to PEFT's, row `k·E + e`; `regroup(b, r, E)` takes PEFT's back. (`A` needs no regrouping:
/// both order its rows, or columns, `e·r + k`.)
pub(crate) fn regroup(b: Tensor<2>, outer: usize, inner: usize) -> Tensor<2> {
    let [rows, d_out] = b.dims();
    if outer <= 1 || inner <= 1 {
        return b;
    }
    debug_assert_eq!(rows, outer * inner);
    b.reshape([outer, inner, d_out])
        .swap_dims(0, 1)
        .reshape([rows, d_out])
}

/// The module key PEFT gives the adapter of a raw parameter of the module at `peft_module`:
/// PEFT wraps the targeted parameters of one module in nested wrappers, the first registered
/// innermost, so the parameter at `index` of `count` gets `count - 1 - index` `base_layer.`
/// segments.
pub(crate) fn param_module_key(peft_module: &str, index: usize, count: usize) -> String {
    let depth = count.saturating_sub(index + 1);
    let mut key = peft_module.to_string();
    for _ in 0..depth {
        key.push_str(".base_layer");
    }
    key
}

/// The full key PEFT writes for `factor` of the module at `peft_path`.
pub(crate) fn factor_key(peft_path: &str, factor: Factor, kind: LayerKind) -> String {
    let segment = factor_segment(factor, kind);
    match (factor, kind) {
        // Embedding factors and the magnitude are parameters, not layers: no `.weight`.
        (Factor::Magnitude, _) | (_, LayerKind::Embedding) => {
            format!("{PEFT_PREFIX}{peft_path}.{segment}")
        }
        (Factor::Bias, _) => format!("{PEFT_PREFIX}{peft_path}.{segment}.bias"),
        _ => format!("{PEFT_PREFIX}{peft_path}.{segment}.weight"),
    }
}

/// A tensor key of an adapter file, taken apart.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Key {
    /// `[base_model.model.]<module>.lora_{A,B}[.<adapter>].weight`,
    /// `….lora_embedding_{A,B}[.<adapter>]` or `….lora_magnitude_vector[.<adapter>][.weight]`.
    Lora {
        module: String,
        factor: Factor,
        /// Whether the key is an embedding's (`lora_embedding_A`/`_B`).
        embedding: bool,
        adapter: Option<String>,
    },
    /// A key of a PEFT feature burn-lora does not load (a bias on `lora_A`).
    Unsupported { feature: &'static str },
    /// Anything else.
    Other,
}

/// Parse one tensor key.
pub(crate) fn parse_key(key: &str) -> Key {
    let path = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    let segments: Vec<&str> = path.split('.').collect();
    let parameter = segments.iter().rposition(|s| {
        matches!(
            *s,
            "lora_embedding_A" | "lora_embedding_B" | "lora_magnitude_vector"
        )
    });
    if let Some(position) = parameter {
        // Parameters, not layers: the adapter name may follow, and `.weight` only for DoRA's
        // vector inside a model's own state dict.
        let adapter = match &segments[position + 1..] {
            [] | ["weight"] => None,
            [name] | [name, "weight"] => Some(name.to_string()),
            _ => return Key::Other,
        };
        if position == 0 {
            return Key::Other;
        }
        let (factor, embedding) = match segments[position] {
            "lora_embedding_A" => (Factor::A, true),
            "lora_embedding_B" => (Factor::B, true),
            _ => (Factor::Magnitude, false),
        };
        return Key::Lora {
            module: segments[..position].join("."),
            factor,
            embedding,
            adapter,
        };
    }
    let Some(position) = segments
        .iter()
        .rposition(|s| *s == "lora_A" || *s == "lora_B")
    else {
        return Key::Other;
    };
    let rest = &segments[position + 1..];
    let (adapter, factor) = match (segments[position], rest) {
        ("lora_A", ["weight"]) => (None, Factor::A),
        ("lora_A", [name, "weight"]) => (Some(name.to_string()), Factor::A),
        ("lora_B", ["weight"]) => (None, Factor::B),
        ("lora_B", [name, "weight"]) => (Some(name.to_string()), Factor::B),
        ("lora_B", ["bias"]) => (None, Factor::Bias),
        ("lora_B", [name, "bias"]) => (Some(name.to_string()), Factor::Bias),
        ("lora_A", [.., "bias"]) => {
            return Key::Unsupported {
                feature: "a bias on lora_A (PEFT's lora_bias puts it on lora_B)",
            };
        }
        _ => return Key::Other,
    };
    if position == 0 {
        return Key::Other;
    }
    Key::Lora {
        module: segments[..position].join("."),
        factor,
        embedding: false,
        adapter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_and_without_prefix_and_adapter_name() {
        let expected = |adapter: Option<&str>| Key::Lora {
            module: "layers.0.q_proj".into(),
            factor: Factor::A,
            embedding: false,
            adapter: adapter.map(str::to_string),
        };
        assert_eq!(
            parse_key("base_model.model.layers.0.q_proj.lora_A.weight"),
            expected(None)
        );
        assert_eq!(parse_key("layers.0.q_proj.lora_A.weight"), expected(None));
        assert_eq!(
            parse_key("layers.0.q_proj.lora_A.task.weight"),
            expected(Some("task"))
        );
        assert!(matches!(
            parse_key("base_model.model.q.lora_B.weight"),
            Key::Lora {
                factor: Factor::B,
                ..
            }
        ));
        assert_eq!(parse_key("layers.0.q_proj.weight"), Key::Other);
        assert_eq!(parse_key("lora_A.weight"), Key::Other);
        assert_eq!(
            parse_key("base_model.model.x.lora_magnitude_vector"),
            Key::Lora {
                module: "x".into(),
                factor: Factor::Magnitude,
                embedding: false,
                adapter: None,
            }
        );
        assert_eq!(
            parse_key("x.lora_magnitude_vector.task.weight"),
            Key::Lora {
                module: "x".into(),
                factor: Factor::Magnitude,
                embedding: false,
                adapter: Some("task".into()),
            }
        );
        assert_eq!(
            parse_key("base_model.model.embed.lora_embedding_B"),
            Key::Lora {
                module: "embed".into(),
                factor: Factor::B,
                embedding: true,
                adapter: None,
            }
        );
        assert_eq!(parse_key("lora_embedding_A"), Key::Other);
        assert_eq!(
            parse_key("base_model.model.x.lora_B.bias"),
            Key::Lora {
                module: "x".into(),
                factor: Factor::Bias,
                embedding: false,
                adapter: None,
            }
        );
        assert_eq!(
            parse_key("x.lora_B.task.bias"),
            Key::Lora {
                module: "x".into(),
                factor: Factor::Bias,
                embedding: false,
                adapter: Some("task".into()),
            }
        );
        assert_eq!(
            factor_key("x", Factor::Bias, LayerKind::Linear),
            "base_model.model.x.lora_B.bias"
        );
        assert!(matches!(
            parse_key("x.lora_A.bias"),
            Key::Unsupported { .. }
        ));
    }

    #[test]
    fn renames_are_segment_aligned_and_invertible() {
        let map = KeyMap::new()
            .rename("model.layers", "layers")
            .rename("self_attn", "attn");
        let burn = map.to_burn("model.layers.0.self_attn.q_proj");
        assert_eq!(burn, "layers.0.attn.q_proj");
        assert_eq!(map.to_peft(&burn), "model.layers.0.self_attn.q_proj");
        assert_eq!(map.to_burn("model.my_self_attn.q"), "model.my_self_attn.q");
        let prefix = KeyMap::new().rename("", "backbone");
        assert_eq!(prefix.to_burn("a.b"), "backbone.a.b");
        assert_eq!(prefix.to_peft("backbone.a.b"), "a.b");
    }

    #[test]
    fn a_lossy_map_is_caught_when_saving() {
        let map = KeyMap::new().rename("q_proj", "query");
        assert_eq!(map.to_peft_checked("attn.query").unwrap(), "attn.q_proj");
        // A Burn module literally called `q_proj` would load back as `query`.
        assert_eq!(
            map.to_peft_checked("attn.q_proj"),
            Err(LoraError::KeyMapNotInvertible {
                burn: "attn.q_proj".into(),
                peft: "attn.q_proj".into(),
                back: "attn.query".into(),
            })
        );
        assert!(matches!(
            KeyMap::new().regex("(", "", "x", ""),
            Err(LoraError::InvalidRegex { .. })
        ));
    }
}
