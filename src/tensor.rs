//! The host matrix: row-major f32, shape-checked. It is the CPU backend's storage and the
//! currency in which every backend takes and returns data.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::backend::cpu::vmath::all_finite;
use crate::error::{Error, Result};
use crate::recycle;
use crate::rng::Rng;

/// Its buffer goes back to the thread's [`recycle`] cache when it is dropped.
#[derive(Debug, Default)]
pub struct Tensor {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
    /// Set once every value has been checked finite (by the op that made the tensor, or by a
    /// scan that found them so); cleared by every mutable access. Later checks then skip the
    /// scan (parameters, for instance, are scanned once per update, not once per op).
    finite: AtomicBool,
    /// Names these values (see [`Tensor::stamp`]); 0 until asked for, and again after every
    /// mutable access.
    stamp: AtomicU64,
}

/// The next stamp to hand out (0 means none yet).
static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

impl Clone for Tensor {
    fn clone(&self) -> Self {
        let mut data = recycle::take(self.data.len());
        data.extend_from_slice(&self.data);
        Tensor {
            rows: self.rows,
            cols: self.cols,
            data,
            finite: AtomicBool::new(self.known_finite()),
            stamp: AtomicU64::new(self.stamp()),
        }
    }
}

/// Equal shapes and values (whether the values are known finite does not matter).
impl PartialEq for Tensor {
    fn eq(&self, other: &Self) -> bool {
        self.rows == other.rows && self.cols == other.cols && self.data == other.data
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        recycle::give(std::mem::take(&mut self.data));
    }
}

/// Anything with a row-major matrix shape (host tensors and device buffers alike).
pub trait Shaped {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn shape(&self) -> (usize, usize) {
        (self.rows(), self.cols())
    }
    fn len(&self) -> usize {
        self.rows() * self.cols()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Errors unless the shape is exactly `rows × cols`.
    fn expect_shape(&self, op: &'static str, rows: usize, cols: usize) -> Result<()> {
        if self.shape() == (rows, cols) {
            Ok(())
        } else {
            Err(Error::shape(
                op,
                format!("{rows}x{cols}"),
                format!("{}x{}", self.rows(), self.cols()),
            ))
        }
    }
}

impl Shaped for Tensor {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

impl Tensor {
    /// The one place a tensor is assembled: values not yet known to be finite.
    fn with_data(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        Tensor {
            rows,
            cols,
            data,
            finite: AtomicBool::new(false),
            stamp: AtomicU64::new(0),
        }
    }

    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self::full(rows, cols, 0.0)
    }

