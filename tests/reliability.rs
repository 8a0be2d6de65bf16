//! Nothing lost, nothing silent: every operation gives the correct result or a typed error, for
//! every state a model can reach. One section per class of failure; each has several cases.
//! The random sequences of operations are in `reliability_props.rs`, concurrent saves and
//! loads in `reliability_concurrency.rs`.

mod common;

use std::path::PathBuf;

use burn::module::{Module, ModuleMapper, Param, ParamGroup, Reparameterization, Reparameterizer};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::{DType, Distribution, FloatDType};
use burn_lora::peft::{
    CONFIG_FILE, KeyMap, LoadOptions, WEIGHTS_FILE, load_adapter, load_adapter_with, save_adapter,
};
use burn_lora::{
    Combination, LoraConfig, LoraError, LoraInit, LoraLinear, LoraModule, LoraPlusConfig,
    LoraState, MixedBatch, Targets,
};
use common::{Projections, base_data, fill, randomize, raw_data};

const D_IN: usize = 6;
const D_OUT: usize = 5;

fn qv(rank: usize) -> LoraConfig {
    LoraConfig::new(rank)
        .with_alpha(Some(2.0 * rank as f64))
        .with_targets(Targets::attention_qv())
}

fn projections(device: &Device) -> Projections {
    device.seed(11);
    Projections::new(D_IN, D_OUT, device)
}

fn input(device: &Device) -> Tensor<2> {
    Tensor::<2>::random([3, D_IN], Distribution::Default, device)
}

fn temp(name: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("reliability_{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Bit-for-bit equality of two outputs.
fn same(a: Tensor<2>, b: Tensor<2>) -> bool {
    a.into_data() == b.into_data()
}

/// Every float parameter cast to `dtype`: a model stored in half precision.
fn cast<M: Module>(model: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|tensor| tensor.cast(dtype))
        }
    }
    model.map(&mut Cast(dtype))
}

// 1. Adapters own only what is theirs ------------------------------------------------------------

/// The model with Burn's own `apply_lora` on `value`, and the output that gives.
fn with_burns_adapter(device: &Device) -> Projections {
    let model = projections(device);
    let id = model.value.weight.id;
    let lora = burn::module::Lora {
        param_group: ParamGroup::from_ids(vec![id]),
        ..burn::module::Lora::new(2, 4.0)
    };
    model.apply_lora(lora)
}

#[test]
fn every_entry_point_refuses_a_model_carrying_burns_adapter_and_leaves_it_alone() {
    let device = Device::flex();
    let model = with_burns_adapter(&device);
    let x = input(&device);
    let before = model.forward(x.clone());
    let foreign = |result: Result<(), LoraError>, what: &str| match result {
        Err(LoraError::AlreadyAdapted { path, kind }) => {
            assert_eq!(path, "value.weight", "{what}");
            assert_eq!(kind, "lora", "{what}");
        }
        other => panic!("{what}: {other:?}"),
    };
    foreign(qv(2).apply(model.clone()).map(drop), "apply");
    foreign(model.add_adapter("x", &qv(2)).map(drop), "add_adapter");
    foreign(model.merge_lora().map(drop), "merge_lora");
    foreign(model.unmerge_lora().map(drop), "unmerge_lora");
    foreign(model.unload_lora().map(drop), "unload_lora");
    foreign(
        model.merge_and_unload_lora().map(drop),
        "merge_and_unload_lora",
    );
    foreign(model.set_active(&["x"]).map(drop), "set_active");
    foreign(model.disable_adapters().map(drop), "disable_adapters");
    foreign(model.delete_adapter("x").map(drop), "delete_adapter");
    foreign(
        model
            .add_weighted_adapter(&[("x", 1.0)], "y", Combination::Cat)
            .map(drop),
        "add_weighted_adapter",
    );
    foreign(model.mixed_batch(&[Some("x")]).map(drop), "mixed_batch");
    foreign(
        save_adapter(&model, temp("foreign_save"), "x").map(drop),
        "save_adapter",
    );
    let (adapted, _) = qv(2).apply(projections(&device)).unwrap();
    let dir = temp("foreign_load");
    save_adapter(&adapted, &dir, "default").unwrap();
    foreign(load_adapter(&model, &dir, "x").map(drop), "load_adapter");
    foreign(
        LoraPlusConfig::new().scheduler(&model, 1e-3).map(drop),
        "LoRA+ scheduler",
    );
    let mut quantizer = burn::module::Quantizer::new(
        burn::tensor::quantization::Calibration::MinMax,
        device.settings().quantization.scheme,
    );
    foreign(
        burn_lora::quantize_base(model.clone(), &mut quantizer).map(drop),
        "quantize_base",
    );
    // The reading operations see none of ours and never fold Burn's.
    assert!(model.lora_adapters().is_empty());
    assert!(model.adapter_names().is_empty());
    assert!(same(model.forward(x), before), "Burn's adapter changed");
}

