//! Training with burn-train's `Learner`: checkpoints that hold the adapters, not the model.
//! Behind the `train` feature.
//!
//! A LoRA run trains a few kilobytes to megabytes of factors on a frozen base of gigabytes.
//! burn-train's default checkpointer writes the whole model record every epoch;
//! [`AdapterCheckpointer`] writes only what the run changes, in two forms:
//!
//! - the adapters in PEFT's format (`adapter_model.safetensors` and `adapter_config.json`, one
//!   subfolder per extra adapter, as PEFT's `save_pretrained` lays them out), which PEFT,
//!   [`peft::load_adapters`] or a later run can read;
//! - `resume.bpk`, the adapter parameters' record with their `ParamId`s (so the optimizer's
//!   state, keyed by id, lines up again) and exact values, and `flags.json`, every adapter's
//!   `active`, `trainable` and `merged` flags and its layer's `enabled` switch. Burn's records
//!   hold tensors only; the flags file is what makes a restore refuse a model whose flags
//!   differ, instead of resuming a merged run on an unmerged base (or the reverse).
//!
//! The optimizer's record already holds the adapters' state only (the base takes no
//! gradient), so burn-train's own `FileCheckpointer` serves for it and for the scheduler:
//!
//! ```no_run
//! # use burn::prelude::*;
//! # use burn::nn::{Linear, LinearConfig};
//! use burn::train::checkpoint::FileCheckpointer;
//! use burn_lora::train::AdapterCheckpointer;
//! # fn demo(model: Linear) -> Result<(), burn_lora::LoraError> {
//! let dir = "runs/lora/checkpoint";
//! let adapters = AdapterCheckpointer::new(dir, &model)?;
//! let optimizer = FileCheckpointer::new(dir, "optim");
//! let scheduler = FileCheckpointer::new(dir, "scheduler");
//! // SupervisedTraining::new(..).with_custom_checkpointers(adapters, optimizer, scheduler)
//! # let _ = (adapters, optimizer, scheduler);
//! # Ok(())
//! # }
//! ```
//!
//! Each epoch's checkpoint is the directory `adapter-<epoch>`, written as a unit: it is built
//! under a temporary name and renamed into place, so a crash leaves the previous checkpoints and
//! at most a temporary directory, which the next save removes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::module::{Module, ParamGroup, ParamId};
use burn::store::ModuleRecord;
use burn::train::checkpoint::{Checkpointer, CheckpointerError};
use serde::{Deserialize, Serialize};

use crate::error::LoraError;
use crate::model::LoraModule;
use crate::model::snapshot::Snapshot;
use crate::model::survey::module_path_of;
use crate::peft::files::{io_error, unique_suffix};
use crate::peft::{self, SaveOptions};

/// The record of the adapter parameters, with their ids, inside a checkpoint directory.
pub const RESUME_FILE: &str = "resume.bpk";
/// The adapters' flags inside a checkpoint directory.
pub const FLAGS_FILE: &str = "flags.json";

/// One adapter's flags, as a checkpoint records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterFlags {
    /// The adapted layer's module path.
    pub path: String,
    /// The adapter's name.
    pub name: String,
    /// Whether it takes part in the forward pass (while its layer is enabled).
    pub active: bool,
    /// Whether its factors take gradients.
    pub trainable: bool,
    /// Whether it is folded into the stored base.
    pub merged: bool,
    /// Whether its layer's adapters are enabled (not switched off by
    /// [`disable_adapters`](crate::LoraModule::disable_adapters)).
    pub enabled: bool,
}

/// The flags of every adapter of `model`, in the order of its layers and adapters.
pub fn adapter_flags<M: Module>(model: &M) -> Vec<AdapterFlags> {
    let snapshot = Snapshot::read(model);
    let mut flags = Vec::new();
    for (path, state) in &snapshot.states {
        for adapter in &state.adapters {
            flags.push(AdapterFlags {
                path: module_path_of(path).to_string(),
                name: adapter.name.clone(),
                active: adapter.active,
                trainable: adapter.trainable,
                merged: adapter.merged,
                enabled: state.enabled,
            });
        }
    }
    flags
}

