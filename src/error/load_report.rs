//! [`LoadReport`]: what loading an adapter file found, problem by problem. A strict load that
//! fails carries it in [`LoraError::AdapterMismatch`](crate::LoraError::AdapterMismatch), so it
//! sits beside the error type.

use core::fmt;

/// One module whose adapter was loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModule {
    /// The module path in the file (Hugging Face names, without `base_model.model.`).
    pub peft_path: String,
    /// The module path in the Burn model.
    pub path: String,
    /// The adapter's rank.
    pub rank: usize,
    /// The adapter's alpha.
    pub alpha: f64,
    /// The adapter's scale.
    pub scale: f64,
}

/// A tensor whose shape does not fit the model or the config.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeMismatch {
    /// The tensor's key in the file.
    pub key: String,
    /// The shape the model and config call for, in PyTorch's layout.
    pub expected: Vec<usize>,
    /// The shape in the file.
    pub found: Vec<usize>,
    /// Why the expected shape is what it is.
    pub reason: String,
}

/// A tensor stored in another dtype than the one it was loaded as.
#[derive(Debug, Clone, PartialEq)]
pub struct DtypeNote {
    /// The tensor's key in the file.
    pub key: String,
    /// The dtype in the file, e.g. `BF16`.
    pub stored: String,
}

/// Everything [`load_adapter`](crate::peft::load_adapter) found.
///
/// A strict load fails unless [`is_clean`](Self::is_clean); a non-strict load skips the modules
/// with problems and returns this report with them listed. Dtype conversions are information,
/// not problems.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadReport {
    /// The adapter's name in the model.
    pub adapter: String,
    /// The modules loaded.
    pub loaded: Vec<LoadedModule>,
    /// Keys the file lacks: half of an `A`/`B` pair, or a module the config's `target_modules`
    /// selects in the model that has no tensors.
    pub missing: Vec<String>,
    /// Keys of the file the model has no place for (no such linear layer, or not a LoRA key).
    pub unexpected: Vec<String>,
    /// Tensors whose shape does not fit the layer, or whose rank disagrees with the config.
    pub shape_mismatches: Vec<ShapeMismatch>,
    /// Tensors converted to f32 on reading (f16, bf16, f64).
    pub conversions: Vec<DtypeNote>,
    /// Tensors of a dtype LoRA cannot use (integers, booleans, 8-bit floats).
    pub unusable_dtypes: Vec<DtypeNote>,
    /// Tensors with no element (a zero dimension).
    pub empty: Vec<String>,
    /// Tensors holding NaN or Inf.
    pub non_finite: Vec<String>,
    /// Checks that could not run, and why.
    pub notes: Vec<String>,
    /// Parameters of `modules_to_save` modules whose trained copies were loaded, as Burn
    /// parameter paths (`classifier.weight`).
    pub saved: Vec<String>,
}

impl LoadReport {
    /// Whether the load found no problem.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.shape_mismatches.is_empty()
            && self.unusable_dtypes.is_empty()
            && self.empty.is_empty()
            && self.non_finite.is_empty()
    }

    /// The number of problems found.
    pub fn problem_count(&self) -> usize {
        self.missing.len()
            + self.unexpected.len()
            + self.shape_mismatches.len()
            + self.unusable_dtypes.len()
            + self.empty.len()
            + self.non_finite.len()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "adapter `{}`: {} modules loaded, {} problems",
            self.adapter,
            self.loaded.len(),
            self.problem_count()
        )?;
        let list = |f: &mut fmt::Formatter<'_>, title: &str, items: &[String]| {
            if items.is_empty() {
                return Ok(());
            }
            writeln!(f, "  {title} ({}):", items.len())?;
            items.iter().try_for_each(|item| writeln!(f, "    {item}"))
        };
        list(f, "modules_to_save copies loaded", &self.saved)?;
        list(f, "missing keys", &self.missing)?;
        list(f, "unexpected keys", &self.unexpected)?;
        let mismatches: Vec<String> = self
            .shape_mismatches
            .iter()
            .map(|m| {
                format!(
                    "{}: expected {:?}, found {:?} ({})",
                    m.key, m.expected, m.found, m.reason
                )
            })
            .collect();
        list(f, "shape mismatches", &mismatches)?;
        let unusable: Vec<String> = self
            .unusable_dtypes
            .iter()
            .map(|note| format!("{}: {}", note.key, note.stored))
            .collect();
        list(f, "unusable dtypes", &unusable)?;
        list(f, "empty tensors", &self.empty)?;
        list(f, "NaN or Inf values", &self.non_finite)?;
        let conversions: Vec<String> = self
            .conversions
            .iter()
            .map(|note| format!("{}: {} → F32", note.key, note.stored))
            .collect();
        list(f, "converted", &conversions)?;
        list(f, "notes", &self.notes)
    }
}
