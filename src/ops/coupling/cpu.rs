//! Reference coupling op: the conditioner MLP on the copied half, the coupling transform of the
//! other half and the per-row log-determinant in one call (eq. 18.10–18.14), plus its backward.
//!
//! The batch is split into chunks of [`CHUNK_ROWS`] rows run in parallel, each writing straight
//! into its rows of the results. A chunk goes through in tiles of [`TILE_ROWS`] rows: the
//! conditioner reads the tile's copied half where it lies (strided, no gather), its activations
//! stay in L1 (`backend::cpu::mlp`), and the tile's output rows are written once. The backward
//! recomputes a tile's activations and runs the conditioner's backward on them right away,
//! adding dW into the chunk's accumulators. Parameter gradients are summed over chunks in
//! chunk order, so results do not depend on thread timing or count. The packed conditioner is
//! kept while its weights do not change (`backend::cpu::cache`), so the backward of a training
//! step reuses the forward's and an evaluation packs once for all its batches.

mod affine;
mod spline;

use std::ops::Range;
use std::sync::Arc;

use spline::RqSpline;

use super::{CouplingKind, CouplingOps, CouplingSpec};
use crate::backend::Cpu;
use crate::backend::cpu::cache::{Cache, stamps};
use crate::backend::cpu::kernel::PAD;
use crate::backend::cpu::mlp::{Grads, PackedMlp, TILE_ROWS};
use crate::backend::cpu::scratch::Scratch;
use crate::backend::cpu::vmath::all_finite;
use crate::backend::cpu::{CHUNK_ROWS, par_fill};
use crate::error::{Error, Result};
use crate::nn::mlp::{Activation, Mlp, tensor_name};
use crate::ops::Direction;
use crate::tensor::{Shaped, Tensor};

/// Packed conditioners by activation and weight stamps: at most 32 (a deep flow's layers, each
/// used by a forward and a backward), 64 MiB in all.
static PACKED: Cache<(Activation, Vec<u64>), PackedMlp> = Cache::new(32, 64 << 20);

/// Drops every kept packed conditioner.
pub(crate) fn clear_packed() {
    PACKED.clear();
}

/// `net` packed, with Wᵀ (which the backward and the feature-major forward need; packing it
/// once serves both passes of a step).
fn packed(net: &Mlp<Tensor>) -> Result<Arc<PackedMlp>> {
    let key = (net.act, stamps(net.tensors()));
    PACKED.get_or_build(key, || Ok(PackedMlp::new(net)))
}

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
        let (rows, d) = (input.rows(), spec.dim);
        // A conditioner narrower than a vector runs feature-major (see `forward_tile_fm`).
        let feature_major = matches!(spec.kind, CouplingKind::Affine { .. }) && net.out_dim() < PAD;
        let mlp = packed(net)?;
        let x = input.data();
        let ([out, logdet], chunks) = par_fill(rows, CHUNK_ROWS, [d, 1], |r, [y, ld]| {
            let x = &x[r.start * d..r.end * d];
            if !input.known_finite() {
                check_given(Stage::Input, "coupling input", x, d, r.start)?;
            }
            let done = if feature_major {
                forward_chunk_fm(spec, &mlp, x, y, ld, r, dir)
            } else {
                forward_chunk(spec, &mlp, x, y, ld, r, dir)
            };
            done.map_err(|e| (Stage::Result, e))
        });
        in_order(chunks)?;
        // Every chunk checked its rows of both.
        let (mut out, mut logdet) = (out, logdet);
        out.mark_finite();
        logdet.mark_finite();
        Ok((out, logdet))
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
        let (rows, d) = (input.rows(), spec.dim);
        let shapes = d_out
            .expect_shape(OP_BACKWARD, rows, d)
            .and_then(|_| d_logdet.expect_shape(OP_BACKWARD, rows, 1));
        if let Err(e) = shapes {
            // A bad input is reported first (see `validate`).
            input.check_finite("coupling_backward input")?;
            return Err(e);
        }
        let mlp = packed(net)?;
        let ([d_in], chunks) = par_fill(rows, CHUNK_ROWS, [d], |r, [g]| {
            let given = Given {
                x: &input.data()[r.start * d..r.end * d],
                d_out: &d_out.data()[r.start * d..r.end * d],
                d_logdet: &d_logdet.data()[r.clone()],
            };
            // Tensors an op has already checked (see `Tensor::known_finite`) are not scanned.
            if !input.known_finite() {
                let x = given.x;
                check_given(Stage::Input, "coupling_backward input", x, d, r.start)?;
            }
            if !d_out.known_finite() {
                let g = given.d_out;
                check_given(Stage::DOut, "coupling_backward d_out", g, d, r.start)?;
            }
            if !d_logdet.known_finite() {
                let ld = given.d_logdet;
                check_given(Stage::DLogdet, "coupling_backward d_logdet", ld, 1, r.start)?;
            }
            backward_chunk(spec, &mlp, &given, g, r, dir).map_err(|e| (Stage::Result, e))
        });
        // Chunk partials are summed in row order.
        let mut grads = Grads::sum(&in_order(chunks)?, &mlp);
        grads.check_finite_and_mark(|name| format!("coupling_backward gradient of {name}"))?;
        // Every chunk checked its rows.
        let mut d_in = d_in;
        d_in.mark_finite();
        Ok((d_in, grads))
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
    // The input is scanned by the chunks, in parallel (`Stage::Input`); only when a parameter
    // is bad is it scanned here first, so that a bad input still wins, as it always has.
    for (i, t) in net.tensors().into_iter().enumerate() {
        if !t.all_finite() {
            input.check_finite_with(|| format!("{op} input"))?;
            t.check_finite_with(|| format!("{op} conditioner {}", tensor_name(i)))?;
        }
    }
    Ok(())
}

