//! A Hugging Face Llama checkpoint in Burn, with a PEFT adapter on it, and back.
//!
//! ```sh
//! cargo run --release --example llama_peft
//! cargo run --release --example llama_peft -- --model DIR --adapter DIR --merge-out OUT
//! cargo run --release --example llama_peft -- --train-out OUT
//! ```
//!
//! 1. Loads `model.safetensors` and `config.json` from `--model` (a `save_pretrained`
//!    directory of `LlamaForCausalLM`; the tiny test fixture by default) into the reference
//!    port of `examples/hf/llama.rs`, through `burn::store` and burn-lora's key map.
//! 2. Prints the plan of the PEFT adapter in `--adapter` (its `adapter_config.json` read as a
//!    `LoraConfig` would target the port), loads it strictly and prints the load report.
//! 3. Generates greedily from a prompt with the base model and with the adapter.
//! 4. With `--merge-out OUT`: merges the adapter and writes a checkpoint transformers loads
//!    (`model.safetensors` in Hugging Face's names and layouts, and the `config.json`).
//! 5. With `--train-out OUT`: trains a new adapter in Burn on Q, K, V and O for a few steps,
//!    saves it in PEFT's format, and writes the logits it gives on the fixture's input beside
//!    it (`expected_logits.safetensors`), for `tests/fixtures/gen_hf_models.py --verify llama
//!    OUT` to check in PyTorch.

#[allow(dead_code)] // the example uses the Llama port only
#[path = "hf/mod.rs"]
mod hf;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn_lora::peft::{LoadOptions, PeftAdapter, SaveOptions, save_adapter_with};
use burn_lora::{LoraConfig, LoraModule, Targets};
use hf::llama::{LlamaForCausalLM, load};

const FIXTURE: &str = "tests/fixtures/hf/llama";

struct Args {
    model: PathBuf,
    adapter: PathBuf,
    merge_out: Option<PathBuf>,
    train_out: Option<PathBuf>,
    prompt: Vec<i64>,
    new_tokens: usize,
}

