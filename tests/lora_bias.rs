//! PEFT's `lora_bias`: a bias on `B`, added as `s·b_B` to the layer's output, trained with `A`
//! and `B`, folded into the layer's bias by a merge and taken back out by an unmerge. Checked
//! against a naive f64 formula; PEFT's own outputs are in `tests/peft_fixtures.rs` (case
//! `lora_bias`).

mod common;

use burn::nn::LinearConfig;
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use burn_lora::{LoraConfig, LoraError, LoraLinear, LoraModule, Targets};
use common::{HostTensor, Projections, devices, fill, randomize, values};

/// f32 against f64 on outputs of size ~10.
const TOLERANCE: f64 = 1e-5;

fn config() -> LoraConfig {
    LoraConfig::new(4)
        .with_alpha(Some(6.0))
        .with_lora_bias(true)
        .with_targets(Targets::names(["query"]))
}

/// The `query` projection (a LoraLinear) adapted with a bias on `B`, factors and bias random.
fn adapted(device: &Device) -> Projections {
    let model = Projections::new(12, 10, device);
    let (model, _) = config().apply(model).unwrap();
    let model = randomize(model, "lora_b", 0.3);
    randomize(model, "lora_bias", 0.5)
}

/// `x·W + b + s·(x·A·B + b_B)` in f64 from the parameters as stored.
fn expected(model: &Projections, x: &Tensor<2>) -> HostTensor {
    let values = values(model);
    let x = HostTensor::from(x.clone());
    let scale = model.lora_adapters()[0].scale;
    let get = |suffix: &str| {
        values
            .iter()
            .find(|(path, _)| path.starts_with("query") && path.ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix} in {:?}", values.keys()))
            .1
            .clone()
    };
    let low_rank = x.matmul(&get("lora_a")).matmul(&get("lora_b"));
    x.matmul(&get("query.weight"))
        .add_row(&get("query.bias"))
        .add(&low_rank.add_row(&get("lora_bias")).scale(scale))
}

#[test]
fn the_output_adds_the_scaled_bias_of_b_on_every_backend() {
    for (backend, device) in devices() {
        device.seed(3);
        let model = adapted(&device);
        let x = Tensor::<2>::random([5, 12], Distribution::Default, &device);
        let output = HostTensor::from(model.query.forward(x.clone()));
        let error = output.max_relative_error(&expected(&model, &x), 1.0);
        assert!(error <= TOLERANCE, "{backend}: {error}");
        assert!(model.lora_adapters()[0].lora_bias);
        // 4·(12 + 10) factors and 10 biases.
        let state = model
            .query
            .weight
            .reparameterization::<burn_lora::LoraState>();
        assert_eq!(state.unwrap().adapters[0].num_params(), 4 * (12 + 10) + 10);
    }
}

#[test]
fn the_bias_of_b_gets_its_gradient() {
    let device = Device::flex().autodiff();
    device.seed(5);
    let model = adapted(&device);
    let x = Tensor::<2>::random([6, 12], Distribution::Default, &device);
    let probe = Tensor::<2>::random([6, 10], Distribution::Default, &device);
    let loss = (model.query.forward(x) * probe.clone()).sum();
    let grads = loss.backward();
    let state = model
        .query
        .weight
        .reparameterization::<burn_lora::LoraState>()
        .expect("adapted");
    let adapter = &state.adapters[0];
    let bias = adapter.lora_bias.as_ref().expect("a bias on B");
    let grad = HostTensor::from(bias.grad(&grads).expect("the bias trains"));
    // d(sum(y·p))/d b_B = s · Σ_rows p.
    let probe = HostTensor::from(probe.inner());
    let mut expected = vec![0.0; 10];
    for row in 0..6 {
        for (column, value) in expected.iter_mut().enumerate() {
            *value += adapter.scale * probe.values[row * 10 + column];
        }
    }
    let expected = HostTensor {
        dims: vec![10],
        values: expected,
    };
    assert!(grad.max_relative_error(&expected, 1.0) <= TOLERANCE);
}

