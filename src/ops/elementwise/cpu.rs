//! Reference element-wise ops.

use super::ElementOps;
use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::ops::Direction;
use crate::tensor::{Shaped, Tensor};

fn zip_with(
    op: &'static str,
    x: &Tensor,
    y: &Tensor,
    f: impl Fn(f32, f32) -> f32,
) -> Result<Tensor> {
    y.expect_shape(op, x.rows(), x.cols())?;
    let data = x
        .data()
        .iter()
        .zip(y.data())
        .map(|(&a, &b)| f(a, b))
        .collect();
    Tensor::from_vec(x.rows(), x.cols(), data)
}

impl ElementOps for Cpu {
    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        zip_with("axpby", x, y, |u, v| a * u + b * v)
    }

    fn mul(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        zip_with("mul", x, y, |u, v| u * v)
    }

    fn fill(&self, rows: usize, cols: usize, value: f32) -> Result<Tensor> {
        Ok(Tensor::full(rows, cols, value))
    }

    fn gather_cols(&self, x: &Tensor, perm: &Vec<u32>) -> Result<Tensor> {
        if perm.len() != x.cols() || perm.iter().any(|&p| p as usize >= x.cols()) {
            return Err(Error::shape(
                "gather_cols",
                format!("{} indices below {}", x.cols(), x.cols()),
                format!("{perm:?}"),
            ));
        }
        Ok(Tensor::from_fn(x.rows(), x.cols(), |i, j| {
            x.get(i, perm[j] as usize)
        }))
    }

    fn gather_rows(&self, x: &Tensor, idx: &Vec<u32>) -> Result<Tensor> {
        let idx: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
        x.gather_rows(&idx)
    }

    fn scale_shift(
        &self,
        x: &Tensor,
        loc: &Tensor,
        log_scale: &Tensor,
        dir: Direction,
    ) -> Result<(Tensor, Tensor)> {
        let d = x.cols();
        loc.expect_shape("scale_shift", 1, d)?;
        log_scale.expect_shape("scale_shift", 1, d)?;
        let (m, ls) = (loc.data(), log_scale.data());
        let total: f64 = ls.iter().map(|&v| v as f64).sum();
        let (y, ld) = match dir {
            Direction::Forward => (
                Tensor::from_fn(x.rows(), d, |i, j| x.get(i, j) * ls[j].exp() + m[j]),
                total,
            ),
            Direction::Inverse => (
                Tensor::from_fn(x.rows(), d, |i, j| (x.get(i, j) - m[j]) * (-ls[j]).exp()),
                -total,
            ),
        };
        Ok((y, Tensor::full(x.rows(), 1, ld as f32)))
    }

    fn scale_shift_backward(
        &self,
        x: &Tensor,
        loc: &Tensor,
        log_scale: &Tensor,
        dir: Direction,
        d_out: &Tensor,
        d_logdet: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, d) = x.shape();
        loc.expect_shape("scale_shift_backward", 1, d)?;
        log_scale.expect_shape("scale_shift_backward", 1, d)?;
        d_out.expect_shape("scale_shift_backward", b, d)?;
        d_logdet.expect_shape("scale_shift_backward", b, 1)?;
        let (m, ls) = (loc.data(), log_scale.data());
        let sum_dld: f64 = d_logdet.data().iter().map(|&v| v as f64).sum();
        let mut dx = Tensor::zeros(b, d);
        let mut dloc = vec![0.0f64; d];
        let mut dls = vec![0.0f64; d];
        for i in 0..b {
            for j in 0..d {
                let g = d_out.get(i, j) as f64;
                let xv = x.get(i, j) as f64;
                match dir {
                    Direction::Forward => {
                        let s = (ls[j] as f64).exp();
                        dx.set(i, j, (g * s) as f32);
                        dloc[j] += g;
                        dls[j] += g * xv * s;
                    }
                    Direction::Inverse => {
                        let s = (-(ls[j] as f64)).exp();
                        dx.set(i, j, (g * s) as f32);
                        dloc[j] -= g * s;
                        dls[j] -= g * (xv - m[j] as f64) * s;
                    }
                }
            }
        }
        let sign = if dir == Direction::Forward { 1.0 } else { -1.0 };
        let to_row = |v: Vec<f64>, extra: f64| Tensor::from_fn(1, d, |_, j| (v[j] + extra) as f32);
        Ok((dx, to_row(dloc, 0.0), to_row(dls, sign * sum_dld)))
    }

    fn col_moments(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, d) = x.shape();
        if b == 0 {
            return Err(Error::Empty("column moments of an empty batch".into()));
        }
        let mut mean = vec![0.0f64; d];
        for i in 0..b {
            for (acc, &v) in mean.iter_mut().zip(x.row(i)) {
                *acc += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= b as f64);
        let mut var = vec![0.0f64; d];
        for i in 0..b {
            for j in 0..d {
                let c = x.get(i, j) as f64 - mean[j];
                var[j] += c * c;
            }
        }
        Ok((
            Tensor::from_fn(1, d, |_, j| mean[j] as f32),
            Tensor::from_fn(1, d, |_, j| (var[j] / b as f64).sqrt() as f32),
        ))
    }
}
