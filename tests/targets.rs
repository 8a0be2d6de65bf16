//! The targeting language on a real model: names, regexes, all-linear, exclude, layer filters,
//! rank and alpha patterns, and the paths of nested containers.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn_lora::{
    AlphaPattern, LoraConfig, LoraError, LoraLinear, LoraModule, RankPattern, Target, Targets,
};

#[derive(Module, Debug)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: Linear,
    o_proj: LoraLinear,
    /// Named `proj`, a suffix of the other names but not a dotted one.
    proj: Linear,
}

#[derive(Module, Debug)]
enum Head {
    Tied(LoraLinear),
    Untied(Linear),
}

#[derive(Module, Debug)]
struct Model {
    embedding: Embedding,
    layers: Vec<Attention>,
    extra: Option<LoraLinear>,
    missing: Option<LoraLinear>,
    pair: (LoraLinear, Linear),
    head: Head,
    lm_head: Linear,
}

fn linear(device: &Device) -> Linear {
    LinearConfig::new(16, 16).init(device)
}

fn model(device: &Device) -> Model {
    let attention = || Attention {
        q_proj: linear(device).into(),
        k_proj: linear(device).into(),
        v_proj: linear(device),
        o_proj: linear(device).into(),
        proj: linear(device),
    };
    Model {
        embedding: EmbeddingConfig::new(32, 16).init(device),
        layers: vec![attention(), attention(), attention()],
        extra: Some(linear(device).into()),
        missing: None,
        pair: (linear(device).into(), linear(device)),
        head: Head::Untied(linear(device)),
        lm_head: linear(device),
    }
}

fn paths(config: LoraConfig) -> Vec<String> {
    let device = Device::flex();
    let report = config.plan(&model(&device)).unwrap();
    report
        .layers
        .iter()
        .map(|layer| layer.path.clone())
        .collect()
}

fn config(targets: Targets) -> LoraConfig {
    LoraConfig::new(2).with_targets(targets)
}

#[test]
fn a_name_matches_dotted_suffixes_only() {
    let found = paths(config(Targets::names(["proj"])));
    assert_eq!(
        found,
        vec!["layers.0.proj", "layers.1.proj", "layers.2.proj"]
    );
}

#[test]
fn nested_containers_get_their_paths() {
    // Every linear layer, the output head included.
    let found = paths(config(Targets::new(vec![Target::AllLinear])));
    for expected in [
        "layers.0.q_proj",
        "layers.2.o_proj",
        "extra",
        "pair.0",
        "pair.1",
        "head.Untied",
        "lm_head",
    ] {
        assert!(
            found.contains(&expected.to_string()),
            "{expected} in {found:?}"
        );
    }
    assert_eq!(found.len(), 3 * 5 + 5, "no embedding, no `missing`");
    let report = config(Targets::all_linear())
        .plan(&model(&Device::flex()))
        .unwrap();
    let types: Vec<(&str, &str)> = report
        .layers
        .iter()
        .map(|layer| (layer.path.as_str(), layer.module_type.as_str()))
        .collect();
    assert!(types.contains(&("pair.0", "LoraLinear")));
    assert!(types.contains(&("pair.1", "Linear")));

    // Applying attaches an adapter at exactly the planned paths.
    let (adapted, report) = config(Targets::all_linear())
        .apply(model(&Device::flex()))
        .unwrap();
    let mut attached: Vec<String> = adapted
        .lora_adapters()
        .into_iter()
        .map(|i| i.path)
        .collect();
    let mut planned: Vec<String> = report.layers.into_iter().map(|l| l.path).collect();
    attached.sort();
    planned.sort();
    assert_eq!(attached, planned);
}

#[test]
fn a_regex_matches_whole_paths_and_a_list_entry_is_never_a_regex() {
    let regex = Target::Regex(r"layers\.[01]\.(q|v)_proj".into());
    let found = paths(config(Targets::new(vec![regex])));
    assert_eq!(
        found,
        vec![
            "layers.0.q_proj",
            "layers.0.v_proj",
            "layers.1.q_proj",
            "layers.1.v_proj"
        ]
    );
    // The same text as a name is literal, matches nothing, and says so.
    let literal = config(Targets::names([r"layers\.[01]\.(q|v)_proj"]));
    let error = literal.plan(&model(&Device::flex())).unwrap_err();
    assert!(
        matches!(error, LoraError::UnmatchedTarget { .. }),
        "{error:?}"
    );
}

#[test]
fn all_linear_without_the_output_head() {
    // PEFT's `all-linear`: the output head is left out without naming it.
    let found = paths(config(Targets::all_linear()));
    assert!(!found.contains(&"lm_head".to_string()));
    assert_eq!(found.len(), 19);
    let every = paths(config(Targets::new(vec![Target::AllLinear])));
    assert_eq!(every.len(), 20);
}

