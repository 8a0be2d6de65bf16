//! The LoRA variants against naive formulas, in training, and through merge and unmerge, on every
//! backend of the build: DoRA, embedding and conv2d adapters, and the PiSSA and OLoRA inits.

mod common;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, TensorData};
use burn_lora::{LayerKind, LoraConfig, LoraError, LoraInit, LoraModule, Target, Targets};
use common::{HostTensor, Projections, base_data, devices, param_ids, randomize, values};

/// f32 against f64 over sums of a few dozen products.
const TOLERANCE: f64 = 1e-5;

const D_IN: usize = 12;
const D_OUT: usize = 10;

/// The test's two projections, `D_IN` to `D_OUT`.
fn projections(device: &Device) -> Projections {
    Projections::new(D_IN, D_OUT, device)
}

fn dora() -> LoraConfig {
    LoraConfig::new(3)
        .with_alpha(Some(6.0))
        .with_use_dora(true)
        .with_targets(Targets::attention_qv())
}

/// `W ⊙ (m / ‖W‖)` per column: DoRA's rescaling, in f64.
fn scale_columns(weight: &HostTensor, magnitude: &HostTensor) -> HostTensor {
    let norms = column_norms(weight);
    let cols = weight.dims[1];
    HostTensor {
        dims: weight.dims.clone(),
        values: weight
            .values
            .iter()
            .enumerate()
            .map(|(i, w)| w * magnitude.values[i % cols] / norms.values[i % cols])
            .collect(),
    }
}

