//! Launches kernels/made.cu on a grid device (CUDA or the emulator).
//!
//! - `ar_parallel`: one masked GEMM per layer (`made_matmul_{f32,bf16}`), each storing the
//!   pre-activation and the next applying the activation as it stages its input, then the affine
//!   transform with its per-row log-det (`made_ar_transform_f32`).
//! - `ar_parallel_backward`: **recomputes** the forward pass (the op receives only the input, so
//!   there is no tape to reuse; the pre-activations of the recomputation are kept for the
//!   activation derivatives), then the transform backward and, per layer from the top, the
//!   masked dW/db (`made_matmul_dw_*`, per-chunk partials summed in a fixed order by
//!   `made_grad_reduce_f32`: deterministic) and dX (`made_matmul_dx_*`, with the activation
//!   derivative of the layer below fused into its epilogue).
//! - `ar_sequential`: `made_seq_pack_f32` lays the weights out unit-major in degree order, then
//!   `made_seq_f32` runs the whole D-step loop in one launch.
//!
//! `precision == Precision::Bf16` selects the tensor-core GEMMs for the parallel pass and its
//! backward; the transform, the reductions and the sequential kernel are f32.
//!
//! The kernels read the degree vectors the caller uploaded; their lengths are checked against
//! the spec, their values are trusted (comparing them would cost a device-to-host copy per call)
//! but only ever used for comparisons or clamped before they index memory, so wrong degrees give
//! wrong numbers, never an out-of-bounds access. Non-finite inputs and results are not searched
//! for on the device (that too would need a copy back per call); they propagate into the
//! log-dets, where the trainer's loss check sees them.

use super::{MadeOps, MadeSpec};
use crate::backend::grid::{
    Grid, GridDevice, GridIdx, GridMat, KArg, LaunchCfg, Precision, dim_i32,
};
use crate::error::{Error, Result};
use crate::nn::mlp::{Activation, Linear, Mlp};
use crate::ops::Direction;
use crate::tensor::Shaped;

/// Block tile of the masked GEMMs: 128 rows of C by 64 columns, 256 threads (made.cu).
const TILE_M: usize = 128;
const TILE_N: usize = 64;
const GEMM_THREADS: u32 = 256;
/// CUDA's limit on grid.y and grid.z.
const MAX_GRID_YZ: usize = 65_535;
/// The dW reduction over the batch is split into chunks so that a few hundred blocks run
/// (2 per SM of an H200) and no thread adds more than this many rows in f32 before the
/// chunk partials are added in f64.
const TARGET_BLOCKS: usize = 264;
const MAX_CHUNK_ROWS: usize = 4096;
/// Chunks start on multiples of the GEMMs' reduction step (16 for f32, 32 for bf16).
const CHUNK_ALIGN: usize = 32;

/// Sequential kernel: rows per block (tried in order until the shared memory fits), threads,
/// the shared memory of one block, and the deepest network it handles.
const SEQ_ROWS: [usize; 3] = [32, 16, 8];
const SEQ_THREADS: u32 = 256;
const SMEM_LIMIT: usize = 227 * 1024;
pub const SEQ_MAX_HIDDEN: usize = 3;

/// One masked linear layer of a MADE: y = x·(W⊙M) + b with the mask given by the degrees of
/// the layer's input and output units (live: c >= a, or c > a for the output layer).
pub struct MaskedLinear<'a, G: GridDevice> {
    /// in × out.
    pub w: &'a GridMat<G>,
    /// 1 × out.
    pub b: &'a GridMat<G>,
    pub deg_in: &'a GridIdx<G>,
    pub deg_out: &'a GridIdx<G>,
    /// The output layer of a MADE (strict inequality).
    pub output: bool,
}

impl<G: GridDevice> Clone for MaskedLinear<'_, G> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<G: GridDevice> Copy for MaskedLinear<'_, G> {}

