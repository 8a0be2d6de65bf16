//! The study's results: the quality bars, and the markdown table.

use std::fmt::Write;

use super::preset::Preset;
use super::variant::{RunResult, Variant};

/// Everything the study measured.
pub struct Study {
    pub preset: Preset,
    pub seed: u64,
    pub command: String,
    pub machine: String,
    pub backend: String,
    pub wall_seconds: f64,
    pub pretrain_seconds: f64,
    pub base_params: usize,
    /// Task A's validation loss at the end of pretraining.
    pub pretrain_loss: f64,
    /// Base, full fine-tuning, LoRA Q,V r=8 and LoRA Q,K,V,O r=8, in that order.
    pub comparison: Vec<(Variant, RunResult)>,
    /// LoRA Q,V at each rank of the sweep.
    pub sweep: Vec<(usize, RunResult)>,
    /// LoRA Q,K,V,O r=8 run a second time, in a fresh process.
    pub repeat: RunResult,
}

/// One quality bar and how it went.
pub struct Bar {
    pub name: String,
    /// `None` when it could not be measured here.
    pub passed: Option<bool>,
    pub detail: String,
}

impl Study {
    pub fn result(&self, variant: Variant) -> &RunResult {
        &self
            .comparison
            .iter()
            .find(|(v, _)| *v == variant)
            .expect("the comparison runs every variant")
            .1
    }

    /// The share of full fine-tuning's ROUGE-1 gain over the base that `variant` recovers.
    pub fn recovered(&self, variant: Variant) -> f64 {
        let base = self.result(Variant::Base).rouge1;
        let full = self.result(Variant::Full).rouge1;
        (self.result(variant).rouge1 - base) / (full - base)
    }

    pub fn bars(&self) -> Vec<Bar> {
        let full = self.result(Variant::Full);
        let qkvo = self.result(Variant::LoraQkvo(8));
        let qv = self.result(Variant::LoraQv(8));
        let recovered = self.recovered(Variant::LoraQkvo(8));
        let share = percent(qkvo.trainable_params, qkvo.total_params);
        let mut bars = vec![Bar {
            name: "LoRA Q,K,V,O r=8 recovers ≥ 85% of full fine-tuning's ROUGE-1 gain with < 3% \
                   of the parameters trainable"
                .into(),
            passed: Some(recovered >= 0.85 && share < 3.0),
            detail: format!(
                "{:.1}% of the gain ({:+.3} vs {:+.3}), {share:.2}% trainable",
                100.0 * recovered,
                qkvo.rouge1 - self.result(Variant::Base).rouge1,
                full.rouge1 - self.result(Variant::Base).rouge1,
            ),
        }];
        let step = [qv, qkvo].iter().all(|r| r.step_ms < full.step_ms);
        bars.push(Bar {
            name: "LoRA's training step is faster than full fine-tuning's".into(),
            passed: Some(step),
            detail: format!(
                "median step: full {:.1} ms, Q,V r=8 {:.1} ms ({:.2}×), Q,K,V,O r=8 {:.1} ms ({:.2}×)",
                full.step_ms,
                qv.step_ms,
                qv.step_ms / full.step_ms,
                qkvo.step_ms,
                qkvo.step_ms / full.step_ms
            ),
        });
        let memory = match (full.peak_rss_mib, qv.peak_rss_mib, qkvo.peak_rss_mib) {
            (Some(f), Some(a), Some(b)) => Bar {
                name: "LoRA's peak memory while training is lower than full fine-tuning's".into(),
                passed: Some(a < f && b < f),
                detail: format!(
                    "peak RSS: full {f:.1} MiB, Q,V r=8 {a:.1} MiB, Q,K,V,O r=8 {b:.1} MiB"
                ),
            },
            _ => Bar {
                name: "LoRA's peak memory while training is lower than full fine-tuning's".into(),
                passed: None,
                detail: "peak RSS cannot be measured on this system (Linux's /proc only)".into(),
            },
        };
        bars.push(memory);
        bars.push(Bar {
            name: "deterministic: a rerun in a fresh process gives the same numbers".into(),
            passed: Some(self.repeat.outcome() == qkvo.outcome()),
            detail: format!(
                "LoRA Q,K,V,O r=8 twice: ROUGE-1 {:.6} and {:.6}, final validation loss {:.6} and \
                 {:.6}, generations digest {:016x} and {:016x}",
                qkvo.rouge1,
                self.repeat.rouge1,
                qkvo.final_val_loss(),
                self.repeat.final_val_loss(),
                qkvo.generations_digest,
                self.repeat.generations_digest,
            ),
        });
        bars
    }