#[test]
fn our_state_has_its_own_name_and_paths() {
    let device = Device::flex();
    assert_eq!(LoraState::NAME, "burn_lora");
    assert_ne!(LoraState::NAME, burn::module::LoraAdapter::NAME);
    let (model, _) = qv(2).apply(projections(&device)).unwrap();
    let paths: Vec<String> = raw_data(&model).into_keys().collect();
    assert!(paths.contains(&"query.weight.burn_lora.adapters.0.lora_a".to_string()));
    assert!(
        paths.iter().all(|path| !path.contains(".lora.")),
        "{paths:?}"
    );
}

// 2. An init that rewrites the base changes nothing else -------------------------------------

fn pissa(rank: usize) -> LoraConfig {
    qv(rank).with_init(LoraInit::Pissa)
}

#[test]
fn a_pissa_adapter_refuses_neighbours_that_would_see_the_residual() {
    let device = Device::flex();
    let (model, _) = pissa(2).apply(projections(&device)).unwrap();
    let refused = |result: Result<(), LoraError>, what: &str| {
        assert!(
            matches!(&result, Err(LoraError::UnsupportedVariant { what, .. }) if what.contains("pissa")),
            "{what}: {result:?}"
        );
    };
    refused(model.add_adapter("plain", &qv(2)).map(drop), "add_adapter");
    refused(model.disable_adapters().map(drop), "disable_adapters");
    refused(
        model
            .add_weighted_adapter(&[("default", 1.0)], "sum", Combination::Cat)
            .map(drop),
        "add_weighted_adapter",
    );
    let (plain, _) = qv(2).apply(projections(&device)).unwrap();
    let dir = temp("pissa_neighbour");
    save_adapter(&plain, &dir, "default").unwrap();
    refused(
        load_adapter(&model, &dir, "loaded").map(drop),
        "load_adapter",
    );
    // And the other way round: a PiSSA adapter beside existing ones.
    let error = plain.add_adapter("p", &pissa(2)).unwrap_err();
    assert!(
        matches!(&error, LoraError::UnsupportedVariant { what, .. } if what.contains("already has adapters")),
        "{error}"
    );
}

#[test]
fn unload_gives_back_the_original_base_bit_for_bit_after_pissa_and_olora() {
    let device = Device::flex();
    for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
        for init in [LoraInit::Pissa, LoraInit::Olora, LoraInit::PissaNiter(2)] {
            let base = cast(projections(&device), dtype);
            let original = base_data(&base);
            let (model, _) = qv(2).with_init(init).apply(base).unwrap();
            assert_ne!(
                base_data(&model),
                original,
                "{init:?}: the base holds the residual"
            );
            // Trained, merged, unmerged: unload still gives the base it started from.
            let model = randomize(model, "lora_b", 0.2);
            assert_eq!(
                base_data(&model.unload_lora().unwrap()),
                original,
                "{dtype:?} {init:?}"
            );
            let merged = model.merge_lora().unwrap();
            assert_eq!(
                base_data(&merged.unload_lora().unwrap()),
                original,
                "{dtype:?} {init:?}"
            );
        }
    }
}

// 3. Half precision never overflows silently -------------------------------------------------

