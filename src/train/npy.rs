//! NumPy `.npy` files holding one 2-D float matrix.
//!
//! Layout (NumPy's format spec, versions 1.0–3.0): the magic `\x93NUMPY`, a major and a minor
//! version byte, the header length (u16 little-endian in 1.0, u32 in 2.0 and 3.0), a header that
//! is a Python dict literal such as `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }`
//! padded with spaces and a newline, then the raw values.
//!
//! Reading accepts `<f4`, `<f8`, `>f4`, `>f8` (big-endian values are byte-swapped; f8 is
//! narrowed to f32), C or Fortran order, and 2-D shapes only. Writing produces version 1.0,
//! `<f4`, C order.

use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::{Shaped, Tensor};
use crate::train::checkpoint::{check_matrix_to_save, write_atomic};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// NumPy pads magic + version + length + header to a multiple of this.
const HEADER_ALIGN: usize = 64;

/// Reads a 2-D float matrix from an `.npy` file.
///
/// Errors: unreadable file → [`Error::Io`]; bad magic, unsupported version or dtype, malformed
/// header, a shape that is not 2-D, truncated or over-long data, or an f8 value outside the f32
/// range → [`Error::Data`]; zero rows or columns → [`Error::Empty`]; NaN or infinity →
/// [`Error::NonFinite`].
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let fail = |reason: String| Error::Data {
        path: path.to_path_buf(),
        reason,
    };
    let (header, data) = split_header(&bytes).map_err(fail)?;
    let header = parse_header(header).map_err(fail)?;
    let (rows, cols) = header.shape;
    if rows == 0 || cols == 0 {
        return Err(Error::Empty(format!(
            "{} has shape ({rows}, {cols})",
            path.display()
        )));
    }
    let width = header.dtype.width();
    let n = rows
        .checked_mul(cols)
        .filter(|n| n.checked_mul(width).is_some())
        .ok_or_else(|| fail(format!("shape ({rows}, {cols}) is too large")))?;
    if data.len() != n * width {
        let what = if data.len() < n * width {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return Err(fail(format!(
            "data {what}: shape ({rows}, {cols}) of {} needs {} bytes, file has {}",
            header.dtype.descr(),
            n * width,
            data.len()
        )));
    }

    let mut values = Vec::with_capacity(n);
    for (k, chunk) in data.chunks_exact(width).enumerate() {
        let v = header.dtype.decode(chunk);
        if v.is_finite() && !(v as f32).is_finite() {
            // Position in the matrix, whichever order the file stores it in.
            let (r, c) = if header.fortran_order {
                (k % rows, k / rows)
            } else {
                (k / cols, k % cols)
            };
            return Err(fail(format!(
                "value {v:e} at row {r}, column {c} is outside the f32 range"
            )));
        }
        values.push(v as f32);
    }
    let t = if header.fortran_order {
        // Column-major data is the row-major data of the transpose.
        Tensor::from_vec(cols, rows, values)?.transpose()
    } else {
        Tensor::from_vec(rows, cols, values)?
    };
    t.check_finite(&path.display().to_string())?;
    Ok(t)
}

/// Writes `t` as a version 1.0, `<f4`, C-order `.npy` file, atomically.
///
/// Errors: an empty matrix → [`Error::Empty`]; a non-finite value → [`Error::NonFinite`] (such
/// a file could not be read back); file-system failures → [`Error::Io`].
pub fn save_npy(path: &Path, t: &Tensor) -> Result<()> {
    check_matrix_to_save(path, t)?;
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        t.rows(),
        t.cols()
    );
    // magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.extend(std::iter::repeat_n(
        ' ',
        unpadded.next_multiple_of(HEADER_ALIGN) - unpadded,
    ));
    header.push('\n');
    let header_len = u16::try_from(header.len())
        .map_err(|_| Error::invalid("npy header longer than 65535 bytes"))?;

    let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + header.len() + 4 * t.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&header_len.to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in t.data() {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F4 { big_endian: bool },
    F8 { big_endian: bool },
}

impl Dtype {
    fn parse(descr: &str) -> Option<Dtype> {
        Some(match descr {
            "<f4" => Dtype::F4 { big_endian: false },
            ">f4" => Dtype::F4 { big_endian: true },
            "<f8" => Dtype::F8 { big_endian: false },
            ">f8" => Dtype::F8 { big_endian: true },
            _ => return None,
        })
    }

    fn width(self) -> usize {
        match self {
            Dtype::F4 { .. } => 4,
            Dtype::F8 { .. } => 8,
        }
    }

    fn descr(self) -> &'static str {
        match self {
            Dtype::F4 { big_endian: false } => "<f4",
            Dtype::F4 { big_endian: true } => ">f4",
            Dtype::F8 { big_endian: false } => "<f8",
            Dtype::F8 { big_endian: true } => ">f8",
        }
    }

    /// One value from exactly `width()` bytes.
    fn decode(self, b: &[u8]) -> f64 {
        match self {
            Dtype::F4 { big_endian } => {
                let a = [b[0], b[1], b[2], b[3]];
                f64::from(if big_endian {
                    f32::from_be_bytes(a)
                } else {
                    f32::from_le_bytes(a)
                })
            }
            Dtype::F8 { big_endian } => {
                let a = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
                if big_endian {
                    f64::from_be_bytes(a)
                } else {
                    f64::from_le_bytes(a)
                }
            }
        }
    }
}

struct Header {
    dtype: Dtype,
    fortran_order: bool,
    shape: (usize, usize),
}

