//! Reference coupling op: the conditioner MLP on the copied half, the coupling transform of the
//! other half and the per-row log-determinant in one call (eq. 18.10–18.14), plus its backward.
//!
//! The batch is split into blocks of [`CHUNK_ROWS`] rows run in parallel (the chunking of
//! `par_row_chunks`, but each block writes straight into its rows of the result, so nothing is
//! concatenated afterwards). A block gathers its copied half, runs the MLP through the host
//! GEMM and transforms its rows in place. Parameter gradients are summed over blocks in block
//! order, so results do not depend on thread timing.

mod affine;
mod spline;

use std::ops::Range;

use rayon::prelude::*;
use spline::RqSpline;

use super::{CouplingKind, CouplingOps, CouplingSpec};
use crate::backend::Cpu;
use crate::backend::cpu::{CHUNK_ROWS, mlp};
use crate::error::{Error, Result};
use crate::nn::mlp::Mlp;
use crate::ops::Direction;
use crate::tensor::{Shaped, Tensor};

const OP: &str = "coupling";
const OP_BACKWARD: &str = "coupling_backward";

impl CouplingOps for Cpu {
    fn coupling(
        &self,
        spec: &CouplingSpec,
        net: &Mlp<Tensor>,
        input: &Tensor,
        dir: Direction,
    ) -> Result<(Tensor, Tensor)> {
        validate(OP, spec, net, input)?;
        let rows = input.rows();
        // The copied half of the output is the input itself; blocks transform the rest in place.
        let mut out = input.clone();
        let blocks = par_row_blocks(out.data_mut(), spec.dim, |r, block| {
            forward_block(spec, net, block, r, dir)
        });
        let mut logdet = Vec::with_capacity(rows);
        for b in blocks {
            logdet.extend_from_slice(&b?);
        }
        Ok((out, Tensor::from_vec(rows, 1, logdet)?))
    }

    fn coupling_backward(
        &self,
        spec: &CouplingSpec,
        net: &Mlp<Tensor>,
        input: &Tensor,
        dir: Direction,
        d_out: &Tensor,
        d_logdet: &Tensor,
    ) -> Result<(Tensor, Mlp<Tensor>)> {
        validate(OP_BACKWARD, spec, net, input)?;
        let rows = input.rows();
        d_out.expect_shape(OP_BACKWARD, rows, spec.dim)?;
        d_logdet.expect_shape(OP_BACKWARD, rows, 1)?;
        check_finite(d_out, "coupling_backward d_out")?;
        check_finite(d_logdet, "coupling_backward d_logdet")?;
        // Starts as d_out: the copied half passes it through, the rest is overwritten per block.
        let mut d_in = d_out.clone();
        let blocks = par_row_blocks(d_in.data_mut(), spec.dim, |r, block| {
            backward_block(spec, net, input, d_logdet, block, r, dir)
        });
        let mut grads: Option<Mlp<Tensor>> = None;
        for b in blocks {
            let g = b?;
            match grads.as_mut() {
                None => grads = Some(g),
                Some(acc) => mlp::add_into(acc, &g),
            }
        }
        let grads = grads.expect("a non-empty batch has at least one block");
        for (name, t) in grads.tensor_names().iter().zip(grads.tensors()) {
            check_finite(t, &format!("coupling_backward gradient of {name}"))?;
        }
        Ok((d_in, grads))
    }
}

/// Runs `f(rows, block)` over consecutive blocks of at most [`CHUNK_ROWS`] rows of the
/// row-major `data` (`cols` wide) in parallel, and returns the results in row order.
fn par_row_blocks<T: Send>(
    data: &mut [f32],
    cols: usize,
    f: impl Fn(Range<usize>, &mut [f32]) -> T + Sync + Send,
) -> Vec<T> {
    data.par_chunks_mut(CHUNK_ROWS * cols)
        .enumerate()
        .map(|(i, block)| {
            let start = i * CHUNK_ROWS;
            f(start..start + block.len() / cols, block)
        })
        .collect()
}

