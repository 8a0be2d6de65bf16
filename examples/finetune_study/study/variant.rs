//! The fine-tuning variants and what each run reports.

use burn_lora::{LoraConfig, LoraInit, Targets};
use serde_json::{Value, json};

/// LoRA's alpha in every LoRA variant: r = 8 gets PEFT's common `alpha = 16`, and the sweep
/// keeps alpha fixed as the LoRA paper does, so the scale is `16 / r`.
pub const LORA_ALPHA: f64 = 16.0;

/// One way to adapt the pretrained model to task B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The pretrained model as it is.
    Base,
    /// Every parameter trained.
    Full,
    /// LoRA on the query and value projections.
    LoraQv(usize),
    /// LoRA on the query, key, value and output projections.
    LoraQkvo(usize),
    /// DoRA on Q, K, V and O.
    DoraQkvo(usize),
    /// LoRA on Q, K, V and O with LoRA+ learning rates (`B` at 16 times `A`'s rate).
    LoraPlusQkvo(usize),
    /// LoRA on Q, K, V and O, initialised with PiSSA.
    PissaQkvo(usize),
    /// LoRA on Q, K, V and O over a base whose linear weights are quantized to `bits` bits.
    QloraQkvo { bits: u8, rank: usize },
}

/// The ratio of `B`'s learning rate to `A`'s in the LoRA+ variant, the paper's default.
pub const LORA_PLUS_RATIO: f64 = 16.0;

impl Variant {
    /// A name for files and command lines: `base`, `full`, `lora_qv_r8`, `lora_qkvo_r8`.
    pub fn id(&self) -> String {
        match self {
            Self::Base => "base".into(),
            Self::Full => "full".into(),
            Self::LoraQv(r) => format!("lora_qv_r{r}"),
            Self::LoraQkvo(r) => format!("lora_qkvo_r{r}"),
            Self::DoraQkvo(r) => format!("dora_qkvo_r{r}"),
            Self::LoraPlusQkvo(r) => format!("loraplus_qkvo_r{r}"),
            Self::PissaQkvo(r) => format!("pissa_qkvo_r{r}"),
            Self::QloraQkvo { bits, rank } => format!("qlora{bits}_qkvo_r{rank}"),
        }
    }

    /// A name for tables and plots.
    pub fn label(&self) -> String {
        match self {
            Self::Base => "base (no fine-tuning)".into(),
            Self::Full => "full fine-tuning".into(),
            Self::LoraQv(r) => format!("LoRA Q,V r={r}"),
            Self::LoraQkvo(r) => format!("LoRA Q,K,V,O r={r}"),
            Self::DoraQkvo(r) => format!("DoRA Q,K,V,O r={r}"),
            Self::LoraPlusQkvo(r) => format!("LoRA+ Q,K,V,O r={r}"),
            Self::PissaQkvo(r) => format!("PiSSA Q,K,V,O r={r}"),
            Self::QloraQkvo { bits, rank } => {
                format!("QLoRA ({bits}-bit base) Q,K,V,O r={rank}")
            }
        }
    }

    /// The variants `--variants` compares beside full fine-tuning and plain LoRA.
    pub fn beyond_lora() -> [Self; 5] {
        [
            Self::DoraQkvo(8),
            Self::LoraPlusQkvo(8),
            Self::PissaQkvo(8),
            Self::QloraQkvo { bits: 8, rank: 8 },
            Self::QloraQkvo { bits: 4, rank: 8 },
        ]
    }

    /// The bits of the quantized base, for QLoRA.
    pub fn quantized_bits(&self) -> Option<u8> {
        match self {
            Self::QloraQkvo { bits, .. } => Some(*bits),
            _ => None,
        }
    }

    /// LoRA+'s ratio of `B`'s learning rate to `A`'s, for LoRA+.
    pub fn lora_plus_ratio(&self) -> Option<f64> {
        match self {
            Self::LoraPlusQkvo(_) => Some(LORA_PLUS_RATIO),
            _ => None,
        }
    }

    pub fn parse(id: &str) -> Option<Self> {
        let rank = |rest: &str| rest.parse::<usize>().ok().filter(|r| *r > 0);
        match id {
            "base" => Some(Self::Base),
            "full" => Some(Self::Full),
            _ => {
                if let Some(rest) = id.strip_prefix("lora_qv_r") {
                    rank(rest).map(Self::LoraQv)
                } else if let Some(rest) = id.strip_prefix("lora_qkvo_r") {
                    rank(rest).map(Self::LoraQkvo)
                } else if let Some(rest) = id.strip_prefix("dora_qkvo_r") {
                    rank(rest).map(Self::DoraQkvo)
                } else if let Some(rest) = id.strip_prefix("loraplus_qkvo_r") {
                    rank(rest).map(Self::LoraPlusQkvo)
                } else if let Some(rest) = id.strip_prefix("pissa_qkvo_r") {
                    rank(rest).map(Self::PissaQkvo)
                } else if let Some(rest) = id.strip_prefix("qlora") {
                    let (bits, rest) = rest.split_once("_qkvo_r")?;
                    let bits = bits.parse::<u8>().ok().filter(|b| [8, 4].contains(b))?;
                    rank(rest).map(|rank| Self::QloraQkvo { bits, rank })
                } else {
                    None
                }
            }
        }
    }

