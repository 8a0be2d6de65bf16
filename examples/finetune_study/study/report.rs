//! The study's results: the quality bars, and the markdown table.

use std::fmt::Write;

use super::preset::Preset;
use super::variant::{RunResult, Variant};

/// Everything the study measured.
pub struct Study {
    pub preset: Preset,
    pub seed: u64,
    /// The fine-tuning seeds every trained variant ran with.
    pub seeds: Vec<u64>,
    pub command: String,
    pub machine: String,
    pub backend: String,
    pub wall_seconds: f64,
    pub pretrain_seconds: f64,
    pub base_params: usize,
    /// Task A's validation loss at the end of pretraining.
    pub pretrain_loss: f64,
    /// Base, full fine-tuning, LoRA Q,V r=8 and LoRA Q,K,V,O r=8, in that order, with one
    /// result per fine-tuning seed (the base, which trains nothing, has one).
    pub comparison: Vec<(Variant, Vec<RunResult>)>,
    /// LoRA Q,V at each rank of the sweep, one result per seed.
    pub sweep: Vec<(usize, Vec<RunResult>)>,
    /// LoRA Q,K,V,O r=8 with the first seed, run a second time in a fresh process.
    pub repeat: RunResult,
}

/// One quality bar and how it went.
pub struct Bar {
    pub name: String,
    /// `None` when it could not be measured here.
    pub passed: Option<bool>,
    pub detail: String,
}

/// The mean and the sample standard deviation (0 for a single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() == 1 {
        return (mean, 0.0);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}

/// `mean ± std` with `digits` decimals, or the one value alone.
pub fn pm(values: &[f64], digits: usize) -> String {
    let (mean, std) = mean_std(values);
    match values.len() {
        1 => format!("{mean:.digits$}"),
        _ => format!("{mean:.digits$} ± {std:.digits$}"),
    }
}

/// One number of each run.
pub fn each(runs: &[RunResult], value: impl Fn(&RunResult) -> f64) -> Vec<f64> {
    runs.iter().map(value).collect()
}

impl Study {
    pub fn runs(&self, variant: Variant) -> &[RunResult] {
        &self
            .comparison
            .iter()
            .find(|(v, _)| *v == variant)
            .expect("the comparison runs every variant")
            .1
    }

    /// The base's ROUGE-1, which no seed changes.
    pub fn base_rouge(&self) -> f64 {
        self.runs(Variant::Base)[0].rouge1
    }

    /// Per seed, the share of full fine-tuning's ROUGE-1 gain over the base that `variant`
    /// recovers, each against full fine-tuning with the same seed.
    pub fn recovered(&self, variant: Variant) -> Vec<f64> {
        let base = self.base_rouge();
        self.runs(variant)
            .iter()
            .zip(self.runs(Variant::Full))
            .map(|(run, full)| (run.rouge1 - base) / (full.rouge1 - base))
            .collect()
    }

    /// Per seed, the ROUGE-1 gain over the base.
    pub fn gains(&self, variant: Variant) -> Vec<f64> {
        let base = self.base_rouge();
        each(self.runs(variant), |r| r.rouge1 - base)
    }

