//! PEFT's `target_parameters`: LoRA on raw parameters, such as a mixture of experts' expert
//! banks (`[experts, d_out, d_in]`), where every expert gets its own rank-`r` update. Checked
//! against a naive f64 formula per expert; PEFT's own outputs on transformers' Mixtral are in
//! `tests/hf_ports.rs` (case `mixtral`).

mod common;

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use burn_lora::peft::{LoadOptions, PeftAdapter, load_adapter, save_adapter};
use burn_lora::{
    Combination, LayerKind, LoraConfig, LoraError, LoraInit, LoraModule, LoraState, ParamLayout,
    Target, Targets,
};
use common::fixture::read_safetensors;
use common::{HostTensor, devices, randomize, values};

/// f32 against f64 on values of size ~1.
const TOLERANCE: f64 = 1e-5;
const EXPERTS: usize = 3;
const HIDDEN: usize = 6;
const INTERMEDIATE: usize = 4;
const RANK: usize = 2;

/// A mixture of experts' expert bank, as transformers' Mixtral stores it: `gate_up_proj`
/// `[E, 2·intermediate, hidden]` and `down_proj` `[E, hidden, intermediate]` (`[E, d_out, d_in]`).
#[derive(Module, Debug)]
struct Experts {
    gate_up_proj: Param<Tensor<3>>,
    down_proj: Param<Tensor<3>>,
}

/// A block with a router and an expert bank.
#[derive(Module, Debug)]
struct Moe {
    router: Linear,
    experts: Experts,
}

fn moe(layout: ParamLayout, device: &Device) -> Moe {
    let bank = |d_in: usize, d_out: usize| {
        let dims = match layout {
            ParamLayout::OutIn => [EXPERTS, d_out, d_in],
            ParamLayout::InOut => [EXPERTS, d_in, d_out],
        };
        Param::from_tensor(Tensor::<3>::random(dims, Distribution::Default, device))
    };
    Moe {
        router: LinearConfig::new(HIDDEN, EXPERTS).init(device),
        experts: Experts {
            gate_up_proj: bank(HIDDEN, 2 * INTERMEDIATE),
            down_proj: bank(INTERMEDIATE, HIDDEN),
        },
    }
}

fn config(layout: ParamLayout) -> LoraConfig {
    LoraConfig::new(RANK).with_alpha(Some(3.0)).with_targets(
        Targets::parameter_names(["experts.gate_up_proj", "experts.down_proj"])
            .with_parameter_layout(layout),
    )
}

/// The model adapted, with random `B` so that every expert's update is non-zero.
fn adapted(layout: ParamLayout, device: &Device) -> Moe {
    let (model, _) = config(layout).apply(moe(layout, device)).unwrap();
    randomize(model, "lora_b", 0.5)
}

/// What the bank at `param` (`gate_up_proj` or `down_proj`) must compute with: every expert
/// `e`'s stored matrix plus `Σ s·A_e·B_e` over the adapters in `names`, in f64, in the
/// parameter's own layout. `A_e` is columns `e·r..(e+1)·r` of `A: [d_in, E·r]`, `B_e` the same
/// rows of `B: [E·r, d_out]`.
fn expected(model: &Moe, param: &str, names: &[&str], layout: ParamLayout) -> HostTensor {
    let values = values(model);
    let base = values[&format!("experts.{param}")].clone();
    let state = match param {
        "gate_up_proj" => model.experts.gate_up_proj.reparameterization::<LoraState>(),
        _ => model.experts.down_proj.reparameterization::<LoraState>(),
    };
    let mut out = base.clone();
    let Some(state) = state else {
        return out;
    };
    let [experts, rows, cols] = [base.dims[0], base.dims[1], base.dims[2]];
    for (index, adapter) in state.adapters.iter().enumerate() {
        if !names.contains(&adapter.name.as_str()) {
            continue;
        }
        let get = |factor: &str| {
            values[&format!("experts.{param}.burn_lora.adapters.{index}.{factor}")].clone()
        };
        let (a, b) = (get("lora_a"), get("lora_b"));
        let (d_in, d_out, rank) = (a.dims[0], b.dims[1], adapter.rank());
        for e in 0..experts {
            for i in 0..d_in {
                for o in 0..d_out {
                    let delta: f64 = (0..rank)
                        .map(|k| {
                            let column = e * rank + k;
                            a.values[i * a.dims[1] + column] * b.values[column * d_out + o]
                        })
                        .sum::<f64>()
                        * adapter.scale;
                    let (row, col) = match layout {
                        ParamLayout::OutIn => (o, i),
                        ParamLayout::InOut => (i, o),
                    };
                    out.values[e * rows * cols + row * cols + col] += delta;
                }
            }
        }
    }
    out
}