fn parse_args() -> Result<Args, String> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    let mut args = Args {
        model: fixture.join("base"),
        adapter: fixture.join("adapter"),
        merge_out: None,
        train_out: None,
        prompt: vec![1, 7, 21, 3],
        new_tokens: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?.into(),
            "--adapter" => args.adapter = value()?.into(),
            "--merge-out" => args.merge_out = Some(value()?.into()),
            "--train-out" => args.train_out = Some(value()?.into()),
            "--prompt" => {
                args.prompt = value()?
                    .split(',')
                    .map(|id| id.trim().parse().map_err(|e| format!("--prompt: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--new-tokens" => {
                args.new_tokens = value()?.parse().map_err(|e| format!("--new-tokens: {e}"))?
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

/// Greedy decoding: the most likely next token, `new_tokens` times, recomputing the whole
/// sequence each step (a tiny model needs no cache).
fn generate(
    model: &LlamaForCausalLM,
    prompt: &[i64],
    new_tokens: usize,
    device: &Device,
) -> Vec<i64> {
    let mut tokens = prompt.to_vec();
    for _ in 0..new_tokens {
        let input =
            Tensor::<2, Int>::from_data(TensorData::new(tokens.clone(), [1, tokens.len()]), device);
        let logits = model.forward(input);
        let [_, seq, vocab] = logits.dims();
        let last = logits
            .slice([0..1, seq - 1..seq, 0..vocab])
            .reshape([vocab]);
        tokens.push(last.argmax(0).into_scalar::<i64>());
    }
    tokens
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // Autodiff on, for `--train-out`; inference runs the same way.
    let device = Device::default().autodiff();
    device.seed(0);

    let start = Instant::now();
    let (base, config) = load(&args.model, &device)?;
    let loaded_base = start.elapsed();
    println!(
        "loaded {} ({} layers, d_model {}, {} query / {} key-value heads) in {:.1} ms",
        args.model.display(),
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config
            .num_key_value_heads
            .unwrap_or(config.num_attention_heads),
        loaded_base.as_secs_f64() * 1e3
    );

    // The adapter's own config, as burn-lora reads it, and what it selects in the port.
    let start = Instant::now();
    let peft = PeftAdapter::read(&args.adapter)?;
    let file_config = peft.config();
    println!(
        "\nadapter {}: r = {}, lora_alpha = {}, target_modules = {:?}",
        args.adapter.display(),
        file_config.r,
        file_config.lora_alpha,
        file_config.target_modules
    );
    let options = LoadOptions::new().with_key_map(hf::llama::key_map());
    let (adapted, report) = peft.load_into(&base, "default", &options)?;
    let loaded_adapter = start.elapsed();
    println!("{report}");
    println!(
        "checkpoint + adapter loaded in {:.1} ms ({:.1} ms for the adapter)",
        (loaded_base + loaded_adapter).as_secs_f64() * 1e3,
        loaded_adapter.as_secs_f64() * 1e3
    );

    println!("\ngreedy generation from {:?}:", args.prompt);
    let base_tokens = generate(&base, &args.prompt, args.new_tokens, &device);
    let adapted_tokens = generate(&adapted, &args.prompt, args.new_tokens, &device);
    println!("  base:         {base_tokens:?}");
    println!("  with adapter: {adapted_tokens:?}");

    if let Some(out) = &args.merge_out {
        let merged = adapted.merge_and_unload_lora()?;
        std::fs::create_dir_all(out)?;
        std::fs::copy(args.model.join("config.json"), out.join("config.json"))?;
        hf::llama::checkpoint(&config).save(&merged, out.join("model.safetensors"))?;
        println!(
            "\nmerged checkpoint written to {} (load it with transformers' from_pretrained)",
            out.display()
        );
    }

    if let Some(out) = &args.train_out {
        train_and_save(base, out, &device)?;
    }
    Ok(())
}

/// A new adapter on Q, K, V and O, trained in Burn to continue a fixed token pattern, saved in
/// PEFT's format with the logits it gives on the fixture's input.
fn train_and_save(
    base: LlamaForCausalLM,
    out: &Path,
    device: &Device,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = LoraConfig::new(4)
        .with_alpha(Some(8.0))
        .with_targets(Targets::attention());
    println!("\ntraining a new adapter in Burn:\n{}", config.plan(&base)?);
    let (mut model, _) = config.apply(base)?;

    // Sequences that count up modulo the vocabulary: a pattern the random base does not know.
    let vocab = model.embed_tokens.weight.dims()[0] as i64;
    let sequences: Vec<i64> = (0..8)
        .flat_map(|start| (0..12).map(move |i| (start * 5 + i) % vocab))
        .collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(sequences, [8, 12]), device);
    let inputs = tokens.clone().slice([0..8, 0..11]);
    let targets = tokens.slice([0..8, 1..12]).reshape([8 * 11]);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.0).init();
    for step in 0..30 {
        let logits = model
            .forward(inputs.clone())
            .reshape([8 * 11, vocab as usize]);
        let loss = loss_fn.forward(logits, targets.clone());
        if step % 10 == 0 || step == 29 {
            println!(
                "  step {step:>2}: loss {:.4}",
                loss.clone().into_scalar::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(5e-3, model, grads);
    }

    let options = SaveOptions::new()
        .with_key_map(hf::llama::key_map())
        .with_task_type("CAUSAL_LM");
    let saved = save_adapter_with(&model, out, "default", &options)?;
    // The logits PEFT must reproduce, on the fixture's input.
    let io = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(FIXTURE)
            .join("io.safetensors"),
    )?;
    let io = safetensors::SafeTensors::deserialize(&io)?;
    let ids = io.tensor("input_ids")?;
    let shape = ids.shape().to_vec();
    let ids_values: Vec<i64> = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    let input =
        Tensor::<2, Int>::from_data(TensorData::new(ids_values.clone(), shape.clone()), device);
    let logits = model.valid().forward(input.inner());
    let logits_shape = logits.dims().to_vec();
    let logits: Vec<f32> = logits.into_data().convert::<f32>().try_into_vec()?;
    let ids_bytes: Vec<u8> = ids_values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "input_ids",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, shape, &ids_bytes)?,
        ),
        (
            "logits",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                logits_shape,
                &logit_bytes,
            )?,
        ),
    ];
    safetensors::serialize_to_file(views, None, &out.join("expected_logits.safetensors"))?;
    println!(
        "adapter saved to {} ({} modules, {} bytes) with its logits on the fixture input:\n  \
         python tests/fixtures/gen_hf_models.py --verify llama {}",
        out.display(),
        saved.modules,
        saved.weights_bytes,
        out.display()
    );
    Ok(())
}
