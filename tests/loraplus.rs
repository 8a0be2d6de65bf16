//! LoRA+: `B` takes `ratio` times the learning rate of `A`, embedding adapters their own rate,
//! measured as the step an optimizer actually takes.

mod common;

use burn::module::{Module, ParamId};
use burn::nn::{Embedding, EmbeddingConfig, LinearConfig};
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use burn_lora::{LoraConfig, LoraError, LoraLinear, LoraPlusConfig, Targets};
use common::{devices, param_ids};

#[derive(Module, Debug)]
struct Model {
    embed: Embedding,
    query: LoraLinear,
}

impl Model {
    fn new(device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(10, 8).init(device),
            query: LinearConfig::new(8, 6).init(device).into(),
        }
    }

    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.query.forward(self.embed.forward(ids))
    }
}

fn adapted(device: &Device) -> Model {
    let config = LoraConfig::new(2).with_targets(Targets::names(["embed", "query"]));
    let (model, _) = config.apply(Model::new(device)).unwrap();
    // Both factors non-zero, so that every factor gets a gradient.
    let model = common::randomize(model, "lora_a", 0.5);
    common::randomize(model, "lora_b", 0.5)
}

/// For every entry with a gradient: `(w_before - w_after) / gradient`, the rate SGD applied, and
/// how far f32 rounding of `w` alone can move that quotient (a few ulps of `w` over the gradient).
fn applied_rates<const D: usize>(
    before: Tensor<D>,
    after: Tensor<D>,
    grad: Tensor<D>,
) -> Vec<(f64, f64)> {
    let to_vec = |t: Tensor<D>| {
        t.into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .unwrap()
    };
    let (before, after, grad) = (to_vec(before), to_vec(after), to_vec(grad));
    before
        .iter()
        .zip(&after)
        .zip(&grad)
        .filter(|(_, g)| g.abs() > 1e-4)
        .map(|((b, a), g)| {
            let rounding = 4.0 * f64::from(f32::EPSILON) * b.abs().max(a.abs()) / g.abs();
            ((b - a) / g, rounding)
        })
        .collect()
}

#[test]
fn sgd_steps_b_ratio_times_as_far_as_a() {
    for (name, device) in devices() {
        let device = device.autodiff();
        device.seed(5);
        let model = adapted(&device);
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 4, 9, 0], [1, 4]), &device);
        let target = Tensor::<3>::random([1, 4, 6], Distribution::Default, &device);
        let ratio = 4.0;
        let config = LoraPlusConfig::new()
            .with_lr_ratio(ratio)
            .with_lr_embedding(1e-3);
        let mut scheduler = config.scheduler(&model, 0.1).unwrap();

        let loss = (model.forward(ids) - target).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let ids = param_ids(&model);
        let id = |path: &str| -> ParamId { ids[path] };
        let factors = [
            ("query.weight.burn_lora.adapters.0.lora_a", 0.1),
            ("query.weight.burn_lora.adapters.0.lora_b", 0.1 * ratio),
            ("embed.weight.burn_lora.adapters.0.lora_a", 1e-3),
            ("embed.weight.burn_lora.adapters.0.lora_b", 1e-3),
        ];
        let read = |model: &Model, path: &str| -> Tensor<2> {
            let params = common::values(model);
            let host = &params[path];
            Tensor::from_data(
                TensorData::new(host.values.clone(), host.dims.clone()),
                &device,
            )
        };
        let before: Vec<Tensor<2>> = factors.iter().map(|(path, _)| read(&model, path)).collect();
        let gradients: Vec<Tensor<2>> = factors
            .iter()
            .map(|(path, _)| grads.get::<2>(id(path)).expect("a gradient"))
            .collect();

        let mut optimizer = SgdConfig::new().init();
        let model = optimizer.step(scheduler.step(), model, grads);
        for (index, (path, expected)) in factors.iter().enumerate() {
            let rates = applied_rates(
                before[index].clone(),
                read(&model, path),
                gradients[index].clone(),
            );
            assert!(!rates.is_empty(), "{name}: {path} has no gradient");
            for (rate, rounding) in rates {
                assert!(
                    (rate - expected).abs() <= 1e-4 * expected + rounding,
                    "{name}: {path} stepped at {rate}, expected {expected} (± {rounding})"
                );
            }
        }
    }
}

#[test]
fn b_follows_the_base_schedule_times_the_ratio() {
    let device = Device::flex();
    let model = adapted(&device);
    let base = LinearLrSchedulerConfig::new(1e-2, 1e-3, 10);
    let mut reference = base.init().unwrap();
    let mut scheduler = LoraPlusConfig::new().scheduler(&model, base).unwrap();
    let ids = param_ids(&model);
    for _ in 0..5 {
        let lr = scheduler.step();
        let expected = reference.step().base();
        let of = |path: &str| lr.lr_from_param(ids[path], Some(path));
        assert_eq!(of("query.weight.burn_lora.adapters.0.lora_a"), expected);
        let b = of("query.weight.burn_lora.adapters.0.lora_b");
        assert!(
            (b - expected * 16.0).abs() <= 1e-15,
            "{b} vs 16 × {expected}"
        );
        assert_eq!(of("embed.weight.burn_lora.adapters.0.lora_a"), 1e-6);
        assert_eq!(of("query.bias"), expected);
    }
}