    pub fn full(rows: usize, cols: usize, value: f32) -> Self {
        Tensor::with_data(rows, cols, vec![value; rows * cols])
    }

    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{} values for {rows}x{cols}", rows * cols),
                format!("{} values", data.len()),
            ));
        }
        Ok(Tensor::with_data(rows, cols, data))
    }

    /// A matrix from rows of equal length.
    pub fn from_rows(rows: &[Vec<f32>]) -> Result<Self> {
        let cols = rows.first().map_or(0, Vec::len);
        let mut data = Vec::with_capacity(rows.len() * cols);
        for (i, r) in rows.iter().enumerate() {
            if r.len() != cols {
                return Err(Error::shape(
                    "Tensor::from_rows",
                    format!("{cols} columns"),
                    format!("{} columns in row {i}", r.len()),
                ));
            }
            data.extend_from_slice(r);
        }
        Ok(Tensor::with_data(rows.len(), cols, data))
    }

    pub fn from_fn(rows: usize, cols: usize, mut f: impl FnMut(usize, usize) -> f32) -> Self {
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                data.push(f(i, j));
            }
        }
        Tensor::with_data(rows, cols, data)
    }

    /// Standard normal entries from a seeded generator.
    pub fn randn(rows: usize, cols: usize, rng: &mut Rng) -> Self {
        let mut t = Tensor::zeros(rows, cols);
        rng.fill_normal(&mut t.data);
        t
    }

    /// Uniform entries on [lo, hi).
    pub fn rand_uniform(rows: usize, cols: usize, lo: f32, hi: f32, rng: &mut Rng) -> Self {
        let mut t = Tensor::zeros(rows, cols);
        for v in &mut t.data {
            *v = lo + (hi - lo) * rng.uniform_f32();
        }
        t
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        self.touch();
        &mut self.data
    }

    /// Whether every value has been checked finite since the last mutable access.
    pub fn known_finite(&self) -> bool {
        self.finite.load(Ordering::Relaxed)
    }

    /// A number that names these values: tensors with the same stamp hold the same shape and
    /// values (a copy keeps its original's stamp; any mutable access drops it, and the next
    /// call hands out a new one). Caches of things derived from a tensor key them on it.
    pub(crate) fn stamp(&self) -> u64 {
        let s = self.stamp.load(Ordering::Relaxed);
        if s != 0 {
            return s;
        }
        let fresh = NEXT_STAMP.fetch_add(1, Ordering::Relaxed);
        match self
            .stamp
            .compare_exchange(0, fresh, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => fresh,
            Err(other) => other,
        }
    }

    /// Forgets what is known about the values before a mutable access.
    fn touch(&mut self) {
        *self.finite.get_mut() = false;
        *self.stamp.get_mut() = 0;
    }

    /// Records that every value has been checked finite (by the op that made the tensor).
    pub(crate) fn mark_finite(&mut self) {
        debug_assert!(self.data.iter().all(|v| v.is_finite()));
        *self.finite.get_mut() = true;
    }

    pub fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.data)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        self.touch();
        let c = self.cols;
        &mut self.data[i * c..(i + 1) * c]
    }

    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.cols + j]
    }

    pub fn set(&mut self, i: usize, j: usize, v: f32) {
        self.touch();
        self.data[i * self.cols + j] = v;
    }

    /// Rows `start..end` as a new matrix.
    pub fn slice_rows(&self, start: usize, end: usize) -> Tensor {
        let end = end.min(self.rows);
        let start = start.min(end);
        Tensor::with_data(
            end - start,
            self.cols,
            self.data[start * self.cols..end * self.cols].to_vec(),
        )
    }

    /// The rows named by `idx`, in that order.
    pub fn gather_rows(&self, idx: &[usize]) -> Result<Tensor> {
        let mut data = Vec::with_capacity(idx.len() * self.cols);
        for &i in idx {
            if i >= self.rows {
                return Err(Error::invalid(format!(
                    "row index {i} out of range for {} rows",
                    self.rows
                )));
            }
            data.extend_from_slice(self.row(i));
        }
        Ok(Tensor::with_data(idx.len(), self.cols, data))
    }

    /// Stacks matrices with the same number of columns on top of each other.
    pub fn vstack(parts: &[&Tensor]) -> Result<Tensor> {
        let cols = parts.first().map_or(0, |t| t.cols);
        let mut data = Vec::new();
        let mut rows = 0;
        for p in parts {
            if p.cols != cols {
                return Err(Error::shape("Tensor::vstack", cols, p.cols));
            }
            data.extend_from_slice(&p.data);
            rows += p.rows;
        }
        Ok(Tensor::with_data(rows, cols, data))
    }

    pub fn map(&self, f: impl Fn(f32) -> f32) -> Tensor {
        let mut data = recycle::take(self.data.len());
        data.extend(self.data.iter().map(|&v| f(v)));
        Tensor::with_data(self.rows, self.cols, data)
    }

    pub fn transpose(&self) -> Tensor {
        Tensor::from_fn(self.cols, self.rows, |i, j| self.get(j, i))
    }

    /// Whether every value is finite: known (from the op that made the tensor, or an earlier
    /// scan), or one vectorised scan, whose success is remembered.
    pub fn all_finite(&self) -> bool {
        if self.known_finite() {
            return true;
        }
        let finite = all_finite(&self.data);
        if finite {
            // Only `&mut self` methods change the values, so none can have since the scan.
            self.finite.store(true, Ordering::Relaxed);
        }
        finite
    }

    /// Errors on the first NaN or infinity, naming where it is (looked up only on failure).
    pub fn check_finite(&self, what: &str) -> Result<()> {
        self.check_finite_with(|| what.to_string())
    }

    /// [`Tensor::check_finite`] with the description made only for an error.
    pub fn check_finite_with(&self, what: impl FnOnce() -> String) -> Result<()> {
        if self.all_finite() {
            return Ok(());
        }
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(k) => Err(Error::NonFinite {
                what: what(),
                row: k / self.cols.max(1),
                col: k % self.cols.max(1),
            }),
        }
    }

    /// Sum of all entries, accumulated in f64.
    pub fn sum_f64(&self) -> f64 {
        self.data.iter().map(|&v| v as f64).sum()
    }

    /// Largest |a - b| over all entries (shapes must match).
    pub fn max_abs_diff(&self, other: &Tensor) -> Result<f32> {
        other.expect_shape("Tensor::max_abs_diff", self.rows, self.cols)?;
        Ok(self
            .data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scan that finds the values finite is remembered, and every kind of write forgets it
    /// (and the stamp), so a NaN written afterwards is found again.
    #[test]
    fn what_is_known_about_the_values_is_forgotten_on_every_write() {
        let writes: [&dyn Fn(&mut Tensor); 3] = [
            &|t| t.data_mut()[5] = f32::NAN,
            &|t| t.row_mut(1)[2] = f32::NAN,
            &|t| t.set(1, 2, f32::NAN),
        ];
        for write in writes {
            let mut t = Tensor::full(3, 3, 1.0);
            assert!(!t.known_finite());
            assert!(t.all_finite() && t.known_finite());
            let stamp = t.stamp();
            assert_eq!(t.stamp(), stamp);
            assert_eq!(t.clone().stamp(), stamp);
            assert!(t.clone().known_finite());
            write(&mut t);
            assert!(!t.known_finite());
            assert_ne!(t.stamp(), stamp);
            assert!(!t.all_finite() && t.check_finite("t").is_err());
        }
        assert_ne!(Tensor::zeros(1, 1).stamp(), Tensor::zeros(1, 1).stamp());
    }
}
