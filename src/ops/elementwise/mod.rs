//! Cheap element-wise and gather ops: what the glue between fused layers needs on a device
//! (losses, permutations, ActNorm, mini-batch gathers).

pub mod cpu;
pub mod cuda;

use crate::backend::Device;
use crate::error::Result;
use crate::ops::Direction;

pub trait ElementOps: Device {
    /// a·x + b·y (same shapes).
    fn axpby(&self, a: f32, x: &Self::Mat, b: f32, y: &Self::Mat) -> Result<Self::Mat>;

    /// x ⊙ y (same shapes).
    fn mul(&self, x: &Self::Mat, y: &Self::Mat) -> Result<Self::Mat>;

    /// A rows×cols matrix filled with `value`.
    fn fill(&self, rows: usize, cols: usize, value: f32) -> Result<Self::Mat>;

    /// out[:, j] = x[:, perm[j]] (a permutation layer; `perm` has x.cols() entries).
    fn gather_cols(&self, x: &Self::Mat, perm: &Self::Idx) -> Result<Self::Mat>;

    /// out[i, :] = x[idx[i], :] (mini-batches from a data set resident on the device).
    fn gather_rows(&self, x: &Self::Mat, idx: &Self::Idx) -> Result<Self::Mat>;

    /// The element-wise affine map of ActNorm and of standardisation, with loc and log_scale
    /// of shape 1×D:
    /// - Forward:  y = x ⊙ exp(log_scale) + loc,    logdet = Σ log_scale
    /// - Inverse:  y = (x - loc) ⊙ exp(-log_scale), logdet = -Σ log_scale
    ///
    /// Returns y (B×D) and the per-row logdet (B×1).
    fn scale_shift(
        &self,
        x: &Self::Mat,
        loc: &Self::Mat,
        log_scale: &Self::Mat,
        dir: Direction,
    ) -> Result<(Self::Mat, Self::Mat)>;

    /// Backward of `scale_shift`: returns (dL/dx, dL/dloc, dL/dlog_scale).
    #[allow(clippy::too_many_arguments)]
    fn scale_shift_backward(
        &self,
        x: &Self::Mat,
        loc: &Self::Mat,
        log_scale: &Self::Mat,
        dir: Direction,
        d_out: &Self::Mat,
        d_logdet: &Self::Mat,
    ) -> Result<(Self::Mat, Self::Mat, Self::Mat)>;

    /// Column means and standard deviations (1×D each, population variance), for ActNorm's
    /// data-dependent initialisation and for standardisation.
    fn col_moments(&self, x: &Self::Mat) -> Result<(Self::Mat, Self::Mat)>;
}
