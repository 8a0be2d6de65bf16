//! burn-train's `Learner` on an adapted model: adapter-only checkpoints, an exact resume, the
//! adapters' flags across a checkpoint, and two devices through burn-train's multi-device
//! strategy (flex and ndarray: Burn's own engine, two real devices on one CPU).

#[path = "../examples/learner/task.rs"]
mod task;

use std::path::Path;
use std::sync::Arc;

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::train::checkpoint::{Checkpointer, FileCheckpointer};
use burn::train::metric::LossMetric;
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining, TrainStep};
use burn_lora::train::{AdapterCheckpointer, adapter_flags, adapter_param_ids};
use burn_lora::{LoraModule, peft};
use task::{Batch, Classifier, Sample, SampleBatcher};

const SEED: u64 = 3;

/// Burn's random generator is global per backend: tests that seed it and draw from it run one
/// at a time, so that each sees only its own draws.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
const TRAIN: usize = 256;
const VALID: usize = 64;
const BATCH: usize = 16;

fn loaders(
    train: &[Sample],
    valid: &[Sample],
    batch: usize,
) -> (Arc<dyn DataLoader<Batch>>, Arc<dyn DataLoader<Batch>>) {
    (
        DataLoaderBuilder::new(SampleBatcher)
            .batch_size(batch)
            .build(InMemDataset::new(train.to_vec())),
        DataLoaderBuilder::new(SampleBatcher)
            .batch_size(64)
            .build(InMemDataset::new(valid.to_vec())),
    )
}

/// Every float parameter's values, by path order.
fn values<M: Module>(model: &M) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.push(data.try_into_vec::<f32>().unwrap());
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

fn bits(values: &[Vec<f32>]) -> Vec<Vec<u32>> {
    values
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// A Learner run of `epochs` on the test task, with adapter checkpoints in `dir`, resumed from
/// `resume` when given. The model is built from the seed each time, as a new process would.
fn learner_run(dir: &Path, epochs: usize, resume: Option<usize>) -> Classifier {
    let device = Device::flex().autodiff();
    let (base, train, valid) = task::base_and_data(&device, SEED, TRAIN, VALID);
    let model = task::adapted(base);
    let (train, valid) = loaders(&train, &valid, BATCH);
    let checkpoints = dir.join("checkpoint");
    let scheduler = burn_lora::LoraPlusConfig::new()
        .with_lr_ratio(4.0)
        .scheduler(&model, 5e-3)
        .unwrap();
    let mut training = SupervisedTraining::new(dir, train, valid)
        .metrics((LossMetric::new(),))
        .with_custom_checkpointers(
            AdapterCheckpointer::new(&checkpoints, &model).unwrap(),
            FileCheckpointer::new(&checkpoints, "optim"),
            FileCheckpointer::new(&checkpoints, "scheduler"),
        )
        .with_application_logger(None)
        .num_epochs(epochs);
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    let result = training.launch(Learner::new(model, AdamConfig::new().init(), scheduler));
    assert!(result.error.is_none(), "{:?}", result.error);
    result.model
}

fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-lora-learner-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_resumed_run_equals_the_uninterrupted_one_bit_for_bit() {
    let _serial = serial();
    let straight = fresh_dir("straight");
    let interrupted = fresh_dir("interrupted");
    let uninterrupted = learner_run(&straight, 3, None);
    let first = learner_run(&interrupted, 1, None);
    let resumed = learner_run(&interrupted, 3, Some(1));

    // Training moved the adapters, and the resumed run lands on the same bits.
    let differing = |a: &[Vec<f32>], b: &[Vec<f32>]| -> usize {
        bits(a)
            .iter()
            .zip(bits(b))
            .map(|(a, b)| a.iter().zip(&b).filter(|(x, y)| x != y).count())
            .sum()
    };
    let reference = values(&uninterrupted);
    assert!(differing(&values(&first), &reference) > 0);
    let off = differing(&values(&resumed), &reference);
    assert_eq!(
        off, 0,
        "{off} values of the resumed run differ from the uninterrupted run's"
    );

    // The checkpoints hold adapters, not the model: PEFT files, the resume record and flags,
    // and burn-train's optimizer and scheduler records; no model record.
    let epoch = interrupted.join("checkpoint/adapter-1");
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "resume.bpk",
        "flags.json",
    ] {
        assert!(epoch.join(file).is_file(), "{file} is missing");
    }
    let names: Vec<String> = std::fs::read_dir(interrupted.join("checkpoint"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|name| !name.starts_with("model-")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|name| name.starts_with("optim-")),
        "{names:?}"
    );
    let adapter_bytes: u64 = std::fs::read_dir(&epoch)
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum();
    let full = interrupted.join("full.bpk");
    first.clone().into_record().save(&full).unwrap();
    let full_bytes = std::fs::metadata(&full).unwrap().len();
    assert!(
        adapter_bytes * 2 < full_bytes,
        "{adapter_bytes} vs {full_bytes}"
    );

    // The PEFT files of epoch 1 give a fresh base the outputs of the model after epoch 1.
    let device = Device::flex();
    let (base, _, valid) = task::base_and_data(&device, SEED, TRAIN, VALID);
    let (loaded, report) = peft::load_adapter(&base, &epoch, "default").unwrap();
    assert!(report.is_clean(), "{report}");
    let batch = SampleBatcher.batch_of(&valid[..16], &device);
    let expected = first.valid().logits(batch.x.clone()).into_data();
    let actual = loaded.logits(batch.x).into_data();
    expected.assert_approx_eq::<f32>(&actual, burn::tensor::Tolerance::absolute(1e-5));

    let _ = std::fs::remove_dir_all(&straight);
    let _ = std::fs::remove_dir_all(&interrupted);
}

