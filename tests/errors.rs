//! Bad input gives a typed error, never a panic, and leaves the caller's model usable.

mod common;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn_lora::{LayerKind, LoraConfig, LoraError, LoraLinear, LoraModule, Targets};
use common::fill;

#[derive(Module, Debug)]
struct Block {
    query: LoraLinear,
    value: Linear,
    embedding: Embedding,
}

fn block(device: &Device) -> Block {
    Block {
        query: LinearConfig::new(8, 6).init(device).into(),
        value: LinearConfig::new(8, 6).init(device),
        embedding: EmbeddingConfig::new(10, 8).init(device),
    }
}

fn qv(rank: usize) -> LoraConfig {
    LoraConfig::new(rank).with_targets(Targets::attention_qv())
}

#[test]
fn rank_zero_is_refused() {
    let device = Device::flex();
    assert_eq!(
        qv(0).apply(block(&device)).unwrap_err(),
        LoraError::ZeroRank
    );
}

#[test]
fn a_rank_above_min_d_in_d_out_is_refused_with_the_path() {
    let device = Device::flex();
    let error = qv(7).apply(block(&device)).unwrap_err();
    assert_eq!(
        error,
        LoraError::RankTooLarge {
            path: "query".into(),
            rank: 7,
            max_rank: 6,
            d_in: 8,
            d_out: 6
        }
    );
    assert!(
        qv(6).apply(block(&device)).is_ok(),
        "rank = min(d_in, d_out) is allowed"
    );
}

#[test]
fn alpha_must_be_finite_and_positive() {
    let device = Device::flex();
    for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let error = qv(2)
            .with_alpha(Some(alpha))
            .apply(block(&device))
            .unwrap_err();
        assert!(
            matches!(error, LoraError::InvalidAlpha { alpha: found } if found.to_bits() == alpha.to_bits()),
            "{alpha}: {error:?}"
        );
    }
}

#[test]
fn dropout_must_be_in_zero_one() {
    let device = Device::flex();
    for dropout in [-0.1, 1.0, 1.5, f64::NAN] {
        let error = qv(2)
            .with_dropout(dropout)
            .apply(block(&device))
            .unwrap_err();
        assert!(
            matches!(error, LoraError::InvalidDropout { .. }),
            "{dropout}: {error:?}"
        );
    }
}

#[test]
fn no_targets_is_refused() {
    let device = Device::flex();
    let config = LoraConfig::new(2).with_targets(Targets::new(vec![]));
    assert_eq!(
        config.apply(block(&device)).unwrap_err(),
        LoraError::NoTargets
    );
}

#[test]
fn a_target_that_matches_nothing_names_itself_and_nearby_layers() {
    let device = Device::flex();
    let config = LoraConfig::new(2).with_targets(Targets::names(["query", "valu"]));
    let error = config.apply(block(&device)).unwrap_err();
    let LoraError::UnmatchedTarget { target, candidates } = &error else {
        panic!("expected UnmatchedTarget, got {error:?}");
    };
    assert_eq!(target, "`valu`");
    assert_eq!(candidates[0], "value", "the closest path comes first");
    let message = error.to_string();
    assert!(
        message.contains("`valu`") && message.contains("value"),
        "{message}"
    );

    // Allowed explicitly, the plan still lists the unmatched target.
    let report = config
        .with_allow_unmatched_targets(true)
        .plan(&block(&device))
        .unwrap();
    let unmatched: Vec<_> = report
        .unmatched_targets()
        .map(|t| t.target.clone())
        .collect();
    assert_eq!(unmatched, vec!["`valu`".to_string()]);
}

#[test]
fn a_named_embedding_is_adapted_and_a_norm_is_reported_not_adapted() {
    let device = Device::flex();
    let config = LoraConfig::new(2).with_targets(Targets::names(["query", "embedding"]));
    let (model, report) = config.apply(block(&device)).unwrap();
    assert_eq!(report.layers.len(), 2);
    let embedding = &report.layers[1];
    assert_eq!(
        (embedding.path.as_str(), embedding.kind),
        ("embedding", LayerKind::Embedding)
    );
    assert_eq!((embedding.d_in, embedding.d_out), (10, 8));
    assert!(
        model
            .embedding
            .weight
            .reparameterization::<burn_lora::LoraState>()
            .is_some()
    );

    #[derive(Module, Debug)]
    struct Normed {
        query: Linear,
        norm: LayerNorm,
    }
    let normed = || Normed {
        query: LinearConfig::new(8, 8).init(&device),
        norm: LayerNormConfig::new(8).init(&device),
    };
    let config = LoraConfig::new(2).with_targets(Targets::names(["query", "norm"]));
    let error = config.clone().apply(normed()).unwrap_err();
    assert!(
        matches!(error, LoraError::UnmatchedTarget { .. }),
        "{error:?}"
    );
    let (model, report) = config
        .with_allow_unmatched_targets(true)
        .apply(normed())
        .unwrap();
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].path, "norm");
    assert_eq!(report.skipped[0].module_type, "LayerNorm");
    assert!(
        model
            .norm
            .gamma
            .reparameterization::<burn_lora::LoraState>()
            .is_none()
    );
}

#[test]
fn applying_twice_is_refused() {
    let device = Device::flex();
    let (model, _) = qv(2).apply(block(&device)).unwrap();
    let error = qv(2).apply(model).unwrap_err();
    assert!(
        matches!(error, LoraError::AlreadyAdapted { .. }),
        "{error:?}"
    );

    // Burn's own `apply_lora` counts as adapters too.
    let burn_lora = block(&device).apply_lora(burn::module::Lora::new(2, 2.0));
    let error = qv(2).apply(burn_lora).unwrap_err();
    assert!(
        matches!(error, LoraError::AlreadyAdapted { .. }),
        "{error:?}"
    );
}

#[test]
fn merging_non_finite_values_is_refused_and_changes_nothing() {
    let device = Device::flex();
    let (model, _) = qv(2).apply(block(&device)).unwrap();
    let model = fill(model, "lora_b", f64::NAN);
    let error = model.merge_lora().unwrap_err();
    assert!(
        matches!(&error, LoraError::NonFiniteMerge { path, adapter } if path == "query" && adapter == "default"),
        "{error:?}"
    );
    assert!(model.lora_adapters().iter().all(|info| !info.merged));
}

#[test]
fn merge_twice_and_unmerge_without_merge_are_refused() {
    let device = Device::flex();
    let (model, _) = qv(2).apply(block(&device)).unwrap();
    assert_eq!(model.unmerge_lora().unwrap_err(), LoraError::NothingMerged);
    let merged = model.merge_lora().unwrap();
    assert_eq!(merged.merge_lora().unwrap_err(), LoraError::AlreadyMerged);
    assert!(merged.unmerge_lora().is_ok());
}

#[test]
fn operations_on_a_model_without_adapters_are_refused() {
    let device = Device::flex();
    let model = block(&device);
    assert_eq!(model.merge_lora().unwrap_err(), LoraError::NoAdapters);
    assert_eq!(model.unmerge_lora().unwrap_err(), LoraError::NoAdapters);
    assert_eq!(model.unload_lora().unwrap_err(), LoraError::NoAdapters);
    assert_eq!(
        model.merge_and_unload_lora().unwrap_err(),
        LoraError::NoAdapters
    );
}