/// Splits the file into the header text and the data, checking magic, version and lengths.
fn split_header(bytes: &[u8]) -> std::result::Result<(&str, &[u8]), String> {
    if bytes.len() < MAGIC.len() + 2 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not an .npy file (bad magic)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let len_width = match major {
        1 => 2,
        2 | 3 => 4,
        _ => return Err(format!("unsupported .npy format version {major}.{minor}")),
    };
    let start = 8 + len_width;
    let len_bytes = bytes
        .get(8..start)
        .ok_or("truncated file: no header length")?;
    let header_len = if len_width == 2 {
        usize::from(u16::from_le_bytes([len_bytes[0], len_bytes[1]]))
    } else {
        u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            format!(
                "truncated file: header of {header_len} bytes but only {} follow",
                bytes.len() - start
            )
        })?;
    // Versions 1.0 and 2.0 promise latin-1 (in practice ASCII); 3.0 allows UTF-8.
    let text =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not text".to_string())?;
    if major < 3 && !text.is_ascii() {
        return Err(format!(
            "header of a version {major}.{minor} file is not ASCII"
        ));
    }
    Ok((text, &bytes[end..]))
}

fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let entries = DictParser::new(text).dict()?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (key, value) in entries {
        match (key.as_str(), value) {
            ("descr", Literal::Str(s)) => descr = Some(s),
            ("fortran_order", Literal::Bool(b)) => fortran = Some(b),
            ("shape", Literal::Tuple(dims)) => shape = Some(dims),
            ("descr" | "fortran_order" | "shape", v) => {
                return Err(format!("header key '{key}' has an unexpected value {v:?}"));
            }
            _ => return Err(format!("unexpected header key '{key}'")),
        }
    }
    let descr = descr.ok_or("header has no 'descr'")?;
    let dtype = Dtype::parse(&descr).ok_or_else(|| {
        format!("unsupported dtype '{descr}' (supported: '<f4', '<f8', '>f4', '>f8')")
    })?;
    let fortran_order = fortran.ok_or("header has no 'fortran_order'")?;
    let dims = shape.ok_or("header has no 'shape'")?;
    let [rows, cols] = dims[..] else {
        return Err(format!(
            "shape {} is {}-D; only 2-D arrays are supported",
            python_tuple(&dims),
            dims.len()
        ));
    };
    Ok(Header {
        dtype,
        fortran_order,
        shape: (rows, cols),
    })
}

/// A shape as Python prints it: `()`, `(6,)`, `(2, 3, 1)`.
fn python_tuple(dims: &[usize]) -> String {
    match dims {
        [d] => format!("({d},)"),
        _ => {
            let shown: Vec<String> = dims.iter().map(usize::to_string).collect();
            format!("({})", shown.join(", "))
        }
    }
}

/// The values an .npy header may hold.
#[derive(Debug)]
enum Literal {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// A parser for the small subset of Python literals NumPy writes: a dict of string keys whose
/// values are strings, True/False, or tuples of non-negative integers.
struct DictParser<'a> {
    rest: &'a str,
}

impl<'a> DictParser<'a> {
    fn new(text: &'a str) -> Self {
        DictParser { rest: text }
    }

    fn skip_ws(&mut self) {
        self.rest = self.rest.trim_start();
    }

    /// Consumes `c` (after whitespace) if it comes next.
    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        match self.rest.strip_prefix(c) {
            Some(r) => {
                self.rest = r;
                true
            }
            None => false,
        }
    }

    fn expect(&mut self, c: char) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "malformed header: expected '{c}' at '{}'",
                self.snippet()
            ))
        }
    }

    fn snippet(&self) -> String {
        self.rest.chars().take(20).collect()
    }

    fn dict(mut self) -> std::result::Result<Vec<(String, Literal)>, String> {
        self.expect('{')?;
        let mut out = Vec::new();
        while !self.eat('}') {
            let key = self.string()?;
            self.expect(':')?;
            out.push((key, self.value()?));
            if !self.eat(',') {
                self.expect('}')?;
                break;
            }
        }
        if !self.rest.trim().is_empty() {
            return Err(format!(
                "malformed header: text after the dict: '{}'",
                self.snippet()
            ));
        }
        Ok(out)
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        self.skip_ws();
        let quote = match self.rest.chars().next() {
            Some(q @ ('\'' | '"')) => q,
            _ => {
                return Err(format!(
                    "malformed header: expected a string at '{}'",
                    self.snippet()
                ));
            }
        };
        let body = &self.rest[1..];
        let close = body
            .find(quote)
            .ok_or("malformed header: unterminated string")?;
        let s = body[..close].to_string();
        self.rest = &body[close + 1..];
        Ok(s)
    }

    fn value(&mut self) -> std::result::Result<Literal, String> {
        self.skip_ws();
        if self.rest.starts_with(['\'', '"']) {
            return self.string().map(Literal::Str);
        }
        for (word, b) in [("True", true), ("False", false)] {
            if let Some(r) = self.rest.strip_prefix(word) {
                self.rest = r;
                return Ok(Literal::Bool(b));
            }
        }
        if self.eat('(') {
            let mut dims = Vec::new();
            while !self.eat(')') {
                dims.push(self.integer()?);
                if !self.eat(',') {
                    self.expect(')')?;
                    break;
                }
            }
            return Ok(Literal::Tuple(dims));
        }
        Err(format!(
            "malformed header: unexpected value at '{}'",
            self.snippet()
        ))
    }

    fn integer(&mut self) -> std::result::Result<usize, String> {
        self.skip_ws();
        let digits = self.rest.len()
            - self
                .rest
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .len();
        let text = &self.rest[..digits];
        // Python 2 era files may write long integers as `3L`.
        let n = text
            .parse::<usize>()
            .map_err(|_| format!("malformed header: bad dimension at '{}'", self.snippet()))?;
        self.rest = &self.rest[digits..];
        self.rest = self.rest.strip_prefix('L').unwrap_or(self.rest);
        Ok(n)
    }
}
