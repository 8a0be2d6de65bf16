//! Bytes on disk: safetensors tensors in and out, and writes that never leave half a file.

use std::fs;
use std::io::Write;
use std::path::Path;

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