#[test]
fn a_merge_moves_the_bias_into_the_layer_and_an_unmerge_restores_it_exactly() {
    let device = Device::flex();
    device.seed(9);
    let model = adapted(&device);
    let x = Tensor::<2>::random([5, 12], Distribution::Default, &device);
    let unmerged = HostTensor::from(model.query.forward(x.clone()));
    let bias_before = model.query.bias.as_ref().unwrap().val().into_data();

    let merged = model.merge_lora().unwrap();
    let output = HostTensor::from(merged.query.forward(x.clone()));
    assert!(output.max_relative_error(&unmerged, 1.0) <= TOLERANCE);
    // The layer's own bias now holds b + s·b_B.
    let adapter = &model
        .query
        .weight
        .reparameterization::<burn_lora::LoraState>()
        .unwrap()
        .adapters[0];
    let expected = HostTensor::from(model.query.bias.as_ref().unwrap().val())
        .add(&HostTensor::from(adapter.lora_bias.as_ref().unwrap().val()).scale(adapter.scale));
    let stored = HostTensor::from(merged.query.bias.as_ref().unwrap().val());
    assert!(stored.max_relative_error(&expected, 1.0) <= TOLERANCE);

    let unmerged_again = merged.unmerge_lora().unwrap();
    let bias_after = unmerged_again
        .query
        .bias
        .as_ref()
        .unwrap()
        .val()
        .into_data();
    assert_eq!(bias_before.as_bytes(), bias_after.as_bytes());
    let output = HostTensor::from(unmerged_again.query.forward(x.clone()));
    assert!(output.max_relative_error(&unmerged, 1.0) <= TOLERANCE);

    // merge_and_unload keeps the folded bias and drops the adapter.
    let unloaded = model.merge_and_unload_lora().unwrap();
    assert!(unloaded.lora_adapters().is_empty());
    let output = HostTensor::from(unloaded.query.forward(x));
    assert!(output.max_relative_error(&unmerged, 1.0) <= TOLERANCE);
}

#[test]
fn a_layer_without_bias_computes_but_refuses_a_merge() {
    let device = Device::flex();
    device.seed(2);
    let layer: LoraLinear = LinearConfig::new(8, 6)
        .with_bias(false)
        .init(&device)
        .into();
    let model = Projections {
        query: layer,
        value: LinearConfig::new(8, 6).init(&device),
    };
    let (model, _) = config().apply(model).unwrap();
    let model = fill(model, "lora_bias", 0.25);
    let x = Tensor::<2>::random([3, 8], Distribution::Default, &device);
    let before = model.query.forward(x.clone()).into_data();
    // The bias of B reaches the output: with B = 0, `s·0.25` on every entry.
    let base = x.clone().matmul(model.query.weight.val().detach());
    let scale = model.lora_adapters()[0].scale;
    (model.query.forward(x.clone()) - base)
        .into_data()
        .assert_approx_eq::<f32>(
            &TensorData::new(vec![(scale * 0.25) as f32; 18], [3, 6]),
            burn::tensor::Tolerance::absolute(1e-6),
        );
    let error = model.merge_lora().unwrap_err();
    assert!(
        matches!(&error, LoraError::NoBiasToMerge { path, .. } if path == "query"),
        "{error}"
    );
    // Nothing changed: the model still computes as before, unmerged.
    assert_eq!(model.query.forward(x).into_data(), before);
    assert!(!model.lora_adapters()[0].merged);
}

#[test]
fn dense_layers_and_dora_refuse_it() {
    let device = Device::flex();
    let model = Projections::new(8, 6, &device);
    let error = config()
        .with_targets(Targets::names(["value"]))
        .apply(model)
        .unwrap_err();
    assert!(
        matches!(&error, LoraError::UnsupportedVariant { path, what, .. }
            if path == "value" && what.contains("LoraLinear")),
        "{error}"
    );
    let model = Projections::new(8, 6, &device);
    let error = config().with_use_dora(true).apply(model).unwrap_err();
    assert!(
        matches!(&error, LoraError::UnsupportedVariant { what, .. } if what.contains("DoRA")),
        "{error}"
    );
}

#[test]
fn a_mixed_batch_adds_each_samples_bias() {
    let device = Device::flex();
    device.seed(4);
    let model = adapted(&device);
    let (model, _) = model
        .add_adapter("plain", &config().with_lora_bias(false))
        .unwrap();
    let model = randomize(model, "lora_b", 0.3);
    let model = randomize(model, "lora_bias", 0.5);
    let x = Tensor::<3>::random([3, 2, 12], Distribution::Default, &device);
    let batch = model
        .mixed_batch(&[Some("default"), None, Some("plain")])
        .unwrap();
    let mixed = model.query.forward_mixed(x.clone(), &batch);
    for (index, name) in [(0, Some("default")), (1, None), (2, Some("plain"))] {
        let single = match name {
            Some(name) => model.set_active(&[name]).unwrap(),
            None => model.disable_adapters().unwrap(),
        };
        let row = |t: Tensor<3>| HostTensor::from(t.slice([index..index + 1, 0..2, 0..10]));
        let expected = row(single.query.forward(x.clone()));
        let error = row(mixed.clone()).max_relative_error(&expected, 1.0);
        assert!(error <= TOLERANCE, "sample {index}: {error}");
    }
}