    /// The LoRA config, for LoRA variants.
    pub fn lora(&self) -> Option<LoraConfig> {
        let (rank, targets) = match self {
            Self::LoraQv(r) => (*r, Targets::attention_qv()),
            Self::LoraQkvo(r)
            | Self::DoraQkvo(r)
            | Self::LoraPlusQkvo(r)
            | Self::PissaQkvo(r)
            | Self::QloraQkvo { rank: r, .. } => (*r, Targets::attention()),
            Self::Base | Self::Full => return None,
        };
        let init = match self {
            Self::PissaQkvo(_) => LoraInit::Pissa,
            _ => LoraInit::KaimingUniform,
        };
        Some(
            LoraConfig::new(rank)
                .with_alpha(Some(LORA_ALPHA))
                .with_targets(targets)
                .with_init(init)
                .with_use_dora(matches!(self, Self::DoraQkvo(_))),
        )
    }
}

/// What one variant's process measured.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub variant: String,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Seconds spent in training steps (validation excluded).
    pub train_seconds: f64,
    /// The median training step, in milliseconds.
    pub step_ms: f64,
    /// The process's peak resident set while training (or, for the base, evaluating), MiB.
    pub peak_rss_mib: Option<f64>,
    /// Bytes on disk of what the variant ships: the full model, or the adapter files.
    pub disk_bytes: u64,
    /// Mean ROUGE-1 F1 on the held-out dialogues.
    pub rouge1: f64,
    /// Mean ROUGE-1 precision.
    pub rouge1_precision: f64,
    /// Mean ROUGE-1 recall.
    pub rouge1_recall: f64,
    /// (step, validation loss) pairs; step 0 is before training.
    pub curve: Vec<(usize, f64)>,
    /// A fingerprint of every generated token, to compare reruns.
    pub generations_digest: u64,
    /// A few held-out summaries: (reference, generated).
    pub samples: Vec<(String, String)>,
}

impl RunResult {
    pub fn final_val_loss(&self) -> f64 {
        self.curve.last().map(|(_, loss)| *loss).unwrap_or(f64::NAN)
    }

    /// The numbers a rerun must reproduce exactly: everything but time and memory.
    pub fn outcome(&self) -> (u64, Vec<u64>, u64, usize) {
        (
            self.rouge1.to_bits(),
            self.curve.iter().map(|(_, loss)| loss.to_bits()).collect(),
            self.generations_digest,
            self.trainable_params,
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "variant": self.variant,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "train_seconds": self.train_seconds,
            "step_ms": self.step_ms,
            "peak_rss_mib": self.peak_rss_mib,
            "disk_bytes": self.disk_bytes,
            "rouge1": self.rouge1,
            "rouge1_precision": self.rouge1_precision,
            "rouge1_recall": self.rouge1_recall,
            "curve": self.curve,
            // As a string: JSON numbers are doubles and would round a u64.
            "generations_digest": self.generations_digest.to_string(),
            "samples": self.samples,
        })
    }

    pub fn from_json(value: &Value) -> Option<Self> {
        let usize_of = |key: &str| value.get(key)?.as_u64().map(|v| v as usize);
        let f64_of = |key: &str| value.get(key)?.as_f64();
        let curve = value
            .get("curve")?
            .as_array()?
            .iter()
            .map(|point| Some((point.get(0)?.as_u64()? as usize, point.get(1)?.as_f64()?)))
            .collect::<Option<Vec<_>>>()?;
        let samples = value
            .get("samples")?
            .as_array()?
            .iter()
            .map(|pair| {
                Some((
                    pair.get(0)?.as_str()?.to_string(),
                    pair.get(1)?.as_str()?.to_string(),
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            variant: value.get("variant")?.as_str()?.to_string(),
            trainable_params: usize_of("trainable_params")?,
            total_params: usize_of("total_params")?,
            train_seconds: f64_of("train_seconds")?,
            step_ms: f64_of("step_ms")?,
            peak_rss_mib: value.get("peak_rss_mib")?.as_f64(),
            disk_bytes: value.get("disk_bytes")?.as_u64()?,
            rouge1: f64_of("rouge1")?,
            rouge1_precision: f64_of("rouge1_precision")?,
            rouge1_recall: f64_of("rouge1_recall")?,
            curve,
            generations_digest: value.get("generations_digest")?.as_str()?.parse().ok()?,
            samples,
        })
    }
}