fn column_norms(weight: &HostTensor) -> HostTensor {
    let (rows, cols) = (weight.dims[0], weight.dims[1]);
    let values = (0..cols)
        .map(|j| {
            (0..rows)
                .map(|i| weight.values[i * cols + j].powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    HostTensor {
        dims: vec![cols],
        values,
    }
}

/// The effective weight of the adapter on `layer` in f64: `W + s·A·B`, rescaled per output
/// feature to the magnitude for DoRA.
fn naive_weight(params: &BTreeMap<String, HostTensor>, layer: &str, scale: f64) -> HostTensor {
    let adapter = format!("{layer}.weight.burn_lora.adapters.0");
    let weight = &params[&format!("{layer}.weight")];
    let a = &params[&format!("{adapter}.lora_a")];
    let b = &params[&format!("{adapter}.lora_b")];
    let adapted = weight.add(&a.matmul(b).scale(scale));
    match params.get(&format!("{adapter}.magnitude")) {
        Some(magnitude) => scale_columns(&adapted, magnitude),
        None => adapted,
    }
}

#[test]
fn dora_starts_at_the_base_with_the_weight_norms_as_magnitude() {
    for (name, device) in devices() {
        device.seed(3);
        let model = projections(&device);
        let x = Tensor::<2>::random([4, D_IN], Distribution::Default, &device);
        let before = model.forward(x.clone());
        let (model, report) = dora().apply(model).unwrap();
        assert_eq!(
            report.trainable_params(),
            2 * (3 * (D_IN + D_OUT) + D_OUT),
            "{name}: the report counts A, B and the magnitudes"
        );
        let infos = model.lora_adapters();
        assert!(infos.iter().all(|info| info.dora), "{name}");
        assert_eq!(
            model.forward(x).into_data(),
            before.into_data(),
            "{name}: DoRA starts exactly at the base"
        );
        let params = values(&model);
        for layer in ["query", "value"] {
            let magnitude = &params[&format!("{layer}.weight.burn_lora.adapters.0.magnitude")];
            let expected = column_norms(&params[&format!("{layer}.weight")]);
            let error = magnitude.max_relative_error(&expected, 1e-6);
            assert!(
                error <= TOLERANCE,
                "{name}/{layer}: magnitude off by {error}"
            );
        }
    }
}

#[test]
fn dora_matches_the_naive_formula_on_the_fast_and_dense_paths() {
    for (name, device) in devices() {
        device.seed(5);
        let (model, _) = dora().apply(projections(&device)).unwrap();
        let model = randomize(model, "lora_b", 0.3);
        let model = randomize(model, "magnitude", 1.0);
        let x = Tensor::<2>::random([4, D_IN], Distribution::Default, &device);
        let params = values(&model);
        let host_x = HostTensor::from(x.clone());
        for layer in ["query", "value"] {
            let expected = host_x
                .matmul(&naive_weight(&params, layer, 2.0))
                .add_row(&params[&format!("{layer}.bias")]);
            let output = match layer {
                "query" => model.query.forward(x.clone()),
                _ => model.value.forward(x.clone()),
            };
            let error = HostTensor::from(output).error_vs_max(&expected);
            assert!(error <= TOLERANCE, "{name}/{layer}: off by {error}");
        }
    }
}

#[test]
fn dora_merge_equals_unmerged_and_unmerge_restores_the_base() {
    for (name, device) in devices() {
        device.seed(7);
        let (model, _) = dora().apply(projections(&device)).unwrap();
        let model = randomize(model, "lora_b", 0.3);
        let model = randomize(model, "magnitude", 1.0);
        let stored = base_data(&model);
        let x = Tensor::<2>::random([4, D_IN], Distribution::Default, &device);
        let unmerged = HostTensor::from(model.forward(x.clone()));

        let merged = model.merge_lora().unwrap();
        let error = HostTensor::from(merged.forward(x.clone())).error_vs_max(&unmerged);
        assert!(error <= TOLERANCE, "{name}: merged differs by {error}");
        // The merged weight is the naive effective weight.
        let params = values(&model);
        let merged_weight = HostTensor::from(merged.value.weight.base());
        let error = merged_weight.error_vs_max(&naive_weight(&params, "value", 2.0));
        assert!(error <= TOLERANCE, "{name}: merged weight off by {error}");

        let back = merged.unmerge_lora().unwrap();
        for (path, data) in base_data(&back) {
            let error =
                HostTensor::from(data).error_vs_max(&HostTensor::from(stored[&path].clone()));
            assert!(
                error <= TOLERANCE,
                "{name}: unmerge left {path} off by {error}"
            );
        }
        let error = HostTensor::from(back.forward(x)).error_vs_max(&unmerged);
        assert!(error <= TOLERANCE, "{name}: after unmerge, off by {error}");
    }
}

/// Train `model` toward `target` with AdamW; returns the model and the first and last losses.
fn train<M: Module, const D: usize>(
    mut model: M,
    forward: impl Fn(&M) -> Tensor<D>,
    target: Tensor<D>,
    steps: usize,
    lr: f64,
) -> (M, f32, f32) {
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let loss = (forward(&model) - target.clone()).powi_scalar(2).mean();
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(lr, model, grads);
    }
    (model, losses[0], losses[losses.len() - 1])
}

/// The ids of the parameters whose paths end in one of `suffixes`.
fn ids_ending_in<M: Module>(model: &M, suffixes: &[&str]) -> Vec<burn::module::ParamId> {
    param_ids(model)
        .into_iter()
        .filter(|(path, _)| suffixes.iter().any(|suffix| path.ends_with(suffix)))
        .map(|(_, id)| id)
        .collect()
}

#[test]
fn dora_trains_its_magnitude_and_factors_and_leaves_the_base_untouched() {
    for (name, device) in devices() {
        let device = device.autodiff();
        device.seed(11);
        let base = projections(&device);
        // The teacher rescales the output features and adds a low-rank change.
        let mut teacher = base.clone();
        let factors = Tensor::<2>::random([1, D_OUT], Distribution::Uniform(0.5, 1.5), &device);
        let change = common::low_rank_change(D_IN, D_OUT, 0.3, &device);
        teacher.query.weight = teacher
            .query
            .weight
            .clone()
            .map(|w| (w + change.clone()) * factors.clone());
        let x = Tensor::<2>::random([32, D_IN], Distribution::Normal(0.0, 1.0), &device);
        let target = teacher.forward(x.clone()).detach();

        let (model, _) = dora().apply(base).unwrap();
        let frozen = base_data(&model);
        let trained = ids_ending_in(&model, &["lora_a", "lora_b", "magnitude"]);
        assert_eq!(trained.len(), 6, "{name}: A, B and m on two layers");
        let loss = (model.forward(x.clone()) - target.clone())
            .powi_scalar(2)
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        assert_eq!(grads.len(), 6, "{name}: gradients reach A, B and m only");

        let (model, first, last) = train(model, |m| m.forward(x.clone()), target, 150, 1e-2);
        assert!(last * 10.0 < first, "{name}: loss {first} -> {last}");
        assert_eq!(base_data(&model), frozen, "{name}: the base moved");
    }
}

#[derive(Module, Debug)]
struct Tokens {
    embed: Embedding,
    head: Linear,
}

impl Tokens {
    fn new(device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(20, 8).init(device),
            head: LinearConfig::new(8, 6).init(device),
        }
    }

    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.head.forward(self.embed.forward(ids))
    }
}