/// A schedule of one's own: halves the rate at every step.
#[derive(Clone)]
struct Halving(f64);

impl burn::optim::lr_scheduler::LrScheduler for Halving {
    fn step(&mut self) -> f64 {
        self.0 /= 2.0;
        self.0
    }

    fn to_record(&self) -> burn::optim::lr_scheduler::LrSchedulerRecord {
        burn::optim::lr_scheduler::LrSchedulerRecord::new().with_scalar("lr", self.0)
    }

    fn load_record(&mut self, record: burn::optim::lr_scheduler::LrSchedulerRecord) {
        self.0 = record.scalar::<f64>("lr").unwrap_or(self.0);
    }
}

#[test]
fn a_custom_schedule_drives_b_at_the_ratio() {
    let device = Device::flex();
    let model = adapted(&device);
    let config = LoraPlusConfig::new().with_lr_ratio(8.0);
    let mut scheduler = config.scheduler_from(&model, Halving(1.0)).unwrap();
    let ids = param_ids(&model);
    let a = "query.weight.burn_lora.adapters.0.lora_a";
    let b = "query.weight.burn_lora.adapters.0.lora_b";
    let mut expected = 1.0;
    for _ in 0..4 {
        expected /= 2.0;
        let lr = scheduler.step();
        assert_eq!(lr.lr_from_param(ids[a], Some(a)), expected);
        assert_eq!(lr.lr_from_param(ids[b], Some(b)), 8.0 * expected);
    }
}

#[test]
fn bad_ratios_and_unadapted_models_are_refused() {
    let device = Device::flex();
    let error = LoraPlusConfig::new()
        .with_lr_ratio(0.0)
        .scheduler(&adapted(&device), 1e-3)
        .err();
    assert!(matches!(
        error,
        Some(LoraError::InvalidLearningRate {
            name: "lr_ratio",
            ..
        })
    ));
    let error = LoraPlusConfig::new()
        .with_lr_embedding(f64::NAN)
        .scheduler(&adapted(&device), 1e-3)
        .err();
    assert!(matches!(error, Some(LoraError::InvalidLearningRate { .. })));
    let error = LoraPlusConfig::new()
        .scheduler(&Model::new(&device), 1e-3)
        .err();
    assert_eq!(error, Some(LoraError::NoAdapters));
    let error = LoraPlusConfig::new()
        .scheduler(
            &adapted(&device),
            LinearLrSchedulerConfig::new(2.0, 1e-3, 10),
        )
        .err();
    assert!(
        matches!(error, Some(LoraError::InvalidSchedule(_))),
        "{error:?}"
    );
}

#[test]
fn lora_plus_training_lowers_the_loss_leaves_the_base_and_merges() {
    for (name, device) in devices() {
        let device = device.autodiff();
        device.seed(8);
        let base = Model::new(&device);
        let mut teacher = base.clone();
        // A rank-2 change, which the rank-4 adapter can learn whatever the draw.
        let change = common::low_rank_change(8, 6, 0.5, &device);
        teacher.query.weight = teacher.query.weight.clone().map(|w| w + change.clone());
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(
                (0..40).map(|i| (i * 7 % 10) as i64).collect::<Vec<_>>(),
                [4, 10],
            ),
            &device,
        );
        let target = teacher.forward(ids.clone()).detach();
        let config = LoraConfig::new(4).with_targets(Targets::names(["query"]));
        let (mut model, _) = config.apply(base).unwrap();
        let frozen = common::base_data(&model);
        let mut scheduler = LoraPlusConfig::new().scheduler(&model, 2e-3).unwrap();
        let mut optimizer = burn::optim::AdamWConfig::new()
            .with_weight_decay(0.0)
            .init();
        let mut losses = Vec::new();
        for _ in 0..200 {
            let loss = (model.forward(ids.clone()) - target.clone())
                .powi_scalar(2)
                .mean();
            losses.push(loss.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(scheduler.step(), model, grads);
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last * 10.0 < first, "{name}: loss {first} -> {last}");
        assert_eq!(common::base_data(&model), frozen, "{name}: the base moved");
        let unmerged = common::HostTensor::from(model.forward(ids.clone()));
        let merged = burn_lora::LoraModule::merge_lora(&model).unwrap();
        let error = common::HostTensor::from(merged.forward(ids)).error_vs_max(&unmerged);
        assert!(error <= 1e-5, "{name}: merged differs by {error}");
    }
}
