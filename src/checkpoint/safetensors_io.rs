//! safetensors files: an 8-byte little-endian header length, a JSON header giving each
//! tensor's dtype, shape and byte range (and a `__metadata__` map of strings), then the raw
//! little-endian tensor data.
//!
//! Writing streams the tensors to disk one at a time (the header is small and built here),
//! so a checkpoint never needs a second in-memory copy of the weights. Reading checks the
//! header with the `safetensors` crate and converts every float dtype diffusers ships to f32.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::{json, Map, Value};

use super::{error, write_atomic};
use crate::error::{Error, Result};

/// A named f32 tensor: one entry of a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// The elements in row-major order, as many as the product of `shape`.
    pub data: Vec<f32>,
}

/// The header key of the free-form string metadata.
const METADATA_KEY: &str = "__metadata__";

/// The width in bytes of the header length that starts the file.
const HEADER_LEN_BYTES: usize = 8;

/// Writes `tensors` (in name order) and `metadata` to `path` as F32 safetensors, atomically.
/// Refuses duplicate names and a data length that does not match the shape.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let named = tensors.iter().map(|t| (t.name.clone(), t)).collect();
    write_renamed(path, named, metadata)
}

/// [`write_safetensors`] with each tensor stored under the name paired with it (the tensor's
/// own name is not used), so that a caller can prefix names without copying the data.
pub(super) fn write_renamed(
    path: &Path,
    mut tensors: Vec<(String, &NamedTensor)>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let header = header(path, &tensors, metadata)?;
    write_atomic(path, |out| write_file(out, &header, &tensors))
}

/// The bytes [`write_safetensors`] writes, in memory (for a page that offers them as a
/// download); `name` is what errors call the file.
pub fn safetensors_bytes(
    name: &str,
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut named: Vec<(String, &NamedTensor)> =
        tensors.iter().map(|t| (t.name.clone(), t)).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let header = header(Path::new(name), &named, metadata)?;
    let mut out = Vec::new();
    write_file(&mut out, &header, &named).map_err(|e| error(Path::new(name), e.to_string()))?;
    Ok(out)
}

/// The header's length, the header, then every tensor's little-endian data.
fn write_file(
    out: &mut impl Write,
    header: &[u8],
    tensors: &[(String, &NamedTensor)],
) -> io::Result<()> {
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header)?;
    for (_, tensor) in tensors {
        for value in &tensor.data {
            out.write_all(&value.to_le_bytes())?;
        }
    }
    Ok(())
}

/// The JSON header of `tensors`, laid out back to back in the given order, padded with
/// spaces to a multiple of 8 bytes (so that the data after it stays aligned).
fn header(
    path: &Path,
    tensors: &[(String, &NamedTensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    if let Some(pair) = tensors.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(error(
            path,
            format!(
                "two tensors are named {:?}; give every tensor its own name",
                pair[0].0
            ),
        ));
    }
    let mut entries = Map::new();
    if !metadata.is_empty() {
        entries.insert(METADATA_KEY.into(), json!(metadata));
    }
    let mut offset = 0;
    for (name, tensor) in tensors {
        if name == METADATA_KEY {
            return Err(error(
                path,
                format!(
                    "a tensor cannot be named {METADATA_KEY:?}: the header keeps that key for \
                     the metadata"
                ),
            ));
        }
        let numel = tensor
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        if numel != Some(tensor.data.len()) {
            return Err(error(
                path,
                format!(
                    "tensor {name:?} has shape {:?} but {} values; its data must hold the \
                     product of its shape",
                    tensor.shape,
                    tensor.data.len()
                ),
            ));
        }
        let end = offset + 4 * tensor.data.len();
        entries.insert(
            name.clone(),
            json!({ "dtype": "F32", "shape": tensor.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut bytes = Value::Object(entries).to_string().into_bytes();
    bytes.resize(bytes.len().next_multiple_of(HEADER_LEN_BYTES), b' ');
    Ok(bytes)
}

/// Reads every tensor of a safetensors file as f32 (F32 as is; F16, BF16 and F64 converted),
/// sorted by name, with the file's metadata.
pub fn read_safetensors(path: &Path) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let bytes = fs::read(path).map_err(|e| read_error(path, e))?;
    parse_safetensors(path, &bytes)
}

/// [`read_safetensors`] of a file's bytes already in memory; `path` is what errors name.
pub fn parse_safetensors(
    path: &Path,
    bytes: &[u8],
) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let (header_len, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| format_error(path, e))?;
    // `read_metadata` checked that the byte ranges tile the data exactly.
    let data = &bytes[HEADER_LEN_BYTES + header_len..];
    let mut tensors = header
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (start, end) = info.data_offsets;
            let data = to_f32(path, &name, info.dtype, &data[start..end])?;
            Ok(NamedTensor {
                name,
                shape: info.shape.clone(),
                data,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let metadata = header.metadata().clone().unwrap_or_default();
    Ok((tensors, metadata.into_iter().collect()))
}

/// The error for a file that cannot be read at all.
fn read_error(path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        error(path, "no such file; check the path")
    } else {
        error(path, format!("cannot read the file: {e}"))
    }
}

/// The error for a file whose bytes are not a well-formed safetensors file.
fn format_error(path: &Path, e: SafeTensorError) -> Error {
    let what = match e {
        SafeTensorError::HeaderTooSmall => {
            "it is shorter than the 8-byte header length (an empty or truncated file)".to_string()
        }
        SafeTensorError::InvalidHeaderLength => {
            "its header runs past the end of the file (a truncated file)".to_string()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "its tensor data does not fill the file as the header says (a truncated file)"
                .to_string()
        }
        other => format!("its header is corrupt ({other})"),
    };
    error(
        path,
        format!("not a readable safetensors file: {what}; save it again, or download it again"),
    )
}

/// Converts the little-endian elements of one tensor to f32.
fn to_f32(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => elements(bytes).map(f32::from_le_bytes).collect(),
        Dtype::F16 => elements(bytes)
            .map(|b| f16_to_f32(u16::from_le_bytes(b)))
            .collect(),
        Dtype::BF16 => elements(bytes)
            .map(|b| bf16_to_f32(u16::from_le_bytes(b)))
            .collect(),
        Dtype::F64 => elements(bytes)
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect(),
        other => {
            return Err(error(
                path,
                format!(
                    "tensor {name:?} has dtype {other:?}; diffwgpu reads F32, F16, BF16 and F64 \
                     tensors, so convert the weights to float32 and save them again"
                ),
            ))
        }
    })
}

/// The `N`-byte elements of `bytes` (whose length is a multiple of `N`).
fn elements<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|chunk| {
        let mut element = [0; N];
        element.copy_from_slice(chunk);
        element
    })
}

/// IEEE half precision (1 sign, 5 exponent, 10 mantissa bits) to f32, exactly.
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 == 0 { 1.0 } else { -1.0 };
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    match exponent {
        // Zero and subnormals: mantissa * 2^-24.
        0 => sign * mantissa as f32 / (1u32 << 24) as f32,
        // Infinities and NaNs keep their mantissa bits.
        0x1f => f32::from_bits((u32::from(h & 0x8000) << 16) | 0x7f80_0000 | (mantissa << 13)),
        // Normal numbers: rebias the exponent from 15 to 127 and widen the mantissa.
        _ => f32::from_bits(
            (u32::from(h & 0x8000) << 16) | ((exponent + 127 - 15) << 23) | (mantissa << 13),
        ),
    }
}

/// bfloat16 is the top half of an f32.
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}