fn ids(device: &Device) -> Tensor<2, Int> {
    Tensor::<2, Int>::from_data(
        TensorData::new(vec![0i64, 3, 7, 19, 3, 5, 11, 2], [2, 4]),
        device,
    )
}

#[test]
fn embedding_adapters_follow_peft_init_and_the_naive_formula() {
    for (name, device) in devices() {
        device.seed(13);
        let model = Tokens::new(&device);
        let before = model.forward(ids(&device));
        let config = LoraConfig::new(4)
            .with_alpha(Some(8.0))
            .with_targets(Targets::new(vec![Target::ModuleType("Embedding".into())]));
        let (model, report) = config.apply(model).unwrap();
        assert_eq!(
            report.layers.len(),
            1,
            "{name}: the type selects the embedding only"
        );
        assert_eq!(report.layers[0].kind, LayerKind::Embedding);
        assert_eq!(report.trainable_params(), 4 * (20 + 8));
        // PEFT's embedding init: A zero, B normal, so the output starts at the base's.
        let params = values(&model);
        assert_eq!(
            params["embed.weight.burn_lora.adapters.0.lora_a"].max_abs(),
            0.0
        );
        assert!(params["embed.weight.burn_lora.adapters.0.lora_b"].max_abs() > 0.1);
        assert_eq!(
            model.forward(ids(&device)).into_data(),
            before.clone().into_data()
        );

        let model = randomize(model, "lora_a", 0.3);
        let params = values(&model);
        let table = naive_weight(&params, "embed", 2.0);
        let rows: Vec<usize> = vec![0, 3, 7, 19, 3, 5, 11, 2];
        let mut gathered = Vec::new();
        for row in &rows {
            gathered.extend_from_slice(&table.values[row * 8..(row + 1) * 8]);
        }
        let expected = HostTensor {
            dims: vec![8, 8],
            values: gathered,
        };
        let embedded = model.embed.forward(ids(&device)).reshape([8, 8]);
        let error = HostTensor::from(embedded).error_vs_max(&expected);
        assert!(error <= TOLERANCE, "{name}: embedding off by {error}");

        let unmerged = HostTensor::from(model.forward(ids(&device)));
        let merged = model.merge_lora().unwrap();
        let error = HostTensor::from(merged.forward(ids(&device))).error_vs_max(&unmerged);
        assert!(error <= TOLERANCE, "{name}: merged differs by {error}");
        let base = merged.unload_lora().unwrap();
        let error =
            HostTensor::from(base.forward(ids(&device))).error_vs_max(&HostTensor::from(before));
        assert!(error <= TOLERANCE, "{name}: unload differs by {error}");
    }
}

