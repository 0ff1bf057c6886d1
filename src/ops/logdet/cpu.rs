//! Reference reductions: f64 accumulation throughout.

use super::{HALF_LOG_2PI, LogdetOps};
use crate::backend::Cpu;
use crate::error::Result;
use crate::tensor::{Shaped, Tensor};

impl LogdetOps for Cpu {
    fn row_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_fn(x.rows(), 1, |i, _| {
            x.row(i).iter().map(|&v| v as f64).sum::<f64>() as f32
        }))
    }

    fn gaussian_log_prob(&self, z: &Tensor) -> Result<Tensor> {
        let c = z.cols() as f64 * HALF_LOG_2PI;
        Ok(Tensor::from_fn(z.rows(), 1, |i, _| {
            let sq: f64 = z.row(i).iter().map(|&v| (v as f64) * (v as f64)).sum();
            (-0.5 * sq - c) as f32
        }))
    }

    fn sum(&self, x: &Tensor) -> Result<f64> {
        Ok(x.sum_f64())
    }

    fn sq_norm(&self, xs: &[&Tensor]) -> Result<f64> {
        Ok(xs
            .iter()
            .flat_map(|t| t.data())
            .map(|&v| (v as f64) * (v as f64))
            .sum())
    }
}
