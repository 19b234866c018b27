//! Minimal safetensors reader and writer for F32 tensors: 8-byte little-endian header length,
//! a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
//! The format is Hugging Face's; files written here load with `safetensors.torch.load_file`.

use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Largest header accepted, as the reference implementation does: a corrupt length must not make
/// us allocate gigabytes.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Serialises named tensors (in the given order) into safetensors bytes.
pub fn serialize(tensors: &[(&str, &[usize], &[f32])], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor {name}: shape and data disagree");
        let end = offset + data.len() * 4;
        header.insert((*name).into(), json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header)).expect("header serialises");
    // The data section starts 8-byte aligned, as the format recommends.
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header_bytes.len() + offset);
    out.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&header_bytes);
    for (_, _, data) in tensors {
        for x in data.iter() {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Parses safetensors bytes; `path` only names the file in errors.
pub fn deserialize(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bad = |reason: String| Error::checkpoint(path, reason);
    if bytes.len() < 8 {
        return Err(bad(format!("is {} bytes, too short for a safetensors header", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > MAX_HEADER_BYTES || 8 + n > bytes.len() as u64 {
        return Err(bad(format!("header length {n} does not fit the {}-byte file", bytes.len())));
    }
    let data = &bytes[8 + n as usize..];
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n as usize])
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let mut out = BTreeMap::new();
    let mut covered = 0usize;
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(Value::as_str);
        if dtype != Some("F32") {
            return Err(bad(format!("tensor {name} has dtype {dtype:?}; only F32 is supported")));
        }
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("tensor {name} has no valid shape")))?;
        let [begin, end]: [usize; 2] = info
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("tensor {name} has no valid data_offsets")))?;
        let numel: usize = shape.iter().product();
        if begin > end || end > data.len() || end - begin != numel * 4 {
            return Err(bad(format!(
                "tensor {name}: offsets [{begin}, {end}) do not hold shape {shape:?} in {} data bytes",
                data.len()
            )));
        }
        covered += end - begin;
        let values =
            data[begin..end].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        out.insert(name, Tensor { shape, data: values });
    }
    if covered != data.len() {
        return Err(bad(format!("tensors cover {covered} of {} data bytes", data.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a = [1.0f32, -2.5, 3.25, 0.0, 5.0, 6.0];
        let b = [7.0f32];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = serialize(&[("a", &[2, 3], &a), ("b", &[1], &b)], &meta);
        assert_eq!((8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())) % 8, 0);
        let back = deserialize(&bytes, Path::new("t.safetensors")).unwrap();
        assert_eq!(back["a"].shape, vec![2, 3]);
        assert_eq!(back["a"].data, a);
        assert_eq!(back["b"].data, b);
    }

    #[test]
    fn truncated_file_is_refused_by_name() {
        let bytes = serialize(&[("a", &[4], &[1.0, 2.0, 3.0, 4.0])], &BTreeMap::new());
        let err =
            deserialize(&bytes[..bytes.len() - 3], Path::new("x.safetensors")).err().unwrap().to_string();
        assert!(err.contains("x.safetensors") && err.contains("tensor a"), "{err}");
    }
}