#[test]
fn half_precision_models_go_through_apply_train_merge_unmerge_save_load() {
    let device = Device::flex().autodiff();
    for dtype in [FloatDType::F16, FloatDType::BF16] {
        let base = cast(projections(&device), dtype);
        let original = base_data(&base);
        let fresh = base.clone();
        let (model, _) = qv(2).apply(base).unwrap();
        let x = input(&device).cast(dtype);
        // One training step: only the factors move.
        let mut optimizer = AdamWConfig::new().init();
        let loss = model.forward(x.clone()).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = optimizer.step(1e-2, model, grads);
        assert_eq!(
            base_data(&model),
            original,
            "{dtype:?}: the frozen base moved"
        );
        let output = model.forward(x.clone());
        assert_eq!(output.dtype(), DType::from(dtype));
        // Merged: the same output within the dtype's rounding, and unmerge is exact.
        let merged = model.merge_lora().unwrap();
        let tolerance = match dtype {
            FloatDType::F16 => 2e-2,
            _ => 1e-1,
        };
        merged
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(
                &output.clone().into_data(),
                burn::tensor::Tolerance::absolute(tolerance),
            );
        let unmerged = merged.unmerge_lora().unwrap();
        assert_eq!(base_data(&unmerged), original, "{dtype:?}: unmerge drifted");
        // Saved in its own dtype and loaded back: the same output.
        let dir = temp(&format!("half_{dtype:?}"));
        save_adapter(&unmerged, &dir, "default").unwrap();
        let (loaded, report) = load_adapter(&fresh, &dir, "default").unwrap();
        assert!(report.is_clean(), "{report}");
        assert!(
            same(loaded.forward(x.clone()), unmerged.forward(x)),
            "{dtype:?}"
        );
    }
}

#[test]
fn merge_unmerge_cycles_do_not_drift_in_any_dtype() {
    let device = Device::flex();
    for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
        let base = cast(projections(&device), dtype);
        let original = base_data(&base);
        let (mut model, _) = qv(3).apply(base).unwrap();
        model = randomize(randomize(model, "lora_a", 0.5), "lora_b", 0.5);
        for _ in 0..100 {
            model = model.merge_lora().unwrap().unmerge_lora().unwrap();
        }
        assert_eq!(base_data(&model), original, "{dtype:?}: 100 cycles drifted");
    }
}

#[test]
fn a_merge_that_overflows_half_precision_is_refused_and_changes_nothing() {
    let device = Device::flex();
    let dtype = FloatDType::F16;
    let (model, _) = qv(2).apply(cast(projections(&device), dtype)).unwrap();
    // s·A·B = 2·(2 · 300 · 300) = 360,000 per entry: finite in f32, past f16's 65,504.
    let model = fill(fill(model, "lora_a", 300.0), "lora_b", 300.0);
    let before = raw_data(&model);
    assert!(matches!(
        model.merge_lora(),
        Err(LoraError::NonFiniteMerge { .. })
    ));
    assert!(matches!(
        model.merge_and_unload_lora(),
        Err(LoraError::NonFiniteMerge { .. })
    ));
    assert_eq!(raw_data(&model), before);
}