#[test]
fn embedding_adapters_train_and_leave_the_table_untouched() {
    for (name, device) in devices() {
        let device = device.autodiff();
        device.seed(17);
        let base = Tokens::new(&device);
        let mut teacher = base.clone();
        let change = common::low_rank_change(20, 8, 0.5, &device);
        teacher.embed.weight = teacher.embed.weight.clone().map(|w| w + change.clone());
        let target = teacher.forward(ids(&device)).detach();
        let config = LoraConfig::new(4).with_targets(Targets::names(["embed"]));
        let (model, _) = config.apply(base).unwrap();
        let frozen = base_data(&model);
        let (model, first, last) = train(model, |m| m.forward(ids(&device)), target, 150, 1e-2);
        assert!(last * 10.0 < first, "{name}: loss {first} -> {last}");
        assert_eq!(base_data(&model), frozen, "{name}: the base moved");
    }
}

#[derive(Module, Debug)]
struct Image {
    conv: Conv2d,
}

impl Image {
    fn new(device: &Device) -> Self {
        Self {
            conv: Conv2dConfig::new([3, 5], [3, 3])
                .with_stride([2, 1])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
        }
    }
}

#[test]
fn conv_adapters_equal_a_conv_into_r_channels_then_a_1x1_conv() {
    for (name, device) in devices() {
        device.seed(19);
        let model = Image::new(&device);
        let x = Tensor::<4>::random([2, 3, 7, 6], Distribution::Default, &device);
        let before = model.conv.forward(x.clone());
        let config = LoraConfig::new(2)
            .with_alpha(Some(3.0))
            .with_targets(Targets::new(vec![Target::ModuleType("Conv2d".into())]));
        let (model, report) = config.apply(model).unwrap();
        let layer = &report.layers[0];
        assert_eq!(
            (layer.kind, layer.d_in, layer.d_out),
            (LayerKind::Conv2d, 27, 5)
        );
        assert_eq!(report.trainable_params(), 2 * (27 + 5));
        assert_eq!(
            model.conv.forward(x.clone()).into_data(),
            before.clone().into_data()
        );

        let model = randomize(model, "lora_b", 0.3);
        // PEFT's formulation: A is a conv with the base's kernel size, stride and padding into
        // r channels, B a 1×1 conv out of them.
        let state = model
            .conv
            .weight
            .reparameterization::<burn_lora::LoraState>()
            .unwrap();
        let adapter = &state.adapters[0];
        let a_kernel = adapter.lora_a.val().transpose().reshape([2, 3, 3, 3]);
        let b_kernel = adapter.lora_b.val().transpose().reshape([5, 2, 1, 1]);
        let options = ConvOptions::new([2, 1], [1, 1], [1, 1], 1);
        let low_rank = conv2d(x.clone(), a_kernel, None, options);
        let low_rank = conv2d(
            low_rank,
            b_kernel,
            None,
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
        );
        let expected = HostTensor::from(before + low_rank.mul_scalar(1.5));
        let output = HostTensor::from(model.conv.forward(x.clone()));
        let error = output.error_vs_max(&expected);
        assert!(error <= TOLERANCE, "{name}: conv adapter off by {error}");

        let merged = model.merge_lora().unwrap();
        let error = HostTensor::from(merged.conv.forward(x.clone())).error_vs_max(&output);
        assert!(error <= TOLERANCE, "{name}: merged differs by {error}");
        let back = merged.unmerge_lora().unwrap();
        let error = HostTensor::from(back.conv.forward(x)).error_vs_max(&output);
        assert!(error <= TOLERANCE, "{name}: unmerged differs by {error}");
    }
}