#[test]
fn a_checkpoint_keeps_the_flags_and_refuses_a_model_whose_flags_differ() {
    let _serial = serial();
    let device = Device::flex().autodiff();
    let (base, _, _) = task::base_and_data(&device, SEED, 8, 8);
    let model = task::adapted(base)
        .add_adapter("other", &task::lora_config())
        .unwrap()
        .0
        .set_active(&["default"])
        .unwrap()
        .set_trainable(&["default"])
        .unwrap();
    let dir = fresh_dir("flags");
    let checkpointer = AdapterCheckpointer::new(&dir, &model).unwrap();
    checkpointer.save(1, model.clone().into_record()).unwrap();
    let saved: Vec<burn_lora::train::AdapterFlags> =
        serde_json::from_slice(&std::fs::read(dir.join("adapter-1/flags.json")).unwrap()).unwrap();
    assert_eq!(saved, adapter_flags(&model));
    assert!(
        saved
            .iter()
            .any(|f| f.name == "other" && !f.active && !f.trainable)
    );
    assert!(
        saved
            .iter()
            .any(|f| f.name == "default" && f.active && f.trainable)
    );

    // The same model restores: only the adapters' parameters, with their ids.
    let record = checkpointer.restore(1).unwrap();
    let restored = model.clone().load_record(record);
    assert_eq!(bits(&values(&restored)), bits(&values(&model)));

    // A model whose flags differ is refused, naming the adapter: another active adapter, a
    // merged one, disabled adapters.
    let variants = [
        ("active", model.set_active(&["other"]).unwrap()),
        ("merged", model.merge_lora().unwrap()),
        ("enabled", model.disable_adapters().unwrap()),
    ];
    for (flag, variant) in variants {
        let other = AdapterCheckpointer::new(&dir, &variant).unwrap();
        let error = other.restore(1).unwrap_err().to_string();
        assert!(
            error.contains("flags") || error.contains(flag),
            "{flag}: {error}"
        );
        assert!(error.contains(&format!("{flag}=")), "{flag}: {error}");
    }
    // A model without the adapter is refused too.
    let (base, _, _) = task::base_and_data(&device, SEED, 8, 8);
    let single = AdapterCheckpointer::new(&dir, &task::adapted(base)).unwrap();
    let error = single.restore(1).unwrap_err().to_string();
    assert!(
        error.contains("`other`") && error.contains("not in the model"),
        "{error}"
    );

    // Deleting an epoch removes its directory, and deleting it again is not an error.
    checkpointer.delete(1).unwrap();
    assert!(!dir.join("adapter-1").exists());
    checkpointer.delete(1).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_adapter_gradients_leave_a_device() {
    let _serial = serial();
    // What burn-train's multi-device strategies move and reduce are the parameters' gradients
    // (`GradientsParams`); the frozen base has none.
    let device = Device::flex().autodiff();
    let (base, train, _) = task::base_and_data(&device, SEED, 32, 8);
    let model = task::adapted(base);
    let batch = SampleBatcher.batch_of(&train, &device);
    let output = TrainStep::step(&model, batch);
    let grads: GradientsParams = output.grads;
    let ids = adapter_param_ids(&model);
    struct Sizes<'a> {
        grads: &'a GradientsParams,
        adapters: &'a [ParamId],
        synced: usize,
        adapter_bytes: usize,
        model_bytes: usize,
    }
    impl ModuleVisitor for Sizes<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let bytes = param.val().shape().num_elements() * 4;
            self.model_bytes += bytes;
            if self.adapters.contains(&param.id) {
                self.adapter_bytes += bytes;
            }
            if let Some(grad) = self.grads.get::<D>(param.id) {
                self.synced += grad.shape().num_elements() * 4;
            }
        }
    }
    let mut sizes = Sizes {
        grads: &grads,
        adapters: &ids,
        synced: 0,
        adapter_bytes: 0,
        model_bytes: 0,
    };
    model.visit(&mut sizes);
    assert_eq!(grads.len(), ids.len());
    assert_eq!(sizes.synced, sizes.adapter_bytes);
    assert!(
        sizes.synced * 5 < sizes.model_bytes,
        "{} of {}",
        sizes.synced,
        sizes.model_bytes
    );
}

