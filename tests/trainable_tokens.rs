//! Trainable tokens (PEFT's `trainable_token_indices`): an adapter's own copy of chosen rows of
//! an embedding, which replaces them while it is active, trains alone, and becomes the
//! embedding's own in `merge_and_unload`. Checked against naive formulas; PEFT's outputs and
//! file are in `tests/peft_variants.rs` (case `trainable_tokens`).

mod common;

use burn::nn::{Embedding, EmbeddingConfig, LinearConfig};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use burn_lora::{
    LoraConfig, LoraError, LoraLinear, LoraModule, LoraState, Targets, TrainableTokens,
};
use common::{base_data, randomize};

#[derive(Module, Debug)]
struct Tiny {
    embed: Embedding,
    proj: LoraLinear,
}

impl Tiny {
    fn new(device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(12, 6).init(device),
            proj: LinearConfig::new(6, 4).init(device).into(),
        }
    }
}

fn tokens(indices: &[usize]) -> TrainableTokens {
    TrainableTokens::new("embed".into(), indices.to_vec())
}

fn config(indices: &[usize]) -> LoraConfig {
    LoraConfig::new(2)
        .with_targets(Targets::names(["proj"]))
        .with_trainable_token_indices(vec![tokens(indices)])
}

fn ids(device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(vec![0i64, 3, 5, 3, 11, 5, 7, 3], [2, 4]),
        device,
    )
}

/// The embedding's stored rows and the copy's rows, on the host.
fn rows(tensor: Tensor<2>) -> Vec<Vec<f32>> {
    let [height, width] = tensor.dims();
    let values = tensor
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    (0..height)
        .map(|row| values[row * width..(row + 1) * width].to_vec())
        .collect()
}

fn copy_rows(model: &Tiny, name: &str) -> Vec<Vec<f32>> {
    let state = model
        .embed
        .weight
        .reparameterization::<LoraState>()
        .unwrap();
    let copy = state.copies.iter().find(|copy| copy.name == name).unwrap();
    let count = copy.rows.as_ref().unwrap().len();
    rows(copy.value.val().reshape([count, 6]))
}

#[test]
fn the_rows_start_as_the_originals_and_replace_them_while_active() {
    let device = Device::flex();
    device.seed(1);
    let model = Tiny::new(&device);
    let before = model.embed.forward(ids(&device)).into_data();
    let (model, report) = config(&[3, 5]).apply(model).unwrap();
    assert_eq!(report.saved[0].rows, Some(vec![3, 5]));
    assert_eq!(report.saved[0].numel, 2 * 6);
    assert!(report.to_string().contains("trainable tokens of embed"));
    assert_eq!(model.embed.forward(ids(&device)).into_data(), before);

    let model = randomize(model, "value", 0.5);
    let weight = rows(base_data(&model)["embed.weight"].clone().into());
    let copy = copy_rows(&model, "default");
    let output = rows(model.embed.forward(ids(&device)).reshape([8, 6]));
    for (position, id) in [0usize, 3, 5, 3, 11, 5, 7, 3].into_iter().enumerate() {
        let expected = match id {
            3 => &copy[0],
            5 => &copy[1],
            _ => &weight[id],
        };
        assert_eq!(
            &output[position], expected,
            "position {position}, token {id}"
        );
    }
    // Disabled, the base rows come back.
    let disabled = model.disable_adapters().unwrap();
    assert_eq!(disabled.embed.forward(ids(&device)).into_data(), before);
}

