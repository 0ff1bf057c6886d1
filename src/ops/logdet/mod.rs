//! Log-determinant sums and batch reductions. A triangular Jacobian's log|det| is the sum of
//! the logs of its diagonal (eq. 18.16), so the flows hand per-coordinate log-scales to
//! `row_sum`; the batch NLL and gradient norms are reductions over the whole batch.

pub mod cpu;
pub mod cuda;

use crate::backend::Device;
use crate::error::Result;

/// ½·log(2π), the per-coordinate constant of the standard normal log-density.
pub const HALF_LOG_2PI: f64 = 0.918_938_533_204_672_8;

pub trait LogdetOps: Device {
    /// Per-row sums (B×D -> B×1), accumulated exactly enough for any D: f64 on the host,
    /// warp-tree f32 sums on the GPU.
    fn row_sum(&self, x: &Self::Mat) -> Result<Self::Mat>;

    /// The base density per row: log N(z; 0, I) = -½|z|² - (D/2)·log 2π (B×D -> B×1).
    fn gaussian_log_prob(&self, z: &Self::Mat) -> Result<Self::Mat>;

    /// The sum of every entry, returned to the host in f64.
    fn sum(&self, x: &Self::Mat) -> Result<f64>;

    /// Σ x² over every entry of every matrix (the global gradient norm, squared).
    fn sq_norm(&self, xs: &[&Self::Mat]) -> Result<f64>;
}