    pub fn bars(&self) -> Vec<Bar> {
        let full = self.runs(Variant::Full);
        let qkvo = self.runs(Variant::LoraQkvo(8));
        let qv = self.runs(Variant::LoraQv(8));
        let recovered = self.recovered(Variant::LoraQkvo(8));
        let (share_mean, _) = mean_std(&recovered);
        let share = percent(qkvo[0].trainable_params, qkvo[0].total_params);
        let percents: Vec<f64> = recovered.iter().map(|r| 100.0 * r).collect();
        let mut bars = vec![Bar {
            name: "LoRA Q,K,V,O r=8 recovers ≥ 85% of full fine-tuning's ROUGE-1 gain (mean over \
                   the seeds) with < 3% of the parameters trainable"
                .into(),
            passed: Some(share_mean >= 0.85 && share < 3.0),
            detail: format!(
                "{}% of the gain over {} seeds (per seed: {}), gain {} vs {}, {share:.2}% trainable",
                pm(&percents, 1),
                recovered.len(),
                percents
                    .iter()
                    .map(|p| format!("{p:.1}%"))
                    .collect::<Vec<_>>()
                    .join(", "),
                pm(&self.gains(Variant::LoraQkvo(8)), 3),
                pm(&self.gains(Variant::Full), 3),
            ),
        }];
        let step_of = |runs: &[RunResult]| mean_std(&each(runs, |r| r.step_ms)).0;
        let (f, a, b) = (step_of(full), step_of(qv), step_of(qkvo));
        bars.push(Bar {
            name: "LoRA's training step is faster than full fine-tuning's".into(),
            passed: Some(a < f && b < f),
            detail: format!(
                "median step (mean over seeds): full {} ms, Q,V r=8 {} ms ({:.2}×), Q,K,V,O r=8 \
                 {} ms ({:.2}×)",
                pm(&each(full, |r| r.step_ms), 1),
                pm(&each(qv, |r| r.step_ms), 1),
                a / f,
                pm(&each(qkvo, |r| r.step_ms), 1),
                b / f
            ),
        });
        let peak = |runs: &[RunResult]| {
            runs.iter()
                .map(|r| r.peak_rss_mib)
                .collect::<Option<Vec<f64>>>()
        };
        let memory = match (peak(full), peak(qv), peak(qkvo)) {
            (Some(f), Some(a), Some(b)) => {
                let highest = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
                let lowest = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
                Bar {
                    name: "LoRA's peak memory while training is lower than full fine-tuning's, \
                           seed for seed"
                        .into(),
                    passed: Some(highest(&a).max(highest(&b)) < lowest(&f)),
                    detail: format!(
                        "peak RSS: full {} MiB, Q,V r=8 {} MiB, Q,K,V,O r=8 {} MiB",
                        pm(&f, 1),
                        pm(&a, 1),
                        pm(&b, 1)
                    ),
                }
            }
            _ => Bar {
                name: "LoRA's peak memory while training is lower than full fine-tuning's".into(),
                passed: None,
                detail: "peak RSS cannot be measured on this system (Linux's /proc only)".into(),
            },
        };
        bars.push(memory);
        let first = &qkvo[0];
        bars.push(Bar {
            name: "deterministic: a rerun in a fresh process gives the same numbers".into(),
            passed: Some(self.repeat.outcome() == first.outcome()),
            detail: format!(
                "LoRA Q,K,V,O r=8, seed {}, twice: ROUGE-1 {:.6} and {:.6}, final validation loss \
                 {:.6} and {:.6}, generations digest {:016x} and {:016x}",
                self.seeds[0],
                first.rouge1,
                self.repeat.rouge1,
                first.final_val_loss(),
                self.repeat.final_val_loss(),
                first.generations_digest,
                self.repeat.generations_digest,
            ),
        });
        bars
    }