#[test]
fn only_the_copied_rows_train() {
    let device = Device::flex().autodiff();
    device.seed(2);
    let (model, _) = config(&[3, 7]).apply(Tiny::new(&device)).unwrap();
    let probe = Tensor::<3>::random([2, 4, 6], Distribution::Default, &device);
    let loss = (model.embed.forward(ids(&device)) * probe.clone()).sum();
    let grads = loss.backward();
    assert!(
        model.embed.weight.grad(&grads).is_none(),
        "the embedding is frozen"
    );
    let state = model
        .embed
        .weight
        .reparameterization::<LoraState>()
        .unwrap();
    let grad = state.copies[0].value.grad(&grads).expect("the rows train");
    let grad = rows(grad.reshape([2, 6]));
    // d(sum(e·p))/d row = Σ p over the positions reading that token.
    let probe = rows(probe.inner().reshape([8, 6]));
    for (slot, id) in [3usize, 7].into_iter().enumerate() {
        let mut expected = vec![0.0f32; 6];
        for (position, token) in [0usize, 3, 5, 3, 11, 5, 7, 3].into_iter().enumerate() {
            if token == id {
                for (value, p) in expected.iter_mut().zip(&probe[position]) {
                    *value += p;
                }
            }
        }
        for (got, want) in grad[slot].iter().zip(&expected) {
            assert!((got - want).abs() <= 1e-6, "token {id}: {got} vs {want}");
        }
    }
}

#[test]
fn adapters_switch_rows_and_merge_and_unload_keeps_the_active_ones() {
    let device = Device::flex();
    device.seed(3);
    let base = Tiny::new(&device);
    let stored = base_data(&base);
    let (model, _) = config(&[3]).apply(base).unwrap();
    let (model, _) = model.add_adapter("other", &config(&[5])).unwrap();
    let model = randomize(model, "value", 0.5);
    let output = |m: &Tiny| rows(m.embed.forward(ids(&device)).reshape([8, 6]));
    let weight = rows(stored["embed.weight"].clone().into());
    let default = output(&model);
    assert_eq!(default[1], copy_rows(&model, "default")[0]);
    assert_eq!(default[2], weight[5]);
    let other = model.set_active(&["other"]).unwrap();
    let switched = output(&other);
    assert_eq!(switched[1], weight[3]);
    assert_eq!(switched[2], copy_rows(&model, "other")[0]);

    let merged = other.merge_and_unload_lora().unwrap();
    assert!(merged.saved_copies().is_empty());
    let merged_rows = rows(merged.embed.weight.val());
    for (row, values) in merged_rows.iter().enumerate() {
        match row {
            5 => assert_eq!(values, &copy_rows(&model, "other")[0]),
            _ => assert_eq!(values, &weight[row], "row {row}"),
        }
    }
    // unload_lora gives the base back bit for bit.
    let unloaded = model.unload_lora().unwrap();
    assert_eq!(base_data(&unloaded), stored);
}

#[test]
fn token_ids_are_checked() {
    let device = Device::flex();
    let model = Tiny::new(&device);
    for (indices, word) in [
        (vec![], "no token ids"),
        (vec![2, 12], "past the vocabulary"),
        (vec![4, 4], "twice"),
    ] {
        let error = config(&indices).apply(model.clone()).unwrap_err();
        assert!(
            matches!(&error, LoraError::InvalidTokenIndices { path, message }
                if path == "embed" && message.contains(word)),
            "{indices:?}: {error}"
        );
    }
    let not_embedding = LoraConfig::new(2)
        .with_targets(Targets::names(["proj"]))
        .with_trainable_token_indices(vec![TrainableTokens::new("proj".into(), vec![0])]);
    let error = not_embedding.apply(model.clone()).unwrap_err();
    assert!(
        matches!(&error, LoraError::InvalidTokenIndices { path, .. } if path == "proj"),
        "{error}"
    );
    let targeted = config(&[1]).with_targets(Targets::names(["embed", "proj"]));
    let error = targeted.apply(model.clone()).unwrap_err();
    assert!(
        matches!(&error, LoraError::SavedAndTargeted { path } if path == "embed"),
        "{error}"
    );
    let (adapted, _) = config(&[1]).apply(model).unwrap();
    let error = adapted.mixed_batch(&[Some("default")]).unwrap_err();
    assert!(
        matches!(error, LoraError::UnsupportedVariant { .. }),
        "{error}"
    );
}

