//! [`LoraModule`]: the LoRA operations on a whole model, named adapters included.
//!
//! Every operation is a rebuild ([`Snapshot`]): all checks run first, then the model is put
//! back together, so a failure leaves the caller's model as it was. The operations take `&self`
//! and return a new module; Burn modules share their tensors, so the copy is cheap, and no base
//! weight is copied unless a merge changes it.

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::Tensor;

use super::attach::{InitProgress, add_adapter, attach_adapters};
use super::combine::{self, Combination, CombineReport};
use super::report::LoraReport;
use super::snapshot::Snapshot;
use super::survey::module_path_of;
use crate::adapter::{Adapter, LoraState, SavedCopy};
use crate::layers::MixedBatch;
use crate::{LoraConfig, LoraError};

/// A summary of one adapter on one weight, from [`LoraModule::lora_adapters`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    /// Module path of the adapted layer, or the parameter path of an adapted raw parameter.
    pub path: String,
    /// Name of the adapter.
    pub name: String,
    /// Its rank (each expert's, for an expert bank).
    pub rank: usize,
    /// The experts of the expert bank it adapts, each with its own update; 1 for a layer.
    pub experts: usize,
    /// Its scale, `alpha / r` or `alpha / √r`.
    pub scale: f64,
    /// Whether it takes part in the forward pass.
    pub active: bool,
    /// Whether its `A` and `B` take gradients.
    pub trainable: bool,
    /// Whether it is folded into the base weight.
    pub merged: bool,
    /// Whether it is a DoRA adapter (it has a magnitude vector).
    pub dora: bool,
    /// Whether `B` has a bias (PEFT's `lora_bias`).
    pub lora_bias: bool,
    /// The init that moved part of the base into it (`"pissa"`, `"olora"`), if any.
    pub residual_init: Option<String>,
}

/// An adapter's copy of one parameter of a module in `modules_to_save`, or of chosen rows of an
/// embedding (trainable tokens), from [`LoraModule::saved_copies`].
#[derive(Debug, Clone, PartialEq)]
pub struct SavedCopyInfo {
    /// Path of the parameter copied, e.g. `classifier.weight`.
    pub path: String,
    /// Name of the adapter the copy belongs to.
    pub name: String,
    /// Number of values in the copy.
    pub numel: usize,
    /// Whether the copy replaces the original in the forward pass.
    pub active: bool,
    /// Whether the copy takes gradients.
    pub trainable: bool,
    /// For trainable tokens: the rows (token ids) the copy holds; `None` for a whole copy.
    pub rows: Option<Vec<usize>>,
}

/// LoRA operations on any Burn module that carries adapters from
/// [`LoraConfig::apply`](crate::LoraConfig::apply), [`add_adapter`](Self::add_adapter) or
/// [`load_adapter`](crate::peft::load_adapter).
///
/// Implemented for every [`Module`]. A model may hold several named adapters per weight, as in
/// PEFT: the *active* ones add up in the forward pass, the others wait. The operations return a
/// new module and leave `self` as it was, so a failed operation loses nothing.
pub trait LoraModule: Module + Sized {
    /// Fold every active, unmerged adapter into its base weight: `W ← W + s·A·B`, in f32.
    ///
    /// The merged model costs exactly what the plain model costs. The adapters stay attached,
    /// so [`unmerge_lora`](Self::unmerge_lora) can take the update out again. A DoRA adapter
    /// folds in its rescaled weight and keeps the norms it divided by, for unmerging.
    ///
    /// A quantized base weight (QLoRA) is dequantized, merged in f32 and left in f32, so the
    /// merged model computes exactly what the adapters did;
    /// [`merge_quantized`](crate::merge_quantized) reports which weights that happened to and
    /// can quantize them again, with the error that costs.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`], [`LoraError::AdaptersDisabled`],
    /// [`LoraError::AlreadyMerged`] when nothing is left to merge, and
    /// [`LoraError::NonFiniteMerge`] when a result would hold NaN or Inf (then nothing merges).
    fn merge_lora(&self) -> Result<Self, LoraError>;