impl<'a, G: GridDevice> MaskedLinear<'a, G> {
    /// Layer `l` of a MADE network.
    pub fn of(net: &'a Mlp<GridMat<G>>, degrees: &'a [GridIdx<G>], l: usize) -> Self {
        MaskedLinear {
            w: &net.layers[l].w,
            b: &net.layers[l].b,
            deg_in: &degrees[l],
            deg_out: &degrees[l + 1],
            output: l + 1 == net.layers.len(),
        }
    }

    fn check(&self, op: &'static str) -> Result<(usize, usize)> {
        let (k, n) = self.w.shape();
        self.b.expect_shape(op, 1, n)?;
        if self.deg_in.len() != k || self.deg_out.len() != n {
            return Err(Error::shape(
                op,
                format!("{k} input and {n} output degrees"),
                format!("{} and {}", self.deg_in.len(), self.deg_out.len()),
            ));
        }
        Ok((k, n))
    }

    fn strict(&self) -> i32 {
        self.output as i32
    }
}

/// A device counter of the multiply-adds the masked GEMMs execute (tile schedule
/// instrumentation for tests and benches; pass `None` to the launches otherwise).
pub struct MacCounter<G: GridDevice> {
    buf: G::Buf,
}

fn act_code(a: Option<Activation>) -> i32 {
    a.map_or(-1, Activation::code)
}

impl<G: GridDevice> Grid<G> {
    /// A zeroed MAC counter.
    pub fn mac_counter(&self) -> Result<MacCounter<G>> {
        Ok(MacCounter {
            buf: self.dev.alloc(8)?,
        })
    }

    /// The multiply-adds counted so far (waits for the device).
    pub fn read_macs(&self, c: &MacCounter<G>) -> Result<u64> {
        let mut v = [0u8; 8];
        self.dev.dtoh(&c.buf, &mut v)?;
        Ok(u64::from_le_bytes(v))
    }