/// The ids of every parameter the adapters of `model` own: each adapter's `A`, `B`, DoRA
/// magnitude and bias on `B`, and the copies of `modules_to_save`. The group of these ids is what a LoRA run
/// trains, and what [`adapter_record`] records.
pub fn adapter_param_ids<M: Module>(model: &M) -> Vec<ParamId> {
    let snapshot = Snapshot::read(model);
    let mut ids = Vec::new();
    for (_, state) in &snapshot.states {
        for adapter in &state.adapters {
            ids.extend([adapter.lora_a.id, adapter.lora_b.id]);
            ids.extend(adapter.magnitude.as_ref().map(|magnitude| magnitude.id));
            ids.extend(adapter.lora_bias.as_ref().map(|bias| bias.id));
        }
        ids.extend(state.copies.iter().map(|copy| copy.value.id));
    }
    ids
}

/// The record of the adapter parameters of `model` alone (see [`adapter_param_ids`]), ready to
/// be applied over the same model's base with `load_record`: it allows a partial load.
///
/// # Errors
///
/// [`LoraError::NoAdapters`] when `model` carries none.
pub fn adapter_record<M: Module>(model: &M) -> Result<ModuleRecord, LoraError> {
    let ids = adapter_param_ids(model);
    if ids.is_empty() {
        return Err(LoraError::NoAdapters);
    }
    Ok(model
        .clone()
        .into_record_group(ParamGroup::from_ids(ids))
        .allow_partial(true))
}

/// A burn-train checkpointer of the model record that writes the adapters only: PEFT files,
/// the adapters' record for an exact resume, and their flags (see the [module](self) docs).
///
/// It keeps a copy of the model it was made from (its parameters are shared, not copied) to
/// turn the Learner's record back into adapters, and to check on restore that the flags of
/// the model being resumed are the ones the checkpoint was taken with.
pub struct AdapterCheckpointer<M> {
    directory: PathBuf,
    template: Mutex<M>,
    options: SaveOptions,
}

impl<M: Module + LoraModule + 'static> AdapterCheckpointer<M> {
    /// A checkpointer writing into `directory` (created when missing) for runs of `model`.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`] when `model` carries none, and [`LoraError::Io`] when the
    /// directory cannot be created.
    pub fn new(directory: impl AsRef<Path>, model: &M) -> Result<Self, LoraError> {
        if adapter_param_ids(model).is_empty() {
            return Err(LoraError::NoAdapters);
        }
        let directory = directory.as_ref().to_path_buf();
        fs::create_dir_all(&directory).map_err(|error| io_error(&directory, &error))?;
        Ok(Self {
            directory,
            template: Mutex::new(model.clone()),
            options: SaveOptions::default(),
        })
    }

    /// The options the PEFT files are written with (key map, base model name, task type).
    pub fn with_save_options(mut self, options: SaveOptions) -> Self {
        self.options = options;
        self
    }

    /// The directory holding the checkpoint of `epoch`.
    pub fn epoch_dir(&self, epoch: usize) -> PathBuf {
        self.directory.join(format!("adapter-{epoch}"))
    }

    /// The model the checkpointer was made from.
    fn template(&self) -> M {
        match self.template.lock() {
            Ok(template) => template.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Write the checkpoint of `epoch` from the full model `record`.
    fn write(&self, epoch: usize, record: ModuleRecord) -> Result<(), LoraError> {
        let model = self.template().try_load_record(record).map_err(|error| {
            LoraError::CheckpointMismatch {
                path: self.epoch_dir(epoch).display().to_string(),
                problems: vec![error.to_string()],
            }
        })?;
        remove_leftovers(&self.directory);
        let staging = self
            .directory
            .join(format!(".adapter-{epoch}.{}.tmp", unique_suffix()));
        let written = self.stage(&model, &staging);
        if let Err(error) = written {
            let _ = fs::remove_dir_all(&staging);
            return Err(error);
        }
        let target = self.epoch_dir(epoch);
        // The previous checkpoint of this epoch (a rerun) is moved aside, then dropped once the
        // new one is in place.
        let aside = self
            .directory
            .join(format!(".adapter-{epoch}.{}.old", unique_suffix()));
        let had_previous = target.exists();
        if had_previous {
            fs::rename(&target, &aside).map_err(|error| io_error(&target, &error))?;
        }
        if let Err(error) = fs::rename(&staging, &target) {
            if had_previous {
                let _ = fs::rename(&aside, &target);
            }
            let _ = fs::remove_dir_all(&staging);
            return Err(io_error(&target, &error));
        }
        if had_previous {
            let _ = fs::remove_dir_all(&aside);
        }
        if let Ok(directory) = fs::File::open(&self.directory) {
            let _ = directory.sync_all();
        }
        Ok(())
    }

    /// Everything of one checkpoint, written into `dir`.
    fn stage(&self, model: &M, dir: &Path) -> Result<(), LoraError> {
        fs::create_dir_all(dir).map_err(|error| io_error(dir, &error))?;
        peft::save_adapters(model, dir, None, &self.options)?;
        let resume = dir.join(RESUME_FILE);
        adapter_record(model)?
            .save(&resume)
            .map_err(|error| other_error(&resume, error))?;
        let flags_path = dir.join(FLAGS_FILE);
        let flags = serde_json::to_vec_pretty(&adapter_flags(model))
            .map_err(|error| other_error(&flags_path, error))?;
        fs::write(&flags_path, flags).map_err(|error| io_error(&flags_path, &error))
    }

    /// Read the checkpoint of `epoch` back as a partial record, after checking its flags.
    fn read(&self, epoch: usize) -> Result<ModuleRecord, LoraError> {
        let dir = self.epoch_dir(epoch);
        let flags_path = dir.join(FLAGS_FILE);
        let bytes = fs::read(&flags_path).map_err(|error| io_error(&flags_path, &error))?;
        let saved: Vec<AdapterFlags> =
            serde_json::from_slice(&bytes).map_err(|error| other_error(&flags_path, error))?;
        let current = adapter_flags(&self.template());
        let problems = flag_differences(&saved, &current);
        if !problems.is_empty() {
            return Err(LoraError::CheckpointMismatch {
                path: dir.display().to_string(),
                problems,
            });
        }
        let resume = dir.join(RESUME_FILE);
        let record = ModuleRecord::load(&resume).map_err(|error| other_error(&resume, error))?;
        Ok(record.allow_partial(true))
    }
}

impl<M: Module + LoraModule + 'static> Checkpointer<ModuleRecord> for AdapterCheckpointer<M> {
    fn save(&self, epoch: usize, record: ModuleRecord) -> Result<(), CheckpointerError> {
        self.write(epoch, record).map_err(checkpointer_error)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        let dir = self.epoch_dir(epoch);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(CheckpointerError::IOError(error)),
        }
    }

    fn restore(&self, epoch: usize) -> Result<ModuleRecord, CheckpointerError> {
        self.read(epoch).map_err(checkpointer_error)
    }
}

