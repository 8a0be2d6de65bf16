//! The reference ports of `examples/hf` load checkpoints saved by transformers and give its
//! logits: the base model, the model PEFT merged, and the base with PEFT's adapter loaded
//! through the port's key map (`tests/fixtures/hf`, made by `tests/fixtures/gen_hf_models.py`).

mod common;
#[allow(dead_code)] // each test uses a part of the ports
#[path = "../examples/hf/mod.rs"]
mod hf;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use burn_lora::LoraModule;
use burn_lora::peft::{
    KeyMap, LoadOptions, LoadReport, SaveOptions, load_adapter_with, save_adapter_with,
};
use common::{HostTensor, devices, param_ids};
use safetensors::{Dtype, SafeTensors};

/// Logits within this of transformers' (absolute): float32 on both sides. Tighter than the
/// 1e-4 the ports promise, so that a GELU variant or a norm epsilon off by a power of ten
/// (7.5e-5 and 6e-6 on these fixtures) fails.
const TOLERANCE: f64 = 5e-6;

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(case)
}

/// The inputs and outputs transformers recorded for a case.
struct Io {
    bytes: Vec<u8>,
}

impl Io {
    fn read(case: &str) -> Self {
        let path = case_dir(case).join("io.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    fn view(&self, name: &str) -> (Vec<usize>, Dtype, Vec<u8>) {
        let tensors = SafeTensors::deserialize(&self.bytes).expect("valid io.safetensors");
        let view = tensors
            .tensor(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        (view.shape().to_vec(), view.dtype(), view.data().to_vec())
    }

    /// An int64 tensor such as `input_ids`.
    fn ids(&self, name: &str, device: &Device) -> Tensor<2, Int> {
        let (shape, dtype, data) = self.view(name);
        assert_eq!(dtype, Dtype::I64, "{name}");
        let values: Vec<i64> = data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// A float32 tensor such as `base_logits`, on the host.
    fn logits(&self, name: &str) -> HostTensor {
        let (shape, dtype, data) = self.view(name);
        assert_eq!(dtype, Dtype::F32, "{name}");
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        HostTensor::from(TensorData::new(values, shape))
    }
}

/// `max |found - expected|`.
fn max_abs_error(found: HostTensor, expected: &HostTensor) -> f64 {
    assert_eq!(found.dims, expected.dims, "logit shapes");
    found
        .values
        .iter()
        .zip(&expected.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn assert_logits(label: &str, found: HostTensor, expected: &HostTensor) {
    let error = max_abs_error(found, expected);
    assert!(
        error < TOLERANCE,
        "{label}: logits differ from transformers' by {error:e}"
    );
}

/// What every port must reproduce of transformers and PEFT on its case: the base's logits, those
/// of PEFT's merged checkpoint (`merged`), those of PEFT's adapter loaded onto `base` through
/// `key_map` (`modules` modules, as `what` counts them), and those of burn-lora's own merge of
/// that adapter. Gives the adapted model, its load report and its merge, for the checks a port
/// adds.
#[allow(clippy::too_many_arguments)]
fn assert_port<M: burn::module::Module>(
    backend: &str,
    io: &Io,
    dir: &Path,
    (base, merged): (&M, &M),
    key_map: KeyMap,
    (modules, what): (usize, &str),
    logits: impl Fn(&M) -> HostTensor,
) -> (M, LoadReport, M) {
    assert_logits(
        &format!("{backend} base"),
        logits(base),
        &io.logits("base_logits"),
    );
    assert_logits(
        &format!("{backend} merged"),
        logits(merged),
        &io.logits("merged_logits"),
    );
    let options = LoadOptions::new().with_key_map(key_map);
    let (adapted, report) =
        load_adapter_with(base, dir.join("adapter"), "default", &options).unwrap();
    assert_eq!(report.loaded.len(), modules, "{backend}: {what}\n{report}");
    assert_logits(
        &format!("{backend} adapted"),
        logits(&adapted),
        &io.logits("adapted_logits"),
    );
    let merged_here = adapted.merge_and_unload_lora().unwrap();
    assert_logits(
        &format!("{backend} merged here"),
        logits(&merged_here),
        &io.logits("merged_logits"),
    );
    (adapted, report, merged_here)
}

#[test]
fn llama_gives_the_logits_of_transformers() {
    let io = Io::read("llama");
    for (backend, device) in devices() {
        let input_ids = io.ids("input_ids", &device);
        let dir = case_dir("llama");
        let (base, config) = hf::llama::load(&dir.join("base"), &device).unwrap();
        assert!(!config.tie_word_embeddings);
        let logits = |model: &hf::llama::LlamaForCausalLM| {
            HostTensor::from(model.forward(input_ids.clone()))
        };
        let (merged, _) = hf::llama::load(&dir.join("merged"), &device).unwrap();
        // burn-lora's own merge of PEFT's adapter gives what PEFT's merge gave ...
        let (_, _, merged_here) = assert_port(
            backend,
            &io,
            &dir,
            (&base, &merged),
            hf::llama::key_map(),
            (14, "7 projections × 2 layers"),
            logits,
        );
        // ... and exported in Hugging Face's names and layouts, it reloads bit for bit.
        let out = std::env::temp_dir().join(format!("burn_lora_llama_{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(dir.join("base/config.json"), out.join("config.json")).unwrap();
        hf::llama::checkpoint(&config)
            .save(&merged_here, out.join("model.safetensors"))
            .unwrap();
        // The keys are transformers' own, every one.
        let header = |path: &Path| -> BTreeSet<String> {
            let bytes = std::fs::read(path).unwrap();
            let file = SafeTensors::deserialize(&bytes).unwrap();
            file.names().into_iter().map(str::to_string).collect()
        };
        assert_eq!(
            header(&out.join("model.safetensors")),
            header(&dir.join("base/model.safetensors"))
        );
        let (reloaded, _) = hf::llama::load(&out, &device).unwrap();
        assert_eq!(
            logits(&reloaded).values,
            logits(&merged_here).values,
            "{backend}: the exported checkpoint reloads exactly"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// Mixtral's experts are raw 3-D parameters, which PEFT adapts with `target_parameters`: the
/// base, PEFT's merge, and PEFT's adapter (attention projections and expert banks) loaded here
/// all give transformers' logits, and burn-lora writes PEFT's file back exactly.
#[test]
fn mixtral_and_its_expert_adapter_give_the_logits_of_transformers() {
    let io = Io::read("mixtral");
    for (backend, device) in devices() {
        let input_ids = io.ids("input_ids", &device);
        let dir = case_dir("mixtral");
        let (base, config) = hf::mixtral::load(&dir.join("base"), &device).unwrap();
        assert_eq!(
            (config.num_local_experts, config.num_experts_per_tok),
            (4, 2)
        );
        let logits = |model: &hf::mixtral::MixtralForCausalLM| {
            HostTensor::from(model.forward(input_ids.clone()))
        };
        let (merged, _) = hf::mixtral::load(&dir.join("merged"), &device).unwrap();
        let (adapted, _, merged_here) = assert_port(
            backend,
            &io,
            &dir,
            (&base, &merged),
            hf::mixtral::key_map(),
            (12, "(4 projections + 2 expert banks) × 2 layers"),
            logits,
        );
        let banks: Vec<_> = (adapted.lora_adapters().into_iter())
            .filter(|info| info.experts == 4)
            .map(|info| info.path)
            .collect();
        assert_eq!(
            banks,
            [
                "layers.0.mlp.experts.gate_up_proj",
                "layers.0.mlp.experts.down_proj",
                "layers.1.mlp.experts.gate_up_proj",
                "layers.1.mlp.experts.down_proj"
            ]
        );
        let unloaded = adapted.unload_lora().unwrap();
        assert_eq!(
            logits(&unloaded).values,
            logits(&base).values,
            "{backend}: unloading gives the base back"
        );
        // Exported, the merge is a checkpoint in transformers 5's fused layout (which
        // `from_pretrained` reads too), and it reloads exactly.
        let export = std::env::temp_dir().join(format!(
            "burn_lora_mixtral_export_{backend}_{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&export).unwrap();
        std::fs::copy(dir.join("base/config.json"), export.join("config.json")).unwrap();
        hf::mixtral::checkpoint(&config)
            .save(&merged_here, export.join("model.safetensors"))
            .unwrap();
        let (reloaded, _) = hf::mixtral::load(&export, &device).unwrap();
        assert_eq!(logits(&reloaded).values, logits(&merged_here).values);
        let _ = std::fs::remove_dir_all(&export);

        // Saved back, the file is PEFT's: the same keys, shapes and values, and the same
        // target_parameters.
        let out = std::env::temp_dir().join(format!(
            "burn_lora_mixtral_{backend}_{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&out);
        let saved = save_adapter_with(
            &adapted,
            &out,
            "default",
            &SaveOptions::new().with_key_map(hf::mixtral::key_map()),
        )
        .unwrap();
        // The shortest names that select exactly the adapted banks.
        assert_eq!(
            saved.config.target_parameters,
            ["experts.down_proj", "experts.gate_up_proj"]
        );
        let tensors = |path: PathBuf| -> Vec<(String, Vec<usize>, Vec<u8>)> {
            let bytes = std::fs::read(path).unwrap();
            let file = SafeTensors::deserialize(&bytes).unwrap();
            let mut tensors: Vec<_> = (file.tensors().into_iter())
                .map(|(name, view)| (name, view.shape().to_vec(), view.data().to_vec()))
                .collect();
            tensors.sort();
            tensors
        };
        assert_eq!(
            tensors(out.join("adapter_model.safetensors")),
            tensors(dir.join("adapter/adapter_model.safetensors")),
            "{backend}: PEFT's file, written back"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn gpt2_gives_the_logits_of_transformers() {
    let io = Io::read("gpt2");
    for (backend, device) in devices() {
        let input_ids = io.ids("input_ids", &device);
        let dir = case_dir("gpt2");
        let (base, _) = hf::gpt2::load(&dir.join("base"), &device).unwrap();
        let logits =
            |model: &hf::gpt2::GPT2LMHeadModel| HostTensor::from(model.forward(input_ids.clone()));
        let (merged, _) = hf::gpt2::load(&dir.join("merged"), &device).unwrap();
        // PEFT saved the adapter with `fan_in_fan_out = true`: its factors are in PyTorch's
        // usual layout all the same, and load onto the `[d_in, d_out]` weights unchanged, and
        // the merge here goes onto the Conv1D weights, as PEFT merges with `fan_in_fan_out`.
        assert_port(
            backend,
            &io,
            &dir,
            (&base, &merged),
            hf::gpt2::key_map(),
            (8, "4 projections × 2 blocks"),
            logits,
        );
    }
}

#[test]
fn bert_gives_the_logits_of_transformers() {
    let io = Io::read("bert");
    for (backend, device) in devices() {
        let [input_ids, token_type_ids, attention_mask] =
            ["input_ids", "token_type_ids", "attention_mask"].map(|name| io.ids(name, &device));
        let dir = case_dir("bert");
        let logits = |model: &hf::bert::BertForSequenceClassification| {
            HostTensor::from(model.forward(
                input_ids.clone(),
                token_type_ids.clone(),
                attention_mask.clone(),
            ))
        };
        let (base, config) = hf::bert::load(&dir.join("base"), &device).unwrap();
        assert_eq!(config.num_labels(), 3);
        let (merged, _) = hf::bert::load(&dir.join("merged"), &device).unwrap();
        // PEFT's SEQ_CLS adapter: LoRA on Q, K, V and the classifier in modules_to_save, which
        // merged and unloaded replaces the original, as in PEFT.
        let (adapted, report, _) = assert_port(
            backend,
            &io,
            &dir,
            (&base, &merged),
            hf::bert::key_map(),
            (6, "Q, K, V × 2 layers"),
            logits,
        );
        assert_eq!(report.saved, ["classifier.weight", "classifier.bias"]);
        // Unloaded, the base model is back, its classifier included.
        let unloaded = adapted.unload_lora().unwrap();
        assert_logits(
            &format!("{backend} unloaded"),
            logits(&unloaded),
            &io.logits("base_logits"),
        );
        // Saved back, the file holds PEFT's keys and values, the classifier's included.
        let out = std::env::temp_dir().join(format!("burn_lora_bert_{}", std::process::id()));
        let saved = burn_lora::peft::save_adapter_with(
            &adapted,
            &out,
            "default",
            &burn_lora::peft::SaveOptions::new().with_key_map(hf::bert::key_map()),
        )
        .unwrap();
        assert_eq!(
            saved.config.modules_to_save,
            Some(vec!["classifier".to_string()])
        );
        let written = std::fs::read(&saved.weights_path).unwrap();
        let original = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
        let (written, original) = (
            SafeTensors::deserialize(&written).unwrap(),
            SafeTensors::deserialize(&original).unwrap(),
        );
        let keys = |file: &SafeTensors| {
            (file.names().into_iter())
                .map(str::to_string)
                .collect::<BTreeSet<String>>()
        };
        assert_eq!(keys(&written), keys(&original));
        for key in keys(&original) {
            let (a, b) = (
                written.tensor(&key).unwrap(),
                original.tensor(&key).unwrap(),
            );
            assert_eq!(a.shape(), b.shape(), "{key}");
            assert_eq!(
                a.data(),
                b.data(),
                "{backend}: {key} round-trips bit for bit"
            );
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// Every module path of the checkpoint maps to a module of the port and back, and every
/// parameter of the port comes from the checkpoint.
fn assert_key_map_complete_and_invertible<M: burn::module::Module>(
    case: &str,
    model: &M,
    key_map: &KeyMap,
) {
    let path = case_dir(case).join("base/model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let checkpoint = SafeTensors::deserialize(&bytes).unwrap();
    let split = |key: &str| {
        let (module, param) = key.rsplit_once('.').unwrap();
        (module.to_string(), param.to_string())
    };
    let port: BTreeSet<String> = param_ids(model).into_keys().collect();
    let port_modules: BTreeSet<String> = port.iter().map(|key| split(key).0).collect();
    let mut mapped = BTreeSet::new();
    for key in checkpoint.names() {
        let (module, _) = split(key);
        let burn = key_map.to_burn(&module);
        assert_eq!(
            key_map.to_peft(&burn),
            module,
            "{case}: `{module}` → `{burn}` → back"
        );
        assert!(
            port_modules.contains(&burn),
            "{case}: `{key}` → `{burn}`: no such module"
        );
        mapped.insert(burn);
    }
    for module in &port_modules {
        assert_eq!(
            &key_map.to_burn(&key_map.to_peft(module)),
            module,
            "{case}: `{module}`"
        );
        assert!(
            mapped.contains(module),
            "{case}: `{module}` is not in the checkpoint"
        );
    }
}

#[test]
fn the_key_maps_are_complete_and_invertible() {
    let device = Device::flex();
    let (llama, _) = hf::llama::load(&case_dir("llama").join("base"), &device).unwrap();
    assert_key_map_complete_and_invertible("llama", &llama, &hf::llama::key_map());
    let (gpt2, _) = hf::gpt2::load(&case_dir("gpt2").join("base"), &device).unwrap();
    assert_key_map_complete_and_invertible("gpt2", &gpt2, &hf::gpt2::key_map());
    let (bert, _) = hf::bert::load(&case_dir("bert").join("base"), &device).unwrap();
    assert_key_map_complete_and_invertible("bert", &bert, &hf::bert::key_map());

    // And the layouts of checkpoints the fixtures do not have.
    let gpt2_bare = hf::gpt2::bare_key_map();
    for module in ["h.3.attn.c_attn", "h.11.mlp.c_proj", "wte", "wpe", "ln_f"] {
        let burn = gpt2_bare.to_burn(module);
        assert_eq!(gpt2_bare.to_peft(&burn), module);
        assert_eq!(
            burn,
            hf::gpt2::key_map().to_burn(&format!("transformer.{module}"))
        );
    }
}

/// The upper 16 bits of the f32 with these `bits`, rounded to nearest, ties to even: bf16.
fn bf16_bits(bits: u32) -> u32 {
    bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16
}

/// Checkpoints on the hub are mostly bf16: loaded into an f32 port, every parameter is f32 and
/// the logits are those of the f32 port whose weights went through bf16.
#[test]
fn a_bf16_checkpoint_loads_into_an_f32_port() {
    use burn::module::{ModuleMapper, ModuleVisitor, Param};
    use burn::tensor::DType;
    let dir = case_dir("llama");
    let out = std::env::temp_dir().join(format!("burn_lora_bf16_{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(dir.join("base/config.json"), out.join("config.json")).unwrap();
    // The fixture's f32 checkpoint, every tensor rounded to bf16 (nearest, ties to even).
    let bytes = std::fs::read(dir.join("base/model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data: Vec<u8> = view
                .data()
                .chunks_exact(4)
                .flat_map(|b| {
                    let bits = u32::from_le_bytes(b.try_into().unwrap());
                    (bf16_bits(bits) as u16).to_le_bytes()
                })
                .collect();
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = converted
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(Dtype::BF16, shape.clone(), data).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();

    struct Dtypes(Vec<DType>);
    impl ModuleVisitor for Dtypes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().dtype());
        }
    }
    struct ThroughBf16;
    impl ModuleMapper for ThroughBf16 {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            // On the host: not every backend casts to bf16 (ndarray does not).
            param.map(|t| {
                let (shape, device) = (t.shape(), t.device());
                let values: Vec<f32> = t
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(|v: f32| f32::from_bits(bf16_bits(v.to_bits()) << 16))
                    .collect();
                Tensor::from_data(TensorData::new(values, shape), &device)
            })
        }
    }
    let io = Io::read("llama");
    for (backend, device) in devices() {
        let input_ids = io.ids("input_ids", &device);
        let (bf16, _) = hf::llama::load(&out, &device).unwrap();
        let mut dtypes = Dtypes(Vec::new());
        bf16.visit(&mut dtypes);
        assert!(
            dtypes.0.iter().all(|dtype| *dtype == DType::F32),
            "{backend}: {:?}",
            dtypes.0
        );
        let (f32_model, _) = hf::llama::load(&dir.join("base"), &device).unwrap();
        let rounded = f32_model.map(&mut ThroughBf16);
        let found = HostTensor::from(bf16.forward(input_ids.clone()));
        let expected = HostTensor::from(rounded.forward(input_ids));
        assert_logits(&format!("{backend} bf16"), found, &expected);
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// A checkpoint saved in shards, as every large model on the hub is, loads through its index:
/// the same model as from one file; a parameter no shard holds, or a shard outside the
/// directory, is an error.
#[test]
fn a_sharded_checkpoint_loads_through_its_index() {
    let dir = case_dir("llama");
    let out = std::env::temp_dir().join(format!("burn_lora_shards_{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(dir.join("base/config.json"), out.join("config.json")).unwrap();
    let bytes = std::fs::read(dir.join("base/model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    names.sort();
    // Two shards, the tensors split alternately, and the index that lists them.
    let mut weight_map = serde_json::Map::new();
    let write_shards =
        |names: &[String], weight_map: &mut serde_json::Map<String, serde_json::Value>| {
            for shard in 0..2 {
                let shard_name = format!("model-{:05}-of-00002.safetensors", shard + 1);
                let views: Vec<(String, safetensors::tensor::TensorView)> = names
                    .iter()
                    .enumerate()
                    .filter(|(index, _)| index % 2 == shard)
                    .map(|(_, name)| {
                        weight_map.insert(name.clone(), shard_name.clone().into());
                        (name.clone(), file.tensor(name).unwrap())
                    })
                    .collect();
                safetensors::serialize_to_file(views, None, &out.join(&shard_name)).unwrap();
            }
        };
    write_shards(&names, &mut weight_map);
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let io = Io::read("llama");
    for (backend, device) in devices() {
        let input_ids = io.ids("input_ids", &device);
        let (sharded, _) = hf::llama::load(&out, &device).unwrap();
        let (single, _) = hf::llama::load(&dir.join("base"), &device).unwrap();
        assert_eq!(
            HostTensor::from(sharded.forward(input_ids.clone())).values,
            HostTensor::from(single.forward(input_ids)).values,
            "{backend}"
        );
    }

    // A tensor that no shard holds.
    let kept: Vec<String> = names
        .iter()
        .filter(|name| name.as_str() != "model.norm.weight")
        .cloned()
        .collect();
    let mut weight_map = serde_json::Map::new();
    write_shards(&kept, &mut weight_map);
    let index = serde_json::json!({ "weight_map": weight_map });
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let error = hf::llama::load(&out, &Device::flex()).unwrap_err();
    assert!(
        error.contains("`norm.gamma` is not in the checkpoint"),
        "{error}"
    );
    // A failed load leaves the model as it was, bit for bit (its random init, here: the first
    // shard holds real values for half the parameters).
    let device = Device::flex();
    let (_, config) = hf::llama::load(&dir.join("base"), &device).unwrap();
    let mut model = config.init(&device).unwrap();
    let before = common::raw_data(&model);
    let error = hf::llama::checkpoint(&config)
        .load_dir(&out, &mut model)
        .unwrap_err();
    assert!(
        matches!(error, burn_lora::LoraError::CheckpointMismatch { .. }),
        "{error:?}"
    );
    assert_eq!(common::raw_data(&model), before);

    // An index that points outside its directory.
    let index =
        serde_json::json!({ "weight_map": { "lm_head.weight": "../elsewhere.safetensors" } });
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let error = hf::llama::load(&out, &Device::flex()).unwrap_err();
    assert!(error.contains("not in the directory"), "{error}");
    let _ = std::fs::remove_dir_all(&out);
}