#[test]
fn conv_adapters_train_and_leave_the_kernel_untouched() {
    for (name, device) in devices() {
        let device = device.autodiff();
        device.seed(23);
        let base = Image::new(&device);
        let mut teacher = base.clone();
        teacher.conv.weight = teacher.conv.weight.clone().map(|w| {
            let noise =
                Tensor::<4>::random([5, 1, 1, 1], Distribution::Normal(0.0, 0.3), &w.device());
            w.clone() + w * noise
        });
        let x = Tensor::<4>::random([4, 3, 7, 6], Distribution::Normal(0.0, 1.0), &device);
        let target = teacher.conv.forward(x.clone()).detach();
        // Rank 5 = c_out: the per-channel rescaling the teacher makes is within reach.
        let config = LoraConfig::new(5).with_targets(Targets::names(["conv"]));
        let (model, _) = config.apply(base).unwrap();
        let frozen = base_data(&model);
        let (model, first, last) = train(model, |m| m.conv.forward(x.clone()), target, 150, 1e-2);
        assert!(last * 10.0 < first, "{name}: loss {first} -> {last}");
        assert_eq!(base_data(&model), frozen, "{name}: the base moved");
    }
}

#[test]
fn pissa_and_olora_start_at_the_base_train_and_merge() {
    for (name, device) in devices() {
        let device = device.autodiff();
        for init in [LoraInit::Pissa, LoraInit::Olora] {
            let label = format!("{name}/{}", init.peft_name());
            device.seed(29);
            let base = projections(&device);
            let x = Tensor::<2>::random([32, D_IN], Distribution::Normal(0.0, 1.0), &device);
            let before = HostTensor::from(base.forward(x.clone()));
            let config = LoraConfig::new(3)
                .with_alpha(Some(6.0))
                .with_init(init)
                .with_targets(Targets::attention_qv());
            let (model, _) = config.apply(base.clone()).unwrap();
            // The stored base is now the residual W - s·A·B, and the output is unchanged.
            let params = values(&model);
            let original = values(&base);
            for layer in ["query", "value"] {
                let rebuilt = naive_weight(&params, layer, 2.0);
                let weight = &original[&format!("{layer}.weight")];
                let error = rebuilt.error_vs_max(weight);
                assert!(
                    error <= TOLERANCE,
                    "{label}/{layer}: W ≠ residual + s·A·B ({error})"
                );
                let residual = &params[&format!("{layer}.weight")];
                assert!(
                    residual.add(&weight.scale(-1.0)).max_abs() > 1e-2,
                    "{label}"
                );
            }
            let error = HostTensor::from(model.forward(x.clone())).error_vs_max(&before);
            assert!(error <= TOLERANCE, "{label}: start differs by {error}");
            let infos = model.lora_adapters();
            assert!(
                infos
                    .iter()
                    .all(|i| i.residual_init == Some(init.peft_name()))
            );

            // The teacher strengthens the principal part the adapter starts from by half, a
            // change its rank can express (a change outside it would need rank r + its own).
            let principal = model
                .query
                .weight
                .reparameterization::<burn_lora::LoraState>()
                .unwrap()
                .adapters[0]
                .delta();
            let mut teacher = base.clone();
            teacher.query.weight = teacher
                .query
                .weight
                .clone()
                .map(|w| w + principal.clone().mul_scalar(0.5));
            let target = teacher.forward(x.clone()).detach();
            let frozen = base_data(&model);
            let (model, first, last) = train(model, |m| m.forward(x.clone()), target, 200, 5e-3);
            assert!(last * 10.0 < first, "{label}: loss {first} -> {last}");
            assert_eq!(base_data(&model), frozen, "{label}: the residual moved");
            let trained = HostTensor::from(model.forward(x.clone()));
            let merged = model.merge_and_unload_lora().unwrap();
            let error = HostTensor::from(merged.forward(x)).error_vs_max(&trained);
            assert!(error <= TOLERANCE, "{label}: merged differs by {error}");
        }
    }
}

