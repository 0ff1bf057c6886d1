//! Launches kernels/elementwise.cu.

use super::ElementOps;
use crate::backend::grid::{Grid, GridDevice, GridIdx, GridMat, KArg, LaunchCfg, dim_i32};
use crate::error::{Error, Result};
use crate::ops::Direction;
use crate::tensor::Shaped;

/// Columns per block and row lanes of elem_col_stats_f32.
const COL_TILE: u32 = 32;
const COL_LANES: u32 = 8;

impl<G: GridDevice> Grid<G> {
    fn binary(
        &self,
        kernel: &'static str,
        x: &GridMat<G>,
        y: &GridMat<G>,
        scalars: &[f32],
    ) -> Result<GridMat<G>> {
        y.expect_shape(kernel, x.rows(), x.cols())?;
        let out = self.alloc_mat(x.rows(), x.cols())?;
        if x.len() > 0 {
            let mut args = vec![
                KArg::Buf(x.buf()),
                KArg::Buf(y.buf()),
                KArg::Buf(out.buf()),
                KArg::I64(x.len() as i64),
            ];
            args.extend(scalars.iter().map(|&s| KArg::F32(s)));
            self.launch(kernel, LaunchCfg::stride(x.len()), &args)?;
        }
        Ok(out)
    }

    /// Column sums (mode 0) or column mean and std (mode 1) of a rows×cols matrix.
    fn col_stats(&self, x: &GridMat<G>, mode: i32) -> Result<(GridMat<G>, GridMat<G>)> {
        let out = self.alloc_mat(1, x.cols())?;
        let out2 = self.alloc_mat(1, x.cols())?;
        if x.cols() > 0 {
            let blocks = (x.cols() as u32).div_ceil(COL_TILE);
            self.launch(
                "elem_col_stats_f32",
                LaunchCfg::new([blocks, 1, 1], [COL_TILE, COL_LANES, 1], 0),
                &[
                    KArg::Buf(x.buf()),
                    KArg::Buf(out.buf()),
                    KArg::Buf(out2.buf()),
                    KArg::I32(dim_i32("col_stats", x.rows())?),
                    KArg::I32(dim_i32("col_stats", x.cols())?),
                    KArg::I32(mode),
                ],
            )?;
        }
        Ok((out, out2))
    }

    fn gather(
        &self,
        kernel: &'static str,
        x: &GridMat<G>,
        idx: &GridIdx<G>,
        rows: usize,
    ) -> Result<GridMat<G>> {
        let out = self.alloc_mat(rows, x.cols())?;
        if out.len() > 0 {
            self.launch(
                kernel,
                LaunchCfg::stride(out.len()),
                &[
                    KArg::Buf(x.buf()),
                    KArg::Buf(idx.buf()),
                    KArg::Buf(out.buf()),
                    KArg::I32(dim_i32(kernel, rows)?),
                    KArg::I32(dim_i32(kernel, x.cols())?),
                ],
            )?;
        }
        Ok(out)
    }
}

fn check_affine<G: GridDevice>(
    op: &'static str,
    x: &GridMat<G>,
    loc: &GridMat<G>,
    ls: &GridMat<G>,
) -> Result<()> {
    loc.expect_shape(op, 1, x.cols())?;
    ls.expect_shape(op, 1, x.cols())
}

impl<G: GridDevice> ElementOps for Grid<G> {
    fn axpby(&self, a: f32, x: &GridMat<G>, b: f32, y: &GridMat<G>) -> Result<GridMat<G>> {
        self.binary("elem_axpby_f32", x, y, &[a, b])
    }

    fn mul(&self, x: &GridMat<G>, y: &GridMat<G>) -> Result<GridMat<G>> {
        self.binary("elem_mul_f32", x, y, &[])
    }

    fn fill(&self, rows: usize, cols: usize, value: f32) -> Result<GridMat<G>> {
        let out = self.alloc_mat(rows, cols)?;
        if out.len() > 0 && value != 0.0 {
            self.launch(
                "elem_fill_f32",
                LaunchCfg::stride(out.len()),
                &[
                    KArg::Buf(out.buf()),
                    KArg::I64(out.len() as i64),
                    KArg::F32(value),
                ],
            )?;
        }
        Ok(out)
    }

