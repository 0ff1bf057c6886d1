//! MADE (Germain et al. 2015) and the affine autoregressive transforms built on it: MAF
//! (eq. 18.17–18.18) and IAF (eq. 18.19–18.20).
//!
//! The masks are never stored: a weight from a unit of degree `a` to a unit of degree `c` is
//! live when `c >= a` (hidden layers) or `c > a` (output layer). Units within each layer are
//! sorted by degree, so every mask is block-triangular and kernels can skip all-zero tiles.

pub mod cpu;
pub mod cuda;

use serde::{Deserialize, Serialize};

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::nn::mlp::Mlp;
use crate::ops::Direction;
use crate::tensor::Shaped;

/// The degrees of a MADE network and the soft clamp of its log-scales.
///
/// `degrees[0]` are the D input degrees (a permutation of 1..=D: the autoregressive order),
/// `degrees[l]` for 0 < l < L the hidden degrees (each in 1..=D−1, sorted ascending within the
/// layer), and `degrees[L]` the 2D output degrees: output j and D + j belong to input j and
/// carry its degree. Output j is the shift b_j, output D + j the raw log-scale of input j.
/// `check` enforces all of this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MadeSpec {
    pub dim: usize,
    pub degrees: Vec<Vec<u32>>,
    /// Log-scales are soft-clamped: s = clamp·tanh(raw/clamp).
    pub clamp: f32,
}

impl MadeSpec {
    /// Is the weight from degree `a` (layer input) to degree `c` (layer output) of layer `l` live?
    #[inline]
    pub fn connected(&self, layer: usize, a: u32, c: u32) -> bool {
        if layer + 1 == self.degrees.len() - 1 {
            c > a
        } else {
            c >= a
        }
    }

    /// The input order: `order()[k]` is the column with degree k + 1.
    pub fn order(&self) -> Vec<usize> {
        let mut cols: Vec<usize> = (0..self.dim).collect();
        cols.sort_by_key(|&j| self.degrees[0][j]);
        cols
    }

    /// Checks the degrees against the network and the batch.
    pub fn check<M: Shaped>(&self, op: &'static str, net: &Mlp<M>, input: &M) -> Result<()> {
        let d = self.dim;
        if d < 2 {
            return Err(Error::invalid(format!(
                "{op}: an autoregressive layer needs dim >= 2"
            )));
        }
        if !(self.clamp > 0.0 && self.clamp.is_finite()) {
            return Err(Error::invalid(format!(
                "{op}: clamp must be positive, got {}",
                self.clamp
            )));
        }
        net.check(op)?;
        let widths = net.widths();
        if widths.len() != self.degrees.len() {
            return Err(Error::shape(
                op,
                format!("{} degree vectors", widths.len()),
                self.degrees.len(),
            ));
        }
        for (l, (w, deg)) in widths.iter().zip(&self.degrees).enumerate() {
            if *w != deg.len() {
                return Err(Error::shape(
                    op,
                    format!("{w} degrees in layer {l}"),
                    deg.len(),
                ));
            }
        }
        if widths[0] != d || *widths.last().unwrap_or(&0) != 2 * d {
            return Err(Error::shape(
                op,
                format!("MADE {d} -> {}", 2 * d),
                format!("{widths:?}"),
            ));
        }
        let mut seen = vec![false; d];
        for &k in &self.degrees[0] {
            if k == 0 || k as usize > d || std::mem::replace(&mut seen[k as usize - 1], true) {
                return Err(Error::invalid(format!(
                    "{op}: input degrees must be a permutation of 1..={d}"
                )));
            }
        }
        // Sorted hidden degrees make every mask block-triangular, which the kernels rely on
        // (a degree outside 1..=D-1 would feed no output).
        for (l, deg) in self.degrees[1..self.degrees.len() - 1].iter().enumerate() {
            if deg.iter().any(|&k| k == 0 || k as usize >= d) || !deg.is_sorted() {
                return Err(Error::invalid(format!(
                    "{op}: hidden degrees of layer {} must be sorted and lie in 1..={}",
                    l + 1,
                    d - 1
                )));
            }
        }
        let out = &self.degrees[self.degrees.len() - 1];
        for j in 0..d {
            if out[j] != self.degrees[0][j] || out[d + j] != self.degrees[0][j] {
                return Err(Error::invalid(format!(
                    "{op}: output degrees must repeat the input degrees"
                )));
            }
        }
        input.expect_shape(op, input.rows(), d)
    }
}

/// The MADE ops. Every method takes `degrees`, the vectors of `spec.degrees` uploaded one
/// per layer (`upload_idx`); a backend may reject degrees that differ from the spec. Input
/// columns are in the data's own column order; `spec.degrees[0]` says which comes first.
/// Errors: shapes that disagree with the spec, an empty batch, or a non-finite input,
/// parameter or result.
pub trait MadeOps: Device {
    /// The one-pass affine autoregressive transform, with (b, s) = MADE(input):
    /// - Inverse (MAF density, x -> z): z = (x - b) ⊙ exp(-s), logdet = -Σ s  (eq. 18.18)
    /// - Forward (IAF sampling, z -> x): x = z ⊙ exp(s) + b, logdet = Σ s     (eq. 18.19)
    ///
    /// Returns the output (B×D) and the per-row logdet (B×1).
    fn ar_parallel(
        &self,
        spec: &MadeSpec,
        net: &Mlp<Self::Mat>,
        degrees: &[Self::Idx],
        input: &Self::Mat,
        dir: Direction,
    ) -> Result<(Self::Mat, Self::Mat)>;

    /// Backward of `ar_parallel`: given dL/d output (B×D) and dL/d logdet (B×1), returns dL/d
    /// input and dL/d parameters, summed over the batch, in the structure of `net` (masked: a
    /// dead weight gets exactly zero).
    #[allow(clippy::too_many_arguments)]
    fn ar_parallel_backward(
        &self,
        spec: &MadeSpec,
        net: &Mlp<Self::Mat>,
        degrees: &[Self::Idx],
        input: &Self::Mat,
        dir: Direction,
        d_out: &Self::Mat,
        d_logdet: &Self::Mat,
    ) -> Result<(Self::Mat, Mlp<Self::Mat>)>;

    /// The sequential transform, one coordinate at a time in the order of the input degrees:
    /// - Forward (MAF sampling, z -> x): x_i = z_i·exp(s_i(x_<i)) + b_i(x_<i), logdet = Σ s
    /// - Inverse (IAF density, x -> z):  z_i = (x_i - b_i(z_<i))·exp(-s_i(z_<i)), logdet = -Σ s
    ///
    /// Each hidden unit is computed once, when the inputs of its degree are known, so the cost
    /// is that of one masked pass (the GPU kernel does the whole loop on chip).
    fn ar_sequential(
        &self,
        spec: &MadeSpec,
        net: &Mlp<Self::Mat>,
        degrees: &[Self::Idx],
        input: &Self::Mat,
        dir: Direction,
    ) -> Result<(Self::Mat, Self::Mat)>;
}