#[test]
fn combinations_and_mismatched_hotswaps_refuse_it() {
    let device = Device::flex();
    let model = adapted(&device);
    let (model, _) = model
        .add_adapter("other", &config().with_alpha(Some(6.0)))
        .unwrap();
    let error = model
        .add_weighted_adapter(
            &[("default", 1.0), ("other", 1.0)],
            "sum",
            burn_lora::Combination::Linear,
        )
        .unwrap_err();
    assert!(
        matches!(&error, LoraError::UnsupportedVariant { what, .. } if what.contains("lora_bias")),
        "{error}"
    );

    // A file without the bias cannot be swapped into an adapter that has one.
    let plain = Projections::new(12, 10, &device);
    let (plain, _) = config().with_lora_bias(false).apply(plain).unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lora_bias_hotswap");
    let _ = std::fs::remove_dir_all(&dir);
    burn_lora::peft::save_adapter(&plain, &dir, "default").unwrap();
    let before = values(&model);
    let options = burn_lora::peft::LoadOptions::new();
    let error = burn_lora::peft::hotswap_adapter(&model, &dir, "default", &options).unwrap_err();
    assert!(
        matches!(&error, LoraError::HotswapMismatch { problems, .. }
            if problems.iter().any(|p| p.contains("lora_bias"))),
        "{error}"
    );
    assert_eq!(values(&model), before);
}

#[test]
fn saved_biases_load_back_bit_for_bit() {
    let device = Device::flex();
    device.seed(8);
    let model = adapted(&device);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lora_bias_save");
    let _ = std::fs::remove_dir_all(&dir);
    let saved = burn_lora::peft::save_adapter(&model, &dir, "default").unwrap();
    assert!(saved.config.lora_bias);
    let fresh = model.unload_lora().unwrap();
    assert!(fresh.lora_adapters().is_empty());
    let (reloaded, report) = burn_lora::peft::load_adapter(&fresh, &dir, "default").expect("loads");
    assert!(report.is_clean(), "{report}");
    let stored = |m: &Projections| {
        let state = m
            .query
            .weight
            .reparameterization::<burn_lora::LoraState>()
            .unwrap();
        let bias = state.adapters[0].lora_bias.as_ref().unwrap().val();
        bias.into_data()
    };
    assert_eq!(stored(&model).as_bytes(), stored(&reloaded).as_bytes());
}

/// A file and its config must agree on the bias, and the bias needs a layer that can add it;
/// a strict load refuses the whole file otherwise, naming each key.
#[test]
fn loading_refuses_biases_the_config_or_the_layer_cannot_hold() {
    use burn_lora::peft::{KeyMap, LoadOptions, load_adapter_with};
    let device = Device::flex();
    device.seed(6);
    let model = adapted(&device);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lora_bias_refusals");
    let _ = std::fs::remove_dir_all(&root);
    burn_lora::peft::save_adapter(&model, root.join("saved"), "default").unwrap();
    let base = model.unload_lora().unwrap();
    let report_of = |dir: &std::path::Path, options: &LoadOptions| match load_adapter_with(
        &base, dir, "default", options,
    )
    .unwrap_err()
    {
        LoraError::AdapterMismatch { report, .. } => report,
        other => panic!("{other}"),
    };

    // The config says there is no bias, the file has one.
    let config_path = root.join("saved/adapter_config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(text.contains("\"lora_bias\": true"));
    let no_bias = root.join("config_without_bias");
    std::fs::create_dir_all(&no_bias).unwrap();
    std::fs::copy(
        root.join("saved/adapter_model.safetensors"),
        no_bias.join("adapter_model.safetensors"),
    )
    .unwrap();
    // Without the digest the pair is read as PEFT's, which names none.
    let edited: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut edited = edited.as_object().unwrap().clone();
    edited.insert("lora_bias".into(), false.into());
    edited.retain(|key, _| !key.contains("digest"));
    std::fs::write(
        no_bias.join("adapter_config.json"),
        serde_json::to_string(&edited).unwrap(),
    )
    .unwrap();
    let report = report_of(&no_bias, &LoadOptions::new());
    assert!(
        report
            .unexpected
            .iter()
            .any(|key| key.contains("lora_B.bias") && key.contains("lora_bias = false")),
        "{report}"
    );

    // The config says there is one, the file has none.
    let plain = Projections::new(12, 10, &device);
    let (plain, _) = config().with_lora_bias(false).apply(plain).unwrap();
    burn_lora::peft::save_adapter(&plain, root.join("plain"), "default").unwrap();
    let config_path = root.join("plain/adapter_config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let mut edited: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).unwrap();
    edited.insert("lora_bias".into(), true.into());
    edited.retain(|key, _| !key.contains("digest"));
    std::fs::write(&config_path, serde_json::to_string(&edited).unwrap()).unwrap();
    let report = report_of(&root.join("plain"), &LoadOptions::new());
    assert!(
        report
            .missing
            .iter()
            .any(|key| key.ends_with("query.lora_B.bias")),
        "{report}"
    );

    // The file's `query` sent to `value`, a plain Linear that computes through its weight.
    let to_value = LoadOptions::new().with_key_map(KeyMap::new().rename("query", "value"));
    let report = report_of(&root.join("saved"), &to_value);
    assert!(
        report
            .unexpected
            .iter()
            .any(|key| key.contains("lora_B.bias") && key.contains("LoraLinear")),
        "{report}"
    );
}
