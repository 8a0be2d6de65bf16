//! PEFT's `modules_to_save`: an adapter trains its own full copy of a module (a classifier
//! head), the original stays for the base and the other adapters, and PEFT files carry the copy
//! under the module's own keys. A property test runs random sequences of add, switch, disable,
//! enable, delete, merge/unmerge and save/load against a shadow of the documented semantics and
//! a naive f64 forward.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::{Distribution, Tolerance};
use burn_lora::peft::{load_adapter, save_adapter};
use burn_lora::{LoraConfig, LoraError, LoraLinear, LoraModule, Targets};
use common::{base_data, devices, param_ids};

/// A body projection (the LoRA target) and a classifier head (saved in full).
#[derive(Module, Debug)]
struct Classifier {
    query: LoraLinear,
    classifier: Linear,
}

impl Classifier {
    fn new(device: &Device) -> Self {
        Self {
            query: LinearConfig::new(8, 8).init(device).into(),
            classifier: LinearConfig::new(8, 3).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.classifier.forward(self.query.forward(x).tanh())
    }
}

fn config() -> LoraConfig {
    LoraConfig::new(2)
        .with_targets(Targets::names(["query"]))
        .with_modules_to_save(vec!["classifier".into()])
}

fn max_difference(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

/// One SGD step on a squared loss, so the adapter's factors and its copy move.
fn train_step(model: Classifier, loss: Tensor<1>) -> Classifier {
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    SgdConfig::new().init().step(0.5, model, grads)
}

#[test]
fn the_copy_trains_and_the_original_stays() {
    for (backend, device) in devices() {
        let device = device.autodiff();
        device.seed(3);
        let base = Classifier::new(&device);
        let x = Tensor::<2>::random([5, 8], Distribution::Normal(0.0, 1.0), &device);
        let before = base.forward(x.clone()).detach();
        let original = base_data(&base);

        let (model, report) = config().apply(base).unwrap();
        assert_eq!(report.saved.len(), 1, "{backend}");
        assert_eq!(report.saved[0].path, "classifier");
        assert_eq!(
            report.saved[0].params,
            vec![
                "classifier.weight".to_string(),
                "classifier.bias".to_string()
            ]
        );
        // LoRA on query (2·(8+8)) and the head's copy (8·3 + 3).
        assert_eq!(report.trainable_params(), 2 * 16 + 27, "{backend}");
        // A copy starts equal to its original: the output is the base's.
        assert_eq!(
            max_difference(model.forward(x.clone()), before.clone()),
            0.0
        );

        let copies = model.saved_copies();
        assert_eq!(copies.len(), 2);
        assert!(
            copies
                .iter()
                .all(|c| c.active && c.trainable && c.name == "default")
        );
        let ids = param_ids(&model);
        let copy_ids: Vec<_> = ids
            .iter()
            .filter(|(path, _)| path.contains(".copies."))
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(copy_ids.len(), 2, "{backend}: {ids:?}");

        let target = Tensor::<2>::ones([5, 3], &device);
        let loss = (model.forward(x.clone()) - target).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        for id in &copy_ids {
            assert!(
                grads.get::<1>(*id).is_some(),
                "{backend}: a copy takes gradients"
            );
        }
        let trained = SgdConfig::new().init().step(0.5, model, grads);
        let after = trained.forward(x.clone()).detach();
        assert!(max_difference(after.clone(), before.clone()) > 1e-3);
        // The original head never trained.
        assert_eq!(base_data(&trained), original, "{backend}");

        // Disabled, or unloaded: the base model, bit for bit.
        let disabled = trained.disable_adapters().unwrap();
        assert_eq!(
            max_difference(disabled.forward(x.clone()), before.clone()),
            0.0
        );
        let unloaded = trained.unload_lora().unwrap();
        assert_eq!(base_data(&unloaded), original);
        assert!(unloaded.saved_copies().is_empty());

        // Merged and unloaded: the copy becomes the head, and the output is the adapted one.
        let merged = trained.merge_and_unload_lora().unwrap();
        assert!(merged.saved_copies().is_empty() && merged.lora_adapters().is_empty());
        let difference = max_difference(merged.forward(x.clone()), after.clone());
        assert!(
            difference < 1e-5,
            "{backend}: merged differs by {difference}"
        );
        // A merge (without unload) leaves the copy in place and the output unchanged.
        let kept = trained.merge_lora().unwrap();
        assert!(max_difference(kept.forward(x.clone()), after) < 1e-5);
        assert_eq!(kept.saved_copies().len(), 2);
    }
}

#[test]
fn each_adapter_has_its_own_copy() {
    let device = Device::flex().autodiff();
    device.seed(5);
    let x = Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device);
    let (model, _) = config().apply(Classifier::new(&device)).unwrap();
    let base_output = model.forward(x.clone()).detach();
    let loss = model.forward(x.clone()).sum();
    let model = train_step(model, loss);
    let (model, report) = model.add_adapter("other", &config()).unwrap();
    assert_eq!(report.saved.len(), 1);
    let names: Vec<String> = model.saved_copies().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["default", "other", "default", "other"]);