#[test]
fn exclude_overrides_a_match() {
    let targets = Targets::names(["q_proj", "k_proj"]).excluding(["layers.1.k_proj"]);
    let found = paths(config(targets));
    assert_eq!(
        found,
        vec![
            "layers.0.q_proj",
            "layers.0.k_proj",
            "layers.1.q_proj",
            "layers.2.q_proj",
            "layers.2.k_proj"
        ]
    );
}

#[test]
fn layers_to_transform_keeps_the_named_layers() {
    let targets = Targets::names(["q_proj"])
        .with_layers_to_transform(Some(vec![0, 2]))
        .with_layers_pattern(Some(vec!["layers".into()]));
    assert_eq!(
        paths(config(targets)),
        vec!["layers.0.q_proj", "layers.2.q_proj"]
    );
}

#[test]
fn rank_and_alpha_patterns_apply_to_exactly_the_paths_they_name() {
    let device = Device::flex();
    let config = LoraConfig::new(2)
        .with_alpha(Some(4.0))
        .with_targets(Targets::names(["q_proj", "v_proj"]))
        .with_rank_pattern(vec![RankPattern::new(
            Target::Name("layers.1.q_proj".into()),
            8,
        )])
        .with_alpha_pattern(vec![AlphaPattern::new(
            Target::Regex(r".*v_proj".into()),
            32.0,
        )]);
    let (model, report) = config.apply(model(&device)).unwrap();
    for layer in &report.layers {
        let expected_rank = if layer.path == "layers.1.q_proj" {
            8
        } else {
            2
        };
        let expected_alpha = if layer.path.ends_with("v_proj") {
            32.0
        } else {
            4.0
        };
        assert_eq!(layer.rank, expected_rank, "{}", layer.path);
        assert_eq!(layer.alpha, expected_alpha, "{}", layer.path);
    }
    // The attached adapters have those ranks and the scales alpha / r.
    for info in model.lora_adapters() {
        let layer = report.layers.iter().find(|l| l.path == info.path).unwrap();
        assert_eq!(info.rank, layer.rank, "{}", info.path);
        assert_eq!(info.scale, layer.alpha / layer.rank as f64, "{}", info.path);
    }
    assert!(
        report
            .to_string()
            .contains("rank_pattern `layers.1.q_proj` (r=8) matched 1")
    );
}

#[test]
fn a_rank_pattern_that_matches_nothing_is_an_error() {
    let config = config(Targets::names(["q_proj"]))
        .with_rank_pattern(vec![RankPattern::new(Target::Name("q_porj".into()), 8)]);
    let error = config.plan(&model(&Device::flex())).unwrap_err();
    let LoraError::UnmatchedTarget { target, candidates } = error else {
        panic!("expected UnmatchedTarget");
    };
    assert!(target.contains("q_porj"), "{target}");
    assert!(candidates[0].ends_with("q_proj"), "{candidates:?}");
}

#[test]
fn the_plan_changes_nothing_and_counts_parameters() {
    let device = Device::flex();
    let model = model(&device);
    let before = model.num_params();
    let report = config(Targets::attention()).plan(&model).unwrap();
    assert!(model.lora_adapters().is_empty());
    assert_eq!(model.num_params(), before);
    assert_eq!(report.base_params, before);
    // Q/K/V/O in three layers, 16x16 each, rank 2: 12 * 2 * 32.
    assert_eq!(report.layers.len(), 12);
    assert_eq!(report.trainable_params(), 12 * 2 * 32);
    let fast = report.layers.iter().filter(|layer| layer.fast_path).count();
    assert_eq!(fast, 9, "v_proj is a plain Linear, the rest LoraLinear");
    let table = report.to_string();
    assert!(table.contains("layers.2.v_proj"), "{table}");
    assert!(table.contains("dense") && table.contains("fast"), "{table}");
}

#[test]
fn an_invalid_regex_is_a_typed_error() {
    let config = config(Targets::new(vec![Target::Regex("(q_proj".into())]));
    let error = config.plan(&model(&Device::flex())).unwrap_err();
    assert!(matches!(error, LoraError::InvalidRegex { .. }), "{error:?}");
}

#[test]
fn a_model_that_is_one_linear_layer_is_adapted_at_the_root() {
    let device = Device::flex();
    let layer: Linear = LinearConfig::new(6, 4).init(&device);
    let config = LoraConfig::new(2).with_targets(Targets::all_linear());
    let (model, report) = config.apply(layer).unwrap();
    // The root module's path is empty; its weight is `weight`.
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.layers[0].path, "");
    assert_eq!(model.lora_adapters().len(), 1);
    assert!(model.merge_and_unload_lora().is_ok());
}