    fn counter_arg<'b>(c: Option<&'b MacCounter<G>>) -> KArg<'b, G::Buf> {
        c.map_or(KArg::Null, |c| KArg::Buf(&c.buf))
    }

    fn gemm_name(&self, f32_name: &'static str, bf16_name: &'static str) -> &'static str {
        match self.precision {
            Precision::F32 => f32_name,
            Precision::Bf16 => bf16_name,
        }
    }

    fn gemm_cfg(op: &'static str, m: usize, n: usize, z: usize) -> Result<LaunchCfg> {
        let (gx, gy) = (n.div_ceil(TILE_N), m.div_ceil(TILE_M));
        if gy > MAX_GRID_YZ || z > MAX_GRID_YZ {
            return Err(Error::invalid(format!(
                "{op}: {m} rows exceed the kernels' grid ({} rows at most)",
                MAX_GRID_YZ * TILE_M
            )));
        }
        Ok(LaunchCfg::new(
            [dim_i32(op, gx)? as u32, gy as u32, z as u32],
            [GEMM_THREADS, 1, 1],
            0,
        ))
    }

    /// Y = out_act?(in_act?(X)·(W⊙M) + b) for X of shape rows × in. The mask comes from the
    /// degrees; reduction steps in which a warp's units have no live weight are skipped.
    pub fn made_linear(
        &self,
        layer: MaskedLinear<'_, G>,
        x: &GridMat<G>,
        in_act: Option<Activation>,
        out_act: Option<Activation>,
        counter: Option<&MacCounter<G>>,
    ) -> Result<GridMat<G>> {
        const OP: &str = "made_linear";
        let (k, n) = layer.check(OP)?;
        x.expect_shape(OP, x.rows(), k)?;
        let rows = x.rows();
        let y = self.alloc_mat(rows, n)?;
        if rows == 0 || n == 0 {
            return Ok(y);
        }
        self.launch(
            self.gemm_name("made_matmul_f32", "made_matmul_bf16"),
            Self::gemm_cfg(OP, rows, n, 1)?,
            &[
                KArg::Buf(x.buf()),
                KArg::Buf(layer.w.buf()),
                KArg::Buf(layer.b.buf()),
                KArg::Buf(layer.deg_in.buf()),
                KArg::Buf(layer.deg_out.buf()),
                KArg::Buf(y.buf()),
                KArg::I32(dim_i32(OP, rows)?),
                KArg::I32(dim_i32(OP, k)?),
                KArg::I32(dim_i32(OP, n)?),
                KArg::I32(layer.strict()),
                KArg::I32(act_code(in_act)),
                KArg::I32(act_code(out_act)),
                Self::counter_arg(counter),
            ],
        )?;
        Ok(y)
    }

    /// dL/dX of `made_linear` (without activations on either side): dY·(W⊙M)ᵀ, times
    /// act'(pre) when `pre` (the pre-activation of the layer's input, rows × in) is given, and
    /// added to `into` when given (which is then returned).
    pub fn made_linear_dx(
        &self,
        layer: MaskedLinear<'_, G>,
        dy: &GridMat<G>,
        pre: Option<(&GridMat<G>, Activation)>,
        into: Option<GridMat<G>>,
        counter: Option<&MacCounter<G>>,
    ) -> Result<GridMat<G>> {
        const OP: &str = "made_linear_dx";
        let (k, n) = layer.check(OP)?;
        let rows = dy.rows();
        dy.expect_shape(OP, rows, n)?;
        if let Some((z, _)) = pre {
            z.expect_shape(OP, rows, k)?;
        }
        let accumulate = into.is_some();
        let mut dx = match into {
            Some(m) => {
                m.expect_shape(OP, rows, k)?;
                m
            }
            None => self.alloc_mat(rows, k)?,
        };
        if rows == 0 || k == 0 {
            return Ok(dx);
        }
        let cfg = Self::gemm_cfg(OP, rows, k, 1)?;
        let name = self.gemm_name("made_matmul_dx_f32", "made_matmul_dx_bf16");
        let out = dx.buf_mut(&self.dev)?;
        self.launch(
            name,
            cfg,
            &[
                KArg::Buf(dy.buf()),
                KArg::Buf(layer.w.buf()),
                KArg::Buf(layer.deg_in.buf()),
                KArg::Buf(layer.deg_out.buf()),
                pre.map_or(KArg::Null, |(z, _)| KArg::Buf(z.buf())),
                KArg::Buf(out),
                KArg::I32(dim_i32(OP, rows)?),
                KArg::I32(dim_i32(OP, k)?),
                KArg::I32(dim_i32(OP, n)?),
                KArg::I32(layer.strict()),
                KArg::I32(act_code(pre.map(|(_, a)| a))),
                KArg::I32(accumulate as i32),
                Self::counter_arg(counter),
            ],
        )?;
        Ok(dx)
    }

    /// dL/dW (masked: dead weights exactly 0) and dL/db of `made_linear`, summed over the
    /// rows, for input X (rows × in, `in_act` applied as in the forward) and dL/dY.
    pub fn made_linear_dw(
        &self,
        layer: MaskedLinear<'_, G>,
        x: &GridMat<G>,
        in_act: Option<Activation>,
        dy: &GridMat<G>,
        counter: Option<&MacCounter<G>>,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        const OP: &str = "made_linear_dw";
        let (k, n) = layer.check(OP)?;
        let rows = x.rows();
        x.expect_shape(OP, rows, k)?;
        dy.expect_shape(OP, rows, n)?;
        let dw = self.alloc_mat(k, n)?;
        let db = self.alloc_mat(1, n)?;
        if rows == 0 || n == 0 {
            return Ok((dw, db));
        }
        let tiles = n.div_ceil(TILE_N) * (k + 1).div_ceil(TILE_M).max(1);
        let chunks = TARGET_BLOCKS
            .div_ceil(tiles)
            .max(rows.div_ceil(MAX_CHUNK_ROWS))
            .clamp(1, rows.div_ceil(CHUNK_ALIGN));
        let chunk_rows = rows.div_ceil(chunks).next_multiple_of(CHUNK_ALIGN);
        let chunks = rows.div_ceil(chunk_rows);
        let partial = self.alloc_mat(chunks * (k + 1), n)?;
        self.launch(
            self.gemm_name("made_matmul_dw_f32", "made_matmul_dw_bf16"),
            Self::gemm_cfg(OP, k.max(1), n, chunks)?,
            &[
                KArg::Buf(x.buf()),
                KArg::Buf(dy.buf()),
                KArg::Buf(layer.deg_in.buf()),
                KArg::Buf(layer.deg_out.buf()),
                KArg::Buf(partial.buf()),
                KArg::I32(dim_i32(OP, rows)?),
                KArg::I32(dim_i32(OP, k)?),
                KArg::I32(dim_i32(OP, n)?),
                KArg::I32(layer.strict()),
                KArg::I32(act_code(in_act)),
                KArg::I32(dim_i32(OP, chunk_rows)?),
                Self::counter_arg(counter),
            ],
        )?;
        self.launch(
            "made_grad_reduce_f32",
            LaunchCfg::stride((k + 1) * n),
            &[
                KArg::Buf(partial.buf()),
                KArg::Buf(layer.deg_in.buf()),
                KArg::Buf(layer.deg_out.buf()),
                KArg::Buf(dw.buf()),
                KArg::Buf(db.buf()),
                KArg::I32(dim_i32(OP, k)?),
                KArg::I32(dim_i32(OP, n)?),
                KArg::I32(dim_i32(OP, chunks)?),
                KArg::I32(layer.strict()),
            ],
        )?;
        Ok((dw, db))
    }

    /// The masked layers of a MADE: the pre-activations of the hidden layers and the output
    /// [b | raw s] (rows × 2D).
    fn made_forward(
        &self,
        net: &Mlp<GridMat<G>>,
        degrees: &[GridIdx<G>],
        input: &GridMat<G>,
        counter: Option<&MacCounter<G>>,
    ) -> Result<(Vec<GridMat<G>>, GridMat<G>)> {
        let layers = net.layers.len();
        let mut pre: Vec<GridMat<G>> = Vec::with_capacity(layers - 1);
        for l in 0..layers {
            let (x, act) = match pre.last() {
                None => (input, None),
                Some(z) => (z, Some(net.act)),
            };
            let z = self.made_linear(MaskedLinear::of(net, degrees, l), x, act, None, counter)?;
            pre.push(z);
        }
        let out = pre.pop().expect("at least one layer");
        Ok((pre, out))
    }

    /// `ar_parallel` with the masked GEMMs' MACs counted (instrumentation).
    pub fn ar_parallel_counted(
        &self,
        spec: &MadeSpec,
        net: &Mlp<GridMat<G>>,
        degrees: &[GridIdx<G>],
        input: &GridMat<G>,
        dir: Direction,
        counter: Option<&MacCounter<G>>,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        const OP: &str = "ar_parallel";
        validate(OP, spec, net, degrees, input)?;
        let (rows, d) = input.shape();
        let (_, out) = self.made_forward(net, degrees, input, counter)?;
        let y = self.alloc_mat(rows, d)?;
        let ld = self.alloc_mat(rows, 1)?;
        self.launch(
            "made_ar_transform_f32",
            LaunchCfg::warp_per_row(rows),
            &[
                KArg::Buf(out.buf()),
                KArg::Buf(input.buf()),
                KArg::Buf(y.buf()),
                KArg::Buf(ld.buf()),
                KArg::I32(dim_i32(OP, rows)?),
                KArg::I32(dim_i32(OP, d)?),
                KArg::F32(spec.clamp),
                KArg::I32(dir.code()),
            ],
        )?;
        Ok((y, ld))
    }

    /// Rows per block and dynamic shared memory (bytes) of `made_seq_f32` for these widths.
    fn seq_layout(d: usize, hidden: &[usize]) -> Option<(usize, usize)> {
        let stride = |w: usize| w.div_ceil(32) * 32 + 4;
        let per_row = stride(d) + hidden.iter().map(|&h| stride(h)).sum::<usize>() + 2;
        let ints = hidden.len() * (d + 2);
        SEQ_ROWS
            .iter()
            .map(|&r| (r, 4 * (r * per_row + ints)))
            .find(|&(_, bytes)| bytes <= SMEM_LIMIT)
    }
}