    pub fn markdown(&self, bars: &[Bar]) -> String {
        let p = &self.preset;
        let mut md = String::new();
        let seeds = self
            .seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            md,
            "# Fine-tuning study: base vs full fine-tuning vs LoRA\n"
        );
        let _ = writeln!(
            md,
            "Produced by `{}` on {} ({} backend), in {:.0} s. The `{}` preset; base seed {}, \
             fine-tuning seeds {seeds}.\n",
            self.command, self.machine, self.backend, self.wall_seconds, p.name, self.seed
        );
        let _ = writeln!(
            md,
            "A decoder-only transformer ({} layer{}, d_model {}, {} heads, {} parameters) is \
             pretrained for {} steps on task A (language modelling on dialogues and on unrelated \
             summary-style sentences; final validation loss {:.3}, {:.0} s), then adapted to task \
             B (summarising a dialogue in one line) with the same budget for every variant: {} \
             steps of {} sequences, AdamW with warmup and cosine decay, peak learning rate {} for \
             full fine-tuning and {} for LoRA (alpha 16), each the best of a small grid \
             (docs/finetune_study.md). Every run trains under burn-train's `Learner`, which \
             validates every {} steps. Each trained variant runs once per fine-tuning seed (the \
             seed draws the training stream, the adapters' initialisation and dropout; the base \
             and the held-out dialogues stay the same), and the tables give the mean ± the \
             sample standard deviation over the {} seeds. ROUGE-1 F1 is the mean over {} \
             held-out dialogues, summarised greedily.\n",
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
            p.eval_every,
            self.seeds.len(),
            p.test_examples,
        );
        let _ = writeln!(md, "## Base vs full fine-tuning vs LoRA\n");
        let _ = writeln!(
            md,
            "| variant | ROUGE-1 F1 | P / R | gain | share of full FT's gain | trainable params \
             | trainable % | final val loss | train time (s) | step (ms) | peak RSS training \
             (MiB) | saved size |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (variant, runs) in &self.comparison {
            let trained = *variant != Variant::Base;
            let dash = || "—".to_string();
            let first = &runs[0];
            let shares: Vec<f64> = match trained {
                true => self.recovered(*variant).iter().map(|r| 100.0 * r).collect(),
                false => Vec::new(),
            };
            let peaks: Option<Vec<f64>> = runs.iter().map(|r| r.peak_rss_mib).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} / {:.2} | {} | {} | {} | {:.2}% | {} | {} | {} | {} | {} |",
                variant.label(),
                pm(&each(runs, |r| r.rouge1), 3),
                mean_std(&each(runs, |r| r.rouge1_precision)).0,
                mean_std(&each(runs, |r| r.rouge1_recall)).0,
                if trained {
                    pm(&self.gains(*variant), 3)
                } else {
                    dash()
                },
                if trained {
                    format!("{}%", pm(&shares, 1))
                } else {
                    dash()
                },
                first.trainable_params,
                percent(first.trainable_params, first.total_params),
                pm(&each(runs, |r| r.final_val_loss()), 3),
                if trained {
                    pm(&each(runs, |r| r.train_seconds), 1)
                } else {
                    dash()
                },
                if trained {
                    pm(&each(runs, |r| r.step_ms), 1)
                } else {
                    dash()
                },
                peaks.map_or(dash(), |m| pm(&m, 1)),
                size(first.disk_bytes),
            );
        }
        let _ = writeln!(
            md,
            "\nSaved size: the whole model (Burn's burnpack file) for the base and full \
             fine-tuning; PEFT's `adapter_model.safetensors` + `adapter_config.json` for LoRA. \
             Step: each run's median step under the Learner (data, forward, backward, optimizer \
             and the Learner's own work); train time: the sum of the steps, validation excluded. \
             Peak RSS is the process's resident-set peak over training, each run in a process of \
             its own, one at a time.\n"
        );
        let _ = writeln!(md, "## Rank sweep: LoRA on Q,V\n");
        let _ = writeln!(
            md,
            "| rank | scale | trainable params | trainable % | final val loss | ROUGE-1 |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for (rank, runs) in &self.sweep {
            let first = &runs[0];
            let _ = writeln!(
                md,
                "| {rank} | {:.3} | {} | {:.2}% | {} | {} |",
                super::variant::LORA_ALPHA / *rank as f64,
                first.trainable_params,
                percent(first.trainable_params, first.total_params),
                pm(&each(runs, |r| r.final_val_loss()), 4),
                pm(&each(runs, |r| r.rouge1), 3),
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
        let _ = writeln!(
            md,
            "\n## Sample summaries (held-out dialogues, seed {})\n",
            self.seeds[0]
        );
        for (i, (reference, _)) in self.runs(Variant::Base)[0].samples.iter().enumerate() {
            let _ = writeln!(md, "- reference: `{reference}`");
            for (variant, runs) in &self.comparison {
                if let Some((_, generated)) = runs[0].samples.get(i) {
                    let _ = writeln!(md, "  - {}: `{generated}`", variant.label());
                }
            }
        }
        let _ = writeln!(
            md,
            "\n![validation loss and rank sweep, mean ± std over the seeds](finetune_study.png)"
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