fn composed(model: &Moe, param: &str) -> HostTensor {
    match param {
        "gate_up_proj" => HostTensor::from(model.experts.gate_up_proj.val()),
        _ => HostTensor::from(model.experts.down_proj.val()),
    }
}

#[test]
fn each_expert_gets_its_own_low_rank_update_on_every_backend() {
    for layout in [ParamLayout::OutIn, ParamLayout::InOut] {
        for (backend, device) in devices() {
            device.seed(3);
            let (model, report) = config(layout).apply(moe(layout, &device)).unwrap();
            assert_eq!(report.layers.len(), 2, "{backend}");
            let gate_up = &report.layers[0];
            assert_eq!(gate_up.path, "experts.gate_up_proj");
            assert_eq!(gate_up.kind, LayerKind::Parameter);
            assert_eq!(
                (gate_up.experts, gate_up.d_in, gate_up.d_out),
                (EXPERTS, HIDDEN, 2 * INTERMEDIATE)
            );
            // E·r·(d_in + d_out) per bank.
            let trainable =
                EXPERTS * RANK * ((HIDDEN + 2 * INTERMEDIATE) + (INTERMEDIATE + HIDDEN));
            assert_eq!(report.trainable_params(), trainable, "{backend}");
            assert!(report.to_string().contains("3×[6, 8]"), "{report}");
            // B starts at zero: the banks are unchanged.
            for param in ["gate_up_proj", "down_proj"] {
                let base = values(&model)[&format!("experts.{param}")].clone();
                assert_eq!(composed(&model, param), base, "{backend} {param}");
            }
            let model = randomize(model, "lora_b", 0.5);
            for param in ["gate_up_proj", "down_proj"] {
                let want = expected(&model, param, &["default"], layout);
                let got = composed(&model, param);
                assert!(
                    got.max_relative_error(&want, 1.0) <= TOLERANCE,
                    "{backend} {param} {layout:?}"
                );
                assert!(
                    got.max_relative_error(&values(&model)[&format!("experts.{param}")], 1.0)
                        > 1e-2,
                    "the update shows"
                );
            }
            let info = &model.lora_adapters()[0];
            assert_eq!(
                (info.path.as_str(), info.rank, info.experts),
                ("experts.gate_up_proj", RANK, EXPERTS)
            );
        }
    }
}

#[test]
fn gradients_reach_each_experts_factors_and_not_the_bank() {
    let device = Device::flex().autodiff();
    device.seed(4);
    let layout = ParamLayout::OutIn;
    let model = adapted(layout, &device);
    let probe = Tensor::<3>::random(
        [EXPERTS, 2 * INTERMEDIATE, HIDDEN],
        Distribution::Default,
        &device,
    );
    let loss = (model.experts.gate_up_proj.val() * probe.clone()).sum();
    let grads = loss.backward();
    let state = model
        .experts
        .gate_up_proj
        .reparameterization::<LoraState>()
        .unwrap();
    let adapter = &state.adapters[0];
    let grad_a = HostTensor::from(adapter.lora_a.grad(&grads).expect("A trains"));
    let grad_b = HostTensor::from(adapter.lora_b.grad(&grads).expect("B trains"));
    assert!(
        model.experts.gate_up_proj.grad(&grads).is_none(),
        "the bank is frozen"
    );
    // loss = Σ_e Σ_(o,i) P[e,o,i]·s·(A_e·B_e)[i,o]: dA[i, e·r+k] = s·Σ_o P[e,o,i]·B[e·r+k, o],
    // dB[e·r+k, o] = s·Σ_i A[i, e·r+k]·P[e,o,i].
    let probe = HostTensor::from(probe.inner());
    let a = HostTensor::from(adapter.lora_a.val().inner());
    let b = HostTensor::from(adapter.lora_b.val().inner());
    let (d_in, d_out, s) = (HIDDEN, 2 * INTERMEDIATE, adapter.scale);
    let p = |e: usize, o: usize, i: usize| probe.values[e * d_out * d_in + o * d_in + i];
    let width = EXPERTS * RANK;
    let mut want_a = vec![0.0; d_in * width];
    let mut want_b = vec![0.0; width * d_out];
    for e in 0..EXPERTS {
        for k in 0..RANK {
            let c = e * RANK + k;
            for i in 0..d_in {
                for o in 0..d_out {
                    want_a[i * width + c] += s * p(e, o, i) * b.values[c * d_out + o];
                    want_b[c * d_out + o] += s * a.values[i * width + c] * p(e, o, i);
                }
            }
        }
    }
    let want_a = HostTensor {
        dims: vec![d_in, width],
        values: want_a,
    };
    let want_b = HostTensor {
        dims: vec![width, d_out],
        values: want_b,
    };
    assert!(grad_a.max_relative_error(&want_a, 1.0) <= TOLERANCE);
    assert!(grad_b.max_relative_error(&want_b, 1.0) <= TOLERANCE);
}

