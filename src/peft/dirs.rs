//! Several adapters of one model in one directory, laid out as PEFT's `save_pretrained` lays
//! them out: the adapter `default` at the root, every other adapter in the subdirectory of its
//! name.
//!
//! ```text
//! adapters/
//!   adapter_model.safetensors    the adapter `default`
//!   adapter_config.json
//!   second/
//!     adapter_model.safetensors  the adapter `second`
//!     adapter_config.json
//! ```
//!
//! Each pair of files goes through the single-adapter path (`save.rs` and [`PeftAdapter`]);
//! this file only decides where each adapter lives.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;

use super::files::io_error;
use super::load::{LoadOptions, PeftAdapter};
use super::save::{SaveOptions, SavedAdapter, save};
use super::{CONFIG_FILE, WEIGHTS_FILE};
use crate::error::LoadReport;
use crate::model::snapshot::Snapshot;
use crate::{DEFAULT_ADAPTER, LoraError};

/// Write the adapters of `model` to `dir` in PEFT's layout: `default` at the root of `dir`,
/// every other adapter `name` in `dir/name/`, as PEFT's `save_pretrained` writes them and as
/// `PeftModel.from_pretrained(model, dir)` plus `load_adapter(dir/name, adapter_name=name)`
/// read them back.
///
/// `names` picks the adapters; `None` writes every adapter, in the order of
/// [`adapter_names`](crate::LoraModule::adapter_names). Without a `default` adapter the root
/// holds no adapter files, only subdirectories (PEFT does the same).
///
/// Each adapter's pair of files is written as one unit, under its directory's lock (see
/// [`save_adapter_with`](super::save_adapter_with)); the set is not: a failure or a crash
/// midway leaves the adapters before it saved and the others as they were. A save replaces
/// and never deletes, so an adapter saved to `dir` earlier and not named now stays there: save
/// into a fresh directory to get exactly this set.
///
/// ```no_run
/// use burn_lora::peft::{SaveOptions, save_adapters};
/// # fn demo<M: burn::module::Module>(model: M) -> Result<(), burn_lora::LoraError> {
/// // adapters/adapter_model.safetensors (`default`), adapters/summarize/... and so on.
/// let saved = save_adapters(&model, "adapters", None, &SaveOptions::new())?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// Before anything is written: [`LoraError::NoAdapters`], [`LoraError::NoAdapterNamed`] for
/// an empty list, [`LoraError::InvalidAdapterName`] for a name that cannot name a directory
/// (empty, `.`, `..`, with a `/` or `\`, starting with `.`) and
/// [`LoraError::UnknownAdapter`]. Then whatever [`save_adapter_with`](super::save_adapter_with)
/// refuses, for the first adapter that fails.
pub fn save_adapters<M: Module>(
    model: &M,
    dir: impl AsRef<Path>,
    names: Option<&[&str]>,
    options: &SaveOptions,
) -> Result<Vec<SavedAdapter>, LoraError> {
    let dir = dir.as_ref();
    let snapshot = Snapshot::read(model);
    if !snapshot.is_adapted() {
        return Err(LoraError::NoAdapters);
    }
    let names: Vec<String> = match names {
        None => snapshot.adapter_names(),
        Some([]) => return Err(LoraError::NoAdapterNamed),
        Some(names) => names.iter().map(|name| name.to_string()).collect(),
    };
    // Every check before the first file: a refused name never leaves half a set behind.
    for name in &names {
        check_name(name)?;
    }
    for name in &names {
        snapshot.require_adapter(name)?;
    }
    // Each save takes its own snapshot; this one need not live through them.
    drop(snapshot);
    names
        .iter()
        .map(|name| save(model, &location(dir, name), name, options))
        .collect()
}

