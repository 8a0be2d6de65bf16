//! LoRA variants against PEFT 0.21.2 itself (`tests/fixtures/gen_peft_variants.py`): DoRA,
//! embedding and conv2d adapters, and PiSSA/OLoRA adapters that PEFT converted to plain LoRA
//! on save. Each file loads into a Burn port of the model and gives PEFT's outputs, unmerged and
//! merged, within 1e-5; unmerging comes back to the adapted outputs and unloading to the base;
//! saving writes PEFT's keys and shapes back, value for value.
//!
//! Our own PiSSA/OLoRA inits are compared with PEFT's (the products `s·A·B` and the residual
//! bases, which do not depend on the SVD's or QR's sign choices), and our converted saves load
//! on the original base with the trained outputs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn_lora::peft::{
    CONFIG_FILE, KeyMap, LoadOptions, SaveOptions, WEIGHTS_FILE, load_adapter_with,
    save_adapter_with,
};
use burn_lora::{LoraConfig, LoraInit, LoraModule, LoraState, Targets};
use common::devices;
use common::fixture::{key_map, load_case_from, read_safetensors, variant_dir};

/// PEFT computes in f32 with another summation order; the issue's bar.
const TOLERANCE: f64 = 1e-5;

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    (a - b).abs().max().into_scalar::<f64>()
}

fn io(case: &str, name: &str, device: &Device) -> Tensor<3> {
    io_tensor(case, name, device)
}

fn io_tensor<const D: usize>(case: &str, name: &str, device: &Device) -> Tensor<D> {
    let (shape, values) = read_safetensors(&variant_dir(case).join("io.safetensors"))
        .remove(name)
        .unwrap_or_else(|| panic!("{case}: no `{name}`"));
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn base_weights(case: &str, device: &Device) -> BTreeMap<String, Tensor<2>> {
    read_safetensors(&variant_dir(case).join("base.safetensors"))
        .into_iter()
        .filter(|(_, (shape, _))| shape.len() <= 2)
        .map(|(name, (shape, values))| {
            let shape = if shape.len() == 1 {
                vec![1, shape[0]]
            } else {
                shape
            };
            (
                name,
                Tensor::from_data(TensorData::new(values, shape), device),
            )
        })
        .collect()
}

/// PEFT's outputs for a case: without adapter, with it, and merged.
struct Expected<const D: usize> {
    base: Tensor<D>,
    lora: Tensor<D>,
    merged: Tensor<D>,
}

impl<const D: usize> Expected<D> {
    fn read(case: &str, device: &Device) -> Self {
        Self {
            base: io_tensor(case, "base_output", device),
            lora: io_tensor(case, "lora_output", device),
            merged: io_tensor(case, "merged_output", device),
        }
    }
}

/// Load the case's PEFT adapter into `model` and check every path against PEFT's outputs; then
/// save it and check the file against PEFT's, tensor for tensor. Returns the loaded model.
fn check_case<M: LoraModule, const D: usize>(
    label: &str,
    case: &str,
    model: &M,
    forward: impl Fn(&M) -> Tensor<D>,
    expected: &Expected<D>,
    key_map: KeyMap,
) -> M {
    let error = max_abs_diff(forward(model), expected.base.clone());
    assert!(error <= TOLERANCE, "{label}: base differs by {error}");

    let dir = variant_dir(case).join("adapter");
    let options = LoadOptions::new().with_key_map(key_map.clone());
    let (adapted, report) =
        load_adapter_with(model, &dir, "task", &options).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert!(report.is_clean(), "{label}: {report}");

    let lora = forward(&adapted);
    let error = max_abs_diff(lora.clone(), expected.lora.clone());
    assert!(error <= TOLERANCE, "{label}: unmerged differs by {error}");
    assert!(
        max_abs_diff(lora, expected.base.clone()) > 1e-2,
        "{label}: the adapter should matter"
    );

    let merged = adapted.merge_lora().unwrap();
    let error = max_abs_diff(forward(&merged), expected.merged.clone());
    assert!(error <= TOLERANCE, "{label}: merged differs by {error}");
    let unmerged = merged.unmerge_lora().unwrap();
    let error = max_abs_diff(forward(&unmerged), expected.lora.clone());
    assert!(
        error <= TOLERANCE,
        "{label}: merge + unmerge differs by {error}"
    );
    let unloaded = unmerged.unload_lora().unwrap();
    let error = max_abs_diff(forward(&unloaded), expected.base.clone());
    assert!(error <= TOLERANCE, "{label}: unload differs by {error}");

    // Saving writes PEFT's own keys, shapes and values back.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("peft_variants_save")
        .join(label.replace('/', "_"));
    let _ = std::fs::remove_dir_all(&out);
    let save = SaveOptions::new().with_key_map(key_map);
    save_adapter_with(&adapted, &out, "task", &save).unwrap();
    let theirs: Tensors = read_safetensors(&dir.join(WEIGHTS_FILE));
    let ours: Tensors = read_safetensors(&out.join(WEIGHTS_FILE));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "{label}"
    );
    for (key, (shape, values)) in &theirs {
        assert_eq!(&ours[key].0, shape, "{label}: {key}");
        assert_eq!(&ours[key].1, values, "{label}: {key}");
    }
    let config = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap()
    };
    let (ours, theirs) = (config(&out), config(&dir));
    for field in ["r", "lora_alpha", "use_dora", "use_rslora"] {
        assert_eq!(
            ours[field]
                .as_f64()
                .or(ours[field].as_bool().map(f64::from)),
            theirs[field]
                .as_f64()
                .or(theirs[field].as_bool().map(f64::from)),
            "{label}: {field}"
        );
    }
    adapted
}

