//! Reference coupling op: the conditioner MLP on the copied half, the coupling transform of the
//! other half and the per-row log-determinant in one call (eq. 18.10–18.14), plus its backward.
//!
//! The batch is split into chunks of [`CHUNK_ROWS`] rows run in parallel; each chunk gathers its
//! copied half, runs the MLP through the host GEMM and transforms its rows in place. Parameter
//! gradients are summed over chunks in chunk order, so results do not depend on thread timing.

mod spline;

use std::ops::Range;

use spline::RqSpline;

use super::{CouplingKind, CouplingOps, CouplingSpec};
use crate::backend::Cpu;
use crate::backend::cpu::{CHUNK_ROWS, concat_rows, mlp, par_row_chunks};
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
        let chunks = par_row_chunks(rows, CHUNK_ROWS, |r| {
            forward_chunk(spec, net, input, r, dir)
        });
        let mut outs = Vec::with_capacity(chunks.len());
        let mut logdets = Vec::with_capacity(chunks.len());
        for c in chunks {
            let (o, l) = c?;
            outs.push(o);
            logdets.push(l);
        }
        Ok((
            concat_rows(outs, rows, spec.dim),
            concat_rows(logdets, rows, 1),
        ))
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
        d_out.check_finite("coupling_backward d_out")?;
        d_logdet.check_finite("coupling_backward d_logdet")?;
        let chunks = par_row_chunks(rows, CHUNK_ROWS, |r| {
            backward_chunk(spec, net, input, d_out, d_logdet, r, dir)
        });
        let mut d_ins = Vec::with_capacity(chunks.len());
        let mut grads: Option<Mlp<Tensor>> = None;
        for c in chunks {
            let (d_in, g) = c?;
            d_ins.push(d_in);
            match grads.as_mut() {
                None => grads = Some(g),
                Some(acc) => mlp::add_into(acc, &g),
            }
        }
        let grads = grads.expect("a non-empty batch has at least one chunk");
        for (name, t) in grads.tensor_names().iter().zip(grads.tensors()) {
            t.check_finite(&format!("coupling_backward gradient of {name}"))?;
        }
        Ok((concat_rows(d_ins, rows, spec.dim), grads))
    }
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
    input.check_finite(&format!("{op} input"))?;
    for (name, t) in net.tensor_names().iter().zip(net.tensors()) {
        t.check_finite(&format!("{op} conditioner {name}"))?;
    }
    Ok(())
}

/// The copied half of `rows` as a contiguous (rows × n_A) conditioner input.
fn conditioner_input(spec: &CouplingSpec, input: &Tensor, rows: &Range<usize>) -> Vec<f32> {
    let cols = spec.copied_cols();
    let mut v = Vec::with_capacity(rows.len() * cols.len());
    for i in rows.clone() {
        v.extend_from_slice(&input.row(i)[cols.clone()]);
    }
    v
}

/// Errors on the first non-finite value of a chunk's `cols`-wide result, naming its batch row.
fn check_chunk(what: &str, data: &[f32], cols: usize, first_row: usize) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(k) => Err(Error::NonFinite {
            what: what.to_string(),
            row: first_row + k / cols,
            col: k % cols,
        }),
    }
}

/// Output rows (rows × D) and log-dets (rows × 1) of one chunk.
fn forward_chunk(
    spec: &CouplingSpec,
    net: &Mlp<Tensor>,
    input: &Tensor,
    rows: Range<usize>,
    dir: Direction,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, d, p) = (rows.len(), spec.dim, spec.net_out());
    let cond = conditioner_input(spec, input, &rows);
    let params = mlp::forward(net, &cond, n).out;
    let t_cols = spec.transformed_cols();
    // The copied half is the input itself: start from a copy and transform the rest in place.
    let mut out = input.data()[rows.start * d..rows.end * d].to_vec();
    let mut logdet = vec![0.0f32; n];
    let mut h = Transform::new(spec.kind);
    for (r, ld) in logdet.iter_mut().enumerate() {
        let row = &mut out[r * d..(r + 1) * d];
        *ld = h.apply_row(&params[r * p..(r + 1) * p], &mut row[t_cols.clone()], dir) as f32;
    }
    check_chunk("coupling output", &out, d, rows.start)?;
    check_chunk("coupling log-det", &logdet, 1, rows.start)?;
    Ok((out, logdet))
}

/// dL/d input rows (rows × D) and this chunk's parameter gradients.
fn backward_chunk(
    spec: &CouplingSpec,
    net: &Mlp<Tensor>,
    input: &Tensor,
    d_out: &Tensor,
    d_logdet: &Tensor,
    rows: Range<usize>,
    dir: Direction,
) -> Result<(Vec<f32>, Mlp<Tensor>)> {
    let (n, d, p) = (rows.len(), spec.dim, spec.net_out());
    let (a_cols, t_cols) = (spec.copied_cols(), spec.transformed_cols());
    let cond = conditioner_input(spec, input, &rows);
    let tape = mlp::forward(net, &cond, n);
    // The copied half passes d_out straight through; the transformed half is overwritten below.
    let mut d_in = d_out.data()[rows.start * d..rows.end * d].to_vec();
    let mut d_params = vec![0.0f32; n * p];
    let mut h = Transform::new(spec.kind);
    for (r, i) in rows.clone().enumerate() {
        h.backward_row(
            &tape.out[r * p..(r + 1) * p],
            &input.row(i)[t_cols.clone()],
            dir,
            &d_out.row(i)[t_cols.clone()],
            d_logdet.get(i, 0),
            &mut d_in[r * d..(r + 1) * d][t_cols.clone()],
            &mut d_params[r * p..(r + 1) * p],
        );
    }
    // The copied half also feeds the conditioner.
    let mut grads = net.zeros_like();
    let d_cond = mlp::backward(net, &cond, &tape, &d_params, &mut grads, true)
        .expect("mlp::backward returns dx when asked");
    let na = a_cols.len();
    for r in 0..n {
        let dst = &mut d_in[r * d..(r + 1) * d][a_cols.clone()];
        for (g, &c) in dst.iter_mut().zip(&d_cond[r * na..(r + 1) * na]) {
            *g += c;
        }
    }
    check_chunk("coupling_backward d_input", &d_in, d, rows.start)?;
    Ok((d_in, grads))
}