#[test]
fn merges_fold_every_expert_and_unmerges_restore_the_bank_exactly() {
    for layout in [ParamLayout::OutIn, ParamLayout::InOut] {
        let device = Device::flex();
        device.seed(5);
        let model = adapted(layout, &device);
        let before = common::base_data(&model);
        let want = expected(&model, "gate_up_proj", &["default"], layout);

        let merged = model.merge_lora().unwrap();
        // The stored bank holds W + ΔW, and the composed value adds nothing more.
        let stored = values(&merged)["experts.gate_up_proj"].clone();
        assert!(stored.max_relative_error(&want, 1.0) <= TOLERANCE);
        assert!(composed(&merged, "gate_up_proj").max_relative_error(&want, 1.0) <= TOLERANCE);

        let unmerged = merged.unmerge_lora().unwrap();
        assert_eq!(common::base_data(&unmerged), before, "{layout:?}");

        let plain = model.merge_and_unload_lora().unwrap();
        assert!(plain.lora_adapters().is_empty());
        let plain_bank = HostTensor::from(plain.experts.gate_up_proj.val());
        assert!(plain_bank.max_relative_error(&want, 1.0) <= TOLERANCE);
        let base = model.unload_lora().unwrap();
        assert_eq!(common::base_data(&base), before);
    }
}

#[test]
fn adapters_switch_and_add_up_per_expert() {
    let device = Device::flex();
    device.seed(6);
    let layout = ParamLayout::OutIn;
    let model = adapted(layout, &device);
    let second = LoraConfig::new(3)
        .with_alpha(Some(2.0))
        .with_use_rslora(true)
        .with_init(LoraInit::Gaussian)
        .with_targets(Targets::parameter_names(["experts.down_proj"]));
    let (model, _) = model.add_adapter("other", &second).unwrap();
    let model = randomize(model, "lora_b", 0.5);
    for names in [vec!["default"], vec!["other"], vec!["default", "other"]] {
        let model = model.set_active(&names).unwrap();
        for param in ["gate_up_proj", "down_proj"] {
            let want = expected(&model, param, &names, layout);
            assert!(
                composed(&model, param).max_relative_error(&want, 1.0) <= TOLERANCE,
                "{names:?} {param}"
            );
        }
    }
    // Padded for hot-swapping, every expert's update is unchanged.
    let padded = model.prepare_hotswap(4).unwrap();
    let info = padded.lora_adapters();
    assert!(info.iter().all(|info| info.rank == 4), "{info:?}");
    for param in ["gate_up_proj", "down_proj"] {
        let want = expected(&model, param, &["default"], layout);
        assert!(composed(&padded, param).max_relative_error(&want, 1.0) <= TOLERANCE);
    }
}

/// An f16 bank: the adapters take its dtype, the composed value is within f16's precision of
/// the f64 formula, and an unmerge restores the f16 bits exactly.
#[test]
fn an_f16_bank_composes_within_its_precision_and_unmerges_exactly() {
    use burn::tensor::{DType, FloatDType};
    let device = Device::flex();
    device.seed(9);
    let layout = ParamLayout::OutIn;
    let half = |param: Param<Tensor<3>>| param.map(|t| t.cast(FloatDType::F16));
    let model = moe(layout, &device);
    let model = Moe {
        experts: Experts {
            gate_up_proj: half(model.experts.gate_up_proj),
            down_proj: half(model.experts.down_proj),
        },
        ..model
    };
    let (model, _) = config(layout).apply(model).unwrap();
    let model = randomize(model, "lora_b", 0.5);
    let state = model
        .experts
        .gate_up_proj
        .reparameterization::<LoraState>()
        .unwrap();
    assert_eq!(state.adapters[0].lora_a.val().dtype(), DType::F16);
    let composed_bank = model.experts.gate_up_proj.val();
    assert_eq!(composed_bank.dtype(), DType::F16);
    let want = expected(&model, "gate_up_proj", &["default"], layout);
    // f16 keeps 11 significant bits: 2⁻¹⁰ relative on values of size ~1.
    assert!(HostTensor::from(composed_bank).max_relative_error(&want, 1.0) <= 2e-3);
    let before = common::base_data(&model);
    let merged = model.merge_lora().unwrap();
    assert_eq!(
        merged.experts.gate_up_proj.val().dtype(),
        DType::F16,
        "the merge keeps the bank's dtype"
    );
    assert_eq!(common::base_data(&merged.unmerge_lora().unwrap()), before);
}

