//! Peak memory of one variant of the transformer block stack, in a process of its own.
//!
//! ```sh
//! python3 benches/peak_memory.py          # every variant, one process each, with ratios
//! cargo run --release --example peak_memory -- lora_train
//! ```
//!
//! Variants: `full_finetune_train`, `lora_train`, `burn_apply_lora_train`, `dora_train`,
//! `qlora_train`, `qlora4_train` (5 AdamW steps each), `plain_forward`, `merged_forward`,
//! `unmerged_forward`, `burn_apply_lora_forward`, `qlora_forward`, `qlora4_forward` (5 forwards
//! each). QLoRA's bases are 8-bit (`qlora`) and 4-bit (`qlora4`). Prints the process's peak resident set (`VmHWM`, Linux) in MiB.

#[path = "../benches/support/stack.rs"]
mod stack;

use burn::prelude::*;
use stack::Encoder;

const STEPS: usize = 5;

fn forward<M: Encoder>(model: M, x: &Tensor<3>) {
    for _ in 0..STEPS {
        let output = model.encode(x.clone());
        std::hint::black_box(output.into_data());
    }
}

/// The process's peak resident set in MiB, from `/proc/self/status`.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    let variant = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "lora_train".into());
    let inference = Device::default();
    let training = Device::default().autodiff();
    inference.seed(0);
    training.seed(0);
    match variant.as_str() {
        "full_finetune_train" => {
            let x = stack::input(&training);
            stack::train(stack::plain(&training), &x, STEPS);
        }
        "lora_train" => {
            let x = stack::input(&training);
            stack::train(stack::lora(&training), &x, STEPS);
        }
        "burn_apply_lora_train" => {
            let x = stack::input(&training);
            stack::train(stack::burn_apply_lora(&training), &x, STEPS);
        }
        "dora_train" => {
            let x = stack::input(&training);
            stack::train(stack::dora(&training), &x, STEPS);
        }
        "qlora_train" => {
            let x = stack::input(&training);
            stack::train(stack::qlora(&training), &x, STEPS);
        }
        "qlora4_train" => {
            let x = stack::input(&training);
            stack::train(stack::qlora4(&training), &x, STEPS);
        }
        "qlora_forward" => forward(stack::qlora(&inference), &stack::input(&inference)),
        "qlora4_forward" => forward(stack::qlora4(&inference), &stack::input(&inference)),
        "plain_forward" => forward(stack::plain(&inference), &stack::input(&inference)),
        "merged_forward" => forward(stack::merged(&inference), &stack::input(&inference)),
        "unmerged_forward" => forward(stack::lora(&inference), &stack::input(&inference)),
        "burn_apply_lora_forward" => forward(
            stack::burn_apply_lora(&inference),
            &stack::input(&inference),
        ),
        other => {
            eprintln!("unknown variant `{other}`");
            std::process::exit(2);
        }
    }
    match peak_rss_mib() {
        Some(mib) => println!("{variant} peak_rss_mib {mib:.1}"),
        None => println!("{variant} peak_rss_mib unavailable"),
    }
}