/// The coupling function of one kind, with whatever scratch it needs.
enum Transform {
    Affine { clamp: f32 },
    Additive,
    Spline(RqSpline),
}

impl Transform {
    fn new(kind: CouplingKind) -> Self {
        match kind {
            CouplingKind::Affine { clamp } => Transform::Affine { clamp },
            CouplingKind::Additive => Transform::Additive,
            CouplingKind::Spline { bins, bound } => Transform::Spline(RqSpline::new(bins, bound)),
        }
    }

    /// Transforms one row's transformed half `v` in place from its conditioner output `p`;
    /// returns the row's log-det (accumulated in f64).
    fn apply_row(&mut self, p: &[f32], v: &mut [f32], dir: Direction) -> f64 {
        let nb = v.len();
        match self {
            Transform::Affine { clamp } => {
                let (raw, shift) = p.split_at(nb);
                let mut sum = 0.0f64;
                for ((x, &r), &b) in v.iter_mut().zip(raw).zip(shift) {
                    let s = soft_clamp(r, *clamp);
                    // eq. 18.10 forward; its inverse (18.11 form) uses exp(−s).
                    *x = match dir {
                        Direction::Forward => *x * s.exp() + b,
                        Direction::Inverse => (*x - b) * (-s).exp(),
                    };
                    sum += s as f64;
                }
                match dir {
                    Direction::Forward => sum,
                    Direction::Inverse => -sum,
                }
            }
            Transform::Additive => {
                for (x, &b) in v.iter_mut().zip(p) {
                    *x = match dir {
                        Direction::Forward => *x + b,
                        Direction::Inverse => *x - b,
                    };
                }
                0.0
            }
            Transform::Spline(sp) => {
                let len = sp.block_len();
                let mut sum = 0.0f64;
                for (x, block) in v.iter_mut().zip(p.chunks_exact(len)) {
                    sp.load(block);
                    let (y, ld) = sp.apply(*x, dir);
                    *x = y;
                    sum += ld as f64;
                }
                sum
            }
        }
    }

    /// Backward of `apply_row` for one row: from the input values `v`, the upstream gradient
    /// `g_out` of the transformed half and `g_ld` of the row's log-det, writes dL/dv into `g_v`
    /// and adds dL/d(conditioner output) into `g_p`.
    #[allow(clippy::too_many_arguments)]
    fn backward_row(
        &mut self,
        p: &[f32],
        v: &[f32],
        dir: Direction,
        g_out: &[f32],
        g_ld: f32,
        g_v: &mut [f32],
        g_p: &mut [f32],
    ) {
        let nb = v.len();
        match self {
            Transform::Affine { clamp } => {
                let c = *clamp;
                let (raw, shift) = p.split_at(nb);
                let (g_raw, g_shift) = g_p.split_at_mut(nb);
                for j in 0..nb {
                    let t = (raw[j] / c).tanh();
                    let s = c * t;
                    let (g_s, g_b, g_x) = match dir {
                        // x = z·e^s + b, logdet += s.
                        Direction::Forward => {
                            let e = s.exp();
                            (g_out[j] * v[j] * e + g_ld, g_out[j], g_out[j] * e)
                        }
                        // z = (x − b)·e^(−s), logdet −= s.
                        Direction::Inverse => {
                            let e = (-s).exp();
                            let z = (v[j] - shift[j]) * e;
                            (-g_out[j] * z - g_ld, -g_out[j] * e, g_out[j] * e)
                        }
                    };
                    // d(c·tanh(r/c))/dr = 1 − tanh².
                    g_raw[j] += g_s * (1.0 - t * t);
                    g_shift[j] += g_b;
                    g_v[j] = g_x;
                }
            }
            Transform::Additive => {
                let sign = match dir {
                    Direction::Forward => 1.0,
                    Direction::Inverse => -1.0,
                };
                for j in 0..nb {
                    g_p[j] += sign * g_out[j];
                    g_v[j] = g_out[j];
                }
            }
            Transform::Spline(sp) => {
                let len = sp.block_len();
                for j in 0..nb {
                    let block = &p[j * len..(j + 1) * len];
                    sp.load(block);
                    g_v[j] = sp.backward(
                        block,
                        v[j],
                        dir,
                        g_out[j],
                        g_ld,
                        &mut g_p[j * len..(j + 1) * len],
                    );
                }
            }
        }
    }
}

/// s = c·tanh(raw/c): close to raw for small values, never beyond ±c (DESIGN.md "Numerics").
#[inline]
fn soft_clamp(raw: f32, clamp: f32) -> f32 {
    clamp * (raw / clamp).tanh()
}
