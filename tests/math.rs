//! The math of adapted layers against naive f64 formulas, on every backend of the build.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::{LoraConfig, LoraInit, LoraLinear, LoraModule, LoraState, Targets};
use common::{HostTensor, Projections, devices, param_ids, randomize, values};

const D_IN: usize = 24;
const D_OUT: usize = 16;
const RANK: usize = 4;

/// The test's two projections, `D_IN` to `D_OUT`.
fn projections(device: &Device) -> Projections {
    Projections::new(D_IN, D_OUT, device)
}

fn config() -> LoraConfig {
    LoraConfig::new(RANK)
        .with_alpha(Some(8.0))
        .with_targets(Targets::attention_qv())
}

fn input(device: &Device) -> Tensor<3> {
    Tensor::random([3, 5, D_IN], Distribution::Normal(0.0, 1.0), device)
}

/// `x·(W + s·A·B) + b` in f64 from the layer's own parameters, read back by path.
fn naive(model: &Projections, layer: &str, x: &Tensor<3>, scale: f64) -> HostTensor {
    let params = values(model);
    let weight = &params[&format!("{layer}.weight")];
    let a = &params[&format!("{layer}.weight.burn_lora.adapters.0.lora_a")];
    let b = &params[&format!("{layer}.weight.burn_lora.adapters.0.lora_b")];
    let bias = &params[&format!("{layer}.bias")];
    let x = HostTensor::from(x.clone().reshape([15, D_IN]));
    let effective = weight.add(&a.matmul(b).scale(scale));
    x.matmul(&effective).add_row(bias)
}

fn flat(output: Tensor<3>) -> HostTensor {
    HostTensor::from(output.reshape([15, D_OUT]))
}

#[test]
fn right_after_apply_the_output_is_the_base_output_bit_for_bit() {
    for (name, device) in devices() {
        device.seed(1);
        let model = projections(&device);
        let x = input(&device);
        let (query, value) = model.outputs(x.clone());

        let (adapted, _) = config().apply(model).unwrap();
        let (adapted_query, adapted_value) = adapted.outputs(x);

        assert_eq!(
            adapted_query.into_data(),
            query.into_data(),
            "{name}: fast path"
        );
        assert_eq!(
            adapted_value.into_data(),
            value.into_data(),
            "{name}: dense path"
        );
    }
}

#[test]
fn unmerged_and_merged_outputs_equal_the_naive_formula() {
    for (name, device) in devices() {
        device.seed(2);
        let (model, _) = config().apply(projections(&device)).unwrap();
        let model = randomize(model, "lora_b", 0.5);
        let x = input(&device);
        let scale = 8.0 / RANK as f64;

        let expected_query = naive(&model, "query", &x, scale);
        let expected_value = naive(&model, "value", &x, scale);
        assert!(
            expected_query.max_abs() > 0.1,
            "{name}: a meaningful output"
        );

        let (query, value) = model.outputs(x.clone());
        let query_error = flat(query).error_vs_max(&expected_query);
        let value_error = flat(value).error_vs_max(&expected_value);
        assert!(
            query_error < 1e-5,
            "{name}: fast path error {query_error:e}"
        );
        assert!(
            value_error < 1e-5,
            "{name}: dense path error {value_error:e}"
        );

        let merged = model.merge_lora().unwrap();
        let (query, value) = merged.outputs(x.clone());
        let query_error = flat(query).error_vs_max(&expected_query);
        let value_error = flat(value).error_vs_max(&expected_value);
        assert!(
            query_error < 1e-5,
            "{name}: merged fast path error {query_error:e}"
        );
        assert!(
            value_error < 1e-5,
            "{name}: merged dense path error {value_error:e}"
        );
    }
}

#[test]
fn the_fast_path_equals_the_dense_composition() {
    for (name, device) in devices() {
        device.seed(3);
        let (model, _) = config().apply(projections(&device)).unwrap();
        let model = randomize(model, "lora_b", 0.5);
        let x = input(&device);

        let fast = model.query.forward(x.clone());
        // The same parameter, adapter included, in a plain `Linear`: `Param::val()` composes.
        let dense = Linear::from(model.query.clone()).forward(x);

        let error = flat(fast).error_vs_max(&flat(dense));
        assert!(error < 1e-5, "{name}: fast vs dense error {error:e}");
    }
}

#[test]
fn merge_then_unmerge_restores_the_base_weight() {
    for (name, device) in devices() {
        device.seed(4);
        let (model, _) = config().apply(projections(&device)).unwrap();
        let model = randomize(model, "lora_b", 0.5);
        let original = values(&model);

        let once = model.merge_lora().unwrap().unmerge_lora().unwrap();
        let mut cycled = model.clone();
        for _ in 0..100 {
            cycled = cycled.merge_lora().unwrap().unmerge_lora().unwrap();
        }

        for layer in ["query", "value"] {
            let key = format!("{layer}.weight");
            let error = values(&once)[&key].error_vs_max(&original[&key]);
            assert!(error < 1e-6, "{name}: {layer} after one cycle: {error:e}");
            let error = values(&cycled)[&key].error_vs_max(&original[&key]);
            assert!(error < 1e-5, "{name}: {layer} after 100 cycles: {error:e}");
        }
        // The merged weight really moved, so the round trip is not vacuous.
        let merged = values(&model.merge_lora().unwrap());
        let moved = merged["query.weight"].error_vs_max(&original["query.weight"]);
        assert!(
            moved > 1e-2,
            "{name}: merge changed the weight by {moved:e}"
        );
    }
}

