//! Checkpoint files: named f32 matrices plus string metadata in the safetensors format, and the
//! atomic file writer every output of the crate (checkpoints, .npy, .csv, PNG) goes through.
//!
//! This module maps nothing to models: the caller decides the tensor names and the metadata.
//! Writing uses the `safetensors` crate; reading is done here with checked arithmetic on every
//! header field, so that a corrupt or hostile file is an [`Error::Checkpoint`], never a panic or
//! a huge allocation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor::{Shaped, Tensor};

/// The reserved header key under which safetensors keeps the string metadata.
const METADATA_KEY: &str = "__metadata__";

/// What a checkpoint holds: string metadata and named matrices.
pub type Contents = (BTreeMap<String, String>, Vec<(String, Tensor)>);

/// Writes `tensors` (each F32 with shape [rows, cols]) and `metadata` to `path` as safetensors,
/// atomically: a reader sees either the old file or the complete new one.
///
/// Errors: duplicate or reserved (`__metadata__`) tensor names and non-finite values are
/// [`Error::Checkpoint`]; file-system failures are [`Error::Io`].
pub fn save(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let fail = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut seen = HashSet::new();
    for (name, t) in tensors {
        if name == METADATA_KEY {
            return Err(fail(format!("tensor name '{METADATA_KEY}' is reserved")));
        }
        if !seen.insert(name.as_str()) {
            return Err(fail(format!("duplicate tensor name '{name}'")));
        }
        if let Some(k) = t.data().iter().position(|v| !v.is_finite()) {
            let cols = t.cols().max(1);
            return Err(fail(format!(
                "non-finite value in tensor '{name}' at row {}, column {}",
                k / cols,
                k % cols
            )));
        }
    }

    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, t), b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, vec![t.rows(), t.cols()], b)
            .map_err(|e| fail(format!("tensor '{name}': {e}")))?;
        views.push((name.clone(), view));
    }
    let info = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>()
    });
    let file = safetensors::serialize(views, info).map_err(|e| fail(e.to_string()))?;
    write_atomic(path, &file)
}

/// Reads a checkpoint written by [`save`] (or any safetensors file whose tensors are all 2-D
/// F32). Tensors come back in the order of their data in the file, which for files written by
/// [`save`] is name order.
///
/// Errors: a missing file, a truncated or corrupt file, a dtype other than F32, a shape that is
/// not 2-D and a non-finite value are [`Error::Checkpoint`]; other read failures are
/// [`Error::Io`].
pub fn load(path: &Path) -> Result<Contents> {
    let bytes = fs::read(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "no such file".into(),
        },
        _ => Error::io(path, e),
    })?;
    parse(&bytes).map_err(|reason| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    })
}

/// One tensor's entry in the header, before its data is read.
struct Entry {
    name: String,
    rows: usize,
    cols: usize,
    start: usize,
    end: usize,
}

/// Parses a whole safetensors file held in memory; the error is the reason, without the path.
fn parse(bytes: &[u8]) -> std::result::Result<Contents, String> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("file too short ({} bytes) for a header", bytes.len()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    let available = (bytes.len() - 8) as u64;
    if header_len > available {
        return Err(format!(
            "header length {header_len} exceeds the {available} bytes after it (truncated file?)"
        ));
    }
    let data_start = 8 + header_len as usize;
    let header = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| format!("header is not UTF-8: {e}"))?;
    let root: serde_json::Map<String, Value> =
        serde_json::from_str(header).map_err(|e| format!("header is not a JSON object: {e}"))?;
    let data = &bytes[data_start..];

    let mut metadata = BTreeMap::new();
    let mut entries = Vec::new();
    for (name, value) in root {
        if name == METADATA_KEY {
            metadata = parse_metadata(&value)?;
        } else {
            entries.push(parse_entry(name, &value)?);
        }
    }

    // The data section must be covered exactly, without holes or overlaps.
    entries.sort_by_key(|e| (e.start, e.end));
    let mut expected_start = 0usize;
    for e in &entries {
        if e.start != expected_start {
            return Err(format!(
                "tensor '{}' starts at byte {} of the data, expected {expected_start}",
                e.name, e.start
            ));
        }
        expected_start = e.end;
    }
    if expected_start != data.len() {
        return Err(format!(
            "tensors cover {expected_start} bytes of data but the file holds {} (truncated or padded file?)",
            data.len()
        ));
    }

    let mut tensors = Vec::with_capacity(entries.len());
    for e in entries {
        let values: Vec<f32> = data[e.start..e.end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(k) = values.iter().position(|v| !v.is_finite()) {
            let cols = e.cols.max(1);
            return Err(format!(
                "non-finite value in tensor '{}' at row {}, column {}",
                e.name,
                k / cols,
                k % cols
            ));
        }
        let t = Tensor::from_vec(e.rows, e.cols, values).map_err(|err| err.to_string())?;
        tensors.push((e.name, t));
    }
    Ok((metadata, tensors))
}

fn parse_metadata(value: &Value) -> std::result::Result<BTreeMap<String, String>, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("'{METADATA_KEY}' is not an object"))?;
    obj.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(format!("metadata value of '{k}' is not a string")),
        })
        .collect()
}

fn parse_entry(name: String, value: &Value) -> std::result::Result<Entry, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("entry of tensor '{name}' is not an object"))?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("tensor '{name}' has no dtype"))?;
    if dtype != "F32" {
        return Err(format!(
            "tensor '{name}' has dtype {dtype}; only F32 is supported"
        ));
    }
    let shape = usize_list(obj.get("shape"))
        .ok_or_else(|| format!("tensor '{name}' has no valid shape"))?;
    let [rows, cols] = shape[..] else {
        return Err(format!(
            "tensor '{name}' has shape {shape:?}; only 2-D tensors are supported"
        ));
    };
    let offsets = usize_list(obj.get("data_offsets"))
        .ok_or_else(|| format!("tensor '{name}' has no valid data_offsets"))?;
    let [start, end] = offsets[..] else {
        return Err(format!(
            "tensor '{name}' has {} data offsets, expected 2",
            offsets.len()
        ));
    };
    let n_bytes = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| format!("tensor '{name}' shape {rows}x{cols} overflows"))?;
    if end < start || end - start != n_bytes {
        return Err(format!(
            "tensor '{name}' of shape {rows}x{cols} needs {n_bytes} bytes but its offsets are [{start}, {end}]"
        ));
    }
    Ok(Entry {
        name,
        rows,
        cols,
        start,
        end,
    })
}

/// A JSON array of non-negative integers that fit in usize.
fn usize_list(value: Option<&Value>) -> Option<Vec<usize>> {
    value?
        .as_array()?
        .iter()
        .map(|v| v.as_u64().and_then(|u| usize::try_from(u).ok()))
        .collect()
}

/// What a matrix file (CSV, .npy) needs before it is written: at least one value, and finite
/// values only (a non-finite one could not be read back).
pub(crate) fn check_matrix_to_save(path: &Path, t: &Tensor) -> Result<()> {
    if t.is_empty() {
        return Err(Error::Empty(format!(
            "refusing to write a {}x{} matrix to {}",
            t.rows(),
            t.cols(),
            path.display()
        )));
    }
    t.check_finite(&format!("matrix written to {}", path.display()))?;
    Ok(())
}

/// Distinguishes temp files of concurrent writers within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` so that a reader (or a crash) never sees a partial file: the bytes go
/// to a temporary file in the same directory, which is flushed to disk and then renamed over
/// `path`. On failure the temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} does not name a file", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(Error::io(path, e));
    }
    // Makes the rename itself durable; not every platform lets a directory be opened, so this
    // is best effort.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
