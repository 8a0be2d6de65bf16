//! Bytes on disk: safetensors tensors in and out, and an adapter directory written as one unit:
//! a reader sees the previous pair of files or the new pair, never one of each, and a failed
//! save leaves the previous pair as it was.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::LoraError;

// Safetensors stores little-endian values, and Burn's `TensorData` holds native-endian bytes:
// the two agree on every platform burn-lora builds for.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "adapter files are read and written on little-endian targets only"
);

/// One tensor of a safetensors file, decoded to f32 on the host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostTensor {
    pub key: String,
    /// The dtype as stored, e.g. `F16`.
    pub dtype: String,
    pub shape: Vec<usize>,
    /// The values as f32, or `None` for a dtype that is not a float LoRA can use.
    pub values: Option<Vec<f32>>,
}

/// Decode every tensor of a safetensors buffer; `path` names the file in errors.
pub(crate) fn read_tensors(bytes: &[u8], path: &str) -> Result<Vec<HostTensor>, LoraError> {
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|error| LoraError::InvalidSafetensors {
            path: path.to_string(),
            message: error.to_string(),
        })?;
    let mut decoded: Vec<HostTensor> = tensors
        .iter()
        .map(|(key, view)| HostTensor {
            key: key.to_string(),
            dtype: format!("{:?}", view.dtype()),
            shape: view.shape().to_vec(),
            values: decode(view.dtype(), view.shape(), view.data()),
        })
        .collect();
    decoded.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(decoded)
}

/// Little-endian floats to f32, through Burn's own conversions; `None` for any other dtype.
fn decode(dtype: Dtype, shape: &[usize], data: &[u8]) -> Option<Vec<f32>> {
    let dtype = match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        _ => return None,
    };
    TensorData::try_from_bytes_vec(data.to_vec(), shape.to_vec(), dtype)
        .and_then(|data| data.try_into_vec_as::<f32>())
        .ok()
}

/// The safetensors dtype of a float tensor's data, and its bytes; data of another dtype is
/// written as f32.
pub(crate) fn encode(data: TensorData) -> (Dtype, Vec<u8>) {
    let (dtype, data) = match data.dtype() {
        DType::F64 => (Dtype::F64, data),
        DType::F16 => (Dtype::F16, data),
        DType::BF16 => (Dtype::BF16, data),
        DType::F32 => (Dtype::F32, data),
        _ => (Dtype::F32, data.convert_dtype(DType::F32)),
    };
    (dtype, data.into_bytes().to_vec())
}

