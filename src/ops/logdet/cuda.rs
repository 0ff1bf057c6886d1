//! Launches kernels/logdet.cu.

use super::LogdetOps;
use crate::backend::grid::{Grid, GridDevice, GridMat, KArg, LaunchCfg, dim_i32};
use crate::error::Result;
use crate::tensor::Shaped;

/// Blocks of the first reduction stage; the second stage is one block over these partials.
const PARTIAL_BLOCKS: usize = 256;

impl<G: GridDevice> Grid<G> {
    fn per_row(&self, kernel: &'static str, x: &GridMat<G>) -> Result<GridMat<G>> {
        let out = self.alloc_mat(x.rows(), 1)?;
        if x.rows() > 0 {
            self.launch(
                kernel,
                LaunchCfg::warp_per_row(x.rows()),
                &[
                    KArg::Buf(x.buf()),
                    KArg::Buf(out.buf()),
                    KArg::I32(dim_i32(kernel, x.rows())?),
                    KArg::I32(dim_i32(kernel, x.cols())?),
                ],
            )?;
        }
        Ok(out)
    }

    /// Σ (or Σ x²) over every entry of every matrix: per-block partials, then one block.
    fn total(&self, xs: &[&GridMat<G>], square: bool) -> Result<f64> {
        let parts: Vec<&&GridMat<G>> = xs.iter().filter(|m| m.len() > 0).collect();
        if parts.is_empty() {
            return Ok(0.0);
        }
        let partial = self.alloc_mat(1, PARTIAL_BLOCKS * parts.len())?;
        for (k, m) in parts.iter().enumerate() {
            let blocks = m.len().div_ceil(256).clamp(1, PARTIAL_BLOCKS) as u32;
            self.launch(
                "logdet_partial_sum_f32",
                LaunchCfg::new([blocks, 1, 1], [256, 1, 1], 0),
                &[
                    KArg::Buf(m.buf()),
                    KArg::Buf(partial.buf()),
                    KArg::I64(m.len() as i64),
                    KArg::I32(square as i32),
                    KArg::I32((k * PARTIAL_BLOCKS) as i32),
                ],
            )?;
        }
        // Unused partial slots are still zero from the allocation.
        let result = self.alloc_mat(1, 1)?;
        self.launch(
            "logdet_partial_sum_f32",
            LaunchCfg::new([1, 1, 1], [256, 1, 1], 0),
            &[
                KArg::Buf(partial.buf()),
                KArg::Buf(result.buf()),
                KArg::I64(partial.len() as i64),
                KArg::I32(0),
                KArg::I32(0),
            ],
        )?;
        let mut v = [0u8; 4];
        self.dev.dtoh(result.buf(), &mut v)?;
        Ok(f32::from_le_bytes(v) as f64)
    }
}

impl<G: GridDevice> LogdetOps for Grid<G> {
    fn row_sum(&self, x: &GridMat<G>) -> Result<GridMat<G>> {
        self.per_row("logdet_row_sum_f32", x)
    }

    fn gaussian_log_prob(&self, z: &GridMat<G>) -> Result<GridMat<G>> {
        self.per_row("logdet_gauss_f32", z)
    }

    fn sum(&self, x: &GridMat<G>) -> Result<f64> {
        self.total(&[x], false)
    }

    fn sq_norm(&self, xs: &[&GridMat<G>]) -> Result<f64> {
        self.total(xs, true)
    }
}