/// Read the adapters in the PEFT directory `dir` and attach them to `model`.
///
/// `None` loads what [`adapter_dirs`] lists: the root's adapter as `default` (when the root
/// holds an `adapter_config.json`), then every subdirectory holding one, under the
/// subdirectory's name, in sorted order. `Some(names)` loads exactly those, in that order,
/// `default` from the root. As in PEFT, the first adapter becomes the active one and the
/// others wait for [`set_active`](crate::LoraModule::set_active). `options` (strictness, key
/// map, trainability) apply to every adapter; the reports come in loading order.
///
/// All or nothing: every adapter is read, then attached one after the other to the model the
/// previous one returned; on any error the partial result is dropped, and `model`, which no
/// operation changes, is as it was.
///
/// ```no_run
/// use burn_lora::LoraModule;
/// use burn_lora::peft::{LoadOptions, load_adapters};
/// # fn demo<M: burn::module::Module>(base: M) -> Result<(), burn_lora::LoraError> {
/// let (model, reports) = load_adapters(&base, "adapters", None, &LoadOptions::new())?;
/// let summarize = model.set_active(&["summarize"])?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`LoraError::NoAdapterNamed`] for an empty list, [`LoraError::InvalidAdapterName`] for a
/// name that cannot name a directory, [`LoraError::Io`] of kind
/// [`NotFound`](std::io::ErrorKind::NotFound) for an adapter asked for and absent, or for a
/// directory without any adapter, and everything [`PeftAdapter::read`] and
/// [`PeftAdapter::load_into`] refuse, for the first adapter that fails.
pub fn load_adapters<M: Module>(
    model: &M,
    dir: impl AsRef<Path>,
    names: Option<&[&str]>,
    options: &LoadOptions,
) -> Result<(M, Vec<LoadReport>), LoraError> {
    let dir = dir.as_ref();
    let locations = match names {
        None => {
            let found = adapter_dirs(dir)?;
            if found.is_empty() {
                return Err(LoraError::Io {
                    path: dir.display().to_string(),
                    kind: std::io::ErrorKind::NotFound,
                    message: format!(
                        "no PEFT adapter: no {CONFIG_FILE} at the root or in any subdirectory"
                    ),
                });
            }
            found
        }
        Some([]) => return Err(LoraError::NoAdapterNamed),
        Some(names) => {
            for name in names {
                check_name(name)?;
            }
            names
                .iter()
                .map(|name| {
                    let path = location(dir, name);
                    match path.join(CONFIG_FILE).is_file() {
                        true => Ok((name.to_string(), path)),
                        false => Err(missing(dir, name)),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    // Read every file first, so that a broken adapter fails before any work on the model.
    let adapters = locations
        .into_iter()
        .map(|(name, path)| PeftAdapter::read(&path).map(|adapter| (name, adapter)))
        .collect::<Result<Vec<(String, PeftAdapter)>, LoraError>>()?;
    let mut loaded: Option<M> = None;
    let mut reports = Vec::with_capacity(adapters.len());
    for (name, adapter) in &adapters {
        let current = loaded.as_ref().unwrap_or(model);
        let (next, report) = adapter.load_into(current, name, options)?;
        loaded = Some(next);
        reports.push(report);
    }
    let model = loaded.expect("at least one adapter was asked for or found");
    Ok((model, reports))
}

/// The adapters in the PEFT directory `dir`, as `(name, directory)`: `default` first when the
/// root holds an `adapter_config.json`, then every immediate subdirectory holding one, named
/// after it, in sorted order. Hidden subdirectories (a leading `.`) are not adapters.
///
/// # Errors
///
/// [`LoraError::Io`] when `dir` cannot be listed (kind
/// [`NotFound`](std::io::ErrorKind::NotFound) when it does not exist), and
/// [`LoraError::InvalidAdapterName`] for an adapter subdirectory whose name cannot be an
/// adapter's (not UTF-8, a `\`...), or a subdirectory `default` beside an adapter at the root:
/// two adapters that PEFT would both call `default`.
pub fn adapter_dirs(dir: impl AsRef<Path>) -> Result<Vec<(String, PathBuf)>, LoraError> {
    let dir = dir.as_ref();
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|error| io_error(dir, &error))? {
        let entry = entry.map_err(|error| io_error(dir, &error))?;
        let path = entry.path();
        // False for a plain file too: `file/adapter_config.json` is no file.
        if !path.join(CONFIG_FILE).is_file() {
            continue;
        }
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            return Err(LoraError::InvalidAdapterName {
                name: file_name.to_string_lossy().into_owned(),
                reason: format!(
                    "the directory `{}` has a name that is not UTF-8",
                    path.display()
                ),
            });
        };
        if name.starts_with('.') {
            continue;
        }
        check_name(name)?;
        found.push((name.to_string(), path));
    }
    found.sort();
    if dir.join(CONFIG_FILE).is_file() {
        if found.iter().any(|(name, _)| name == DEFAULT_ADAPTER) {
            return Err(LoraError::InvalidAdapterName {
                name: DEFAULT_ADAPTER.to_string(),
                reason: format!(
                    "`{}` holds an adapter at its root, which PEFT calls `{DEFAULT_ADAPTER}`, and \
                     another in its subdirectory `{DEFAULT_ADAPTER}`",
                    dir.display()
                ),
            });
        }
        found.insert(0, (DEFAULT_ADAPTER.to_string(), dir.to_path_buf()));
    }
    Ok(found)
}

/// Where PEFT keeps the adapter `name` in `dir`: the root for `default`, `dir/name` otherwise.
fn location(dir: &Path, name: &str) -> PathBuf {
    match name == DEFAULT_ADAPTER {
        true => dir.to_path_buf(),
        false => dir.join(name),
    }
}

/// [`LoraError::InvalidAdapterName`] unless `name` can name a subdirectory of its own, one
/// level below the root, that no other adapter and no file of the root uses.
fn check_name(name: &str) -> Result<(), LoraError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.contains(['/', '\\']) {
        "it contains a path separator"
    } else if name.contains('\0') {
        "it contains a NUL character"
    } else if name.starts_with('.') {
        // `.` and `..` name no directory of their own; other dot names are hidden, like the
        // temporary files of a save.
        "it starts with `.`"
    } else if name == WEIGHTS_FILE || name == CONFIG_FILE {
        "it is the name of a file at the root"
    } else {
        return Ok(());
    };
    Err(LoraError::InvalidAdapterName {
        name: name.to_string(),
        reason: reason.to_string(),
    })
}

/// The error for the adapter `name` asked for and absent from `dir`.
fn missing(dir: &Path, name: &str) -> LoraError {
    let place = match name == DEFAULT_ADAPTER {
        true => "at the root".to_string(),
        false => format!("in the subdirectory `{name}`"),
    };
    let present: Vec<String> = adapter_dirs(dir)
        .map(|found| found.into_iter().map(|(name, _)| name).collect())
        .unwrap_or_default();
    LoraError::Io {
        path: location(dir, name).join(CONFIG_FILE).display().to_string(),
        kind: std::io::ErrorKind::NotFound,
        message: format!(
            "no adapter `{name}`: PEFT keeps it {place}, and there is no {CONFIG_FILE} there; \
             the directory holds {present:?}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lives_at_the_root_and_the_others_below_it() {
        let dir = Path::new("adapters");
        assert_eq!(location(dir, "default"), dir);
        assert_eq!(location(dir, "second"), dir.join("second"));
    }

    #[test]
    fn names_that_cannot_be_a_directory_are_refused() {
        for name in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            ".hidden",
            "a\0b",
            WEIGHTS_FILE,
            CONFIG_FILE,
        ] {
            assert!(
                matches!(check_name(name), Err(LoraError::InvalidAdapterName { .. })),
                "{name:?}"
            );
        }
        for name in ["default", "second", "task-1", "v2_final", "résumé"] {
            assert_eq!(check_name(name), Ok(()), "{name:?}");
        }
    }
}
