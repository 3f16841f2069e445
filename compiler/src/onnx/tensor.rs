//! TensorProto -> constant: raw_data, the typed repeated fields, and external
//! data files mapped into memory (shared across tensors, never copied).

use super::proto::{tensor_proto::DataLocation, TensorProto};
use crate::ir::{Constant, DType, Tensor};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// Opens external-data files once each and hands out slices of their maps.
#[derive(Default)]
pub struct ExternalFiles {
    base: Option<PathBuf>,
    maps: HashMap<PathBuf, Bytes>,
}

impl ExternalFiles {
    pub fn new(base: Option<&Path>) -> ExternalFiles {
        ExternalFiles { base: base.map(Path::to_path_buf), maps: HashMap::new() }
    }

    fn slice(&mut self, location: &str, offset: u64, length: Option<u64>) -> Result<Bytes, String> {
        let rel = Path::new(location);
        // ONNX requires locations relative to the model's folder; refuse escapes.
        if rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(format!(
                "external data location '{location}' must be a relative path inside the model's folder"
            ));
        }
        let base = self.base.as_ref().ok_or_else(|| {
            format!("external data '{location}' needs the model's folder, but the model was loaded from memory")
        })?;
        let path = base.join(rel);
        let map = match self.maps.get(&path) {
            Some(m) => m.clone(),
            None => {
                let file = std::fs::File::open(&path)
                    .map_err(|e| format!("cannot open external data file {}: {e}", path.display()))?;
                // SAFETY: the map is read-only; like every mmap reader we rely on the
                // file not being truncated while the model is in use.
                let mmap = unsafe { memmap2::Mmap::map(&file) }
                    .map_err(|e| format!("cannot map external data file {}: {e}", path.display()))?;
                let bytes = Bytes::from_owner(mmap);
                self.maps.insert(path.clone(), bytes.clone());
                bytes
            }
        };
        let size = map.len() as u64;
        let len = length.unwrap_or(size.saturating_sub(offset));
        let end = offset.checked_add(len).filter(|&e| e <= size).ok_or_else(|| {
            format!("external data range offset={offset} length={len} lies outside {} ({size} bytes)", path.display())
        })?;
        Ok(map.slice(offset as usize..end as usize))
    }
}

fn parse_u64(key: &str, v: &str) -> Result<u64, String> {
    v.parse().map_err(|_| format!("external data field '{key}' is not a number: '{v}'"))
}

/// The tensor's element type, or an error naming the ONNX type we lack.
pub fn dtype_of(code: i32) -> Result<DType, String> {
    crate::ir::dtype::from_onnx_code(code)
        .ok_or_else(|| format!("data type {} ({code}) is not supported", crate::ir::dtype::onnx_code_name(code)))
}

/// Decodes a TensorProto into a constant (name, type, shape, little-endian bytes).
pub fn decode_tensor(t: &TensorProto, ext: &mut ExternalFiles) -> Result<Constant, String> {
    let name = t.name.clone().unwrap_or_default();
    let dtype = dtype_of(t.data_type.unwrap_or(0)).map_err(|e| format!("tensor '{name}': {e}"))?;
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("tensor '{name}' has negative dimension {d}")))
        .collect::<Result<_, _>>()?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("tensor '{name}' has too many elements"))?;
    if t.segment.is_some() {
        return Err(format!("tensor '{name}' is segmented, which is not supported"));
    }
    let bytes = if t.data_location == Some(DataLocation::External as i32) {
        let mut location = None;
        let (mut offset, mut length) = (0u64, None);
        for kv in &t.external_data {
            let (k, v) = (kv.key.as_deref().unwrap_or(""), kv.value.as_deref().unwrap_or(""));
            match k {
                "location" => location = Some(v.to_string()),
                "offset" => offset = parse_u64(k, v)?,
                "length" => length = Some(parse_u64(k, v)?),
                _ => {}
            }
        }
        let location = location.ok_or_else(|| format!("tensor '{name}' has external data without a location"))?;
        ext.slice(&location, offset, length).map_err(|e| format!("tensor '{name}': {e}"))?
    } else if let Some(raw) = &t.raw_data {
        raw.clone()
    } else {
        typed_field_bytes(t, dtype, numel).map_err(|e| format!("tensor '{name}': {e}"))?
    };
    let c = Constant { name: name.clone(), dtype, shape, bytes };
    let want = numel * dtype.size();
    if c.bytes.len() != want {
        return Err(format!(
            "tensor '{name}' {dtype}{:?} needs {want} bytes of data but has {}",
            c.shape,
            c.bytes.len()
        ));
    }
    Ok(c)
}

/// Data stored in the typed repeated fields (float_data, int32_data, ...).
fn typed_field_bytes(t: &TensorProto, dtype: DType, numel: usize) -> Result<Bytes, String> {
    let count = match dtype {
        DType::F32 => t.float_data.len(),
        DType::F64 => t.double_data.len(),
        DType::I64 => t.int64_data.len(),
        DType::I32 | DType::I8 | DType::U8 | DType::Bool => t.int32_data.len(),
    };
    if count != numel {
        return Err(format!("has {count} values for {numel} elements"));
    }
    let tensor = match dtype {
        DType::F32 => Tensor::from_vec(vec![numel], t.float_data.clone()),
        DType::F64 => Tensor::from_vec(vec![numel], t.double_data.clone()),
        DType::I64 => Tensor::from_vec(vec![numel], t.int64_data.clone()),
        DType::I32 => Tensor::from_vec(vec![numel], t.int32_data.clone()),
        DType::I8 => Tensor::from_vec(vec![numel], t.int32_data.iter().map(|&x| x as i8).collect()),
        DType::U8 => Tensor::from_vec(vec![numel], t.int32_data.iter().map(|&x| x as u8).collect()),
        DType::Bool => Tensor::from_vec(vec![numel], t.int32_data.iter().map(|&x| x != 0).collect()),
    };
    Ok(Bytes::from(tensor.to_le_bytes()))
}

/// Decodes a TensorProto straight into a tensor (test data, attribute values).
pub fn tensor_from_proto(t: &TensorProto, base: Option<&Path>) -> Result<Tensor, String> {
    let c = decode_tensor(t, &mut ExternalFiles::new(base))?;
    Ok(c.to_tensor())
}