#[test]
fn dora_adapters_give_peft_outputs() {
    for (backend, device) in devices() {
        for case in ["dora", "dora_rslora"] {
            let label = format!("{backend}/{case}");
            let fixture = load_case_from(&variant_dir(case), &device);
            let expected = Expected::<3>::read(case, &device);
            let input = fixture.input.clone();
            let model = check_case(
                &label,
                case,
                &fixture.model,
                |m| m.forward(input.clone()),
                &expected,
                key_map(),
            );
            let infos = model.lora_adapters();
            assert!(
                !infos.is_empty() && infos.iter().all(|info| info.dora),
                "{label}"
            );
        }
    }
}

#[derive(Module, Debug)]
struct EmbedModel {
    embed: Embedding,
    proj: Linear,
}

impl EmbedModel {
    /// The base model of a fixture case of this model.
    fn of_case(case: &str, device: &Device) -> Self {
        let weights = base_weights(case, device);
        Self {
            embed: Embedding {
                weight: Param::from_tensor(weights["embed.weight"].clone()),
            },
            proj: Linear {
                weight: Param::from_tensor(weights["proj.weight"].clone().transpose()),
                bias: Some(Param::from_tensor(
                    weights["proj.bias"].clone().reshape([8]),
                )),
            },
        }
    }

    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.proj.forward(self.embed.forward(ids))
    }
}

#[test]
fn embedding_adapters_give_peft_outputs() {
    for (backend, device) in devices() {
        let case = "embedding";
        let model = EmbedModel::of_case(case, &device);
        let ids = io_tensor::<2>(case, "input", &device).int();
        let expected = Expected::<3>::read(case, &device);
        let adapted = check_case(
            &format!("{backend}/{case}"),
            case,
            &model,
            |m| m.forward(ids.clone()),
            &expected,
            KeyMap::new(),
        );
        assert_eq!(adapted.lora_adapters().len(), 2);
    }
}

