//! Reference MADE ops on the host. The masks are block-triangular once units are in degree
//! order, so each pass multiplies only the blocks a unit can see (`plan`), one GEMM per tile,
//! with threads over chunks of the batch (`pass`).

mod pass;
mod plan;
mod plans;

pub(crate) use plans::clear as clear_plans;

use super::{MadeOps, MadeSpec};
use crate::backend::Cpu;
use crate::backend::cpu::vmath::all_finite;
use crate::backend::cpu::{CHUNK_ROWS, par_fill};
use crate::error::{Error, Result};
use crate::nn::mlp::{Mlp, tensor_name};
use crate::ops::Direction;
use crate::tensor::{Shaped, Tensor};
use pass::ChunkGrads;
use plan::Tiling;

/// Tiles of the one-pass forward: six units, the height of the kernel's register block, each
/// reading the prefix of its last unit. For D = 16 and hidden [128, 128] that multiplies about
/// 7% more than the exact mask (whole degree groups of at least 16 units: 13%; dense: 89%).
const FORWARD_TILE: usize = 6;

/// Tiles of the backward hold at least this many units: its weight gradients go through the
/// general GEMM, whose fixed cost per call wants wider tiles.
const BACKWARD_TILE: usize = 16;

/// Rows per work item of the forward passes. Twice the backend's default: the forward keeps
/// only two activation buffers, so 512 rows still fit in L2, and fewer chunks halve the fixed
/// cost per tile. (The backward keeps every layer and uses the default.)
const FORWARD_CHUNK_ROWS: usize = 2 * CHUNK_ROWS;

/// Everything the ops check before touching data.
fn validate(
    op: &'static str,
    spec: &MadeSpec,
    net: &Mlp<Tensor>,
    degrees: &[Vec<u32>],
    input: &Tensor,
) -> Result<()> {
    spec.check(op, net, input)?;
    if degrees != spec.degrees.as_slice() {
        return Err(Error::invalid(format!(
            "{op}: the uploaded degrees differ from the spec's"
        )));
    }
    if input.rows() == 0 {
        return Err(Error::Empty(format!("{op}: a batch with no rows")));
    }
    for (i, t) in net.tensors().into_iter().enumerate() {
        t.check_finite_with(|| format!("{op} parameter {}", tensor_name(i)))?;
    }
    input.check_finite_with(|| format!("{op} input"))
}

/// Runs a forward pass over chunks of `chunk` rows in parallel, each writing straight into its
/// rows of the output and logdet, and rejects a non-finite result (an overflow must not
/// travel on as a silent NaN). Each chunk scans its own results while they are in cache; only
/// on a failure is the whole output scanned again to name the first bad entry, so the errors
/// are those of a serial check of the output, then of the logdet.
fn forward_chunks(
    op: &'static str,
    input: &Tensor,
    chunk: usize,
    pass: impl Fn(&[f32], &mut [f32], &mut [f32]) + Sync + Send,
) -> Result<(Tensor, Tensor)> {
    let (rows, d) = input.shape();
    let x = input.data();
    let ([y, ld], finite) = par_fill(rows, chunk, [d, 1], |r, [y, ld]| {
        pass(&x[r.start * d..r.end * d], y, ld);
        (all_finite(y), all_finite(ld))
    });
    if !finite.iter().all(|f| f.0) {
        y.check_finite_with(|| format!("{op} output"))?;
    }
    if !finite.iter().all(|f| f.1) {
        ld.check_finite_with(|| format!("{op} logdet"))?;
    }
    let (mut y, mut ld) = (y, ld);
    y.mark_finite();
    ld.mark_finite();
    Ok((y, ld))
}

impl MadeOps for Cpu {
    fn ar_parallel(
        &self,
        spec: &MadeSpec,
        net: &Mlp<Tensor>,
        degrees: &[Vec<u32>],
        input: &Tensor,
        dir: Direction,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "ar_parallel";
        validate(OP, spec, net, degrees, input)?;
        let plan = plans::plan(spec, net, Tiling::Fixed(FORWARD_TILE))?;
        forward_chunks(OP, input, FORWARD_CHUNK_ROWS, |x, y, ld| {
            pass::parallel(&plan, dir, x, y, ld)
        })
    }

    fn ar_parallel_backward(
        &self,
        spec: &MadeSpec,
        net: &Mlp<Tensor>,
        degrees: &[Vec<u32>],
        input: &Tensor,
        dir: Direction,
        d_out: &Tensor,
        d_logdet: &Tensor,
    ) -> Result<(Tensor, Mlp<Tensor>)> {
        const OP: &str = "ar_parallel_backward";
        validate(OP, spec, net, degrees, input)?;
        let (rows, d) = input.shape();
        d_out.expect_shape(OP, rows, d)?;
        d_logdet.expect_shape(OP, rows, 1)?;
        d_out.check_finite_with(|| format!("{OP} d_out"))?;
        d_logdet.check_finite_with(|| format!("{OP} d_logdet"))?;
        let plan = plans::plan(spec, net, Tiling::MinWidth(BACKWARD_TILE))?;
        let ([dx], parts) = par_fill(rows, CHUNK_ROWS, [d], |r, [dx]| {
            pass::parallel_backward(
                &plan,
                dir,
                &input.data()[r.start * d..r.end * d],
                &d_out.data()[r.start * d..r.end * d],
                &d_logdet.data()[r],
                dx,
            )
        });
        // Chunk partials are summed in row order, so the result does not depend on threads.
        let mut total = ChunkGrads::zeros(&plan);
        for g in &parts {
            total.add(g);
        }
        let mut grads = plan.unpack_grads(spec, &total.tiles, &total.bias);
        let mut dx = dx;
        dx.check_finite_with(|| format!("{OP} d_input"))?;
        dx.mark_finite();
        grads.check_finite_and_mark(|name| format!("{OP} gradient of {name}"))?;
        Ok((dx, grads))
    }

    fn ar_sequential(
        &self,
        spec: &MadeSpec,
        net: &Mlp<Tensor>,
        degrees: &[Vec<u32>],
        input: &Tensor,
        dir: Direction,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "ar_sequential";
        validate(OP, spec, net, degrees, input)?;
        let plan = plans::plan(spec, net, Tiling::Degree)?;
        forward_chunks(OP, input, FORWARD_CHUNK_ROWS, |x, y, ld| {
            pass::sequential(&plan, dir, x, y, ld)
        })
    }
}
