//! Hugging Face → Burn → Hugging Face, for the Llama, GPT-2, BERT and Mixtral fixtures.
//!
//! ```sh
//! cargo run --release --example hf_round_trip -- OUT
//! python tests/fixtures/gen_hf_models.py --verify llama OUT/llama/merged   # and so on
//! ```
//!
//! For each case of `tests/fixtures/hf`, the base checkpoint is loaded into its reference port
//! (`examples/hf`) and PEFT's adapter onto it, then burn-lora writes:
//!
//! - `OUT/<case>/merged/`: the adapter merged and unloaded, as a checkpoint in Hugging Face's
//!   names and layouts (`model.safetensors` and the base's `config.json`), which transformers'
//!   `from_pretrained` must load and run to PEFT's merged logits;
//! - `OUT/<case>/adapter/`: the adapter saved back in PEFT's format, with the logits the port
//!   gives with it on the fixture's input (`expected_logits.safetensors`), which PEFT must
//!   reproduce.
//!
//! The verify mode of `tests/fixtures/gen_hf_models.py` checks both in PyTorch;
//! `docs/results/hf_round_trip.md` holds a run.

#[allow(dead_code)] // the round trip uses a part of each port
#[path = "hf/mod.rs"]
mod hf;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use burn_lora::LoraModule;
use burn_lora::peft::{KeyMap, LoadOptions, SaveOptions, load_adapter_with, save_adapter_with};
use burn_lora::store::HfCheckpoint;
use safetensors::{Dtype, SafeTensors};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let out: PathBuf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/hf_round_trip".into())
        .into();
    let device = Device::default();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");

    let case = fixtures.join("llama");
    let io = Io::read(&case)?;
    let ids = io.ids("input_ids", &device)?;
    let (base, config) = hf::llama::load(&case.join("base"), &device)?;
    round_trip(
        "llama",
        &case,
        &out,
        base,
        hf::llama::key_map(),
        hf::llama::checkpoint(&config),
        |model| model.forward(ids.clone()),
    )?;

    let case = fixtures.join("gpt2");
    let io = Io::read(&case)?;
    let ids = io.ids("input_ids", &device)?;
    let (base, config) = hf::gpt2::load(&case.join("base"), &device)?;
    let keys = vec!["transformer.wte.weight".to_string()];
    round_trip(
        "gpt2",
        &case,
        &out,
        base,
        hf::gpt2::key_map(),
        hf::gpt2::checkpoint(&config, &keys),
        |model| model.forward(ids.clone()),
    )?;

    let case = fixtures.join("bert");
    let io = Io::read(&case)?;
    let [ids, types, mask] = [
        io.ids("input_ids", &device)?,
        io.ids("token_type_ids", &device)?,
        io.ids("attention_mask", &device)?,
    ];
    let (base, _) = hf::bert::load(&case.join("base"), &device)?;
    round_trip(
        "bert",
        &case,
        &out,
        base,
        hf::bert::key_map(),
        hf::bert::checkpoint(),
        |model| model.forward(ids.clone(), types.clone(), mask.clone()),
    )?;

    // Mixtral's adapter also has target_parameters: LoRA on the expert banks.
    let case = fixtures.join("mixtral");
    let io = Io::read(&case)?;
    let ids = io.ids("input_ids", &device)?;
    let (base, config) = hf::mixtral::load(&case.join("base"), &device)?;
    round_trip(
        "mixtral",
        &case,
        &out,
        base,
        hf::mixtral::key_map(),
        hf::mixtral::checkpoint(&config),
        |model| model.forward(ids.clone()),
    )?;
    Ok(())
}

/// Loads the case's PEFT adapter onto `base`, and writes the merged checkpoint and the adapter
/// saved back, each with what PyTorch must reproduce.
fn round_trip<M: burn::module::Module, const D: usize>(
    name: &str,
    case: &Path,
    out: &Path,
    base: M,
    key_map: KeyMap,
    checkpoint: HfCheckpoint,
    forward: impl Fn(&M) -> Tensor<D>,
) -> Result<(), Error> {
    let options = LoadOptions::new().with_key_map(key_map.clone());
    let (adapted, report) = load_adapter_with(&base, case.join("adapter"), "default", &options)?;
    println!("{name}: {report}");

    let merged_dir = out.join(name).join("merged");
    std::fs::create_dir_all(&merged_dir)?;
    std::fs::copy(
        case.join("base/config.json"),
        merged_dir.join("config.json"),
    )?;
    let merged = adapted.merge_and_unload_lora()?;
    checkpoint.save(&merged, merged_dir.join("model.safetensors"))?;

    let adapter_dir = out.join(name).join("adapter");
    let saved = save_adapter_with(
        &adapted,
        &adapter_dir,
        "default",
        &SaveOptions::new().with_key_map(key_map),
    )?;
    write_logits(
        &adapter_dir.join("expected_logits.safetensors"),
        forward(&adapted),
    )?;
    println!(
        "  wrote {} (merged checkpoint) and {} ({} modules{})\n",
        merged_dir.display(),
        adapter_dir.display(),
        saved.modules,
        match &saved.config.modules_to_save {
            Some(modules) => format!(", modules_to_save {modules:?}"),
            None => String::new(),
        }
    );
    Ok(())
}

/// `logits` as the `logits` tensor of a safetensors file.
fn write_logits<const D: usize>(path: &Path, logits: Tensor<D>) -> Result<(), Error> {
    let shape = logits.dims().to_vec();
    let values: Vec<f32> = logits.into_data().convert::<f32>().try_into_vec()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F32, shape, &bytes)?;
    safetensors::serialize_to_file(vec![("logits", view)], None, path)?;
    Ok(())
}

/// The inputs transformers recorded for a case.
struct Io {
    bytes: Vec<u8>,
}

impl Io {
    fn read(case: &Path) -> Result<Self, Error> {
        Ok(Self {
            bytes: std::fs::read(case.join("io.safetensors"))?,
        })
    }

    fn ids(&self, name: &str, device: &Device) -> Result<Tensor<2, Int>, Error> {
        let file = SafeTensors::deserialize(&self.bytes)?;
        let view = file.tensor(name)?;
        let values: Vec<i64> = view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        Ok(Tensor::from_data(
            TensorData::new(values, view.shape().to_vec()),
            device,
        ))
    }
}
