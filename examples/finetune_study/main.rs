//! Prove it learns: a reproducible fine-tuning study of burn-lora.
//!
//! A small decoder-only transformer is pretrained here, from a fixed seed, on task A (language
//! modelling on template-generated dialogues and summary-style sentences). It is then adapted
//! to task B, summarising a dialogue in one line, four ways with the same budget: not at all,
//! full fine-tuning, LoRA on Q,V at rank 8, and LoRA on Q,K,V,O at rank 8. A sweep of LoRA Q,V
//! over ranks 1 to 64 follows. Every run trains under burn-train's `Learner`, once per
//! fine-tuning seed (3 by default: the tables give mean ± standard deviation), and each is a
//! process of its own, so its peak memory is its own.
//!
//! ```sh
//! cargo run --release --example finetune_study            # 16-19 minutes on 2 cores
//! cargo run --release --example finetune_study -- --quick # under 2 minutes
//! ```
//!
//! Writes `docs/results/finetune_study.md` (the tables, also printed) and
//! `docs/results/finetune_study.png` (validation loss per variant, ROUGE-1 and loss against
//! rank), and exits non-zero when a quality bar is missed.

mod study;

fn main() -> std::process::ExitCode {
    study::main(std::env::args().collect())
}