/// Everything the ops check before launching.
fn validate<G: GridDevice>(
    op: &'static str,
    spec: &MadeSpec,
    net: &Mlp<GridMat<G>>,
    degrees: &[GridIdx<G>],
    input: &GridMat<G>,
) -> Result<()> {
    spec.check(op, net, input)?;
    if degrees.len() != spec.degrees.len()
        || degrees
            .iter()
            .zip(&spec.degrees)
            .any(|(g, h)| g.len() != h.len())
    {
        return Err(Error::shape(
            op,
            format!(
                "degree vectors of lengths {:?}",
                spec.degrees.iter().map(Vec::len).collect::<Vec<_>>()
            ),
            format!("{:?}", degrees.iter().map(GridIdx::len).collect::<Vec<_>>()),
        ));
    }
    if input.rows() == 0 {
        return Err(Error::Empty(format!("{op}: a batch with no rows")));
    }
    Ok(())
}

impl<G: GridDevice> MadeOps for Grid<G> {
    fn ar_parallel(
        &self,
        spec: &MadeSpec,
        net: &Mlp<GridMat<G>>,
        degrees: &[GridIdx<G>],
        input: &GridMat<G>,
        dir: Direction,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        self.ar_parallel_counted(spec, net, degrees, input, dir, None)
    }