/// Trainable tokens (PEFT's `trainable_token_indices`): rows 1, 4 and 7 of the embedding train
/// on their own beside LoRA on `proj`; PEFT's outputs, and its file written back exactly.
#[test]
fn trainable_tokens_give_peft_outputs() {
    for (backend, device) in devices() {
        let case = "trainable_tokens";
        let model = EmbedModel::of_case(case, &device);
        let ids = io_tensor::<2>(case, "input", &device).int();
        let expected = Expected::<3>::read(case, &device);
        let label = format!("{backend}/{case}");
        let adapted = check_case(
            &label,
            case,
            &model,
            |m| m.forward(ids.clone()),
            &expected,
            KeyMap::new(),
        );
        assert_eq!(adapted.lora_adapters().len(), 1);
        let copies = adapted.saved_copies();
        assert_eq!(copies.len(), 1, "{copies:?}");
        assert_eq!(copies[0].path, "embed.weight");
        assert_eq!(copies[0].rows, Some(vec![1, 4, 7]));
        let saved = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("peft_variants_save")
            .join(label.replace('/', "_"))
            .join(CONFIG_FILE);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(saved).unwrap()).unwrap();
        assert_eq!(
            config["trainable_token_indices"],
            serde_json::json!({"embed": [1, 4, 7]})
        );
        assert!(config["modules_to_save"].is_null());
        // Only those rows moved: every other row of the embedding reads the base's.
        let merged = adapted.merge_and_unload_lora().unwrap();
        let rows = |m: &EmbedModel| HostRows::of(m.embed.weight.val());
        let (before, after) = (rows(&model), rows(&merged));
        for row in 0..before.0.len() {
            let changed = before.0[row] != after.0[row];
            assert_eq!(changed, [1, 4, 7].contains(&row), "{label}: row {row}");
        }
    }
}

/// An embedding's rows on the host.
struct HostRows(Vec<Vec<f32>>);

impl HostRows {
    fn of(weight: Tensor<2>) -> Self {
        let [height, width] = weight.dims();
        let values = weight
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        Self(
            (0..height)
                .map(|row| values[row * width..(row + 1) * width].to_vec())
                .collect(),
        )
    }
}

#[derive(Module, Debug)]
struct ConvModel {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl ConvModel {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let hidden = burn::tensor::activation::relu(self.conv1.forward(x));
        self.conv2.forward(hidden)
    }
}