#[test]
fn what_a_raw_parameter_cannot_take_is_refused() {
    let device = Device::flex();
    let layout = ParamLayout::OutIn;
    let refused = [
        config(layout).with_dropout(0.1),
        config(layout).with_use_dora(true),
        config(layout).with_lora_bias(true),
        config(layout).with_init(LoraInit::Pissa),
    ];
    for config in refused {
        let error = config.apply(moe(layout, &device)).unwrap_err();
        assert!(
            matches!(&error, LoraError::UnsupportedVariant { what, path, .. }
                if what.contains("raw parameter") && path == "experts.gate_up_proj"),
            "{error}"
        );
    }
    // A 1-D parameter, and a layer's weight that a module target adapts too.
    let bias = LoraConfig::new(1).with_targets(Targets::parameter_names(["router.bias"]));
    assert!(matches!(
        bias.apply(moe(layout, &device)).unwrap_err(),
        LoraError::InvalidTargetParameter { path, .. } if path == "router.bias"
    ));
    let both = LoraConfig::new(1).with_targets(
        Targets::names(["router"]).with_parameters(vec![Target::Name("router.weight".into())]),
    );
    assert!(matches!(
        both.apply(moe(layout, &device)).unwrap_err(),
        LoraError::InvalidTargetParameter { path, .. } if path == "router.weight"
    ));
    // A quantized bank: its update cannot compose into a QFloat value.
    let mut quantizer = burn::module::Quantizer::new(
        burn::tensor::quantization::Calibration::MinMax,
        device
            .settings()
            .quantization
            .scheme
            .with_value(burn::tensor::quantization::QuantValue::Q8S),
    );
    let quantized = moe(layout, &device).quantize_weights(&mut quantizer);
    assert!(matches!(
        quantized.experts.gate_up_proj.val().dtype(),
        burn::tensor::DType::QFloat(_)
    ));
    assert!(matches!(
        config(layout).apply(quantized).unwrap_err(),
        LoraError::InvalidTargetParameter { path, reason }
            if path == "experts.gate_up_proj" && reason.contains("quantized")
    ));
    let nothing = LoraConfig::new(1).with_targets(Targets::parameter_names(["experts.up_proj"]));
    assert!(matches!(
        nothing.apply(moe(layout, &device)).unwrap_err(),
        LoraError::UnmatchedTarget { .. }
    ));
    // A rank above an expert's smaller side.
    let wide = LoraConfig::new(INTERMEDIATE + 1)
        .with_targets(Targets::parameter_names(["experts.down_proj"]));
    assert!(matches!(
        wide.apply(moe(layout, &device)).unwrap_err(),
        LoraError::RankTooLarge { .. }
    ));

    // Mixed batches and combinations, which compose per sample or per factor.
    let model = adapted(layout, &device);
    let before = values(&model);
    assert!(matches!(
        model.mixed_batch(&[Some("default"), None]).unwrap_err(),
        LoraError::UnsupportedVariant { .. }
    ));
    assert!(matches!(
        model
            .add_weighted_adapter(&[("default", 1.0)], "sum", Combination::Linear)
            .unwrap_err(),
        LoraError::UnsupportedVariant { .. }
    ));
    assert_eq!(values(&model), before);
}