    fn ar_parallel_backward(
        &self,
        spec: &MadeSpec,
        net: &Mlp<GridMat<G>>,
        degrees: &[GridIdx<G>],
        input: &GridMat<G>,
        dir: Direction,
        d_out: &GridMat<G>,
        d_logdet: &GridMat<G>,
    ) -> Result<(GridMat<G>, Mlp<GridMat<G>>)> {
        const OP: &str = "ar_parallel_backward";
        validate(OP, spec, net, degrees, input)?;
        let (rows, d) = input.shape();
        d_out.expect_shape(OP, rows, d)?;
        d_logdet.expect_shape(OP, rows, 1)?;
        let (pre, out) = self.made_forward(net, degrees, input, None)?;
        let dx = self.alloc_mat(rows, d)?;
        let mut delta = self.alloc_mat(rows, 2 * d)?;
        self.launch(
            "made_ar_transform_bwd_f32",
            LaunchCfg::stride(rows * d),
            &[
                KArg::Buf(out.buf()),
                KArg::Buf(input.buf()),
                KArg::Buf(d_out.buf()),
                KArg::Buf(d_logdet.buf()),
                KArg::Buf(dx.buf()),
                KArg::Buf(delta.buf()),
                KArg::I32(dim_i32(OP, rows)?),
                KArg::I32(dim_i32(OP, d)?),
                KArg::F32(spec.clamp),
                KArg::I32(dir.code()),
            ],
        )?;
        let layers = net.layers.len();
        let mut grads: Vec<Option<Linear<GridMat<G>>>> = (0..layers).map(|_| None).collect();
        let mut dx = Some(dx);
        for l in (0..layers).rev() {
            let layer = MaskedLinear::of(net, degrees, l);
            let (x, act) = if l == 0 {
                (input, None)
            } else {
                (&pre[l - 1], Some(net.act))
            };
            let (w, b) = self.made_linear_dw(layer, x, act, &delta, None)?;
            grads[l] = Some(Linear { w, b });
            if l > 0 {
                delta =
                    self.made_linear_dx(layer, &delta, Some((&pre[l - 1], net.act)), None, None)?;
            } else {
                dx = Some(self.made_linear_dx(layer, &delta, None, dx.take(), None)?);
            }
        }
        let layers = grads
            .into_iter()
            .map(|g| g.expect("every layer has its gradient"))
            .collect();
        let dx = dx.expect("the first layer adds to dx");
        Ok((
            dx,
            Mlp {
                layers,
                act: net.act,
            },
        ))
    }

