//! Bytes on disk: safetensors tensors in and out, and writes that never leave half a file.

use std::fs;
use std::io::Write;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::LoraError;

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
            values: decode(view.dtype(), view.data()),
        })
        .collect();
    decoded.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(decoded)
}

/// Little-endian floats to f32; `None` for any other dtype.
fn decode(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let values = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")) as f32)
            .collect(),
        _ => return None,
    };
    Some(values)
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

/// Write `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader (or a crash) sees the old file or the new one, never a part.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LoraError> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = fs::File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = fs::remove_file(&temporary);
        return Err(io_error(path, &error));
    }
    // Make the rename itself durable; not every platform can open a directory.
    if let Some(directory) = path.parent()
        && let Ok(directory) = fs::File::open(directory)
    {
        let _ = directory.sync_all();
    }
    Ok(())
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