    // "other" starts from the original head, not from "default"'s trained copy.
    let other = model.set_active(&["other"]).unwrap();
    assert_eq!(
        max_difference(other.forward(x.clone()), base_output.clone()),
        0.0
    );
    let default = other.set_active(&["default"]).unwrap();
    assert!(max_difference(default.forward(x.clone()), base_output) > 1e-3);
    let infos = default.saved_copies();
    for info in &infos {
        assert_eq!(info.active, info.name == "default");
        assert_eq!(info.trainable, info.name == "default");
    }
    let pruned = default.delete_adapter("other").unwrap();
    assert!(pruned.saved_copies().iter().all(|c| c.name == "default"));
    assert_eq!(pruned.saved_copies().len(), 2);
}

#[test]
fn a_module_cannot_be_targeted_and_saved_and_names_must_match() {
    let device = Device::flex();
    let both = LoraConfig::new(2)
        .with_targets(Targets::names(["query", "classifier"]))
        .with_modules_to_save(vec!["classifier".into()]);
    let error = both.apply(Classifier::new(&device)).unwrap_err();
    assert!(
        matches!(&error, LoraError::SavedAndTargeted { path } if path == "classifier"),
        "{error:?}"
    );
    let missing = config().with_modules_to_save(vec!["score".into()]);
    let error = missing.apply(Classifier::new(&device)).unwrap_err();
    assert!(
        matches!(&error, LoraError::UnmatchedTarget { target, .. } if target.contains("score")),
        "{error:?}"
    );
    // A later adapter may not target what an earlier one saved.
    let (model, _) = config().apply(Classifier::new(&device)).unwrap();
    let targeting = LoraConfig::new(2).with_targets(Targets::names(["classifier"]));
    let error = model.add_adapter("b", &targeting).unwrap_err();
    assert!(
        matches!(error, LoraError::SavedAndTargeted { .. }),
        "{error:?}"
    );
    // A mixed batch cannot route a saved module.
    let error = model.mixed_batch(&[Some("default"), None]).unwrap_err();
    assert!(
        matches!(error, LoraError::UnsupportedVariant { .. }),
        "{error:?}"
    );
}

#[test]
fn peft_files_carry_the_copy_under_the_module_keys() {
    let device = Device::flex().autodiff();
    device.seed(9);
    let x = Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device);
    let base = Classifier::new(&device);
    let (model, _) = config().apply(base.clone()).unwrap();
    let loss = model.forward(x.clone()).powi_scalar(2).mean();
    let model = train_step(model, loss);
    let expected = model.forward(x.clone());

    let dir = std::env::temp_dir().join(format!("burn_lora_saved_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let saved = save_adapter(&model, &dir, "default").unwrap();
    assert_eq!(
        saved.config.modules_to_save,
        Some(vec!["classifier".to_string()])
    );
    // PEFT's layout: the module's own key, PyTorch's [d_out, d_in].
    let bytes = std::fs::read(&saved.weights_path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let weight = file.tensor("base_model.model.classifier.weight").unwrap();
    assert_eq!(weight.shape(), [3, 8]);
    assert_eq!(
        file.tensor("base_model.model.classifier.bias")
            .unwrap()
            .shape(),
        [3]
    );
    let copy = model
        .classifier
        .weight
        .reparameterization::<burn_lora::LoraState>()
        .expect("the head carries its copies")
        .copies[0]
        .value_as::<2>([8, 3].into());
    let stored: Vec<f32> = weight
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let transposed = copy.transpose().into_data().try_into_vec::<f32>().unwrap();
    assert_eq!(stored, transposed);

    let (loaded, report) = load_adapter(&base, &dir, "default").unwrap();
    assert_eq!(report.saved, vec!["classifier.weight", "classifier.bias"]);
    loaded
        .forward(x)
        .into_data()
        .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-6));
    let _ = std::fs::remove_dir_all(&dir);
}