#[test]
fn a_load_of_f32_factors_that_overflow_the_layer_is_refused() {
    let device = Device::flex();
    let (model, _) = qv(2).apply(projections(&device)).unwrap();
    let model = fill(model, "lora_b", 1e6); // finite in f32, Inf in f16
    let dir = temp("overflow_load");
    save_adapter(&model, &dir, "default").unwrap();
    let half = cast(projections(&device), FloatDType::F16);
    match load_adapter(&half, &dir, "default") {
        Err(LoraError::AdapterMismatch { report, .. }) => {
            assert!(
                report
                    .non_finite
                    .iter()
                    .any(|key| key.contains("overflows")),
                "{report}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Non-strict: nothing loadable either, still an error, never Inf in the model.
    let lenient = LoadOptions::new().with_strict(false);
    assert!(load_adapter_with(&half, &dir, "default", &lenient).is_err());
    // In f32 it loads.
    assert!(load_adapter(&projections(&device), &dir, "default").is_ok());
}

#[test]
fn combining_into_an_overflowing_adapter_is_refused() {
    let device = Device::flex();
    let (model, _) = qv(2)
        .apply(cast(projections(&device), FloatDType::F16))
        .unwrap();
    let model = fill(fill(model, "lora_a", 1.0), "lora_b", 1.0);
    let error = model
        .add_weighted_adapter(&[("default", 1e12)], "huge", Combination::Cat)
        .unwrap_err();
    assert!(
        matches!(error, LoraError::NonFiniteCombination { .. }),
        "{error}"
    );
}

// 4. DoRA's degenerate cases -------------------------------------------------------------------

fn dora(rank: usize) -> LoraConfig {
    qv(rank).with_use_dora(true)
}

/// The model with output feature `column` of both weights set to zero.
fn zero_column(model: Projections, column: usize) -> Projections {
    struct Zero(usize);
    impl ModuleMapper for Zero {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if D != 2 {
                return param;
            }
            let column = self.0;
            param.map(|tensor| {
                let dims = tensor.dims();
                let device = tensor.device();
                let matrix: Tensor<2> = tensor.reshape([dims[0], dims[1]]);
                let zeroed = matrix.slice_assign(
                    [0..dims[0], column..column + 1],
                    Tensor::zeros([dims[0], 1], &device),
                );
                zeroed.reshape(dims)
            })
        }
    }
    model.map(&mut Zero(column))
}

#[test]
fn dora_on_a_weight_with_an_all_zero_output_column_stays_finite() {
    let device = Device::flex();
    let base = zero_column(projections(&device), 2);
    let x = input(&device);
    let (model, _) = dora(2).apply(base).unwrap();
    let (query, value) = model.outputs(x.clone());
    assert!(
        query.clone().is_finite().all().into_scalar::<bool>(),
        "{query}"
    );
    assert!(value.is_finite().all().into_scalar::<bool>());
    let trained = randomize(model, "lora_b", 0.3);
    let output = trained.forward(x.clone());
    assert!(
        output.clone().is_finite().all().into_scalar::<bool>(),
        "{output}"
    );
    let merged = trained.merge_lora().unwrap();
    assert!(merged.forward(x).is_finite().all().into_scalar::<bool>());
}

#[test]
fn a_dora_merge_with_zero_magnitudes_is_undone_exactly() {
    let device = Device::flex();
    let base = projections(&device);
    let original = base_data(&base);
    let (model, _) = dora(2).apply(base).unwrap();
    let model = fill(randomize(model, "lora_b", 0.3), "magnitude", 0.0);
    let merged = model.merge_lora().unwrap();
    assert_eq!(base_data(&merged.unmerge_lora().unwrap()), original);
    assert_eq!(base_data(&merged.unload_lora().unwrap()), original);
}

// 5. An adapter directory is one unit ---------------------------------------------------------

#[test]
fn a_torn_pair_is_detected_and_the_kept_weights_recover_it() {
    let device = Device::flex();
    // Other tests draw from the device's generator too: keep one base, never re-seed.
    let base = projections(&device);
    let (model, _) = qv(2).apply(base.clone()).unwrap();
    let first = fill(model.clone(), "lora_b", 0.25);
    let second = fill(model, "lora_b", 0.5);
    let dir = temp("torn");
    save_adapter(&first, &dir, "default").unwrap();
    let old_weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    save_adapter(&second, &dir, "default").unwrap();
    let new_config = std::fs::read(dir.join(CONFIG_FILE)).unwrap();
    // A crash between the two renames: the new weights beside the old config.
    save_adapter(&first, &dir, "default").unwrap();
    std::fs::write(
        dir.join(WEIGHTS_FILE),
        std::fs::read(temp_copy(&second, "torn_second").join(WEIGHTS_FILE)).unwrap(),
    )
    .unwrap();
    let error = load_adapter(&base, &dir, "x").unwrap_err();
    assert!(matches!(error, LoraError::TornAdapter { .. }), "{error}");
    // The save had kept the old weights aside: the loader finds the ones the config names.
    std::fs::write(dir.join(format!(".{WEIGHTS_FILE}.1.2.3.bak")), &old_weights).unwrap();
    let (loaded, _) = load_adapter(&base, &dir, "x").unwrap();
    let x = input(&device);
    // The same factors (exactly, f32 in the file); the products may round differently.
    loaded
        .forward(x.clone())
        .into_data()
        .assert_approx_eq::<f32>(
            &first.forward(x.clone()).into_data(),
            burn::tensor::Tolerance::absolute(1e-6),
        );
    let wrong = second.forward(x.clone()) - first.forward(x);
    assert!(
        wrong.abs().max().into_scalar::<f32>() > 1e-3,
        "the two saves differ"
    );
    // A config PEFT wrote (no digest) is taken as it is.
    assert!(!new_config.is_empty());
}

fn temp_copy<M: Module>(model: &M, name: &str) -> PathBuf {
    let dir = temp(name);
    save_adapter(model, &dir, "default").unwrap();
    dir
}

// 6. The loader never double-attaches ---------------------------------------------------------

#[test]
fn a_key_map_sending_two_modules_to_one_layer_fails_a_strict_load() {
    let device = Device::flex();
    let (model, _) = qv(2).apply(projections(&device)).unwrap();
    let dir = temp("collision");
    save_adapter(&model, &dir, "default").unwrap();
    let map = KeyMap::new().rename("value", "query");
    let options = LoadOptions::new().with_key_map(map.clone());
    match load_adapter_with(&projections(&device), &dir, "x", &options) {
        Err(LoraError::AdapterMismatch { report, .. }) => assert!(
            report
                .unexpected
                .iter()
                .any(|key| key.contains("maps to `query`")),
            "{report}"
        ),
        other => panic!("{other:?}"),
    }
    // Non-strict: one adapter on `query`, the collision reported.
    let lenient = options.with_strict(false);
    let (loaded, report) = load_adapter_with(&projections(&device), &dir, "x", &lenient).unwrap();
    assert_eq!(report.loaded.len(), 1, "{report}");
    assert_eq!(loaded.lora_adapters().len(), 1);
    assert!(!report.is_clean());
}

#[test]
fn a_config_pattern_that_does_not_compile_is_an_error() {
    let device = Device::flex();
    let (model, _) = qv(2).apply(projections(&device)).unwrap();
    let dir = temp("bad_pattern");
    save_adapter(&model, &dir, "default").unwrap();
    let config = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    let broken = config.replacen(
        "\"alpha_pattern\": {}",
        "\"alpha_pattern\": {\"query(\": 3}",
        1,
    );
    assert_ne!(
        broken, config,
        "the saved config has an empty alpha_pattern"
    );
    std::fs::write(dir.join(CONFIG_FILE), broken).unwrap();
    let error = load_adapter(&projections(&device), &dir, "x").unwrap_err();
    assert!(
        matches!(&error, LoraError::InvalidConfig { message, .. } if message.contains("alpha_pattern")),
        "{error}"
    );
}

// 7. Shared layers ------------------------------------------------------------------------------

#[derive(Module, Debug)]
struct Twice {
    first: LoraLinear,
    second: LoraLinear,
}

#[derive(Module, Debug)]
struct Once {
    first: LoraLinear,
}

#[test]
fn a_layer_at_two_paths_is_refused_and_reported_at_both() {
    let device = Device::flex();
    let layer: LoraLinear = LinearConfig::new(D_IN, D_OUT).init(&device).into();
    let shared = Twice {
        first: layer.clone(),
        second: layer,
    };
    for targets in [
        Targets::names(["first", "second"]),
        Targets::names(["first"]),
    ] {
        let error = LoraConfig::new(2)
            .with_targets(targets)
            .apply(shared.clone())
            .unwrap_err();
        assert!(
            matches!(error, LoraError::SharedWeight { ref paths } if paths.len() == 2),
            "{error}"
        );
    }
    // Adapted first, then placed twice: every operation refuses, none panics.
    let (once, _) = LoraConfig::new(2)
        .with_targets(Targets::names(["first"]))
        .apply(Once {
            first: LinearConfig::new(D_IN, D_OUT).init(&device).into(),
        })
        .unwrap();
    let twice = Twice {
        first: once.first.clone(),
        second: once.first,
    };
    let shared_error = |result: Result<(), LoraError>| {
        assert!(
            matches!(result, Err(LoraError::SharedWeight { .. })),
            "{result:?}"
        );
    };
    shared_error(twice.merge_lora().map(drop));
    shared_error(twice.unload_lora().map(drop));
    shared_error(twice.set_active(&["default"]).map(drop));
    shared_error(save_adapter(&twice, temp("shared_save"), "default").map(drop));
    let paths: Vec<String> = twice
        .lora_adapters()
        .into_iter()
        .map(|info| info.path)
        .collect();
    assert_eq!(paths, ["first", "second"]);
}

// 8. Every number a user passes is bounded ----------------------------------------------------

#[test]
fn every_number_is_checked_against_its_range() {
    let device = Device::flex();
    let model = projections(&device);
    let error = |config: LoraConfig| config.apply(model.clone()).unwrap_err();
    assert!(matches!(
        error(qv(usize::MAX)),
        LoraError::RankTooLarge { .. }
    ));
    assert!(matches!(error(qv(0)), LoraError::ZeroRank));
    for alpha in [f64::NAN, -1.0, 0.0, f64::INFINITY] {
        assert!(matches!(
            error(qv(2).with_alpha(Some(alpha))),
            LoraError::InvalidAlpha { .. }
        ));
    }
    for dropout in [f64::NAN, -0.1, 1.0] {
        assert!(matches!(
            error(qv(2).with_dropout(dropout)),
            LoraError::InvalidDropout { .. }
        ));
    }
    let (adapted, _) = qv(2).apply(model).unwrap();
    for ratio in [0.0, -2.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            LoraPlusConfig::new()
                .with_lr_ratio(ratio)
                .scheduler(&adapted, 1e-3),
            Err(LoraError::InvalidLearningRate { .. })
        ));
    }
    for weight in [f64::NAN, f64::INFINITY] {
        assert!(matches!(
            adapted.add_weighted_adapter(&[("default", weight)], "w", Combination::Cat),
            Err(LoraError::InvalidWeight { .. })
        ));
    }
    for rank in [usize::MAX, D_OUT + 1] {
        assert!(matches!(
            adapted.add_weighted_adapter(&[("default", 1.0)], "s", Combination::Svd { rank }),
            Err(LoraError::RankTooLarge { .. })
        ));
    }
}