/// What differs between the flags a checkpoint saved and the model's, one line each.
fn flag_differences(saved: &[AdapterFlags], current: &[AdapterFlags]) -> Vec<String> {
    let mut problems = Vec::new();
    let key = |flags: &AdapterFlags| (flags.path.clone(), flags.name.clone());
    for flags in saved {
        match current.iter().find(|other| key(other) == key(flags)) {
            None => problems.push(format!(
                "adapter `{}` at `{}` is in the checkpoint, not in the model",
                flags.name, flags.path
            )),
            Some(other) if other != flags => problems.push(format!(
                "adapter `{}` at `{}`: the checkpoint has {}, the model {}",
                flags.name,
                flags.path,
                describe(flags),
                describe(other)
            )),
            Some(_) => {}
        }
    }
    for flags in current {
        if !saved.iter().any(|other| key(other) == key(flags)) {
            problems.push(format!(
                "adapter `{}` at `{}` is in the model, not in the checkpoint",
                flags.name, flags.path
            ));
        }
    }
    problems
}

fn describe(flags: &AdapterFlags) -> String {
    format!(
        "active={} trainable={} merged={} enabled={}",
        flags.active, flags.trainable, flags.merged, flags.enabled
    )
}

/// A [`LoraError`] as burn-train's error, its message kept.
fn checkpointer_error(error: LoraError) -> CheckpointerError {
    CheckpointerError::Unknown(error.to_string())
}

/// A failure reading or writing `path` that is not the system's (a record or JSON error).
fn other_error(path: &Path, error: impl std::fmt::Display) -> LoraError {
    LoraError::Io {
        path: path.display().to_string(),
        kind: std::io::ErrorKind::InvalidData,
        message: error.to_string(),
    }
}

/// Temporary directories a crashed save left behind.
fn remove_leftovers(directory: &Path) {
    let Ok(entries) = fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".adapter-") && (name.ends_with(".tmp") || name.ends_with(".old")) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
