//! How long PiSSA and OLoRA take to initialize an adapter on one square weight, and how exactly
//! the init keeps the model: `W_residual + s·A·B` against the original `W`.
//!
//! ```sh
//! cargo run --release --example init_timing                 # 1024 and 4096, rank 16
//! cargo run --release --example init_timing -- 1024 2048    # other sizes
//! ```
//!
//! Prints a Markdown table (CPU model first), as recorded in `docs/variants.md`.

use std::time::Instant;

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn_lora::{LoraConfig, LoraInit, LoraModule, Targets};

const RANK: usize = 16;

fn main() -> Result<(), burn_lora::LoraError> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|arg| arg.parse().expect("sizes are integers"))
        .collect();
    let sizes = match sizes.is_empty() {
        true => vec![1024, 4096],
        false => sizes,
    };
    let device = Device::default();
    println!("CPU: {}", cpu_model());
    println!(
        "threads: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("| weight | init | rank | time (s) | max abs(W' - W) |");
    println!("|---|---|---:|---:|---:|");
    for &d in &sizes {
        device.seed(0);
        let linear: Linear = LinearConfig::new(d, d).init(&device);
        let original = linear.weight.val();
        for init in [LoraInit::Pissa, LoraInit::PissaNiter(4), LoraInit::Olora] {
            let config = LoraConfig::new(RANK)
                .with_init(init)
                .with_targets(Targets::all_linear());
            let start = Instant::now();
            let (adapted, _) = config.apply_with_progress(linear.clone(), &mut |step| {
                eprintln!(
                    "  {d}² {}: layer {}/{} initialized",
                    init.peft_name(),
                    step.done,
                    step.total
                );
            })?;
            let seconds = start.elapsed().as_secs_f64();
            // Merging the untrained adapter back gives the original weight, up to rounding.
            let merged = adapted.merge_and_unload_lora()?;
            let error = (merged.weight.val() - original.clone())
                .abs()
                .max()
                .into_scalar::<f32>();
            println!(
                "| {d}×{d} | {} | {RANK} | {seconds:.2} | {error:.1e} |",
                init.peft_name()
            );
        }
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