    /// Take every merged adapter back out of its base weight: `W ← W - s·A·B`.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`], and [`LoraError::NothingMerged`] when no adapter is merged.
    fn unmerge_lora(&self) -> Result<Self, LoraError>;

    /// Merge the active adapters, then drop every adapter: a plain model with the fine-tuned
    /// weights.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`], [`LoraError::AdaptersDisabled`] and
    /// [`LoraError::NonFiniteMerge`].
    fn merge_and_unload_lora(&self) -> Result<Self, LoraError>;

    /// Drop every adapter and return the base model as it was before `apply`: merged adapters
    /// are taken out of their weights first.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`] and [`LoraError::NonFiniteMerge`].
    fn unload_lora(&self) -> Result<Self, LoraError>;

    /// The adapters attached to the model, one entry per adapted weight and adapter. A layer
    /// placed at several paths is listed at each (the other operations refuse it with
    /// [`LoraError::SharedWeight`]).
    fn lora_adapters(&self) -> Vec<AdapterInfo>;

    /// The adapters' copies of the parameters of `modules_to_save` (see
    /// [`LoraConfig::modules_to_save`]), one entry per parameter and adapter.
    fn saved_copies(&self) -> Vec<SavedCopyInfo>;

    /// The distinct adapter names, in the order they were added.
    fn adapter_names(&self) -> Vec<String>;

    /// The names of the active adapters.
    fn active_adapters(&self) -> Vec<String>;

    /// Attach a new adapter `name` to the weights that `config` targets, beside the adapters
    /// the model has.
    ///
    /// The first adapter of a model freezes the base and is active and trainable. A later one
    /// starts inactive and frozen, as in PEFT: [`set_active`](Self::set_active) picks it.
    ///
    /// # Errors
    ///
    /// [`LoraError::AdapterExists`], and everything [`LoraConfig::apply`] refuses.
    fn add_adapter(&self, name: &str, config: &LoraConfig)
    -> Result<(Self, LoraReport), LoraError>;

    /// [`add_adapter`](Self::add_adapter), calling `progress` after each layer's adapter is
    /// initialized (see [`LoraConfig::apply_with_progress`]).
    ///
    /// # Errors
    ///
    /// As [`add_adapter`](Self::add_adapter).
    fn add_adapter_with_progress(
        &self,
        name: &str,
        config: &LoraConfig,
        progress: &mut dyn FnMut(&InitProgress),
    ) -> Result<(Self, LoraReport), LoraError>;

    /// Make exactly the adapters in `names` active; their outputs add up in the forward pass.
    /// As in PEFT, the active adapters become trainable and the others frozen; call
    /// [`set_trainable`](Self::set_trainable) afterwards to train a subset.
    ///
    /// Switching adapters copies no weight: it reattaches the same tensors.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapterNamed`] for an empty list, [`LoraError::UnknownAdapter`], and
    /// [`LoraError::AdaptersMerged`] while an adapter is merged (unmerge first).
    fn set_active(&self, names: &[&str]) -> Result<Self, LoraError>;

    /// Make exactly the adapters in `names` take gradients; every other adapter is frozen, and
    /// an optimizer leaves it bit for bit as it is. Activity does not change.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`] and [`LoraError::UnknownAdapter`].
    fn set_trainable(&self, names: &[&str]) -> Result<Self, LoraError>;

    /// Run the base model alone, keeping every adapter attached and its activity remembered.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`] and [`LoraError::AdaptersMerged`].
    fn disable_adapters(&self) -> Result<Self, LoraError>;