#[test]
fn conv2d_adapters_give_peft_outputs() {
    for (backend, device) in devices() {
        let case = "conv2d";
        let tensors = read_safetensors(&variant_dir(case).join("base.safetensors"));
        let kernel = |name: &str| {
            let (shape, values) = tensors[name].clone();
            Param::from_tensor(Tensor::<4>::from_data(
                TensorData::new(values, shape),
                &device,
            ))
        };
        let conv = |channels: [usize; 2], stride: usize, bias: bool, name: &str| {
            let mut conv = Conv2dConfig::new(channels, [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(bias)
                .init(&device);
            conv.weight = kernel(&format!("{name}.weight"));
            if bias {
                let (shape, values) = tensors[&format!("{name}.bias")].clone();
                conv.bias = Some(Param::from_tensor(Tensor::from_data(
                    TensorData::new(values, shape),
                    &device,
                )));
            }
            conv
        };
        let model = ConvModel {
            conv1: conv([3, 8], 1, true, "conv1"),
            conv2: conv([8, 4], 2, false, "conv2"),
        };
        let input = io_tensor::<4>(case, "input", &device);
        let expected = Expected::<4>::read(case, &device);
        check_case(
            &format!("{backend}/{case}"),
            case,
            &model,
            |m| m.forward(input.clone()),
            &expected,
            KeyMap::new(),
        );
    }
}

#[test]
fn peft_converted_pissa_and_olora_adapters_load_on_the_original_base() {
    for (backend, device) in devices() {
        for case in ["pissa", "olora"] {
            let fixture = load_case_from(&variant_dir(case), &device);
            let expected = Expected::<3>::read(case, &device);
            let input = fixture.input.clone();
            let model = check_case(
                &format!("{backend}/{case}"),
                case,
                &fixture.model,
                |m| m.forward(input.clone()),
                &expected,
                key_map(),
            );
            // PEFT doubled the rank: [A | A₀] and [B ; -B₀].
            assert!(model.lora_adapters().iter().all(|info| info.rank == 8));
        }
    }
}

/// `(s·A·B, stored base)` of the adapter on `layer`'s weight, both `[d_in, d_out]`.
fn product_and_base(layer: &burn_lora::LoraLinear) -> (Tensor<2>, Tensor<2>) {
    let state = layer
        .weight
        .reparameterization::<LoraState>()
        .expect("adapted");
    (state.adapters[0].delta(), layer.weight.base())
}

#[test]
fn pissa_and_olora_inits_match_peft() {
    let device = Device::flex();
    for (case, init) in [("pissa", LoraInit::Pissa), ("olora", LoraInit::Olora)] {
        let fixture = load_case_from(&variant_dir(case), &device);
        let config = LoraConfig::new(4)
            .with_alpha(Some(8.0))
            .with_init(init)
            .with_targets(Targets::names(["query", "value"]));
        let (model, _) = config.apply(fixture.model.clone()).unwrap();
        let start = model.forward(fixture.input.clone());
        let error = max_abs_diff(start, io(case, "base_output", &device));
        assert!(
            error <= TOLERANCE,
            "{case}: the init changed the output by {error}"
        );

        let peft = read_safetensors(&variant_dir(case).join(format!("{case}_init.safetensors")));
        let tensor = |key: String| {
            let (shape, values) = peft[&key].clone();
            Tensor::<2>::from_data(TensorData::new(values, shape), &device)
        };
        let scale = 2.0;
        for (index, block) in model.blocks.iter().enumerate() {
            for (name, layer) in [("q_proj", &block.attn.query), ("v_proj", &block.attn.value)] {
                let prefix = format!("layers.{index}.self_attn.{name}");
                // PEFT: ΔW = s·B₀·A₀ in [out, in]; ours is its transpose.
                let theirs = tensor(format!("{prefix}.lora_B"))
                    .matmul(tensor(format!("{prefix}.lora_A")))
                    .mul_scalar(scale)
                    .transpose();
                let (ours, residual) = product_and_base(layer);
                let error = max_abs_diff(ours, theirs);
                assert!(
                    error <= TOLERANCE,
                    "{case}/{prefix}: s·A·B differs by {error}"
                );
                let theirs = tensor(format!("{prefix}.residual")).transpose();
                let error = max_abs_diff(residual, theirs);
                assert!(
                    error <= TOLERANCE,
                    "{case}/{prefix}: residual differs by {error}"
                );
            }
        }
    }
}

#[test]
fn our_pissa_saves_load_as_plain_lora_on_the_original_base() {
    for (backend, device) in devices() {
        device.seed(11);
        for init in [LoraInit::Pissa, LoraInit::Olora] {
            let label = format!("{backend}/{}", init.peft_name());
            let fixture = load_case_from(&variant_dir("pissa"), &device);
            let config = LoraConfig::new(4)
                .with_alpha(Some(8.0))
                .with_init(init)
                .with_targets(Targets::names(["query", "value"]));
            let (model, _) = config.apply(fixture.model.clone()).unwrap();
            // "Training": move both factors away from their start.
            let model = common::randomize(model, "lora_a", 0.3);
            let model = common::randomize(model, "lora_b", 0.3);
            let trained = model.forward(fixture.input.clone());
            assert!(max_abs_diff(trained.clone(), fixture.base_output.clone()) > 1e-2);

            let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("pissa_conversion")
                .join(label.replace('/', "_"));
            let _ = std::fs::remove_dir_all(&dir);
            let save = SaveOptions::new().with_key_map(key_map());
            let saved = save_adapter_with(&model, &dir, "default", &save).unwrap();
            assert_eq!(
                (saved.config.r, saved.config.lora_alpha),
                (8, 16.0),
                "{label}"
            );

            // On the unmodified base, the plain rank-8 file gives the trained outputs.
            let options = LoadOptions::new().with_key_map(key_map());
            let (plain, report) =
                load_adapter_with(&fixture.model, &dir, "task", &options).unwrap();
            assert!(report.is_clean(), "{label}: {report}");
            let error = max_abs_diff(plain.forward(fixture.input.clone()), trained.clone());
            assert!(
                error <= TOLERANCE,
                "{label}: converted save differs by {error}"
            );

            // Merging the PiSSA model gives the same fine-tuned weights.
            let merged = model.merge_and_unload_lora().unwrap();
            let error = max_abs_diff(merged.forward(fixture.input.clone()), trained);
            assert!(error <= TOLERANCE, "{label}: merge differs by {error}");
        }
    }
}