#[test]
fn merged_layers_carry_merged_adapters_and_unload_returns_the_base() {
    let device = Device::flex();
    device.seed(5);
    let base = projections(&device);
    let x = input(&device);
    let (base_query, _) = base.outputs(x.clone());
    let (model, _) = config().apply(base.clone()).unwrap();
    let model = randomize(model, "lora_b", 0.5);
    let (unmerged_query, _) = model.outputs(x.clone());

    let merged = model.merge_lora().unwrap();
    assert!(merged.lora_adapters().iter().all(|info| info.merged));
    assert_eq!(merged.lora_adapters().len(), 2);

    let plain = merged.merge_and_unload_lora().unwrap();
    assert!(plain.lora_adapters().is_empty());
    assert_eq!(plain.num_params(), base.num_params());
    let (plain_query, _) = plain.outputs(x.clone());
    let error = flat(plain_query).error_vs_max(&flat(unmerged_query));
    assert!(
        error < 1e-5,
        "merge_and_unload keeps the fine-tuned output: {error:e}"
    );

    let unloaded = merged.unload_lora().unwrap();
    assert!(unloaded.lora_adapters().is_empty());
    let (unloaded_query, _) = unloaded.outputs(x);
    let error = flat(unloaded_query).error_vs_max(&flat(base_query));
    assert!(
        error < 1e-6,
        "unload takes merged updates back out: {error:e}"
    );
}

#[test]
fn rslora_scales_by_alpha_over_root_rank() {
    let device = Device::flex();
    device.seed(6);
    let config = config().with_use_rslora(true);
    assert_eq!(config.scale(), 8.0 / 2.0);
    let (model, _) = config.apply(projections(&device)).unwrap();
    let model = randomize(model, "lora_b", 0.5);
    let x = input(&device);
    let expected = naive(&model, "query", &x, 8.0 / (RANK as f64).sqrt());
    let (query, _) = model.outputs(x);
    let error = flat(query).error_vs_max(&expected);
    assert!(error < 1e-5, "rsLoRA error {error:e}");
}

#[test]
fn init_follows_peft() {
    let device = Device::flex();
    device.seed(7);
    let wide = || Projections {
        query: LinearConfig::new(256, 64).init(&device).into(),
        value: LinearConfig::new(256, 64).init(&device),
    };
    let rank = 16;

    // Kaiming-uniform with a = √5 on A [d_in, r] is U(-1/√d_in, 1/√d_in); B is zero.
    let config = LoraConfig::new(rank).with_targets(Targets::attention_qv());
    let (model, _) = config.apply(wide()).unwrap();
    let params = values(&model);
    let a = &params["query.weight.burn_lora.adapters.0.lora_a"];
    let b = &params["query.weight.burn_lora.adapters.0.lora_b"];
    assert_eq!(a.dims, vec![256, rank]);
    assert_eq!(b.dims, vec![rank, 64]);
    let bound = 1.0 / 256f64.sqrt();
    assert!(a.max_abs() <= bound && a.max_abs() > 0.9 * bound);
    assert_eq!(b.max_abs(), 0.0);

    // Gaussian: A ~ N(0, (1/r)²).
    let config = config.with_init(LoraInit::Gaussian);
    let (model, _) = config.apply(wide()).unwrap();
    let a = &values(&model)["query.weight.burn_lora.adapters.0.lora_a"];
    let n = a.values.len() as f64;
    let std = (a.values.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
    let expected = 1.0 / rank as f64;
    assert!(
        (std / expected - 1.0).abs() < 0.1,
        "std {std} vs {expected}"
    );
}

#[test]
fn dropout_acts_in_training_only() {
    let device = Device::flex().autodiff();
    device.seed(8);
    let config = config().with_dropout(0.5);
    let (model, _) = config.apply(projections(&device)).unwrap();
    let model = randomize(model, "lora_b", 0.5);
    let x = input(&device);

    let training = flat(model.query.forward(x.clone()));
    let expected = naive(&model, "query", &x, 2.0);
    assert!(
        training.error_vs_max(&expected) > 1e-3,
        "dropout changes the training output"
    );

    let inference = model.valid();
    let eval = flat(inference.query.forward(x.clone().inner()));
    let error = eval.error_vs_max(&expected);
    assert!(error < 1e-5, "no dropout at inference: {error:e}");
}

#[test]
fn the_seed_example_reports_4608_trainable_of_32768() {
    #[derive(Module, Debug)]
    struct One {
        proj: LoraLinear,
    }
    let device = Device::flex();
    let model = One {
        proj: LinearConfig::new(512, 64)
            .with_bias(false)
            .init(&device)
            .into(),
    };
    let config = LoraConfig::new(8).with_targets(Targets::names(["proj"]));
    let (model, report) = config.apply(model).unwrap();
    assert_eq!(report.trainable_params(), 4_608);
    assert_eq!(report.adapted_weight_params(), 32_768);
    assert_eq!(
        format!("{:.1}", report.change_vs_adapted_weights()),
        "-85.9"
    );
    assert_eq!(model.num_params(), 32_768 + 4_608);
    let state = model.proj.weight.reparameterization::<LoraState>().unwrap();
    assert_eq!(state.adapters[0].num_params(), 4_608);
    println!("{report}");
}

#[test]
fn merge_and_unmerge_keep_every_parameter_id() {
    // Optimizer state is keyed by ParamId: a rebuild that changed ids would silently reset it.
    let device = Device::flex();
    let (model, _) = config().apply(projections(&device)).unwrap();
    let ids = param_ids(&model);
    assert_eq!(ids.len(), 4 + 4, "two weights, two biases, two A, two B");
    let merged = model.merge_lora().unwrap();
    assert_eq!(param_ids(&merged), ids);
    assert_eq!(param_ids(&merged.unmerge_lora().unwrap()), ids);
}
