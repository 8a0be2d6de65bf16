//! The model of `tests/fixtures/gen_peft.py`, ported to Burn under Burn-style names, and the
//! fixture files it reads and writes.
//!
//! PyTorch (file)                     Burn (model)
//! `layers.i.self_attn.{q,k,v,o}_proj`  `blocks.i.attn.{query,key,value,out}` (LoraLinear)
//! `layers.i.mlp.{up,down}_proj`        `blocks.i.ff.{up,down}` (plain Linear: dense path)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn_lora::LoraLinear;
use burn_lora::peft::KeyMap;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

#[derive(Module, Debug)]
pub struct Attention {
    pub query: LoraLinear,
    pub key: LoraLinear,
    pub value: LoraLinear,
    pub out: LoraLinear,
}

#[derive(Module, Debug)]
pub struct FeedForward {
    pub up: Linear,
    pub down: Linear,
}

#[derive(Module, Debug)]
pub struct Block {
    pub attn: Attention,
    pub ff: FeedForward,
}

#[derive(Module, Debug)]
pub struct FixtureModel {
    pub blocks: Vec<Block>,
}

impl FixtureModel {
    /// `h = relu(q(x)) + k(x)·v(x)`, `x += o(h)`, `x += down(relu(up(x)))` per block.
    pub fn forward(&self, mut x: Tensor<3>) -> Tensor<3> {
        for block in &self.blocks {
            let a = &block.attn;
            let h = burn::tensor::activation::relu(a.query.forward(x.clone()))
                + a.key.forward(x.clone()) * a.value.forward(x.clone());
            x = x.clone() + a.out.forward(h);
            let up = burn::tensor::activation::relu(block.ff.up.forward(x.clone()));
            x = x.clone() + block.ff.down.forward(up);
        }
        x
    }

    /// The base model from a PyTorch state dict (`[out, in]` weights, transposed here).
    pub fn from_state_dict(
        tensors: &BTreeMap<String, Tensor<2>>,
        biases: &BTreeMap<String, Tensor<1>>,
        layers: usize,
    ) -> Self {
        let linear = |name: String| Linear {
            weight: Param::from_tensor(tensors[&format!("{name}.weight")].clone().transpose()),
            bias: biases
                .get(&format!("{name}.bias"))
                .cloned()
                .map(Param::from_tensor),
        };
        let blocks = (0..layers)
            .map(|i| {
                let attn = |p: &str| LoraLinear::from(linear(format!("layers.{i}.self_attn.{p}")));
                Block {
                    attn: Attention {
                        query: attn("q_proj"),
                        key: attn("k_proj"),
                        value: attn("v_proj"),
                        out: attn("o_proj"),
                    },
                    ff: FeedForward {
                        up: linear(format!("layers.{i}.mlp.up_proj")),
                        down: linear(format!("layers.{i}.mlp.down_proj")),
                    },
                }
            })
            .collect();
        Self { blocks }
    }
}

/// Hugging Face names in the files ↔ Burn names in [`FixtureModel`].
pub fn key_map() -> KeyMap {
    KeyMap::new()
        .rename("layers", "blocks")
        .rename("self_attn", "attn")
        .rename("q_proj", "query")
        .rename("k_proj", "key")
        .rename("v_proj", "value")
        .rename("o_proj", "out")
        .rename("mlp", "ff")
        .rename("up_proj", "up")
        .rename("down_proj", "down")
}

pub fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft")
        .join(case)
}

/// A case of `tests/fixtures/gen_peft_variants.py`.
pub fn variant_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft_variants")
        .join(case)
}

/// A safetensors file as `name → (shape, f32 values)`. Integer tensors (token ids, which the
/// fixtures also store as f32) are left out.
pub fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = SafeTensors::deserialize(&bytes).expect("valid fixture");
    tensors
        .iter()
        .filter(|(_, view)| view.dtype() != Dtype::I64)
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name.to_string(), (view.shape().to_vec(), values))
        })
        .collect()
}

/// Write f32 tensors to a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    std::fs::write(path, safetensors_bytes(tensors)).unwrap();
}

/// f32 tensors as safetensors bytes.
pub fn safetensors_bytes(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap();
            (name.to_string(), view)
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// One fixture case: its base model on `device`, the input and PEFT's three outputs.
pub struct Case {
    pub model: FixtureModel,
    pub input: Tensor<3>,
    pub base_output: Tensor<3>,
    pub lora_output: Tensor<3>,
    pub merged_output: Tensor<3>,
    pub layers: usize,
    pub bias: bool,
}

pub fn load_case(case: &str, device: &Device) -> Case {
    load_case_from(&fixture_dir(case), device)
}

/// [`load_case`] for a case directory anywhere.
pub fn load_case_from(dir: &Path, device: &Device) -> Case {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let layers = meta["n_layers"].as_u64().unwrap() as usize;
    let bias = meta["bias"].as_bool().unwrap();
    let base = read_safetensors(&dir.join("base.safetensors"));
    let mut weights = BTreeMap::new();
    let mut biases = BTreeMap::new();
    for (name, (shape, values)) in base {
        let data = TensorData::new(values, shape.clone());
        match shape.len() {
            2 => {
                weights.insert(name, Tensor::<2>::from_data(data, device));
            }
            _ => {
                biases.insert(name, Tensor::<1>::from_data(data, device));
            }
        }
    }
    let io = read_safetensors(&dir.join("io.safetensors"));
    let tensor = |name: &str| {
        let (shape, values) = io[name].clone();
        Tensor::<3>::from_data(TensorData::new(values, shape), device)
    };
    Case {
        model: FixtureModel::from_state_dict(&weights, &biases, layers),
        input: tensor("input"),
        base_output: tensor("base_output"),
        lora_output: tensor("lora_output"),
        merged_output: tensor("merged_output"),
        layers,
        bias,
    }
}

/// `max |a - b|`.
pub fn max_abs_diff(a: Tensor<3>, b: Tensor<3>) -> f64 {
    (a - b).abs().max().into_scalar::<f64>()
}
