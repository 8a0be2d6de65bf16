//! What [`LoraConfig::plan`](crate::LoraConfig::plan) and
//! [`LoraConfig::apply`](crate::LoraConfig::apply) report: the adapted layers and the counts.

use core::fmt;

use super::survey::weight_path_of;
use crate::adapter::LayerKind;
use crate::config::ParamLayout;

/// One layer (linear, embedding or convolution) or raw parameter (an expert bank) that gets (or
/// got) an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptedLayer {
    /// Module path of the layer, e.g. `encoder.layers.0.mha.query`; for a raw parameter, its
    /// parameter path, e.g. `layers.0.mlp.experts.gate_up_proj`.
    pub path: String,
    /// The layer's type, e.g. `Linear` or `LoraLinear`.
    pub module_type: String,
    /// The kind of layer, which fixes how its weight maps to `[d_in, d_out]`.
    pub kind: LayerKind,
    /// Input features of the weight: `d_input` of a linear layer, the vocabulary of an
    /// embedding, `channels_in·k1·k2` of a convolution.
    pub d_in: usize,
    /// Output features of the weight: `d_output`, the embedding size, `channels_out`.
    pub d_out: usize,
    /// Rank of the adapter.
    pub rank: usize,
    /// Alpha of the adapter.
    pub alpha: f64,
    /// Whether the adapter is DoRA, which also trains a magnitude per output feature.
    pub dora: bool,
    /// Whether the layer takes the activation path ([`LoraLinear`](crate::LoraLinear)) rather
    /// than composing a dense weight on every forward.
    pub fast_path: bool,
    /// For a raw parameter ([`LayerKind::Parameter`]): the number of experts `E` along its
    /// first axis (1 for a 2-D parameter), each with its own rank-`rank` update of
    /// `d_in × d_out`. 1 for a layer.
    pub experts: usize,
    /// For a raw parameter: the layout it is stored in. `None` for a layer.
    pub param_layout: Option<ParamLayout>,
}

impl AdaptedLayer {
    /// Values in the frozen weight, `experts · d_in · d_out`.
    pub fn weight_params(&self) -> usize {
        self.experts * self.d_in * self.d_out
    }

    /// Values the adapter trains, `experts · rank · (d_in + d_out)`, plus `d_out` magnitudes for
    /// DoRA.
    pub fn adapter_params(&self) -> usize {
        self.experts * self.rank * (self.d_in + self.d_out) + if self.dora { self.d_out } else { 0 }
    }

    /// The path of the parameter the adapter sits on: the layer's `weight`, or the raw
    /// parameter itself (whose path [`path`](Self::path) is).
    pub fn param_path(&self) -> String {
        match self.kind {
            LayerKind::Parameter => self.path.clone(),
            _ => weight_path_of(&self.path),
        }
    }
}

/// What one entry of the targets matched.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetMatch {
    /// The target, as written.
    pub target: String,
    /// Module paths of the layers it matched.
    pub matched: Vec<String>,
}

/// A module a target named that LoRA does not adapt (a norm, a bias...).
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedModule {
    /// Module path.
    pub path: String,
    /// The module's type.
    pub module_type: String,
    /// Why it was left alone.
    pub reason: String,
}

/// A module in `modules_to_save`: the adapter trains its own full copy of the module's
/// parameters; or an embedding with trainable tokens: its own copy of some rows.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedModule {
    /// Module path, e.g. `classifier`.
    pub path: String,
    /// The module's type.
    pub module_type: String,
    /// Paths of the parameters copied (`classifier.weight`, `classifier.bias`).
    pub params: Vec<String>,
    /// Values in the copies.
    pub numel: usize,
    /// For trainable tokens: the rows (token ids) of the embedding's weight that are copied;
    /// `None` for a whole module.
    pub rows: Option<Vec<usize>>,
}

/// The outcome of a LoRA plan: which layers are adapted and what that costs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoraReport {
    /// The adapted layers, in module order.
    pub layers: Vec<AdaptedLayer>,
    /// What each target matched.
    pub targets: Vec<TargetMatch>,
    /// Modules a target named that were not adapted, with the reason.
    pub skipped: Vec<SkippedModule>,
    /// Parameters of the model before adapters were attached.
    pub base_params: usize,
    /// The modules of `modules_to_save`, whose copies the adapter trains in full.
    pub saved: Vec<SavedModule>,
}

impl LoraReport {
    /// Values the adapters train: their factors, and the copies of `modules_to_save`.
    pub fn trainable_params(&self) -> usize {
        self.layers
            .iter()
            .map(AdaptedLayer::adapter_params)
            .sum::<usize>()
            + self.saved.iter().map(|module| module.numel).sum::<usize>()
    }

    /// Values in the weights that carry adapters.
    pub fn adapted_weight_params(&self) -> usize {
        self.layers.iter().map(AdaptedLayer::weight_params).sum()
    }