    fn ar_sequential(
        &self,
        spec: &MadeSpec,
        net: &Mlp<GridMat<G>>,
        degrees: &[GridIdx<G>],
        input: &GridMat<G>,
        dir: Direction,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        const OP: &str = "ar_sequential";
        validate(OP, spec, net, degrees, input)?;
        let (rows, d) = input.shape();
        let nh = net.layers.len() - 1;
        if nh > SEQ_MAX_HIDDEN {
            return Err(Error::Unsupported {
                op: "ar_sequential with more than 3 hidden layers",
                backend: self.dev.describe(),
            });
        }
        let hidden: Vec<usize> = net.layers[..nh].iter().map(|l| l.w.cols()).collect();
        let Some((block_rows, smem)) = Self::seq_layout(d, &hidden) else {
            return Err(Error::Unsupported {
                op: "ar_sequential with layers this wide (shared memory)",
                backend: self.dev.describe(),
            });
        };
        // Packed weights: layer l at woff[l], the output bias pairs after the last layer.
        let mut woff = vec![0usize];
        for layer in &net.layers {
            let (k, n) = layer.w.shape();
            woff.push(woff.last().unwrap() + k * n);
        }
        let total = woff[nh + 1] + 2 * d;
        let wt = self.alloc_mat(1, total)?;
        dim_i32(OP, total)?;
        let w_arg = |l: usize| {
            net.layers
                .get(l)
                .map_or(KArg::Null, |layer| KArg::Buf(layer.w.buf()))
        };
        let width = |l: usize| hidden.get(l).copied().unwrap_or(0);
        self.launch(
            "made_seq_pack_f32",
            LaunchCfg::stride(total),
            &[
                w_arg(0),
                w_arg(1),
                w_arg(2),
                w_arg(3),
                KArg::Buf(net.layers[nh].b.buf()),
                KArg::Buf(wt.buf()),
                KArg::Buf(degrees[0].buf()),
                KArg::I32(dim_i32(OP, d)?),
                KArg::I32(nh as i32),
                KArg::I32(dim_i32(OP, width(0))?),
                KArg::I32(dim_i32(OP, width(1))?),
                KArg::I32(dim_i32(OP, width(2))?),
            ],
        )?;
        let off = |l: usize| woff.get(l).copied().unwrap_or(0);
        let bias_arg = |l: usize| {
            if l < nh {
                KArg::Buf(net.layers[l].b.buf())
            } else {
                KArg::Null
            }
        };
        let deg_arg = |l: usize| {
            if l < nh {
                KArg::Buf(degrees[l + 1].buf())
            } else {
                KArg::Null
            }
        };
        // The packed output bias sits at woff[nh + 1]; the kernel reads it as woff[nh + 1].
        let mut offs = [0usize; 4];
        for (i, o) in offs.iter_mut().enumerate() {
            *o = if i < nh + 1 { off(i + 1) } else { 0 };
        }
        let y = self.alloc_mat(rows, d)?;
        let ld = self.alloc_mat(rows, 1)?;
        let blocks = rows.div_ceil(block_rows);
        self.launch(
            "made_seq_f32",
            LaunchCfg::new(
                [dim_i32(OP, blocks)? as u32, 1, 1],
                [SEQ_THREADS, 1, 1],
                smem as u32,
            ),
            &[
                KArg::Buf(input.buf()),
                KArg::Buf(y.buf()),
                KArg::Buf(ld.buf()),
                KArg::I32(dim_i32(OP, rows)?),
                KArg::I32(dim_i32(OP, d)?),
                KArg::Buf(wt.buf()),
                KArg::I32(offs[0] as i32),
                KArg::I32(offs[1] as i32),
                KArg::I32(offs[2] as i32),
                KArg::I32(offs[3] as i32),
                bias_arg(0),
                bias_arg(1),
                bias_arg(2),
                KArg::Buf(degrees[0].buf()),
                deg_arg(0),
                deg_arg(1),
                deg_arg(2),
                KArg::I32(width(0) as i32),
                KArg::I32(width(1) as i32),
                KArg::I32(width(2) as i32),
                KArg::I32(nh as i32),
                KArg::I32(net.act.code()),
                KArg::F32(spec.clamp),
                KArg::I32(dir.code()),
                KArg::I32(block_rows as i32),
            ],
        )?;
        Ok((y, ld))
    }
}