/// Which check of an op an error comes from. The checks run per chunk, in parallel, but the
/// op reports errors as if they ran one after another over the whole batch: the earliest
/// stage wins, then the earliest row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Input,
    DOut,
    DLogdet,
    Result,
}

type Staged<T> = std::result::Result<T, (Stage, Error)>;

/// The chunks' values in row order, or the error that the checks run in sequence would have
/// met first.
fn in_order<T>(chunks: Vec<Staged<T>>) -> Result<Vec<T>> {
    let first = chunks
        .iter()
        .filter_map(|c| c.as_ref().err().map(|(stage, _)| *stage))
        .min();
    let mut values = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        match chunk {
            Ok(v) => values.push(v),
            Err((stage, e)) if Some(stage) == first => return Err(e),
            Err(_) => {}
        }
    }
    Ok(values)
}

/// [`check_block`] for a chunk's rows of one of the op's given tensors.
fn check_given(
    stage: Stage,
    what: &str,
    data: &[f32],
    cols: usize,
    first_row: usize,
) -> Staged<()> {
    check_block(what, data, cols, first_row).map_err(|e| (stage, e))
}

/// Errors on the first non-finite value of a chunk's `cols`-wide result, naming its batch row.
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

/// Forward of one chunk: `x` holds its input rows, `y` and `logdet` receive its results.
fn forward_chunk(
    spec: &CouplingSpec,
    mlp: &PackedMlp,
    x: &[f32],
    y: &mut [f32],
    logdet: &mut [f32],
    rows: Range<usize>,
    dir: Direction,
) -> Result<()> {
    let (d, a0) = (spec.dim, spec.copied_cols().start);
    let ldp = mlp.out_pad();
    let mut tape = mlp.tape();
    let mut transform = Transform::new(spec);
    let tiles = x
        .chunks(TILE_ROWS * d)
        .zip(y.chunks_mut(TILE_ROWS * d))
        .zip(logdet.chunks_mut(TILE_ROWS));
    for ((xt, yt), ldt) in tiles {
        let n = ldt.len();
        mlp.forward_tile(&xt[a0..], d, n, &mut tape);
        // The copied half passes through; the transform rewrites the other half in place.
        yt.copy_from_slice(xt);
        let rs = affine::Rows {
            params: &tape.out[..n * ldp],
            ldp,
            p: spec.net_out(),
            d,
            t: spec.transformed_cols(),
            dir,
        };
        transform.apply_rows(&rs, yt, ldt);
    }
    check_block("coupling output", y, d, rows.start)?;
    check_block("coupling log-det", logdet, 1, rows.start)
}

/// [`forward_chunk`] for an affine layer with a narrow conditioner, feature-major: the copied
/// half is gathered across a tile's rows, the conditioner output comes back one row per
/// output unit, and the transform runs along the rows.
fn forward_chunk_fm(
    spec: &CouplingSpec,
    mlp: &PackedMlp,
    x: &[f32],
    y: &mut [f32],
    logdet: &mut [f32],
    rows: Range<usize>,
    dir: Direction,
) -> Result<()> {
    let CouplingKind::Affine { clamp } = spec.kind else {
        unreachable!("the feature-major path is for affine layers");
    };
    let (d, a_cols) = (spec.dim, spec.copied_cols());
    let mut tape = mlp.tape();
    // Zeroed once, so the padding lanes of a short last tile hold zeros.
    let mut xt = Scratch::zeroed(a_cols.len() * TILE_ROWS);
    let tiles = x
        .chunks(TILE_ROWS * d)
        .zip(y.chunks_mut(TILE_ROWS * d))
        .zip(logdet.chunks_mut(TILE_ROWS));
    for ((xs, ys), lds) in tiles {
        let n = lds.len();
        for (i, col) in a_cols.clone().enumerate() {
            let dst = &mut xt[i * TILE_ROWS..i * TILE_ROWS + n];
            dst.iter_mut()
                .zip(xs.chunks_exact(d))
                .for_each(|(v, row)| *v = row[col]);
        }
        mlp.forward_tile_fm(&xt, n, &mut tape);
        ys.copy_from_slice(xs);
        let t = spec.transformed_cols();
        affine::affine_apply_fm(clamp, dir, &tape.out, TILE_ROWS, d, t, ys, lds);
    }
    check_block("coupling output", y, d, rows.start)?;
    check_block("coupling log-det", logdet, 1, rows.start)
}