    fn gather_cols(&self, x: &GridMat<G>, perm: &GridIdx<G>) -> Result<GridMat<G>> {
        if perm.len() != x.cols() {
            return Err(Error::shape("gather_cols", x.cols(), perm.len()));
        }
        self.gather("elem_gather_cols_f32", x, perm, x.rows())
    }

    /// Indices are checked on the host side of the caller (the trainer draws them); the kernel
    /// trusts them, as a GPU gather must.
    fn gather_rows(&self, x: &GridMat<G>, idx: &GridIdx<G>) -> Result<GridMat<G>> {
        self.gather("elem_gather_rows_f32", x, idx, idx.len())
    }

    fn scale_shift(
        &self,
        x: &GridMat<G>,
        loc: &GridMat<G>,
        ls: &GridMat<G>,
        dir: Direction,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        check_affine("scale_shift", x, loc, ls)?;
        let y = self.alloc_mat(x.rows(), x.cols())?;
        if x.len() > 0 {
            self.launch(
                "elem_scale_shift_f32",
                LaunchCfg::stride(x.len()),
                &[
                    KArg::Buf(x.buf()),
                    KArg::Buf(loc.buf()),
                    KArg::Buf(ls.buf()),
                    KArg::Buf(y.buf()),
                    KArg::I32(dim_i32("scale_shift", x.rows())?),
                    KArg::I32(dim_i32("scale_shift", x.cols())?),
                    KArg::I32(dir.code()),
                ],
            )?;
        }
        // Every row has the same log-det: ±Σ log_scale.
        let ld = self.alloc_mat(x.rows(), 1)?;
        if x.rows() > 0 {
            let sign = if dir == Direction::Forward { 1.0 } else { -1.0 };
            self.launch(
                "elem_logdet_broadcast_f32",
                LaunchCfg::stride(x.rows()),
                &[
                    KArg::Buf(ls.buf()),
                    KArg::Buf(ld.buf()),
                    KArg::I32(dim_i32("scale_shift", x.rows())?),
                    KArg::I32(dim_i32("scale_shift", x.cols())?),
                    KArg::F32(sign),
                ],
            )?;
        }
        Ok((y, ld))
    }

    fn scale_shift_backward(
        &self,
        x: &GridMat<G>,
        loc: &GridMat<G>,
        ls: &GridMat<G>,
        dir: Direction,
        d_out: &GridMat<G>,
        d_logdet: &GridMat<G>,
    ) -> Result<(GridMat<G>, GridMat<G>, GridMat<G>)> {
        check_affine("scale_shift_backward", x, loc, ls)?;
        d_out.expect_shape("scale_shift_backward", x.rows(), x.cols())?;
        d_logdet.expect_shape("scale_shift_backward", x.rows(), 1)?;
        let dx = self.alloc_mat(x.rows(), x.cols())?;
        let t_loc = self.alloc_mat(x.rows(), x.cols())?;
        let t_ls = self.alloc_mat(x.rows(), x.cols())?;
        if x.len() > 0 {
            self.launch(
                "elem_scale_shift_bwd_f32",
                LaunchCfg::stride(x.len()),
                &[
                    KArg::Buf(x.buf()),
                    KArg::Buf(loc.buf()),
                    KArg::Buf(ls.buf()),
                    KArg::Buf(d_out.buf()),
                    KArg::Buf(d_logdet.buf()),
                    KArg::Buf(dx.buf()),
                    KArg::Buf(t_loc.buf()),
                    KArg::Buf(t_ls.buf()),
                    KArg::I32(dim_i32("scale_shift_backward", x.rows())?),
                    KArg::I32(dim_i32("scale_shift_backward", x.cols())?),
                    KArg::I32(dir.code()),
                ],
            )?;
        }
        let dloc = self.col_stats(&t_loc, 0)?.0;
        let dls = self.col_stats(&t_ls, 0)?.0;
        Ok((dx, dloc, dls))
    }

    fn col_moments(&self, x: &GridMat<G>) -> Result<(GridMat<G>, GridMat<G>)> {
        if x.rows() == 0 {
            return Err(Error::Empty("column moments of an empty batch".into()));
        }
        self.col_stats(x, 1)
    }
}