#[test]
fn saved_tokens_load_back_bit_for_bit() {
    let device = Device::flex();
    device.seed(4);
    let (model, _) = config(&[2, 9]).apply(Tiny::new(&device)).unwrap();
    let model = randomize(model, "value", 0.5);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("trainable_tokens_save");
    let _ = std::fs::remove_dir_all(&dir);
    let saved = burn_lora::peft::save_adapter(&model, &dir, "default").unwrap();
    assert_eq!(
        saved.config.trainable_token_indices,
        vec![("embed".to_string(), vec![2, 9])]
    );
    let base = model.unload_lora().unwrap();
    let (reloaded, report) = burn_lora::peft::load_adapter(&base, &dir, "default").unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        copy_rows(&reloaded, "default"),
        copy_rows(&model, "default")
    );
    assert_eq!(
        reloaded.embed.forward(ids(&device)).into_data(),
        model.embed.forward(ids(&device)).into_data()
    );
}

mod properties {
    //! Random sequences of adding adapters with their own token rows, switching, disabling,
    //! deleting, merging and unmerging, `merge_and_unload`, and a PEFT save and load. After every
    //! step the embedding's output equals, token by token, the active adapter's copied row (as
    //! the model holds it now) or the original row; the stored embedding stays the original bit
    //! for bit; and a failed operation returns the documented error.

    use super::*;
    use burn_lora::peft::{load_adapter, save_adapter};
    use proptest::prelude::*;
    use proptest::test_runner::{Config as RunnerConfig, RngSeed, TestRunner};

    const NAMES: [&str; 3] = ["a", "b", "c"];
    const IDS: [usize; 8] = [0, 3, 5, 3, 11, 5, 7, 3];