#[test]
fn variants_refuse_what_they_cannot_do() {
    let device = Device::flex();
    // PiSSA and OLoRA apply to linear layers.
    let config = LoraConfig::new(2)
        .with_init(LoraInit::Pissa)
        .with_targets(Targets::names(["embed"]));
    let error = config.apply(Tokens::new(&device)).unwrap_err();
    assert!(
        matches!(&error, LoraError::UnsupportedVariant { what, path, .. }
            if what.contains("pissa") && what.contains("embedding") && path == "embed"),
        "{error}"
    );
    // DoRA adapters do not combine.
    let (model, _) = dora().apply(projections(&device)).unwrap();
    let error = model
        .add_weighted_adapter(
            &[("default", 1.0)],
            "sum",
            burn_lora::Combination::Svd { rank: 2 },
        )
        .unwrap_err();
    assert!(
        matches!(error, LoraError::UnsupportedVariant { .. }),
        "{error}"
    );
    // A DoRA adapter with a residual init has no plain-LoRA form to save.
    let config = dora().with_init(LoraInit::Pissa);
    let (model, _) = config.apply(projections(&device)).unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dora_pissa_save");
    let error = burn_lora::peft::save_adapter(&model, &dir, "default").unwrap_err();
    assert!(
        matches!(&error, LoraError::UnsupportedVariant { what, .. } if what.contains("DoRA")),
        "{error}"
    );
    assert!(!dir.join(burn_lora::peft::WEIGHTS_FILE).exists());
}

#[test]
fn fast_pissa_is_close_to_exact_pissa() {
    let device = Device::flex();
    device.seed(31);
    let base = projections(&device);
    let product = |init: LoraInit| {
        let config = LoraConfig::new(3)
            .with_init(init)
            .with_targets(Targets::names(["query"]));
        let (model, _) = config.apply(base.clone()).unwrap();
        let state = model
            .query
            .weight
            .reparameterization::<burn_lora::LoraState>()
            .unwrap();
        HostTensor::from(state.adapters[0].delta())
    };
    let exact = product(LoraInit::Pissa);
    let fast = product(LoraInit::PissaNiter(4));
    // A random 12×10 weight has a flat spectrum, the hard case for a randomized SVD; the
    // oversampled sketch still finds its top 3 directions.
    let error = fast.error_vs_max(&exact);
    assert!(error <= 1e-4, "fast PiSSA's s·A·B is off by {error}");
    assert_eq!(LoraInit::PissaNiter(4).peft_name(), "pissa_niter_4");
}

#[test]
fn a_dora_adapter_serves_its_own_samples_of_a_mixed_batch() {
    let device = Device::flex();
    device.seed(7);
    let (model, _) = dora().apply(projections(&device)).unwrap();
    let (model, _) = model
        .add_adapter(
            "plain",
            &LoraConfig::new(2).with_targets(Targets::attention_qv()),
        )
        .unwrap();
    // Trained adapters: every B and the magnitudes away from their starting values.
    let model = randomize(randomize(model, "lora_b", 0.3), "magnitude", 0.5);
    let x = Tensor::<2>::random([3, D_IN], Distribution::Default, &device);
    let batch = model
        .mixed_batch(&[Some("default"), None, Some("plain")])
        .unwrap();
    let mixed = model.query.forward_mixed(x.clone(), &batch);
    // Each sample alone, with only its adapter active (or none), through the plain forward.
    let alone = |name: Option<&str>, row: usize| {
        let model = match name {
            Some(name) => model.set_active(&[name]).unwrap(),
            None => model.disable_adapters().unwrap(),
        };
        model.query.forward(x.clone().narrow(0, row, 1))
    };
    let expected = Tensor::cat(
        vec![
            alone(Some("default"), 0),
            alone(None, 1),
            alone(Some("plain"), 2),
        ],
        0,
    );
    // f32 rounding of a few products of size ~1.
    mixed.into_data().assert_approx_eq::<f32>(
        &expected.into_data(),
        burn::tensor::Tolerance::absolute(1e-5),
    );
}