// 9. Mixed batches never give the wrong output ------------------------------------------------

#[test]
fn a_batch_from_the_public_constructor_gives_a_dora_adapter_its_own_output() {
    let device = Device::flex();
    let (model, _) = dora(2).apply(projections(&device)).unwrap();
    let model = randomize(randomize(model, "lora_b", 0.3), "magnitude", 0.4);
    let x = input(&device);
    // Built without the model's checks: the layer itself computes DoRA's output.
    let batch = MixedBatch::new(&[Some("default"), None, Some("default")], &device);
    let mixed = model.query.forward_mixed(x.clone(), &batch);
    let adapted = model.query.forward(x.clone());
    let plain = model.disable_adapters().unwrap().query.forward(x);
    let expected = Tensor::cat(
        vec![
            adapted.clone().narrow(0, 0, 1),
            plain.narrow(0, 1, 1),
            adapted.narrow(0, 2, 1),
        ],
        0,
    );
    mixed.into_data().assert_approx_eq::<f32>(
        &expected.into_data(),
        burn::tensor::Tolerance::absolute(1e-5),
    );
}

// 10. Panic safety ------------------------------------------------------------------------------

/// A reparameterization whose composition panics.
#[derive(Module, Debug)]
struct Panicking {
    armed: bool,
}