    /// Undo [`disable_adapters`](Self::disable_adapters).
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`].
    fn enable_adapters(&self) -> Result<Self, LoraError>;

    /// Remove the adapter `name` from every weight.
    ///
    /// # Errors
    ///
    /// [`LoraError::UnknownAdapter`], and [`LoraError::DeleteActive`] for an active adapter:
    /// activate others first, so the model never changes behaviour by surprise.
    fn delete_adapter(&self, name: &str) -> Result<Self, LoraError>;

    /// Zero-pad every adapter to rank `rank`, so that later
    /// [hot-swaps](crate::peft::PeftAdapter::hotswap_into) of any rank up to it change no
    /// shape (PEFT's `prepare_model_for_compiled_hotswap`). Outputs do not change: `A·B` and the
    /// scales stay, the alphas are restated for the new rank, and the parameters keep their
    /// ids. An adapter already at `rank` is left as it is.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`], [`LoraError::ZeroRank`], [`LoraError::RankTooLarge`] (above
    /// a weight's `min(d_in, d_out)`), [`LoraError::HotswapMismatch`] for an adapter whose
    /// rank is already above `rank`, and [`LoraError::UnsupportedVariant`] for a PiSSA/OLoRA
    /// adapter (its saved form depends on its rank).
    fn prepare_hotswap(&self, rank: usize) -> Result<Self, LoraError>;

    /// Combine existing adapters into a new inactive adapter `name`, weighting each by its
    /// factor: see [`Combination`] for PEFT's ways (linear, cat, svd, TIES, DARE, magnitude
    /// pruning and their SVD forms). The report gives, per layer, the relative Frobenius error
    /// of the new `ΔW` against the exact weighted sum `Σ wᵢ·ΔWᵢ` (for the pruning ways, how far
    /// pruning moved it).
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapterNamed`], [`LoraError::UnknownAdapter`],
    /// [`LoraError::AdapterExists`], [`LoraError::InvalidWeight`],
    /// [`LoraError::InvalidDensity`], [`LoraError::IncompatibleRanks`] (for the ways that
    /// combine factors), [`LoraError::ZeroRank`] and [`LoraError::RankTooLarge`] (for the SVD
    /// forms).
    fn add_weighted_adapter(
        &self,
        adapters: &[(&str, f64)],
        name: &str,
        combination: Combination,
    ) -> Result<(Self, CombineReport), LoraError>;

    /// Route each sample of a batch to its own adapter (or to none) for
    /// [`LoraLinear::forward_mixed`](crate::LoraLinear::forward_mixed), after checking that every
    /// named adapter exists and that none is merged.
    ///
    /// # Errors
    ///
    /// [`LoraError::UnknownAdapter`], [`LoraError::AdaptersMerged`] and
    /// [`LoraError::NoAdapters`].
    fn mixed_batch(&self, adapters: &[Option<&str>]) -> Result<MixedBatch, LoraError>;
}

impl<M: Module> LoraModule for M {
    fn merge_lora(&self) -> Result<Self, LoraError> {
        fold(self, Fold::Merge)
    }

    fn unmerge_lora(&self) -> Result<Self, LoraError> {
        fold(self, Fold::Unmerge)
    }

    fn merge_and_unload_lora(&self) -> Result<Self, LoraError> {
        fold(self, Fold::MergeAndUnload)
    }

    fn unload_lora(&self) -> Result<Self, LoraError> {
        fold(self, Fold::Unload)
    }

    fn lora_adapters(&self) -> Vec<AdapterInfo> {
        // Reading only: a shared layer is listed at each of its paths, and foreign
        // reparameterizations are left out.
        let snapshot = Snapshot::read(self);
        let mut infos = Vec::new();
        for (path, state) in &snapshot.states {
            for adapter in &state.adapters {
                let path = match state.param_layout {
                    Some(_) => path.as_str(),
                    None => module_path_of(path),
                };
                infos.push(AdapterInfo {
                    path: path.to_string(),
                    name: adapter.name.clone(),
                    rank: adapter.rank(),
                    experts: adapter.experts,
                    scale: adapter.scale,
                    active: adapter.active && state.enabled,
                    trainable: adapter.trainable,
                    merged: adapter.merged,
                    dora: adapter.is_dora(),
                    lora_bias: adapter.lora_bias.is_some(),
                    residual_init: adapter.residual_init.as_ref().map(|r| r.method.clone()),
                });
            }
        }
        infos
    }

    fn saved_copies(&self) -> Vec<SavedCopyInfo> {
        let snapshot = Snapshot::read(self);
        let mut infos = Vec::new();
        for (path, state) in &snapshot.states {
            for copy in &state.copies {
                infos.push(SavedCopyInfo {
                    path: path.clone(),
                    name: copy.name.clone(),
                    numel: copy.value.lazy_shape().num_elements(),
                    active: copy.active && state.enabled,
                    trainable: copy.trainable,
                    rows: copy.rows.clone(),
                });
            }
        }
        infos
    }

    fn adapter_names(&self) -> Vec<String> {
        Snapshot::read(self).adapter_names()
    }

    fn active_adapters(&self) -> Vec<String> {
        Snapshot::read(self).active_names()
    }

    fn add_adapter(
        &self,
        name: &str,
        config: &LoraConfig,
    ) -> Result<(Self, LoraReport), LoraError> {
        add_adapter(self, name, config, &mut |_| {})
    }

    fn add_adapter_with_progress(
        &self,
        name: &str,
        config: &LoraConfig,
        progress: &mut dyn FnMut(&InitProgress),
    ) -> Result<(Self, LoraReport), LoraError> {
        add_adapter(self, name, config, progress)
    }

    fn set_active(&self, names: &[&str]) -> Result<Self, LoraError> {
        let snapshot = adapted_snapshot(self)?;
        require_names(&snapshot, names)?;
        snapshot.require_unmerged("set_active")?;
        Ok(edit_states(snapshot, |state| {
            let chosen = |name: &String| names.contains(&name.as_str());
            LoraState {
                adapters: (state.adapters.into_iter())
                    .map(|adapter| {
                        let on = chosen(&adapter.name);
                        Adapter {
                            active: on,
                            ..adapter.with_trainable(on)
                        }
                    })
                    .collect(),
                copies: (state.copies.into_iter())
                    .map(|copy| {
                        let on = chosen(&copy.name);
                        SavedCopy {
                            active: on,
                            ..copy.with_trainable(on)
                        }
                    })
                    .collect(),
                ..state
            }
        }))
    }

    fn set_trainable(&self, names: &[&str]) -> Result<Self, LoraError> {
        let snapshot = adapted_snapshot(self)?;
        for name in names {
            snapshot.require_adapter(name)?;
        }
        Ok(edit_states(snapshot, |state| {
            let chosen = |name: &String| names.contains(&name.as_str());
            LoraState {
                adapters: (state.adapters.into_iter())
                    .map(|adapter| {
                        let on = chosen(&adapter.name);
                        adapter.with_trainable(on)
                    })
                    .collect(),
                copies: (state.copies.into_iter())
                    .map(|copy| {
                        let on = chosen(&copy.name);
                        copy.with_trainable(on)
                    })
                    .collect(),
                ..state
            }
        }))
    }

    fn disable_adapters(&self) -> Result<Self, LoraError> {
        let snapshot = adapted_snapshot(self)?;
        snapshot.require_unmerged("disable_adapters")?;
        // The stored base of a PiSSA or OLoRA layer is the residual, not the model's base.
        snapshot.refuse_beside_residual("disable_adapters", "")?;
        Ok(edit_states(snapshot, |state| LoraState {
            enabled: false,
            ..state
        }))
    }

    fn enable_adapters(&self) -> Result<Self, LoraError> {
        let snapshot = adapted_snapshot(self)?;
        Ok(edit_states(snapshot, |state| LoraState {
            enabled: true,
            ..state
        }))
    }

    fn delete_adapter(&self, name: &str) -> Result<Self, LoraError> {
        let snapshot = adapted_snapshot(self)?;
        snapshot.require_adapter(name)?;
        if snapshot.active_names().iter().any(|active| active == name) {
            return Err(LoraError::DeleteActive {
                name: name.to_string(),
            });
        }
        Ok(edit_states(snapshot, |state| LoraState {
            adapters: state
                .adapters
                .into_iter()
                .filter(|adapter| adapter.name != name)
                .collect(),
            copies: state
                .copies
                .into_iter()
                .filter(|copy| copy.name != name)
                .collect(),
            ..state
        }))
    }

    fn prepare_hotswap(&self, rank: usize) -> Result<Self, LoraError> {
        let snapshot = adapted_snapshot(self)?;
        if rank == 0 {
            return Err(LoraError::ZeroRank);
        }
        let mut problems = Vec::new();
        for (path, state) in &snapshot.states {
            let module = module_path_of(path);
            for adapter in &state.adapters {
                let [d_in, _] = adapter.lora_a.lazy_shape().dims::<2>();
                let [_, d_out] = adapter.lora_b.lazy_shape().dims::<2>();
                if rank > d_in.min(d_out) {
                    return Err(LoraError::rank_too_large(module, rank, d_in, d_out));
                }
                if adapter.residual_init.is_some() {
                    return Err(LoraError::UnsupportedVariant {
                        what: "padding a PiSSA/OLoRA adapter; save and reload it first".into(),
                        path: module.to_string(),
                        adapter: adapter.name.clone(),
                    });
                }
                if adapter.rank() > rank {
                    problems.push(format!(
                        "`{module}`: adapter `{}` has rank {}, above {rank}",
                        adapter.name,
                        adapter.rank()
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(LoraError::HotswapMismatch {
                adapter: snapshot.adapter_names().join(", "),
                source_name: format!("prepare_hotswap({rank})"),
                problems,
            });
        }
        Ok(edit_states(snapshot, |state| LoraState {
            adapters: state
                .adapters
                .into_iter()
                .map(|adapter| adapter.padded(rank))
                .collect(),
            ..state
        }))
    }

    fn add_weighted_adapter(
        &self,
        adapters: &[(&str, f64)],
        name: &str,
        combination: Combination,
    ) -> Result<(Self, CombineReport), LoraError> {
        let snapshot = adapted_snapshot(self)?;
        if adapters.is_empty() {
            return Err(LoraError::NoAdapterNamed);
        }
        combination.validate()?;
        for (source, weight) in adapters {
            snapshot.require_adapter(source)?;
            if !weight.is_finite() {
                return Err(LoraError::InvalidWeight {
                    adapter: source.to_string(),
                    weight: *weight,
                });
            }
        }
        snapshot.require_new_name(name)?;
        snapshot.refuse_beside_residual("another adapter beside it", name)?;
        snapshot.refuse_dora(
            |adapter| adapters.iter().any(|(source, _)| *source == adapter.name),
            "combining DoRA adapters (their magnitudes do not add)",
        )?;
        refuse_copies(
            &snapshot,
            |copy| adapters.iter().any(|(source, _)| *source == copy.name),
            "combining adapters with modules_to_save (their trained copies do not add)",
        )?;
        for (path, state) in &snapshot.states {
            let source = |adapter: &&Adapter| adapters.iter().any(|(s, _)| *s == adapter.name);
            if let Some(adapter) =
                (state.adapters.iter().filter(source)).find(|_| state.param_layout.is_some())
            {
                return Err(LoraError::UnsupportedVariant {
                    what: "combining adapters of raw parameters (target_parameters)".into(),
                    path: path.clone(),
                    adapter: adapter.name.clone(),
                });
            }
            if let Some(adapter) = state
                .adapters
                .iter()
                .filter(source)
                .find(|adapter| adapter.lora_bias.is_some())
            {
                return Err(LoraError::UnsupportedVariant {
                    what: "combining adapters with a bias on B (lora_bias; a combination is \
                           made of factors only)"
                        .into(),
                    path: module_path_of(path).to_string(),
                    adapter: adapter.name.clone(),
                });
            }
        }
        // Compute every layer's new adapter before touching the model.
        let mut report = CombineReport::default();
        let mut combined = Vec::new();
        for (path, state) in &snapshot.states {
            if let Some((adapter, layer)) =
                combine::combine(module_path_of(path), state, adapters, name, combination)?
            {
                combined.push((path.clone(), adapter, state.param_layout));
                report.layers.push(layer);
            }
        }
        Ok((
            attach_adapters(snapshot, combined, Vec::new(), HashMap::new()),
            report,
        ))
    }

    fn mixed_batch(&self, adapters: &[Option<&str>]) -> Result<MixedBatch, LoraError> {
        let snapshot = adapted_snapshot(self)?;
        for name in adapters.iter().flatten() {
            snapshot.require_adapter(name)?;
        }
        snapshot.require_unmerged("forward_mixed")?;
        refuse_copies(
            &snapshot,
            |_| true,
            "a mixed batch on a model with modules_to_save (one copy of a module serves a batch)",
        )?;
        // A raw parameter's update is composed into the parameter, one for the whole batch.
        if let Some((path, adapter)) = (snapshot.states.iter())
            .filter(|(_, state)| state.param_layout.is_some())
            .find_map(|(path, state)| state.adapters.first().map(|adapter| (path, adapter)))
        {
            return Err(LoraError::UnsupportedVariant {
                what: "a mixed batch on a model with adapted raw parameters (target_parameters; \
                       one composed parameter serves a batch)"
                    .into(),
                path: path.clone(),
                adapter: adapter.name.clone(),
            });
        }
        let device = snapshot
            .states
            .iter()
            .find_map(|(_, state)| state.adapters.first())
            .map(|adapter| adapter.lora_a.lazy_device())
            .ok_or(LoraError::NoAdapters)?;
        Ok(MixedBatch::new(adapters, &device))
    }
}

/// The snapshot of a model that must carry adapters.
fn adapted_snapshot<M: Module>(model: &M) -> Result<Snapshot<M>, LoraError> {
    let snapshot = Snapshot::take(model)?;
    match snapshot.is_adapted() {
        true => Ok(snapshot),
        false => Err(LoraError::NoAdapters),
    }
}

/// Check a non-empty list of adapter names against the model.
fn require_names<M: Module>(snapshot: &Snapshot<M>, names: &[&str]) -> Result<(), LoraError> {
    if names.is_empty() {
        return Err(LoraError::NoAdapterNamed);
    }
    names
        .iter()
        .try_for_each(|name| snapshot.require_adapter(name))
}

/// Rebuild with every state passed through `edit`; no base changes.
fn edit_states<M: Module>(snapshot: Snapshot<M>, edit: impl Fn(LoraState) -> LoraState) -> M {
    let states: Vec<(String, LoraState)> = snapshot
        .states
        .iter()
        .map(|(path, state)| (path.clone(), edit(state.clone())))
        .collect();
    snapshot.rebuild(states, HashMap::new(), false)
}

/// [`LoraError::UnsupportedVariant`] naming `what` for the first copy (`modules_to_save`) that
/// `pick` selects.
fn refuse_copies<M: Module>(
    snapshot: &Snapshot<M>,
    pick: impl Fn(&SavedCopy) -> bool,
    what: &str,
) -> Result<(), LoraError> {
    for (path, state) in &snapshot.states {
        if let Some(copy) = state.copies.iter().find(|copy| pick(copy)) {
            return Err(LoraError::UnsupportedVariant {
                what: what.to_string(),
                path: module_path_of(path).to_string(),
                adapter: copy.name.clone(),
            });
        }
    }
    Ok(())
}

/// The operations that fold adapters into or out of the base weights.
#[derive(Clone, Copy, PartialEq)]
enum Fold {
    Merge,
    Unmerge,
    MergeAndUnload,
    Unload,
}

impl Fold {
    /// Which adapters of `state` to fold into the base, with which sign, and whether the
    /// adapters stay attached afterwards.
    fn edit(self, state: &LoraState) -> (Vec<usize>, f64, bool) {
        let select = |pick: &dyn Fn(&Adapter) -> bool| -> Vec<usize> {
            (0..state.adapters.len())
                .filter(|&index| pick(&state.adapters[index]))
                .collect()
        };
        match self {
            Fold::Merge => (select(&|a| a.contributes()), 1.0, true),
            Fold::Unmerge => (select(&|a| a.merged), -1.0, true),
            Fold::MergeAndUnload => (select(&|a| a.contributes()), 1.0, false),
            Fold::Unload => (select(&|a| a.merged), -1.0, false),
        }
    }
}

fn fold<M: Module>(model: &M, operation: Fold) -> Result<M, LoraError> {
    let snapshot = adapted_snapshot(model)?;
    let merging = matches!(operation, Fold::Merge | Fold::MergeAndUnload);
    if merging && snapshot.states.iter().any(|(_, state)| !state.enabled) {
        return Err(LoraError::AdaptersDisabled);
    }
    let paths: Vec<String> = snapshot.states.iter().map(|(p, _)| p.clone()).collect();
    let mut stored = snapshot.bases(&paths);
    // The layers' biases, for adapters with a bias on B (lora_bias).
    let bias_paths: Vec<String> = snapshot
        .states
        .iter()
        .filter(|(_, state)| state.adapters.iter().any(|a| a.lora_bias.is_some()))
        .map(|(path, _)| format!("{}.bias", module_path_of(path)))
        .collect();
    let mut stored_biases = snapshot.values(&bias_paths);
    // The parameters whose active copy holds some rows only (trainable tokens), for a
    // merge_and_unload to write those rows into.
    let token_paths: Vec<String> = snapshot
        .states
        .iter()
        .filter(|_| operation == Fold::MergeAndUnload)
        .filter(|(_, state)| state.active_copy().is_some_and(|copy| copy.rows.is_some()))
        .map(|(path, _)| path.clone())
        .collect();
    let token_bases = snapshot.values(&token_paths);

    // Everything is computed and checked before the model is rebuilt.
    let mut bases: HashMap<String, Tensor<2>> = HashMap::new();
    let mut replacements: HashMap<String, Tensor<1>> = HashMap::new();
    let mut states: Vec<(String, LoraState)> = Vec::new();
    for (path, state) in &snapshot.states {
        let mut state = state.clone();
        if operation == Fold::MergeAndUnload
            && let Some(copy) = state.active_copy()
        {
            // As PEFT's merge_and_unload: the active adapter's copy becomes the module's own
            // (for trainable tokens, its rows do).
            let value = match token_bases.get(path) {
                Some(base) => {
                    let site = (snapshot.survey.params.iter())
                        .find(|site| &site.path == path)
                        .expect("copies sit on parameters of the model");
                    let height = site.dims[0];
                    let (count, width) = (base.dims()[0], base.dims()[0] / height.max(1));
                    copy.apply_to::<2>(base.clone().reshape([height, width]))
                        .reshape([count])
                }
                None => copy.value.val(),
            };
            replacements.insert(path.clone(), value);
        }
        let (selected, sign, keep) = operation.edit(&state);
        if !selected.is_empty() {
            let base = stored
                .remove(path)
                .expect("every adapted weight is a 2-D parameter of the model");
            let module = module_path_of(path);
            let bias_path = format!("{module}.bias");
            let bias = stored_biases.remove(&bias_path);
            if let Some(bias) = state.fold_into_bias(module, bias, &selected, sign > 0.0)? {
                replacements.insert(bias_path, bias);
            }
            let folded = state.fold_into_base(module, base, &selected, sign > 0.0)?;
            bases.insert(path.clone(), folded);
        }
        for index in selected {
            state.adapters[index].merged = sign > 0.0;
        }
        if operation == Fold::Unload
            && let Some(init) = state.adapters.iter().find_map(|a| a.residual_init.as_ref())
        {
            // A PiSSA or OLoRA init stored the residual; the base is the one it started from.
            bases.insert(path.clone(), init.base.clone());
        }
        if keep {
            states.push((path.clone(), state));
        }
    }
    match operation {
        Fold::Merge if bases.is_empty() => return Err(LoraError::AlreadyMerged),
        Fold::Unmerge if bases.is_empty() => return Err(LoraError::NothingMerged),
        _ => {}
    }
    Ok(snapshot.rebuild_with(states, bases, replacements, false))
}
