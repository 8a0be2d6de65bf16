//! The state a property test expects a model's adapters to be in, kept beside the model: which
//! adapters exist, which are active and merged, and whether they are enabled. `predict` says
//! what an operation does to it, or which `LoraError` variant the documentation names for it.

use burn_lora::LoraError;

/// An operation on a model's adapters, as the shadow sees it.
#[derive(Debug, Clone)]
pub enum Step<'a> {
    /// `add_adapter(name)`: active when it is the model's first.
    Add(&'a str),
    /// `set_active(&[name])`.
    SetActive(&'a str),
    /// `disable_adapters`.
    Disable,
    /// `enable_adapters`.
    Enable,
    /// `merge_lora`.
    Merge,
    /// `unmerge_lora`.
    Unmerge,
    /// `delete_adapter(name)`.
    Delete(&'a str),
    /// `save_adapter(source)`, then `load_adapter` of that file as `new`.
    SaveLoad { source: &'a str, new: &'a str },
    /// `mixed_batch` naming `names`; `supported` is false when the model's adapters refuse
    /// mixed batches altogether (`UnsupportedVariant`, after the checks every call makes).
    Mixed {
        names: Vec<&'a str>,
        supported: bool,
    },
}

/// One adapter as the shadow expects it.
#[derive(Debug, Clone)]
pub struct Expected {
    pub name: String,
    pub active: bool,
    pub merged: bool,
}

/// The adapters a model is expected to have.
#[derive(Debug, Clone)]
pub struct Shadow {
    pub adapters: Vec<Expected>,
    pub enabled: bool,
}

impl Default for Shadow {
    fn default() -> Self {
        Self {
            adapters: Vec::new(),
            enabled: true,
        }
    }
}

impl Shadow {
    pub fn knows(&self, name: &str) -> bool {
        self.adapters.iter().any(|a| a.name == name)
    }

    pub fn any_merged(&self) -> bool {
        self.adapters.iter().any(|a| a.merged)
    }

    /// Whether the adapter `name` shapes the model's output: merged, or active and enabled.
    pub fn shapes(&self, name: &str) -> bool {
        (self.adapters.iter()).any(|a| a.name == name && (a.merged || (a.active && self.enabled)))
    }

    /// The state after `step`, or the `LoraError` variant the documentation names.
    pub fn predict(&self, step: &Step) -> Result<Shadow, &'static str> {
        if self.adapters.is_empty() && !matches!(step, Step::Add(_)) {
            return Err("NoAdapters");
        }
        let mut next = self.clone();
        let new = |name: &str, active: bool| Expected {
            name: name.to_string(),
            active,
            merged: false,
        };
        match step {
            Step::Add(name) => {
                if self.knows(name) {
                    return Err("AdapterExists");
                }
                next.adapters.push(new(name, self.adapters.is_empty()));
            }
            Step::SetActive(name) => {
                if !self.knows(name) {
                    return Err("UnknownAdapter");
                }
                if self.any_merged() {
                    return Err("AdaptersMerged");
                }
                for adapter in &mut next.adapters {
                    adapter.active = adapter.name == *name;
                }
            }
            Step::Disable => {
                if self.any_merged() {
                    return Err("AdaptersMerged");
                }
                next.enabled = false;
            }
            Step::Enable => next.enabled = true,
            Step::Merge => {
                if !self.enabled {
                    return Err("AdaptersDisabled");
                }
                let mut any = false;
                for adapter in next.adapters.iter_mut().filter(|a| a.active && !a.merged) {
                    adapter.merged = true;
                    any = true;
                }
                if !any {
                    return Err("AlreadyMerged");
                }
            }
            Step::Unmerge => {
                if !self.any_merged() {
                    return Err("NothingMerged");
                }
                for adapter in &mut next.adapters {
                    adapter.merged = false;
                }
            }
            Step::Delete(name) => {
                let Some(index) = self.adapters.iter().position(|a| a.name == *name) else {
                    return Err("UnknownAdapter");
                };
                if self.adapters[index].active {
                    return Err("DeleteActive");
                }
                next.adapters.remove(index);
            }
            Step::SaveLoad { source, new: name } => {
                if !self.knows(source) {
                    return Err("UnknownAdapter");
                }
                if self.knows(name) {
                    return Err("AdapterExists");
                }
                next.adapters.push(new(name, false));
            }
            Step::Mixed { names, supported } => {
                if names.iter().any(|n| !self.knows(n)) {
                    return Err("UnknownAdapter");
                }
                if self.any_merged() {
                    return Err("AdaptersMerged");
                }
                if !supported {
                    return Err("UnsupportedVariant");
                }
            }
        }
        Ok(next)
    }
}

/// The name of `error`'s variant, as `predict` gives it.
pub fn variant(error: &LoraError) -> String {
    format!("{error:?}")
        .split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// An operation's outcome held against the shadow's prediction: the next model and shadow when
/// both say `Ok`, `None` when both name the same error and the failed call left the model
/// `unchanged`, and the disagreement otherwise. `label` names the step in messages.
pub fn settle<M>(
    label: &str,
    outcome: Result<M, LoraError>,
    predicted: Result<Shadow, &'static str>,
    unchanged: impl FnOnce() -> bool,
) -> Result<Option<(M, Shadow)>, String> {
    match (outcome, predicted) {
        (Ok(next), Ok(shadow)) => Ok(Some((next, shadow))),
        (Err(error), Err(expected)) => {
            if variant(&error) != expected {
                return Err(format!("{label}: {error:?}, expected {expected}"));
            }
            match unchanged() {
                true => Ok(None),
                false => Err(format!("{label}: a failed operation changed the model")),
            }
        }
        (outcome, expected) => Err(format!(
            "{label}: got {:?}, expected {expected:?}",
            outcome.map(|_| ()).map_err(|e| e.to_string())
        )),
    }
}

/// Runs `run` on `cases` random sequences of 1 to 13 operations drawn from `op`, from a fixed
/// `seed` so that a failing sequence replays; `run` gets the case's number, for its seed and
/// scratch directory.
pub fn run_sequences<O: std::fmt::Debug + Clone>(
    cases: u32,
    seed: u64,
    op: impl proptest::strategy::Strategy<Value = O>,
    run: impl Fn(&[O], usize) -> Result<(), String>,
) {
    use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    });
    let case = std::cell::Cell::new(0usize);
    runner
        .run(&proptest::collection::vec(op, 1..14), |ops| {
            case.set(case.get() + 1);
            run(&ops, case.get()).map_err(TestCaseError::fail)
        })
        .unwrap();
}