/// A tensor to write: its key, safetensors dtype, shape and little-endian bytes.
pub(crate) struct OutTensor {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// The safetensors bytes of `tensors`, with PEFT's `{"format": "pt"}` metadata.
pub(crate) fn write_tensors(tensors: &[OutTensor], path: &str) -> Result<Vec<u8>, LoraError> {
    let views = tensors
        .iter()
        .map(|tensor| {
            TensorView::new(tensor.dtype, tensor.shape.clone(), &tensor.bytes)
                .map(|view| (tensor.key.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>();
    let metadata = [("format".to_string(), "pt".to_string())].into();
    views
        .and_then(|views| safetensors::serialize(views, Some(metadata)))
        .map_err(|error| LoraError::InvalidSafetensors {
            path: path.to_string(),
            message: error.to_string(),
        })
}

/// The config field that holds the weights file's digest, so that a reader can tell a pair of
/// files written by one save from a torn one.
pub(crate) const DIGEST_FIELD: &str = "burn_lora_weights_digest";

/// A held advisory lock on an adapter directory, released on drop (and by the system if the
/// process dies, so a crash leaves no stale lock).
pub(crate) struct DirLock {
    _directory: Option<fs::File>,
}

/// Lock the directory `dir` itself (no lock file is left in it): exclusively for a writer,
/// shared for a reader. Where the platform cannot open a directory as a file, it goes on
/// without a lock, and the weights' digest in the config still catches a torn pair.
pub(crate) fn lock(dir: &Path, exclusive: bool) -> Result<DirLock, LoraError> {
    let Ok(directory) = fs::File::open(dir) else {
        return Ok(DirLock { _directory: None });
    };
    let locked = match exclusive {
        true => directory.lock(),
        false => directory.lock_shared(),
    };
    locked.map_err(|error| io_error(dir, &error))?;
    Ok(DirLock {
        _directory: Some(directory),
    })
}

/// A 64-bit FNV-1a digest of `bytes`, written as `fnv1a64:<hex>`: enough to tell two saves'
/// weights apart, not a cryptographic hash.
pub(crate) fn digest(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("fnv1a64:{hash:016x}")
}

/// A step of [`publish`], where a test can make it fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Writing the temporary copy of file `i`.
    Stage(usize),
    /// Keeping the previous file `i` aside.
    Backup(usize),
    /// Renaming the temporary copy of file `i` over the previous one.
    Rename(usize),
}

/// Write `files` (name, bytes) into `dir` as one unit: each is written to a uniquely named
/// temporary file, the previous files are kept aside, then the new ones are renamed into place
/// in order. A failure at any step puts the previous files back, so `dir` holds either every
/// old file or every new one, and no temporary file. Hold the directory's exclusive
/// [`lock`] around it so that writers do not interleave.
pub(crate) fn publish(dir: &Path, files: &[(&str, &[u8])]) -> Result<(), LoraError> {
    publish_with(dir, files, &mut |_| Ok(()))
}

/// [`publish`], calling `before` ahead of each step; an error from it fails that step.
pub(crate) fn publish_with(
    dir: &Path,
    files: &[(&str, &[u8])],
    before: &mut dyn FnMut(Step) -> std::io::Result<()>,
) -> Result<(), LoraError> {
    remove_leftovers(dir, files);
    let suffix = unique_suffix();
    let staged: Vec<PathBuf> = files
        .iter()
        .map(|(name, _)| dir.join(format!(".{name}.{suffix}.tmp")))
        .collect();
    let backups: Vec<PathBuf> = files
        .iter()
        .map(|(name, _)| dir.join(format!(".{name}.{suffix}.bak")))
        .collect();
    let finals: Vec<PathBuf> = files.iter().map(|(name, _)| dir.join(name)).collect();
    let mut kept: Vec<bool> = vec![false; files.len()];
    let clean = |paths: &[PathBuf]| paths.iter().for_each(|path| drop(fs::remove_file(path)));

    for (index, (_, bytes)) in files.iter().enumerate() {
        let written = before(Step::Stage(index)).and_then(|()| {
            let mut file = fs::File::create_new(&staged[index])?;
            file.write_all(bytes)?;
            file.sync_all()
        });
        if let Err(error) = written {
            clean(&staged);
            return Err(io_error(&staged[index], &error));
        }
    }
    for index in 0..files.len() {
        if !finals[index].exists() {
            continue;
        }
        // A hard link costs nothing; where links are not supported, a copy.
        let kept_aside = before(Step::Backup(index)).and_then(|()| {
            fs::hard_link(&finals[index], &backups[index])
                .or_else(|_| fs::copy(&finals[index], &backups[index]).map(drop))
        });
        if let Err(error) = kept_aside {
            clean(&staged);
            clean(&backups);
            return Err(io_error(&finals[index], &error));
        }
        kept[index] = true;
    }
    for index in 0..files.len() {
        let renamed =
            before(Step::Rename(index)).and_then(|()| fs::rename(&staged[index], &finals[index]));
        if let Err(error) = renamed {
            // Put back what the earlier renames replaced.
            for done in 0..index {
                let _ = match kept[done] {
                    true => fs::rename(&backups[done], &finals[done]),
                    false => fs::remove_file(&finals[done]),
                };
            }
            clean(&staged);
            clean(&backups);
            return Err(io_error(&finals[index], &error));
        }
    }
    clean(&backups);
    // Make the renames themselves durable; not every platform can open a directory.
    if let Ok(directory) = fs::File::open(dir) {
        let _ = directory.sync_all();
    }
    Ok(())
}

/// Temporary and backup files a crashed save of `files` left in `dir`. Only called under the
/// exclusive lock, when no other save can be running.
fn remove_leftovers(dir: &Path, files: &[(&str, &[u8])]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = files
            .iter()
            .any(|(file, _)| name.starts_with(&format!(".{file}.")));
        if ours && (name.ends_with(".tmp") || name.ends_with(".bak")) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A suffix no other save, in this process or another, uses at the same time.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |time| time.subsec_nanos());
    format!(
        "{}.{}.{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Read a whole file.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, LoraError> {
    fs::read(path).map_err(|error| io_error(path, &error))
}

pub(crate) fn io_error(path: &Path, error: &std::io::Error) -> LoraError {
    LoraError::Io {
        path: path.display().to_string(),
        kind: error.kind(),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("burn_lora_publish_{name}_{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                (name, fs::read(entry.path()).unwrap())
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_failure_at_any_step_leaves_the_previous_pair() {
        let old: [(&str, &[u8]); 2] = [("weights", b"old weights"), ("config", b"old config")];
        let new: [(&str, &[u8]); 2] = [("weights", b"new weights"), ("config", b"new config")];
        let steps = [
            Step::Stage(0),
            Step::Stage(1),
            Step::Backup(0),
            Step::Backup(1),
            Step::Rename(0),
            Step::Rename(1),
        ];
        for failing in steps {
            let dir = directory("fail");
            publish(&dir, &old).unwrap();
            let before = contents(&dir);
            let result = publish_with(&dir, &new, &mut |step| match step == failing {
                true => Err(std::io::Error::other("injected")),
                false => Ok(()),
            });
            assert!(result.is_err(), "{failing:?}");
            assert_eq!(contents(&dir), before, "{failing:?}: the old pair changed");
            // And the next save goes through.
            publish(&dir, &new).unwrap();
            let after: Vec<(String, Vec<u8>)> = contents(&dir);
            assert_eq!(
                after,
                vec![
                    ("config".to_string(), b"new config".to_vec()),
                    ("weights".to_string(), b"new weights".to_vec())
                ]
            );
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_first_save_that_fails_leaves_nothing() {
        let dir = directory("first");
        let new: [(&str, &[u8]); 2] = [("weights", b"w"), ("config", b"c")];
        let result = publish_with(&dir, &new, &mut |step| match step == Step::Rename(1) {
            true => Err(std::io::Error::other("injected")),
            false => Ok(()),
        });
        assert!(result.is_err());
        assert!(contents(&dir).is_empty(), "{:?}", contents(&dir));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn crash_leftovers_are_cleaned_by_the_next_save() {
        let dir = directory("leftovers");
        fs::write(dir.join(".weights.1.2.3.tmp"), b"partial").unwrap();
        fs::write(dir.join(".config.1.2.3.bak"), b"old").unwrap();
        fs::write(dir.join("unrelated.tmp"), b"mine").unwrap();
        publish(&dir, &[("weights", b"w"), ("config", b"c")]).unwrap();
        let names: Vec<String> = contents(&dir).into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["config", "unrelated.tmp", "weights"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_digest_tells_contents_apart() {
        assert_eq!(digest(b""), "fnv1a64:cbf29ce484222325");
        assert_ne!(digest(b"weights a"), digest(b"weights b"));
    }
}
