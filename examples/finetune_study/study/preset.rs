//! The study's sizes: the full run, `--quick`, and the miniature one the tests use.

use super::model::LanguageModelConfig;
use super::variant::Variant;

/// Everything that sets the study's cost. Every fine-tuning variant gets the same budget.
#[derive(Clone, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Steps of pretraining on task A.
    pub pretrain_steps: usize,
    /// Steps of fine-tuning on task B, the same for every variant.
    pub finetune_steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Peak learning rate of pretraining.
    pub pretrain_lr: f64,
    /// Peak learning rate of full fine-tuning: the best of a grid (see docs/finetune_study.md).
    pub full_lr: f64,
    /// Peak learning rate of LoRA: the best of a grid. LoRA, as usual, wants a higher rate.
    pub lora_lr: f64,
    /// Peak learning rate of `A` under LoRA+ (`B` learns 16 times faster): the best of a grid.
    pub loraplus_lr: f64,
    /// Peak learning rate of PiSSA, whose factors start large: the best of a grid.
    pub pissa_lr: f64,
    /// Peak learning rate of QLoRA, whose rounded base makes LoRA's edge-of-stability rate
    /// less forgiving: the best of a grid.
    pub qlora_lr: f64,
    /// Validation loss every this many steps.
    pub eval_every: usize,
    /// Held-out dialogues for the validation loss.
    pub val_examples: usize,
    /// Held-out dialogues summarised for ROUGE-1.
    pub test_examples: usize,
    /// Ranks of the sweep (LoRA on Q and V).
    pub ranks: &'static [usize],
}

impl Preset {
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "full" => Some(Self::full()),
            "quick" => Some(Self::quick()),
            "miniature" => Some(Self::miniature()),
            _ => None,
        }
    }

    /// The default run: 16 to 19 minutes on 2 CPU cores with three seeds.
    pub fn full() -> Self {
        Self {
            name: "full",
            d_model: 192,
            n_layers: 2,
            n_heads: 4,
            pretrain_steps: 600,
            finetune_steps: 200,
            batch: 16,
            pretrain_lr: 1e-3,
            full_lr: 4e-3,
            lora_lr: 2e-2,
            loraplus_lr: 2e-3,
            pissa_lr: 1e-2,
            qlora_lr: 1e-2,
            eval_every: 20,
            val_examples: 64,
            test_examples: 128,
            ranks: &[1, 2, 4, 8, 16, 32, 64],
        }
    }

    /// `--quick`: the same model, fewer and smaller steps, no rank sweep beyond the
    /// comparison's rank 8; under 2 minutes with three seeds.
    pub fn quick() -> Self {
        Self {
            name: "quick",
            pretrain_steps: 300,
            finetune_steps: 50,
            batch: 8,
            eval_every: 10,
            test_examples: 48,
            ranks: &[8],
            ..Self::full()
        }
    }

    /// A few steps of a tiny model: checks the pipeline, not the quality.
    pub fn miniature() -> Self {
        Self {
            name: "miniature",
            d_model: 32,
            n_layers: 1,
            n_heads: 2,
            pretrain_steps: 4,
            finetune_steps: 3,
            batch: 4,
            eval_every: 2,
            val_examples: 4,
            test_examples: 4,
            ranks: &[1, 8],
            ..Self::full()
        }
    }

    /// The peak learning rate of `variant`.
    pub fn lr_for(&self, variant: Variant) -> f64 {
        match variant {
            Variant::Full => self.full_lr,
            Variant::LoraPlusQkvo(_) => self.loraplus_lr,
            Variant::PissaQkvo(_) => self.pissa_lr,
            Variant::QloraQkvo { .. } => self.qlora_lr,
            _ => self.lora_lr,
        }
    }

    /// Whether the quality bars apply (a miniature run is too short to learn anything).
    pub fn checks_quality(&self) -> bool {
        self.name != "miniature"
    }

    pub fn model(&self, vocab: usize) -> LanguageModelConfig {
        LanguageModelConfig::new(
            vocab,
            self.d_model,
            4 * self.d_model,
            self.n_heads,
            self.n_layers,
            80,
        )
    }
}
