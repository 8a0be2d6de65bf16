//! `--variants`: the LoRA variants side by side on the study's task, as a markdown table.

use super::preset::Preset;
use super::report::{percent, size};
use super::variant::{RunResult, Variant};

/// Every run of a `--variants` comparison, in order: base, full fine-tuning, LoRA, then the
/// variants.
pub struct Comparison {
    pub preset: Preset,
    pub command: String,
    pub machine: String,
    pub backend: String,
    pub wall_seconds: f64,
    pub results: Vec<(Variant, RunResult)>,
}

impl Comparison {
    fn result(&self, variant: Variant) -> &RunResult {
        &self
            .results
            .iter()
            .find(|(v, _)| *v == variant)
            .expect("every compared variant ran")
            .1
    }

    pub fn markdown(&self) -> String {
        let base = self.result(Variant::Base).rouge1;
        let full = self.result(Variant::Full).rouge1;
        let lora = self.result(Variant::LoraQkvo(8));
        let p = &self.preset;
        let mut md = String::new();
        md += "# LoRA variants on the fine-tuning study's task\n\n";
        md += &format!(
            "`{}` — preset `{}`: d_model {}, {} layer{}, {} fine-tuning steps of batch {}, the \
             same data, steps, schedule and evaluation for every row. {} on {}, {:.0} s in \
             all.\n\n",
            self.command,
            p.name,
            p.d_model,
            p.n_layers,
            if p.n_layers == 1 { "" } else { "s" },
            p.finetune_steps,
            p.batch,
            self.backend,
            self.machine,
            self.wall_seconds
        );
        md += "| variant | peak lr | ROUGE-1 | share of full FT's gain | validation loss | \
               trainable params | step (ms) | step vs LoRA | peak RSS (MiB) | saved |\n";
        md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for (variant, result) in &self.results {
            let lr = match variant {
                Variant::Base => "—".to_string(),
                Variant::LoraPlusQkvo(_) => format!(
                    "{} (B: ×{})",
                    p.lr_for(*variant),
                    variant.lora_plus_ratio().unwrap_or(1.0)
                ),
                _ => p.lr_for(*variant).to_string(),
            };
            let share = match variant {
                Variant::Base => "—".to_string(),
                _ => format!("{:.1}%", 100.0 * (result.rouge1 - base) / (full - base)),
            };
            let (step, ratio) = match variant {
                Variant::Base => ("—".to_string(), "—".to_string()),
                _ => (
                    format!("{:.0}", result.step_ms),
                    format!("{:.2}×", result.step_ms / lora.step_ms),
                ),
            };
            let rss = result
                .peak_rss_mib
                .map_or("—".to_string(), |mib| format!("{mib:.1}"));
            md += &format!(
                "| {} | {lr} | {:.3} | {share} | {:.3} | {} ({:.2}%) | {step} | {ratio} | {rss} | \
                 {} |\n",
                variant.label(),
                result.rouge1,
                result.final_val_loss(),
                result.trainable_params,
                percent(result.trainable_params, result.total_params),
                size(result.disk_bytes),
            );
        }
        md += "\nROUGE-1 is the F1 of greedy summaries of the held-out dialogues; the share of \
               full fine-tuning's gain is `(variant - base) / (full - base)`. The step is the \
               median training step; the peak RSS is the process's high-water mark over \
               training. QLoRA quantizes the encoder's linear weights (symmetric integers, one f32 \
               scale per 32 values); its output head, embeddings and norms stay f32. What a \
               variant saves is its PEFT adapter files (PiSSA's converted to a plain rank-16 \
               LoRA delta against the original base).\n";
        md
    }
}