    /// Parameters of the adapted model: the base plus the adapters.
    pub fn total_params(&self) -> usize {
        self.base_params + self.trainable_params()
    }

    /// Trainable share of all parameters, in percent (PEFT's `trainable%`).
    pub fn trainable_percent(&self) -> f64 {
        percent(self.trainable_params(), self.total_params())
    }

    /// How much smaller the adapters are than the weights they adapt, in percent: -85.9 for a
    /// rank-8 adapter on a 512×64 weight.
    pub fn change_vs_adapted_weights(&self) -> f64 {
        percent(self.trainable_params(), self.adapted_weight_params()) - 100.0
    }

    /// Targets that matched no layer.
    pub fn unmatched_targets(&self) -> impl Iterator<Item = &TargetMatch> {
        self.targets
            .iter()
            .filter(|target| target.matched.is_empty())
    }
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// `1234567` as `1,234,567`.
pub(crate) fn thousands(value: usize) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

impl fmt::Display for LoraReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path_width = self
            .layers
            .iter()
            .map(|layer| layer.path.len())
            .chain([4])
            .max()
            .unwrap_or(4);
        writeln!(
            f,
            "{:<path_width$}  {:<10}  {:>12}  {:>4}  {:>6}  {:>10}  compute",
            "layer", "type", "weight", "rank", "alpha", "trainable"
        )?;
        for layer in &self.layers {
            writeln!(
                f,
                "{:<path_width$}  {:<10}  {:>12}  {:>4}  {:>6}  {:>10}  {}",
                layer.path,
                layer.module_type,
                match layer.experts {
                    1 => format!("[{}, {}]", layer.d_in, layer.d_out),
                    // An expert bank: each expert's [d_in, d_out], and how many there are.
                    experts => format!("{experts}×[{}, {}]", layer.d_in, layer.d_out),
                },
                layer.rank,
                layer.alpha,
                thousands(layer.adapter_params()),
                match (layer.fast_path, layer.dora) {
                    (true, false) => "fast",
                    (true, true) => "fast, DoRA",
                    (false, false) => "dense",
                    (false, true) => "dense, DoRA",
                },
            )?;
        }
        for target in &self.targets {
            write!(
                f,
                "target {} matched {} layer(s)",
                target.target,
                target.matched.len()
            )?;
            // The first few paths say what the pattern means; the table has the rest.
            const SHOWN: usize = 3;
            if !target.matched.is_empty() {
                write!(
                    f,
                    ": {}",
                    target.matched[..target.matched.len().min(SHOWN)].join(", ")
                )?;
            }
            if target.matched.len() > SHOWN {
                write!(f, ", and {} more", target.matched.len() - SHOWN)?;
            }
            writeln!(f)?;
        }
        for saved in &self.saved {
            match &saved.rows {
                None => writeln!(
                    f,
                    "saved {} ({}): a full trainable copy, {} params",
                    saved.path,
                    saved.module_type,
                    thousands(saved.numel)
                )?,
                Some(rows) => writeln!(
                    f,
                    "trainable tokens of {} ({}): {} rows, {} params",
                    saved.path,
                    saved.module_type,
                    rows.len(),
                    thousands(saved.numel)
                )?,
            }
        }
        for skipped in &self.skipped {
            writeln!(
                f,
                "skipped {} ({}): {}",
                skipped.path, skipped.module_type, skipped.reason
            )?;
        }
        writeln!(
            f,
            "adapters: {} trainable params vs {} in the adapted weights ({:+.1}%)",
            thousands(self.trainable_params()),
            thousands(self.adapted_weight_params()),
            self.change_vs_adapted_weights()
        )?;
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable_params()),
            thousands(self.total_params()),
            self.trainable_percent()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(d_in: usize, d_out: usize, rank: usize) -> AdaptedLayer {
        AdaptedLayer {
            kind: LayerKind::Linear,
            path: "proj".into(),
            module_type: "Linear".into(),
            d_in,
            d_out,
            rank,
            alpha: rank as f64,
            dora: false,
            fast_path: false,
            experts: 1,
            param_layout: None,
        }
    }

    #[test]
    fn the_seed_example_counts_4608_of_32768() {
        let report = LoraReport {
            layers: vec![layer(512, 64, 8)],
            targets: vec![],
            skipped: vec![],
            base_params: 512 * 64,
            saved: vec![],
        };
        assert_eq!(report.trainable_params(), 4_608);
        assert_eq!(report.adapted_weight_params(), 32_768);
        assert!((report.change_vs_adapted_weights() - (-85.9375)).abs() < 1e-9);
        let text = report.to_string();
        assert!(text.contains("4,608 trainable params vs 32,768"), "{text}");
        assert!(text.contains("(-85.9%)"), "{text}");
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }
}