impl Reparameterization for Panicking {
    const NAME: &'static str = "panicking";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        assert!(!self.armed, "a composition that fails");
        base
    }
}

struct ArmEverything;

impl Reparameterizer for ArmEverything {
    type Reparam = Panicking;

    fn reparameterize<const D: usize>(
        &mut self,
        _path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<Panicking>) {
        (param, Some(Panicking { armed: true }))
    }
}

#[test]
fn a_panic_while_reading_adapters_leaves_later_forwards_adapted() {
    let device = Device::flex();
    let (model, _) = qv(2).apply(projections(&device)).unwrap();
    let model = randomize(model, "lora_b", 0.5);
    let x = input(&device);
    let adapted = model.value.forward(x.clone()); // the dense path composes through `val()`
    let plain = model.disable_adapters().unwrap().value.forward(x.clone());
    assert!(
        !same(adapted.clone(), plain),
        "the adapter changes the output"
    );
    // Reading another model's adapters panics half way through the capture.
    let other: Linear = LinearConfig::new(D_IN, D_OUT).init(&device);
    let other = other.apply_reparameterization(ArmEverything);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| other.lora_adapters()));
    assert!(result.is_err(), "the foreign composition panicked");
    // The capture ended with the panic: this thread's forwards still compose the adapter.
    assert!(same(model.value.forward(x), adapted));
}