    pub fn markdown(&self, bars: &[Bar]) -> String {
        let p = &self.preset;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Fine-tuning study: base vs full fine-tuning vs LoRA\n"
        );
        let _ = writeln!(
            md,
            "Produced by `{}` on {} ({} backend), in {:.0} s. Seed {}; the `{}` preset.\n",
            self.command, self.machine, self.backend, self.wall_seconds, self.seed, p.name
        );
        let _ = writeln!(
            md,
            "A decoder-only transformer ({} layer{}, d_model {}, {} heads, {} parameters) is \
             pretrained for {} steps on task A (language modelling on dialogues and on unrelated \
             summary-style sentences; final validation loss {:.3}, {:.0} s), then adapted to task \
             B (summarising a dialogue in one line) with the same budget for every variant: {} \
             steps of {} sequences, AdamW with warmup and cosine decay, peak learning rate {} for \
             full fine-tuning and {} for LoRA (alpha 16), each the best of a small grid \
             (docs/finetune_study.md). ROUGE-1 F1 is the mean over {} held-out \
             dialogues, summarised greedily.\n",
            p.n_layers,
            if p.n_layers == 1 { "" } else { "s" },
            p.d_model,
            p.n_heads,
            self.base_params,
            p.pretrain_steps,
            self.pretrain_loss,
            self.pretrain_seconds,
            p.finetune_steps,
            p.batch,
            p.full_lr,
            p.lora_lr,
            p.test_examples,
        );
        let _ = writeln!(md, "## Base vs full fine-tuning vs LoRA\n");
        let _ = writeln!(
            md,
            "| variant | ROUGE-1 F1 (P / R) | gain | share of full FT's gain | trainable params | trainable % \
             | final val loss | train time (s) | step (ms) | peak RSS training (MiB) | saved size |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
        let base = self.result(Variant::Base).rouge1;
        for (variant, r) in &self.comparison {
            let trained = *variant != Variant::Base;
            let _ = writeln!(
                md,
                "| {} | {:.3} ({:.2} / {:.2}) | {} | {} | {} | {:.2}% | {:.3} | {} | {} | {} | {} |",
                variant.label(),
                r.rouge1,
                r.rouge1_precision,
                r.rouge1_recall,
                if trained {
                    format!("{:+.3}", r.rouge1 - base)
                } else {
                    "—".into()
                },
                if trained {
                    format!("{:.1}%", 100.0 * self.recovered(*variant))
                } else {
                    "—".into()
                },
                r.trainable_params,
                percent(r.trainable_params, r.total_params),
                r.final_val_loss(),
                if trained {
                    format!("{:.1}", r.train_seconds)
                } else {
                    "—".into()
                },
                if trained {
                    format!("{:.1}", r.step_ms)
                } else {
                    "—".into()
                },
                r.peak_rss_mib.map_or("—".into(), |m| format!("{m:.1}")),
                size(r.disk_bytes),
            );
        }
        let _ = writeln!(
            md,
            "\nSaved size: the whole model (Burn's burnpack file) for the base and full \
             fine-tuning; PEFT's `adapter_model.safetensors` + `adapter_config.json` for LoRA. Peak \
             RSS is the process's resident-set peak over the training loop, each variant in a \
             process of its own.\n"
        );
        let _ = writeln!(md, "## Rank sweep: LoRA on Q,V\n");
        let _ = writeln!(
            md,
            "| rank | scale | trainable params | trainable % | final val loss | ROUGE-1 |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for (rank, r) in &self.sweep {
            let _ = writeln!(
                md,
                "| {rank} | {:.3} | {} | {:.2}% | {:.4} | {:.3} |",
                super::variant::LORA_ALPHA / *rank as f64,
                r.trainable_params,
                percent(r.trainable_params, r.total_params),
                r.final_val_loss(),
                r.rouge1
            );
        }
        let _ = writeln!(md, "\n## Quality bars\n");
        for bar in bars {
            let mark = match bar.passed {
                Some(true) => "pass",
                Some(false) => "**MISSED**",
                None => "not checked",
            };
            let _ = writeln!(md, "- {mark}: {} — {}", bar.name, bar.detail);
        }
        let _ = writeln!(md, "\n## Sample summaries (held-out dialogues)\n");
        for (i, (reference, _)) in self.result(Variant::Base).samples.iter().enumerate() {
            let _ = writeln!(md, "- reference: `{reference}`");
            for (variant, r) in &self.comparison {
                if let Some((_, generated)) = r.samples.get(i) {
                    let _ = writeln!(md, "  - {}: `{generated}`", variant.label());
                }
            }
        }
        let _ = writeln!(
            md,
            "\n![validation loss and rank sweep](finetune_study.png)"
        );
        md
    }
}

pub fn percent(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}