    #[derive(Debug, Clone)]
    enum Step {
        Add(&'static str, Vec<usize>),
        SetActive(&'static str),
        Disable,
        Enable,
        Delete(&'static str),
        MergeUnmerge,
        MergeAndUnload,
        SaveLoad(&'static str, &'static str),
    }

    fn name() -> impl Strategy<Value = &'static str> {
        proptest::sample::select(NAMES.to_vec())
    }

    fn step() -> impl Strategy<Value = Step> {
        let rows =
            proptest::sample::subsequence((0..12).collect::<Vec<usize>>(), 1..=4).prop_shuffle();
        prop_oneof![
            3 => (name(), rows).prop_map(|(name, rows)| Step::Add(name, rows)),
            3 => name().prop_map(Step::SetActive),
            1 => Just(Step::Disable),
            1 => Just(Step::Enable),
            1 => name().prop_map(Step::Delete),
            1 => Just(Step::MergeUnmerge),
            1 => Just(Step::MergeAndUnload),
            2 => (name(), name()).prop_map(|(from, to)| Step::SaveLoad(from, to)),
        ]
    }

    /// What the embedding must read, position by position.
    fn expected(
        model: &Tiny,
        active: Option<&str>,
        enabled: bool,
        base: &[Vec<f32>],
    ) -> Vec<Vec<f32>> {
        let copy = active.filter(|_| enabled).map(|name| {
            let state = model
                .embed
                .weight
                .reparameterization::<LoraState>()
                .unwrap();
            let copy = state.copies.iter().find(|c| c.name == name).unwrap();
            (copy.rows.clone().unwrap(), copy_rows(model, name))
        });
        IDS.iter()
            .map(|&id| match &copy {
                Some((rows, values)) => match rows.iter().position(|&row| row == id) {
                    Some(slot) => values[slot].clone(),
                    None => base[id].clone(),
                },
                None => base[id].clone(),
            })
            .collect()
    }

    fn embedded(model: &Tiny, device: &Device) -> Vec<Vec<f32>> {
        rows(model.embed.forward(ids(device)).reshape([8, 6]))
    }

    #[test]
    fn random_sequences_read_the_right_rows() {
        let mut runner = TestRunner::new(RunnerConfig {
            cases: 48,
            failure_persistence: None,
            rng_seed: RngSeed::Fixed(0x746f_6b65_6e73),
            ..RunnerConfig::default()
        });
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("trainable_tokens_props");
        let strategy = (any::<u64>(), proptest::collection::vec(step(), 1..=12));
        runner
            .run(&strategy, |(seed, steps)| {
                let device = Device::flex();
                device.seed(seed);
                let base = Tiny::new(&device);
                let stored = base_data(&base);
                let base_rows = rows(stored["embed.weight"].clone().into());
                let (mut model, _) = config(&[3]).apply(base).unwrap();
                model = randomize(model, "value", 0.5);
                let (mut names, mut active, mut enabled) = (vec!["default"], Some("default"), true);
                for (index, step) in steps.iter().enumerate() {
                    let label = format!("step {index} {step:?}");
                    let known = |name: &str| names.contains(&name);
                    let outcome: Result<Tiny, LoraError> = match step {
                        Step::Add(name, rows) => {
                            model.add_adapter(name, &config(rows)).map(|(m, _)| m)
                        }
                        Step::SetActive(name) => model.set_active(&[name]),
                        Step::Disable => model.disable_adapters(),
                        Step::Enable => model.enable_adapters(),
                        Step::Delete(name) => model.delete_adapter(name),
                        Step::MergeUnmerge => match model.merge_lora() {
                            Ok(merged) => {
                                let want = expected(&model, active, enabled, &base_rows);
                                prop_assert_eq!(embedded(&merged, &device), want, "{}", label);
                                merged.unmerge_lora()
                            }
                            Err(error) => Err(error),
                        },
                        Step::MergeAndUnload => {
                            // Read only: the unloaded model reads the active rows as its own.
                            if let Ok(unloaded) = model.merge_and_unload_lora() {
                                let want = expected(&model, active, enabled, &base_rows);
                                prop_assert_eq!(embedded(&unloaded, &device), want, "{}", label);
                                prop_assert!(unloaded.saved_copies().is_empty());
                            }
                            Ok(model.clone())
                        }
                        Step::SaveLoad(from, to) => {
                            let _ = std::fs::remove_dir_all(&dir);
                            save_adapter(&model, &dir, from)
                                .and_then(|_| load_adapter(&model, &dir, to).map(|(m, _)| m))
                        }
                    };
                    let ok = match step {
                        Step::Add(name, _) => !known(name),
                        Step::SetActive(name) => known(name),
                        Step::Disable | Step::Enable | Step::MergeAndUnload => true,
                        Step::Delete(name) => known(name) && active != Some(*name),
                        Step::MergeUnmerge => enabled,
                        Step::SaveLoad(from, to) => known(from) && !known(to),
                    };
                    prop_assert_eq!(
                        outcome.is_ok(),
                        ok,
                        "{}: {:?}",
                        label,
                        outcome.as_ref().err()
                    );
                    if let Ok(next) = outcome {
                        model = next;
                        match step {
                            Step::Add(name, _) | Step::SaveLoad(_, name) => {
                                names.push(name);
                                model = randomize(model, "value", 0.5);
                            }
                            Step::SetActive(name) => active = Some(*name),
                            Step::Disable => enabled = false,
                            Step::Enable => enabled = true,
                            Step::Delete(name) => names.retain(|n| n != name),
                            _ => {}
                        }
                    }
                    let want = expected(&model, active, enabled, &base_rows);
                    prop_assert_eq!(embedded(&model, &device), want, "{}", label);
                    prop_assert_eq!(&base_data(&model)["embed.weight"], &stored["embed.weight"]);
                }
                Ok(())
            })
            .unwrap();
    }
}

/// A quantized embedding: the copied rows (in f32) replace its rows, the others read as
/// dequantized.
#[test]
fn a_quantized_embedding_takes_its_rows_in_float() {
    for (_, device) in common::devices() {
        quantized_embedding(&device);
    }
}

fn quantized_embedding(device: &Device) {
    let device = device.clone();
    device.seed(6);
    let mut base = Tiny::new(&device);
    let scheme = device.settings().quantization.scheme;
    base.embed.weight = base.embed.weight.map(|w| w.quantize_dynamic(&scheme));
    let dequantized = rows(base.embed.weight.val().dequantize());
    let (model, _) = config(&[3]).apply(base).unwrap();
    let model = randomize(model, "value", 0.5);
    let output = rows(model.embed.forward(ids(&device)).reshape([8, 6]));
    let copy = copy_rows(&model, "default");
    for (position, id) in [0usize, 3, 5, 3, 11, 5, 7, 3].into_iter().enumerate() {
        let expected = match id {
            3 => &copy[0],
            _ => &dequantized[id],
        };
        assert_eq!(
            &output[position], expected,
            "position {position}, token {id}"
        );
    }
}

/// A file with LoRA factors and trainable tokens for the same embedding (PEFT never writes one)
/// is refused by a strict load, and a lenient one keeps the factors and leaves the copy out.
#[test]
fn factors_and_tokens_on_one_embedding_do_not_load_together() {
    use burn_lora::peft::{LoadOptions, load_adapter_with, save_adapter};
    use std::collections::BTreeMap;
    let device = Device::flex();
    device.seed(5);
    let base = Tiny::new(&device);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("trainable_tokens_both");
    let _ = std::fs::remove_dir_all(&root);
    let lora = LoraConfig::new(2).with_targets(Targets::names(["embed", "proj"]));
    let (with_factors, _) = lora.apply(base.clone()).unwrap();
    let with_factors = randomize(with_factors, "lora_b", 0.5);
    save_adapter(&with_factors, root.join("factors"), "default").unwrap();
    let (with_tokens, _) = config(&[3]).apply(base.clone()).unwrap();
    save_adapter(&with_tokens, root.join("tokens"), "default").unwrap();

    // The factors' file, plus the tokens' tensor and config entry.
    let read = |dir: &str| {
        let bytes = std::fs::read(root.join(dir).join("adapter_model.safetensors")).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out = BTreeMap::new();
        for (key, view) in tensors.tensors() {
            out.insert(key, (view.shape().to_vec(), view.data().to_vec()));
        }
        out
    };
    let mut tensors = read("factors");
    tensors.extend(
        read("tokens")
            .into_iter()
            .filter(|(key, _)| key.contains("trainable_tokens_delta")),
    );
    let both = root.join("both");
    std::fs::create_dir_all(&both).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(key, (shape, data))| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (key.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &both.join("adapter_model.safetensors")).unwrap();
    let text = std::fs::read_to_string(root.join("factors/adapter_config.json")).unwrap();
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).unwrap();
    config.retain(|key, _| !key.contains("digest"));
    config.insert(
        "trainable_token_indices".into(),
        serde_json::json!({"embed": [3]}),
    );
    std::fs::write(
        both.join("adapter_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();

    let error = load_adapter_with(&base, &both, "default", &LoadOptions::new()).unwrap_err();
    assert!(
        matches!(&error, LoraError::AdapterMismatch { report, .. }
            if report.unexpected.iter().any(|u| u.contains("embed.weight"))),
        "{error}"
    );
    let lenient = LoadOptions::new().with_strict(false);
    let (loaded, report) = load_adapter_with(&base, &both, "default", &lenient).unwrap();
    assert!(!report.is_clean());
    assert!(loaded.saved_copies().is_empty());
    assert_eq!(loaded.lora_adapters().len(), 2);
    assert_eq!(
        loaded.embed.forward(ids(&device)).into_data(),
        with_factors.embed.forward(ids(&device)).into_data()
    );
}