/// Spec, shapes, an empty batch, and non-finite input or parameters.
fn validate(
    op: &'static str,
    spec: &CouplingSpec,
    net: &Mlp<Tensor>,
    input: &Tensor,
) -> Result<()> {
    spec.check(op, net, input)?;
    if input.rows() == 0 {
        return Err(Error::Empty(format!("{op}: the batch has no rows")));
    }
    check_finite(input, &format!("{op} input"))?;
    for (name, t) in net.tensor_names().iter().zip(net.tensors()) {
        check_finite(t, &format!("{op} conditioner {name}"))?;
    }
    Ok(())
}

/// Whether every value is finite: integer tests on the exponent bits with no early exit inside
/// a stretch, so the scan vectorises (it runs over every input and output).
fn all_finite(data: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    data.chunks(4096).all(|c| {
        c.iter()
            .fold(0u32, |bad, v| bad | ((v.to_bits() & EXP) == EXP) as u32)
            == 0
    })
}

/// `Tensor::check_finite` behind the fast scan; the position is only looked up on failure.
fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    if all_finite(t.data()) {
        Ok(())
    } else {
        t.check_finite(what)
    }
}

/// Errors on the first non-finite value of a block's `cols`-wide result, naming its batch row.
fn check_block(what: &str, data: &[f32], cols: usize, first_row: usize) -> Result<()> {
    if all_finite(data) {
        return Ok(());
    }
    let k = data.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(Error::NonFinite {
        what: what.to_string(),
        row: first_row + k / cols,
        col: k % cols,
    })
}

/// The copied half of a block's rows as a contiguous (rows × n_A) conditioner input.
fn conditioner_input(spec: &CouplingSpec, block: &[f32]) -> Vec<f32> {
    let cols = spec.copied_cols();
    let mut v = Vec::with_capacity(block.len() / spec.dim * cols.len());
    for row in block.chunks_exact(spec.dim) {
        v.extend_from_slice(&row[cols.clone()]);
    }
    v
}

/// Transforms a block of rows (holding the input on entry) in place; returns its log-dets.
fn forward_block(
    spec: &CouplingSpec,
    net: &Mlp<Tensor>,
    block: &mut [f32],
    rows: Range<usize>,
    dir: Direction,
) -> Result<Vec<f32>> {
    let (n, d, p) = (rows.len(), spec.dim, spec.net_out());
    let cond = conditioner_input(spec, block);
    let params = mlp::forward_output(net, &cond, n);
    let rs = affine::Rows {
        params: &params,
        p,
        d,
        t: spec.transformed_cols(),
        dir,
    };
    let mut logdet = vec![0.0f32; n];
    Transform::new(spec).apply_rows(&rs, block, &mut logdet);
    check_block("coupling output", block, d, rows.start)?;
    check_block("coupling log-det", &logdet, 1, rows.start)?;
    Ok(logdet)
}

/// Backward for a block of rows: `block` holds dL/d output on entry and dL/d input on return.
/// Returns this block's parameter gradients.
fn backward_block(
    spec: &CouplingSpec,
    net: &Mlp<Tensor>,
    input: &Tensor,
    d_logdet: &Tensor,
    block: &mut [f32],
    rows: Range<usize>,
    dir: Direction,
) -> Result<Mlp<Tensor>> {
    let (n, d, p) = (rows.len(), spec.dim, spec.net_out());
    let (a_cols, t_cols) = (spec.copied_cols(), spec.transformed_cols());
    let x = &input.data()[rows.start * d..rows.end * d];
    let cond = conditioner_input(spec, x);
    let tape = mlp::forward(net, &cond, n);
    let mut d_params = vec![0.0f32; n * p];
    let rs = affine::Rows {
        params: &tape.out,
        p,
        d,
        t: t_cols,
        dir,
    };
    Transform::new(spec).backward_rows(
        &rs,
        x,
        block,
        &d_logdet.data()[rows.clone()],
        &mut d_params,
    );
    // The copied half also feeds the conditioner.
    let mut grads = net.zeros_like();
    let d_cond = mlp::backward(net, &cond, &tape, &d_params, &mut grads, true)
        .expect("mlp::backward returns dx when asked");
    for (g_row, dc) in block
        .chunks_exact_mut(d)
        .zip(d_cond.chunks_exact(a_cols.len()))
    {
        for (g, &c) in g_row[a_cols.clone()].iter_mut().zip(dc) {
            *g += c;
        }
    }
    check_block("coupling_backward d_input", block, d, rows.start)?;
    Ok(grads)
}