/// A chunk's rows of the backward's inputs.
struct Given<'a> {
    x: &'a [f32],
    d_out: &'a [f32],
    d_logdet: &'a [f32],
}

/// Backward of one chunk: writes dL/d input into `d_in` and returns the chunk's parameter
/// gradients.
fn backward_chunk(
    spec: &CouplingSpec,
    mlp: &PackedMlp,
    given: &Given,
    d_in: &mut [f32],
    rows: Range<usize>,
    dir: Direction,
) -> Result<Grads> {
    let (d, a_cols) = (spec.dim, spec.copied_cols());
    let (a0, n_a) = (a_cols.start, a_cols.len());
    let (ldp, ld_cond) = (mlp.out_pad(), mlp.in_pad());
    let mut tape = mlp.tape();
    let mut deltas = mlp.deltas();
    let mut grads = mlp.zero_grads();
    // Zeroed once: the transform writes the valid columns, the padding stays zero.
    let mut d_params = Scratch::zeroed(TILE_ROWS * ldp);
    let mut d_cond = Scratch::new(TILE_ROWS * ld_cond);
    let mut transform = Transform::new(spec);
    let tiles = given
        .x
        .chunks(TILE_ROWS * d)
        .zip(given.d_out.chunks(TILE_ROWS * d))
        .zip(given.d_logdet.chunks(TILE_ROWS))
        .zip(d_in.chunks_mut(TILE_ROWS * d));
    for (((xt, got), g_ld), gt) in tiles {
        let n = g_ld.len();
        mlp.forward_tile(&xt[a0..], d, n, &mut tape);
        // dL/d input starts as dL/d output: the copied half passes it through.
        gt.copy_from_slice(got);
        let rs = affine::Rows {
            params: &tape.out[..n * ldp],
            ldp,
            p: spec.net_out(),
            d,
            t: spec.transformed_cols(),
            dir,
        };
        let d_params = &mut d_params[..n * ldp];
        transform.backward_rows(&rs, xt, gt, g_ld, d_params);
        mlp.backward_tile(
            &xt[a0..],
            d,
            n,
            &tape,
            d_params,
            &mut deltas,
            &mut grads,
            Some(&mut d_cond),
        );
        // The copied half also feeds the conditioner.
        for (g_row, dc) in gt.chunks_exact_mut(d).zip(d_cond.chunks_exact(ld_cond)) {
            for (g, &c) in g_row[a0..a0 + n_a].iter_mut().zip(dc) {
                *g += c;
            }
        }
    }
    check_block("coupling_backward d_input", d_in, d, rows.start)?;
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

    /// Transforms the rows of a tile in place (see [`affine::Rows`]), log-dets into `logdet`
    /// (accumulated per row in f64).
    fn apply_rows(&mut self, rs: &affine::Rows, block: &mut [f32], logdet: &mut [f32]) {
        match self {
            Transform::Affine { clamp } => affine::affine_apply_rows(*clamp, rs, block, logdet),
            Transform::Additive => {
                for (row, pr) in block.chunks_exact_mut(rs.d).zip(rs.param_rows()) {
                    affine::additive_apply(pr, &mut row[rs.t.clone()], rs.dir);
                }
                logdet.fill(0.0);
            }
            Transform::Spline(sp) => {
                let len = sp.block_len();
                let items = block
                    .chunks_exact_mut(rs.d)
                    .zip(rs.param_rows())
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

    /// Backward of `apply_rows`: `x` holds the tile's input rows, `g` dL/d output on entry and
    /// dL/d input on return (transformed columns; the copied ones are left alone), `d_logdet`
    /// dL/d(row log-det); dL/d(conditioner output) is written into `g_params` (row stride
    /// `rs.ldp`; the padding columns are left as they are).
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
                for (g_row, g_p) in g.chunks_exact(rs.d).zip(rs.param_rows_mut(g_params)) {
                    affine::additive_backward(rs.dir, &g_row[rs.t.clone()], g_p);
                }
            }
            Transform::Spline(sp) => {
                // The spline adds into its blocks.
                g_params.fill(0.0);
                let len = sp.block_len();
                let items = g
                    .chunks_exact_mut(rs.d)
                    .zip(x.chunks_exact(rs.d))
                    .zip(rs.param_rows().zip(rs.param_rows_mut(g_params)))
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