/// One step of a random sequence over a model with a saved classifier.
#[derive(Debug, Clone)]
enum Step {
    Add(&'static str),
    SetActive(&'static str),
    Disable,
    Enable,
    Delete(&'static str),
    MergeUnmerge,
    SaveLoad(&'static str, &'static str),
}

const STEP_NAMES: [&str; 3] = ["a", "b", "c"];

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let name = || proptest::sample::select(STEP_NAMES.to_vec());
    prop_oneof![
        name().prop_map(Step::Add),
        name().prop_map(Step::SetActive),
        Just(Step::Disable),
        Just(Step::Enable),
        name().prop_map(Step::Delete),
        Just(Step::MergeUnmerge),
        (name(), name()).prop_map(|(from, to)| Step::SaveLoad(from, to)),
    ]
}

/// The shadow of the model: the adapters in order, the active one, and whether adapters are
/// enabled, following the documented semantics, never read from the model.
#[derive(Debug, Default)]
struct Shadow {
    adapters: Vec<&'static str>,
    active: Option<&'static str>,
    enabled: bool,
}

/// The output of the model by hand, in f64: `tanh(x·Wq + bq + s·x·A·B)·Wc + bc`, with the
/// active adapter's factors and copy when adapters are enabled (read from the model, chosen by
/// the shadow), and the original head otherwise.
fn reference(
    model: &Classifier,
    shadow: &Shadow,
    original: &[common::HostTensor; 2],
    x: &Tensor<2>,
) -> common::HostTensor {
    use common::HostTensor;
    let host = |t: Tensor<2>| HostTensor::from(t);
    let x = host(x.clone());
    let weight = host(model.query.weight.base().clone());
    let bias = HostTensor::from(model.query.bias.as_ref().unwrap().val());
    let mut hidden = x.matmul(&weight);
    let state = model
        .query
        .weight
        .reparameterization::<burn_lora::LoraState>();
    let active = shadow.active.filter(|_| shadow.enabled);
    if let (Some(name), Some(state)) = (active, state) {
        let adapter = state.adapter(name).expect("the active adapter is on query");
        let delta = x
            .matmul(&host(adapter.lora_a.val()))
            .matmul(&host(adapter.lora_b.val()));
        for (h, d) in hidden.values.iter_mut().zip(&delta.values) {
            *h += adapter.scale * d;
        }
    }
    let columns = hidden.dims[1];
    for (index, h) in hidden.values.iter_mut().enumerate() {
        *h = (*h + bias.values[index % columns]).tanh();
    }
    let copy = |param: &burn::module::Param<Tensor<1>>, fallback: &HostTensor| {
        let state = param.reparameterization::<burn_lora::LoraState>();
        match (active, state) {
            (Some(name), Some(state)) => {
                let copy = state
                    .copies
                    .iter()
                    .find(|c| c.name == name)
                    .expect("a copy");
                HostTensor::from(copy.value.val())
            }
            _ => fallback.clone(),
        }
    };
    let weight_copy = {
        let state = model
            .classifier
            .weight
            .reparameterization::<burn_lora::LoraState>();
        match (active, state) {
            (Some(name), Some(state)) => {
                let copy = state
                    .copies
                    .iter()
                    .find(|c| c.name == name)
                    .expect("a copy");
                HostTensor::from(copy.value_as::<2>([8, 3].into()))
            }
            _ => original[0].clone(),
        }
    };
    let bias_copy = copy(model.classifier.bias.as_ref().unwrap(), &original[1]);
    let mut output = hidden.matmul(&weight_copy);
    for (index, y) in output.values.iter_mut().enumerate() {
        *y += bias_copy.values[index % 3];
    }
    output
}

#[test]
fn random_sequences_keep_copies_and_originals_apart() {
    use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestCaseError, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(0x5A7E),
        ..Config::default()
    });
    let strategy = (
        proptest::prelude::any::<u64>(),
        proptest::collection::vec(step(), 1..=10),
    );
    let dir = std::env::temp_dir().join(format!("burn_lora_saved_props_{}", std::process::id()));
    let result = runner.run(&strategy, |(seed, steps)| {
        let device = Device::flex();
        device.seed(seed);
        let base = Classifier::new(&device);
        let x = Tensor::<2>::random([4, 8], Distribution::Uniform(-1.0, 1.0), &device);
        let original_base = base_data(&base);
        let original = [
            common::HostTensor::from(base.classifier.weight.val()),
            common::HostTensor::from(base.classifier.bias.as_ref().unwrap().val()),
        ];
        let (mut model, _) = config().apply(base.clone()).unwrap();
        let mut shadow = Shadow {
            adapters: vec!["default"],
            active: Some("default"),
            enabled: true,
        };
        let randomized = |model: Classifier| {
            common::randomize(common::randomize(model, "value", 0.5), "lora_b", 0.5)
        };
        model = randomized(model);
        let mut history = Vec::new();
        for step in steps {
            history.push(format!("{step:?}"));
            let outcome: Result<Classifier, LoraError> = match &step {
                Step::Add(name) => model.add_adapter(name, &config()).map(|(m, _)| m),
                Step::SetActive(name) => model.set_active(&[name]),
                Step::Disable => model.disable_adapters(),
                Step::Enable => model.enable_adapters(),
                Step::Delete(name) => model.delete_adapter(name),
                Step::MergeUnmerge => model.merge_lora().and_then(|merged| {
                    let expected = reference(&model, &shadow, &original, &x);
                    let found = common::HostTensor::from(merged.forward(x.clone()));
                    assert!(found.error_vs_max(&expected) < 1e-4, "merged: {history:?}");
                    merged.unmerge_lora()
                }),
                Step::SaveLoad(from, to) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    save_adapter(&model, &dir, from)
                        .and_then(|_| load_adapter(&model, &dir, to).map(|(m, _)| m))
                }
            };
            // The shadow says what must happen.
            let known = |name: &str| shadow.adapters.contains(&name);
            let expected_ok = match &step {
                Step::Add(name) => !known(name),
                Step::SetActive(name) => known(name),
                Step::Disable | Step::Enable => true,
                Step::Delete(name) => known(name) && shadow.active != Some(*name),
                Step::MergeUnmerge => shadow.enabled,
                Step::SaveLoad(from, to) => known(from) && !known(to),
            };
            match (outcome, expected_ok) {
                (Ok(next), true) => {
                    match &step {
                        Step::Add(name) | Step::SaveLoad(_, name) => shadow.adapters.push(name),
                        Step::SetActive(name) => shadow.active = Some(name),
                        Step::Disable => shadow.enabled = false,
                        Step::Enable => shadow.enabled = true,
                        Step::Delete(name) => shadow.adapters.retain(|a| a != name),
                        Step::MergeUnmerge => {}
                    }
                    model = match step {
                        Step::Add(_) => randomized(next),
                        _ => next,
                    };
                }
                (Err(_), false) => {}
                (outcome, _) => {
                    return Err(TestCaseError::fail(format!(
                        "{history:?}: expected ok = {expected_ok}, got {:?}",
                        outcome.map(|_| ())
                    )));
                }
            }
            let expected = reference(&model, &shadow, &original, &x);
            let found = common::HostTensor::from(model.forward(x.clone()));
            let error = found.error_vs_max(&expected);
            if error >= 1e-4 {
                return Err(TestCaseError::fail(format!(
                    "{history:?}: output off by {error}"
                )));
            }
            let names: Vec<String> = shadow.adapters.iter().map(|n| n.to_string()).collect();
            if model.adapter_names() != names {
                return Err(TestCaseError::fail(format!(
                    "{history:?}: adapters {:?}, expected {names:?}",
                    model.adapter_names()
                )));
            }
            // The original head never changes, and unloading gives the base back bit for bit.
            if base_data(&model.unload_lora().unwrap()) != original_base {
                return Err(TestCaseError::fail(format!(
                    "{history:?}: the base changed"
                )));
            }
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(error) = result {
        panic!("{error}");
    }
}