/// The coupling function of one kind, with whatever scratch it needs.
enum Transform {
    Affine { clamp: f32 },
    Additive,
    Spline(RqSpline),
}

impl Transform {
    fn new(spec: &CouplingSpec) -> Self {
        match spec.kind {
            CouplingKind::Affine { clamp } => Transform::Affine { clamp },
            CouplingKind::Additive => Transform::Additive,
            CouplingKind::Spline { bins, bound } => Transform::Spline(RqSpline::new(bins, bound)),
        }
    }

    /// Transforms the rows of a block in place (see [`affine::Rows`]), log-dets into `logdet`
    /// (accumulated per row in f64).
    fn apply_rows(&mut self, rs: &affine::Rows, block: &mut [f32], logdet: &mut [f32]) {
        match self {
            Transform::Affine { clamp } => affine::affine_apply_rows(*clamp, rs, block, logdet),
            Transform::Additive => {
                for (row, pr) in block
                    .chunks_exact_mut(rs.d)
                    .zip(rs.params.chunks_exact(rs.p))
                {
                    affine::additive_apply(pr, &mut row[rs.t.clone()], rs.dir);
                }
                logdet.fill(0.0);
            }
            Transform::Spline(sp) => {
                let len = sp.block_len();
                let items = block
                    .chunks_exact_mut(rs.d)
                    .zip(rs.params.chunks_exact(rs.p))
                    .zip(logdet);
                for ((row, pr), ld) in items {
                    let mut sum = 0.0f64;
                    for (x, b) in row[rs.t.clone()].iter_mut().zip(pr.chunks_exact(len)) {
                        sp.load(b);
                        let (y, l) = sp.apply(*x, rs.dir);
                        *x = y;
                        sum += l as f64;
                    }
                    *ld = sum as f32;
                }
            }
        }
    }

    /// Backward of `apply_rows`: `x` holds the block's input rows, `g` dL/d output on entry and
    /// dL/d input on return (transformed columns; the copied ones are left alone), `d_logdet`
    /// dL/d(row log-det); dL/d(conditioner output) goes into `g_params` (zero on entry).
    fn backward_rows(
        &mut self,
        rs: &affine::Rows,
        x: &[f32],
        g: &mut [f32],
        d_logdet: &[f32],
        g_params: &mut [f32],
    ) {
        match self {
            Transform::Affine { clamp } => {
                affine::affine_backward_rows(*clamp, rs, x, g, d_logdet, g_params)
            }
            Transform::Additive => {
                for (g_row, g_p) in g.chunks_exact(rs.d).zip(g_params.chunks_exact_mut(rs.p)) {
                    affine::additive_backward(rs.dir, &g_row[rs.t.clone()], g_p);
                }
            }
            Transform::Spline(sp) => {
                let len = sp.block_len();
                let items = g
                    .chunks_exact_mut(rs.d)
                    .zip(x.chunks_exact(rs.d))
                    .zip(
                        rs.params
                            .chunks_exact(rs.p)
                            .zip(g_params.chunks_exact_mut(rs.p)),
                    )
                    .zip(d_logdet);
                for (((g_row, x_row), (pr, g_p)), &g_ld) in items {
                    let cols = g_row[rs.t.clone()]
                        .iter_mut()
                        .zip(&x_row[rs.t.clone()])
                        .zip(pr.chunks_exact(len).zip(g_p.chunks_exact_mut(len)));
                    for ((gj, &vj), (b, g_b)) in cols {
                        sp.load(b);
                        *gj = sp.backward(b, vj, rs.dir, *gj, g_ld, g_b);
                    }
                }
            }
        }
    }
}
