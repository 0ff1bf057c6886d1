//! Comma-separated numbers: one sample per line, one column per dimension.
//!
//! The first non-blank line is taken as a header (and skipped) when any of its cells is not a
//! number; blank lines are skipped anywhere. Lines and columns in error messages count from 1,
//! as an editor shows them.

use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::{Shaped, Tensor};
use crate::train::checkpoint::{check_matrix_to_save, write_atomic};

/// Reads a matrix of numbers from a CSV file.
///
/// Errors: unreadable file → [`Error::Io`]; text that is not UTF-8, rows of unequal width, a
/// header of a different width than the data, cells that are not numbers, and NaN, infinity
/// or values beyond the f32 range → [`Error::Data`] naming the line and column; no data rows →
/// [`Error::Empty`].
pub fn read_csv(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let fail = |reason: String| Error::Data {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| fail(format!("not UTF-8 text: {e}")))?;
    parse(text)
        .map_err(fail)?
        .ok_or_else(|| Error::Empty(format!("{} holds no data rows", path.display())))
}

/// Parses CSV text; `Ok(None)` when there are no data rows.
fn parse(text: &str) -> std::result::Result<Option<Tensor>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();

    let mut header: Option<(usize, usize)> = None; // (line, width)
    if let Some(&(line_no, line)) = lines.peek()
        && line.split(',').any(|cell| parse_cell(cell).is_none())
    {
        header = Some((line_no, line.split(',').count()));
        lines.next();
    }

    let mut values = Vec::new();
    let mut width = None;
    let mut rows = 0usize;
    for (line_no, line) in lines {
        let start = values.len();
        for (col, cell) in line.split(',').enumerate() {
            let v = parse_cell(cell).ok_or_else(|| {
                format!(
                    "line {line_no}, column {}: '{}' is not a number",
                    col + 1,
                    cell.trim()
                )
            })?;
            if !v.is_finite() {
                return Err(format!(
                    "line {line_no}, column {}: '{}' is not a finite f32",
                    col + 1,
                    cell.trim()
                ));
            }
            values.push(v);
        }
        let w = values.len() - start;
        match width {
            None => width = Some(w),
            Some(expected) if expected != w => {
                return Err(format!(
                    "line {line_no} has {w} columns, earlier rows have {expected}"
                ));
            }
            Some(_) => {}
        }
        rows += 1;
    }
    let Some(width) = width else {
        return Ok(None);
    };
    if let Some((line_no, hw)) = header
        && hw != width
    {
        return Err(format!(
            "header on line {line_no} has {hw} columns, the data has {width}"
        ));
    }
    Tensor::from_vec(rows, width, values)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// A number, or None. f32's parser also accepts "nan" and "inf"; those are caught by the
/// caller's finiteness check so that the message can name them.
fn parse_cell(cell: &str) -> Option<f32> {
    cell.trim().parse::<f32>().ok()
}

/// Writes `t` as CSV without a header, atomically. Values are written in the shortest form
/// that reads back to the same f32, so a round trip is exact.
///
/// Errors: an empty matrix → [`Error::Empty`]; a non-finite value → [`Error::NonFinite`];
/// file-system failures → [`Error::Io`].
pub fn save_csv(path: &Path, t: &Tensor) -> Result<()> {
    check_matrix_to_save(path, t)?;
    let mut out = String::with_capacity(t.len() * 12);
    for i in 0..t.rows() {
        for (j, v) in t.row(i).iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&v.to_string());
        }
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}