#[test]
#[allow(deprecated)]
fn two_devices_reach_the_single_device_loss_on_the_same_global_batch() {
    let _serial = serial();
    // burn-train's multi-device strategy gives each device its contiguous half of the data,
    // one batch each per step, and adds their gradients. With the loss summed over the batch,
    // a step over flex and ndarray equals one single-device step over both batches joined.
    let devices = [Device::flex(), Device::ndarray()];
    let (base, train, valid) = task::base_and_data(&devices[0].clone().autodiff(), SEED, 128, 32);
    let mut base = base;
    base.sum_loss = true;
    let half = train.len() / 2;
    // The joint batches in the order the two devices see them.
    let mut joint = Vec::new();
    for step in 0..half / 8 {
        joint.extend_from_slice(&train[step * 8..step * 8 + 8]);
        joint.extend_from_slice(&train[half + step * 8..half + step * 8 + 8]);
    }
    let start = task::adapted(base);
    let run = |strategy: Option<ExecutionStrategy>, data: &[Sample], batch: usize, dir: &str| {
        let (train, valid) = loaders(data, &valid, batch);
        let dir = fresh_dir(dir);
        let mut training = SupervisedTraining::new(&dir, train, valid)
            .metrics((LossMetric::new(),))
            .with_application_logger(None)
            .num_epochs(2);
        if let Some(strategy) = strategy {
            training = training.with_training_strategy(strategy.into());
        }
        let result = training.launch(Learner::new(start.clone(), AdamConfig::new().init(), 5e-3));
        assert!(result.error.is_none(), "{:?}", result.error);
        let _ = std::fs::remove_dir_all(&dir);
        result.model
    };
    let single = run(None, &joint, 16, "single");
    let multi = run(
        Some(ExecutionStrategy::multi(
            devices.to_vec(),
            MultiDeviceOptim::OptimMainDevice,
        )),
        &train,
        8,
        "multi",
    );
    // Training moved the adapters away from the start, by far more than the tolerance.
    let largest = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .zip(b)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max)
    };
    let moved = largest(&values(&single), &values(&start));
    let apart = largest(&values(&single), &values(&multi));
    assert!(moved > 1e-2, "moved {moved}");
    assert!(
        apart < 1e-4,
        "single and multi-device adapters differ by {apart} (moved {moved})"
    );

    // And the same validation loss.
    let device = Device::flex();
    let batch = SampleBatcher.batch_of(&valid, &device);
    let loss = |model: &Classifier| {
        model
            .valid()
            .classify(batch.clone())
            .loss
            .into_scalar::<f32>()
    };
    let (single_loss, multi_loss) = (loss(&single), loss(&multi));
    assert!(
        (single_loss - multi_loss).abs() <= 1e-4 * single_loss.abs().max(1.0),
        "{single_loss} vs {multi_loss}"
    );
}