#[test]
fn saved_expert_factors_are_in_peft_layout_and_load_back_bit_for_bit() {
    let device = Device::flex();
    device.seed(7);
    let layout = ParamLayout::OutIn;
    let model = adapted(layout, &device);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("target_parameters_save");
    let _ = std::fs::remove_dir_all(&dir);
    let saved = save_adapter(&model, &dir, "default").unwrap();
    assert_eq!(
        saved.config.target_parameters,
        vec![
            "experts.down_proj".to_string(),
            "experts.gate_up_proj".to_string()
        ]
    );
    assert!(saved.config.target_modules.is_none());

    // PEFT nests one wrapper per parameter of `experts`, the first registered innermost:
    // gate_up_proj's factors are under `experts.base_layer`, down_proj's under `experts`.
    let file = read_safetensors(&dir.join("adapter_model.safetensors"));
    let width = EXPERTS * RANK;
    let (a_shape, a_file) = &file["base_model.model.experts.base_layer.lora_A.weight"];
    let (b_shape, b_file) = &file["base_model.model.experts.base_layer.lora_B.weight"];
    assert_eq!(a_shape, &vec![width, HIDDEN]);
    assert_eq!(b_shape, &vec![2 * INTERMEDIATE, width]);
    assert_eq!(
        file["base_model.model.experts.lora_A.weight"].0,
        vec![width, INTERMEDIATE]
    );
    assert_eq!(file.len(), 4);
    // PEFT's A row e·r + k is A's column e·r + k; PEFT's B column k·E + e is B's row e·r + k.
    let state = model
        .experts
        .gate_up_proj
        .reparameterization::<LoraState>()
        .unwrap();
    let a = HostTensor::from(state.adapters[0].lora_a.val());
    let b = HostTensor::from(state.adapters[0].lora_b.val());
    let d_out = 2 * INTERMEDIATE;
    for e in 0..EXPERTS {
        for k in 0..RANK {
            for i in 0..HIDDEN {
                let ours = a.values[i * width + e * RANK + k];
                assert_eq!(a_file[(e * RANK + k) * HIDDEN + i] as f64, ours);
            }
            for o in 0..d_out {
                let ours = b.values[(e * RANK + k) * d_out + o];
                assert_eq!(b_file[o * width + k * EXPERTS + e] as f64, ours);
            }
        }
    }

    let fresh = model.unload_lora().unwrap();
    let (reloaded, report) = load_adapter(&fresh, &dir, "default").expect("loads");
    assert!(report.is_clean(), "{report}");
    let factors = |model: &Moe| -> Vec<TensorData> {
        let states = [
            model.experts.gate_up_proj.reparameterization::<LoraState>(),
            model.experts.down_proj.reparameterization::<LoraState>(),
        ];
        (states.into_iter().flatten())
            .flat_map(|state| {
                let adapter = &state.adapters[0];
                [
                    adapter.lora_a.val().into_data(),
                    adapter.lora_b.val().into_data(),
                ]
            })
            .collect()
    };
    let (want, got) = (factors(&model), factors(&reloaded));
    assert_eq!(want.len(), 4);
    for (want, got) in want.iter().zip(&got) {
        assert_eq!(want.as_bytes(), got.as_bytes());
    }
    for param in ["gate_up_proj", "down_proj"] {
        assert_eq!(composed(&reloaded, param), composed(&model, param));
    }
}

#[test]
fn loading_checks_the_nesting_the_layout_and_the_coverage() {
    let device = Device::flex();
    device.seed(8);
    let layout = ParamLayout::OutIn;
    let model = adapted(layout, &device);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("target_parameters_checks");
    let _ = std::fs::remove_dir_all(&dir);
    save_adapter(&model, &dir, "default").unwrap();
    let adapter = PeftAdapter::read(&dir).unwrap();
    let fresh = model.unload_lora().unwrap();

    // The model declared in the other layout: every bank's shapes disagree.
    let error = adapter
        .load_into(
            &fresh,
            "default",
            &LoadOptions::new().with_parameter_layout(ParamLayout::InOut),
        )
        .unwrap_err();
    let LoraError::AdapterMismatch { report, .. } = error else {
        panic!("{error}");
    };
    assert_eq!(report.shape_mismatches.len(), 4, "{report}");

    // Without down_proj's factors, a strict load misses them; the config still selects it.
    let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let tensors = read_safetensors(&dir.join("adapter_model.safetensors"));
    let kept: Vec<(&str, Vec<usize>, Vec<f32>)> = (tensors.iter())
        .filter(|(key, _)| key.contains("base_layer"))
        .map(|(key, (shape, values))| (key.as_str(), shape.clone(), values.clone()))
        .collect();
    let partial = common::fixture::safetensors_bytes(&kept);
    let partial = PeftAdapter::from_bytes(&partial, &config, "partial").unwrap();
    let error = partial
        .load_into(&fresh, "default", &LoadOptions::new())
        .unwrap_err();
    let LoraError::AdapterMismatch { report, .. } = error else {
        panic!("{error}");
    };
    assert!(
        report
            .missing
            .iter()
            .any(|key| key.contains("experts.down_proj")),
        "{report}"
    );
    // Leniently, gate_up_proj loads, still found one base_layer deep.
    let (loaded, report) = partial
        .load_into(&fresh, "default", &LoadOptions::new().with_strict(false))
        .unwrap();
    assert_eq!(report.loaded.len(), 1, "{report}");
    assert_eq!(
        composed(&loaded, "gate_up_proj"),
        composed(&model, "gate_up_proj")
    );
    assert!(
        loaded
            .experts
            .down_proj
            .reparameterization::<LoraState>()
            .is_none()
    );
}
