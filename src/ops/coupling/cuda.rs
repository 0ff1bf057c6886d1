//! Launches kernels/coupling.cu: the fused coupling layer on the grid backends (CUDA and the
//! emulated grid).
//!
//! One call of [`CouplingOps::coupling`] is two launches: `coupling_pack_f32` gathers the
//! conditioner's tensors into one zero-padded buffer (and checks them for non-finite values),
//! then `coupling_fwd_f32` (or, at [`Precision::Bf16`], `coupling_pack_bf16` +
//! `coupling_fwd_bf16`) runs the MLP, the transform and the log-det per row tile in one pass.
//! The backward is the pack, `coupling_bwd_f32` or, at bf16, `coupling_bwd_bf16` (per-block
//! gradient partials, no atomics) and `coupling_grad_reduce_f32` (sums the partials in block
//! order), so gradients are bitwise reproducible for a given batch size.
//!
//! Every kernel records the first non-finite input, parameter or result in a small status
//! buffer, which is read back after the launches and turned into the same errors as the CPU
//! reference. Layer pointers are passed as eight separate arguments (w0, b0, .., w3, b3) with
//! [`KArg::Null`] for the layers a shallower conditioner lacks.
//!
//! Limits of the grid path: at most [`MAX_LAYERS`] linear layers, and widths whose row tiles
//! (down to 16 rows) fit in shared memory: in the backward, hidden widths up to 512 (padded);
//! anything else is `Error::Unsupported`.

use super::{CouplingKind, CouplingOps, CouplingSpec, Half, SPLINE_MIN_DERIVATIVE};
use crate::backend::grid::{Grid, GridDevice, GridMat, KArg, LaunchCfg, Precision, dim_i32};
use crate::error::{Error, Result};
use crate::nn::mlp::Mlp;
use crate::ops::Direction;
use crate::tensor::Shaped;

const OP: &str = "coupling";
const OP_BACKWARD: &str = "coupling_backward";

/// The deepest conditioner the kernels take (CP_MAX_LAYERS).
pub const MAX_LAYERS: usize = 4;
/// Threads per block of the fused kernels (CP_THREADS).
const THREADS: u32 = 256;
/// Dynamic shared memory a block may use: 227 KiB on sm_90 (and sm_80), less a margin for the
/// kernels' static shared memory (the layout descriptor, under 1 KiB).
const SMEM_LIMIT: usize = 227 * 1024 - 1024;
/// Shared memory per SM on an H200, for the blocks-per-SM estimate.
const SMEM_PER_SM: usize = 228 * 1024;
/// SMs of an H200: the persistent grids are this many times the blocks one SM holds.
const FILL_SMS: usize = 132;
/// k-slice height of the streamed f32 weights (CP_STAGE_VEC allows up to 16).
const KS: usize = 16;
/// Rows per tile of the bf16 kernel (CP_MMA_TM), its k-slice and row padding.
const MMA_TM: usize = 64;
const MMA_KS: usize = 32;
const MMA_PAD: usize = 8;

/// Status slots (coupling_layout.cuh CP_ST_*), one i64 each.
const ST_INPUT: usize = 0;
const ST_PARAM: usize = 1;
const ST_OUTPUT: usize = 2;
const ST_LOGDET: usize = 3;
const ST_DOUT: usize = 4;
const ST_DLOGDET: usize = 5;
const ST_DINPUT: usize = 6;
const ST_GRAD: usize = 7;
const ST_LAYOUT: usize = 8;
const ST_SLOTS: usize = 9;

/// Padded width of a layer input or output (cp_pad): a multiple of its column chunk.
fn pad(n: usize) -> usize {
    match n {
        0..=32 => 32,
        33..=64 => 64,
        65..=128 => 128,
        _ => n.div_ceil(256) * 256,
    }
}

/// Columns of one pass of the tile products (cp_chunk).
fn chunk(padded: usize) -> usize {
    padded.min(256)
}

/// The conditioner's padded layout, as the kernels compute it (CpNet in coupling_layout.cuh).
struct NetLayout {
    widths: Vec<usize>,
    kp: Vec<usize>,
    np: Vec<usize>,
    hmax: usize,
    hidden_max: usize,
    packed_len: usize,
    grad_len: usize,
}

impl NetLayout {
    fn new<M: Shaped>(net: &Mlp<M>) -> Self {
        let widths = net.widths();
        let layers = widths.len() - 1;
        let kp: Vec<usize> = widths[..layers].iter().map(|&w| pad(w)).collect();
        let np: Vec<usize> = widths[1..].iter().map(|&w| pad(w)).collect();
        let hmax = kp.iter().chain(&np).copied().max().unwrap_or(0);
        let hidden_max = np[..layers - 1].iter().copied().max().unwrap_or(0);
        let packed_len = (0..layers).map(|l| 2 * kp[l] * np[l] + np[l]).sum();
        let grad_len = (0..layers).map(|l| kp[l] * np[l] + np[l]).sum();
        NetLayout {
            widths,
            kp,
            np,
            hmax,
            hidden_max,
            packed_len,
            grad_len,
        }
    }

    fn layers(&self) -> usize {
        self.kp.len()
    }

    /// Resident weights in floats (cp_resident_len): W (rows of np + 4), b (and W^T, rows of
    /// kp + 4) of every layer.
    fn resident_len(&self, with_transpose: bool) -> usize {
        (0..self.layers())
            .map(|l| {
                let (kp, np) = (self.kp[l], self.np[l]);
                kp * (np + 4) + np + if with_transpose { np * (kp + 4) } else { 0 }
            })
            .sum()
    }

    /// Two k-slices of streamed weights, rows padded by 4 (cp_stage_len).
    fn stage_len(&self, ks: usize) -> usize {
        2 * ks * (chunk(self.hmax) + 4)
    }

    /// coupling_fwd_f32's shared memory in floats (cp_fwd_act_len and the weights).
    fn fwd_f32_len(&self, tm: usize, resident: bool, ks: usize) -> usize {
        let ldp = self.np[self.layers() - 1] + 4;
        let act = (self.hmax * (tm + 4)).max(tm * ldp);
        2 * act
            + if resident {
                self.resident_len(false)
            } else {
                self.stage_len(ks)
            }
    }

    /// coupling_bwd_f32's shared memory in floats (cp_bwd_len).
    fn bwd_f32_len(&self, tm: usize, resident: bool, ks: usize) -> usize {
        let tms = tm + 4;
        let zs: usize = (1..self.layers()).map(|l| self.np[l - 1] * tms).sum();
        let zlen = (tm * (self.hmax + 4)).max(self.hidden_max * tms);
        self.kp[0] * tms
            + zs
            + 2 * zlen
            + if resident {
                self.resident_len(true)
            } else {
                self.stage_len(ks)
            }
    }

    /// coupling_fwd_bf16's shared memory in floats (cp_fwd_bf16_len).
    fn fwd_bf16_len(&self, resident: bool) -> usize {
        let lda = self.hmax + MMA_PAD;
        let weights = if resident {
            (0..self.layers())
                .map(|l| self.np[l] * (self.kp[l] + MMA_PAD) / 2)
                .sum()
        } else {
            256 * (MMA_KS + MMA_PAD)
        };
        MMA_TM * lda + MMA_TM * (self.np[self.layers() - 1] + 4) + weights
    }

    /// bf16 elements of the transposed weights (cp_bf16_offset of the last layer + its size).
    fn bf16_len(&self) -> usize {
        (0..self.layers()).map(|l| self.np[l] * self.kp[l]).sum()
    }

    /// The eight width arguments every kernel takes after the layer count: act, n0..n4.
    fn width_args<B>(&self, act: i32) -> Result<Vec<KArg<'static, B>>> {
        let mut v = vec![KArg::I32(dim_i32(OP, self.layers())?), KArg::I32(act)];
        for i in 0..=MAX_LAYERS {
            v.push(KArg::I32(dim_i32(
                OP,
                self.widths.get(i).copied().unwrap_or(0),
            )?));
        }
        Ok(v)
    }
}

/// Which kernel runs and how its shared memory is used.
#[derive(Clone, Copy, Debug)]
struct Plan {
    bf16: bool,
    tm: usize,
    resident: bool,
    ks: usize,
    smem_floats: usize,
}

impl Plan {
    fn smem_bytes(&self) -> usize {
        self.smem_floats * 4
    }

    /// Persistent blocks: enough to fill every SM of an H200 (as many per SM as shared memory
    /// allows, at most 8 of 256 threads), never more than there are tiles. A function of the
    /// plan and the batch only, so the backward's partials are summed in the same order on
    /// every run.
    fn blocks(&self, rows: usize) -> usize {
        let per_sm = (SMEM_PER_SM / (self.smem_bytes() + 1024)).clamp(1, 8);
        rows.div_ceil(self.tm).clamp(1, FILL_SMS * per_sm)
    }

    fn launch_cfg(&self, rows: usize) -> LaunchCfg {
        LaunchCfg::new(
            [self.blocks(rows) as u32, 1, 1],
            [THREADS, 1, 1],
            self.smem_bytes() as u32,
        )
    }
}

/// The first plan that fits: 64-row tiles before 32 and 16, resident weights before streamed
/// ones, 16-deep weight slices before 8.
fn plan_f32(
    lay: &NetLayout,
    len: impl Fn(&NetLayout, usize, bool, usize) -> usize,
) -> Option<Plan> {
    let candidates = [
        (64, true, KS),
        (64, false, KS),
        (32, true, KS),
        (32, false, KS),
        (16, false, KS),
        (16, false, KS / 2),
    ];
    candidates.into_iter().find_map(|(tm, resident, ks)| {
        let smem_floats = len(lay, tm, resident, ks);
        (smem_floats * 4 <= SMEM_LIMIT).then_some(Plan {
            bf16: false,
            tm,
            resident,
            ks,
            smem_floats,
        })
    })
}

fn plan_forward(lay: &NetLayout, precision: Precision) -> Option<Plan> {
    if precision == Precision::Bf16 {
        for resident in [true, false] {
            let smem_floats = lay.fwd_bf16_len(resident);
            if smem_floats * 4 <= SMEM_LIMIT {
                return Some(Plan {
                    bf16: true,
                    tm: MMA_TM,
                    resident,
                    ks: MMA_KS,
                    smem_floats,
                });
            }
        }
    }
    // f32, and bf16 layers too wide for its 64-row tiles.
    plan_f32(lay, NetLayout::fwd_f32_len)
}

/// The transform's scalar arguments: kind, direction, clamp or bound, bins, derivative shift.
fn transform_args<B>(spec: &CouplingSpec, dir: Direction) -> [KArg<'static, B>; 5] {
    let (hp, bins) = match spec.kind {
        CouplingKind::Affine { clamp } => (clamp, 0),
        CouplingKind::Additive => (0.0, 0),
        CouplingKind::Spline { bins, bound } => (bound, bins as i32),
    };
    // The same f64 expression as the CPU spline, so that a zero output is the identity.
    let dshift = ((1.0 - SPLINE_MIN_DERIVATIVE as f64).exp() - 1.0).ln() as f32;
    [
        KArg::I32(spec.kind.code()),
        KArg::I32(dir.code()),
        KArg::F32(hp),
        KArg::I32(bins),
        KArg::F32(dshift),
    ]
}

impl<G: GridDevice> Grid<G> {
    fn unsupported(&self, op: &'static str) -> Error {
        Error::Unsupported {
            op,
            backend: self.dev.describe(),
        }
    }

    /// Shapes, an empty batch, and what the kernels can take; the non-finite checks are done by
    /// the kernels themselves (status slots).
    fn coupling_layout(
        &self,
        op: &'static str,
        spec: &CouplingSpec,
        net: &Mlp<GridMat<G>>,
        input: &GridMat<G>,
    ) -> Result<NetLayout> {
        spec.check(op, net, input)?;
        if input.rows() == 0 {
            return Err(Error::Empty(format!("{op}: the batch has no rows")));
        }
        if net.layers.len() > MAX_LAYERS {
            return Err(self.unsupported(op));
        }
        let lay = NetLayout::new(net);
        dim_i32(op, input.rows())?;
        dim_i32(op, lay.packed_len)?;
        dim_i32(op, lay.bf16_len())?;
        Ok(lay)
    }

    /// The eight layer pointers, null past the last layer.
    fn layer_args<'a>(net: &'a Mlp<GridMat<G>>) -> Vec<KArg<'a, G::Buf>> {
        (0..MAX_LAYERS)
            .flat_map(|l| match net.layers.get(l) {
                Some(layer) => [KArg::Buf(layer.w.buf()), KArg::Buf(layer.b.buf())],
                None => [KArg::Null, KArg::Null],
            })
            .collect()
    }

    /// coupling_pack_f32: the padded f32 weights (W, b, W^T per layer).
    fn pack_f32(
        &self,
        net: &Mlp<GridMat<G>>,
        lay: &NetLayout,
        status: &GridMat<G>,
    ) -> Result<GridMat<G>> {
        let packed = self.alloc_mat(1, lay.packed_len)?;
        let mut args = Self::layer_args(net);
        args.push(KArg::Buf(packed.buf()));
        args.push(KArg::Buf(status.buf()));
        args.extend(lay.width_args(net.act.code())?);
        self.launch(
            "coupling_pack_f32",
            LaunchCfg::stride(lay.packed_len),
            &args,
        )?;
        Ok(packed)
    }

    /// coupling_pack_bf16: W^T of every layer in bf16 (2 per f32 slot of the returned matrix).
    fn pack_bf16(&self, net: &Mlp<GridMat<G>>, lay: &NetLayout) -> Result<GridMat<G>> {
        let wt = self.alloc_mat(1, lay.bf16_len().div_ceil(2))?;
        let mut args: Vec<KArg<'_, G::Buf>> = (0..MAX_LAYERS)
            .map(|l| match net.layers.get(l) {
                Some(layer) => KArg::Buf(layer.w.buf()),
                None => KArg::Null,
            })
            .collect();
        args.push(KArg::Buf(wt.buf()));
        args.extend(lay.width_args(net.act.code())?);
        self.launch(
            "coupling_pack_bf16",
            LaunchCfg::stride(lay.bf16_len()),
            &args,
        )?;
        Ok(wt)
    }

    /// The status slots after the launches, as the first error in the CPU reference's order.
    fn coupling_status(
        &self,
        op: &'static str,
        status: &GridMat<G>,
        slots: &[usize],
        dim: usize,
        net: &Mlp<GridMat<G>>,
        smem_bytes: usize,
    ) -> Result<()> {
        let mut raw = vec![0u8; ST_SLOTS * 8];
        self.dev.dtoh(status.buf(), &mut raw)?;
        let value = |slot: usize| {
            let v = i64::from_le_bytes(raw[slot * 8..slot * 8 + 8].try_into().expect("8 bytes"));
            (v != 0).then(|| (i64::MAX - v) as u64)
        };
        if let Some(need) = value(ST_LAYOUT) {
            return Err(Error::invalid(format!(
                "{op}: internal error: the kernel's shared-memory plan needs {} bytes, the launch gave {smem_bytes}",
                need * 4
            )));
        }
        for &slot in slots {
            let Some(key) = value(slot) else { continue };
            let at = |what: String, key: u64, cols: usize| Error::NonFinite {
                what,
                row: (key / cols as u64) as usize,
                col: (key % cols as u64) as usize,
            };
            return Err(match slot {
                ST_PARAM | ST_GRAD => {
                    let tensor = (key >> 40) as usize;
                    let flat = key & ((1 << 40) - 1);
                    let (l, is_bias) = (tensor / 2, tensor % 2 == 1);
                    let name = format!("{}{l}", if is_bias { "b" } else { "w" });
                    let cols = net.layers.get(l).map_or(1, |x| x.w.cols()).max(1);
                    let what = if slot == ST_PARAM {
                        format!("{op} conditioner {name}")
                    } else {
                        format!("{op} gradient of {name}")
                    };
                    at(what, flat, cols)
                }
                ST_INPUT => at(format!("{op} input"), key, dim),
                ST_OUTPUT => at(format!("{op} output"), key, dim),
                ST_LOGDET => at(format!("{op} log-det"), key, 1),
                ST_DOUT => at(format!("{op} d_out"), key, dim),
                ST_DLOGDET => at(format!("{op} d_logdet"), key, 1),
                _ => at(format!("{op} d_input"), key, dim),
            });
        }
        Ok(())
    }

    /// Arguments shared by the forward and backward kernels after their buffers: the batch, the
    /// spec, the transform and the conditioner's widths.
    fn shape_args(
        spec: &CouplingSpec,
        lay: &NetLayout,
        act: i32,
        rows: usize,
        dir: Direction,
    ) -> Result<Vec<KArg<'static, G::Buf>>> {
        let mut v = vec![
            KArg::I32(dim_i32(OP, rows)?),
            KArg::I32(dim_i32(OP, spec.dim)?),
            KArg::I32((spec.copied == Half::Upper) as i32),
        ];
        v.extend(transform_args(spec, dir));
        v.extend(lay.width_args(act)?);
        Ok(v)
    }
}

impl<G: GridDevice> CouplingOps for Grid<G> {
    fn coupling(
        &self,
        spec: &CouplingSpec,
        net: &Mlp<GridMat<G>>,
        input: &GridMat<G>,
        dir: Direction,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        let lay = self.coupling_layout(OP, spec, net, input)?;
        let plan = plan_forward(&lay, self.precision).ok_or_else(|| self.unsupported(OP))?;
        let rows = input.rows();
        let status = self.alloc_mat(1, 2 * ST_SLOTS)?;
        let packed = self.pack_f32(net, &lay, &status)?;
        let out = self.alloc_mat(rows, spec.dim)?;
        let logdet = self.alloc_mat(rows, 1)?;
        let wt = if plan.bf16 {
            Some(self.pack_bf16(net, &lay)?)
        } else {
            None
        };
        let mut args = vec![
            KArg::Buf(input.buf()),
            KArg::Buf(out.buf()),
            KArg::Buf(logdet.buf()),
            KArg::Buf(packed.buf()),
        ];
        if let Some(wt) = &wt {
            args.push(KArg::Buf(wt.buf()));
        }
        args.push(KArg::Buf(status.buf()));
        args.extend(Self::shape_args(spec, &lay, net.act.code(), rows, dir)?);
        if !plan.bf16 {
            args.push(KArg::I32(plan.tm as i32));
        }
        args.push(KArg::I32(plan.resident as i32));
        if !plan.bf16 {
            args.push(KArg::I32(plan.ks as i32));
        }
        args.push(KArg::I32(dim_i32(OP, plan.smem_bytes())?));
        let kernel = if plan.bf16 {
            "coupling_fwd_bf16"
        } else {
            "coupling_fwd_f32"
        };
        self.launch(kernel, plan.launch_cfg(rows), &args)?;
        self.coupling_status(
            OP,
            &status,
            &[ST_INPUT, ST_PARAM, ST_OUTPUT, ST_LOGDET],
            spec.dim,
            net,
            plan.smem_bytes(),
        )?;
        Ok((out, logdet))
    }

    fn coupling_backward(
        &self,
        spec: &CouplingSpec,
        net: &Mlp<GridMat<G>>,
        input: &GridMat<G>,
        dir: Direction,
        d_out: &GridMat<G>,
        d_logdet: &GridMat<G>,
    ) -> Result<(GridMat<G>, Mlp<GridMat<G>>)> {
        let lay = self.coupling_layout(OP_BACKWARD, spec, net, input)?;
        let rows = input.rows();
        d_out.expect_shape(OP_BACKWARD, rows, spec.dim)?;
        d_logdet.expect_shape(OP_BACKWARD, rows, 1)?;
        let plan =
            plan_f32(&lay, NetLayout::bwd_f32_len).ok_or_else(|| self.unsupported(OP_BACKWARD))?;
        let status = self.alloc_mat(1, 2 * ST_SLOTS)?;
        let packed = self.pack_f32(net, &lay, &status)?;
        let blocks = plan.blocks(rows);
        let partial = self.alloc_mat(blocks, lay.grad_len)?;
        let d_in = self.alloc_mat(rows, spec.dim)?;
        let mut args = vec![
            KArg::Buf(input.buf()),
            KArg::Buf(d_out.buf()),
            KArg::Buf(d_logdet.buf()),
            KArg::Buf(d_in.buf()),
            KArg::Buf(partial.buf()),
            KArg::Buf(packed.buf()),
            KArg::Buf(status.buf()),
        ];
        args.extend(Self::shape_args(spec, &lay, net.act.code(), rows, dir)?);
        args.extend([
            KArg::I32(plan.tm as i32),
            KArg::I32(plan.resident as i32),
            KArg::I32(plan.ks as i32),
            KArg::I32(dim_i32(OP_BACKWARD, plan.smem_bytes())?),
        ]);
        // At bf16 precision the same backward runs its products on tensor cores, where its
        // tiles allow (32-row multiples, 16-deep weight slices); 16-row plans stay f32.
        let kernel = if self.precision == Precision::Bf16 && plan.tm % 32 == 0 && plan.ks == KS {
            "coupling_bwd_bf16"
        } else {
            "coupling_bwd_f32"
        };
        self.launch(kernel, plan.launch_cfg(rows), &args)?;

        let grads = net.try_map(|t| self.alloc_mat(t.rows(), t.cols()))?;
        let mut args = vec![
            KArg::Buf(partial.buf()),
            KArg::I32(dim_i32(OP_BACKWARD, blocks)?),
        ];
        args.extend(Self::layer_args(&grads));
        args.push(KArg::Buf(status.buf()));
        args.extend(lay.width_args(net.act.code())?);
        let params: usize = net.layers.iter().map(|l| l.w.len() + l.b.len()).sum();
        self.launch("coupling_grad_reduce_f32", LaunchCfg::stride(params), &args)?;
        self.coupling_status(
            OP_BACKWARD,
            &status,
            &[ST_INPUT, ST_PARAM, ST_DOUT, ST_DLOGDET, ST_DINPUT, ST_GRAD],
            spec.dim,
            net,
            plan.smem_bytes(),
        )?;
        Ok((d_in, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::mlp::Activation;
    use crate::rng::Rng;
    use crate::tensor::Tensor;

    fn layout(widths: &[usize]) -> NetLayout {
        let net: Mlp<Tensor> = Mlp::new(widths, Activation::Relu, &mut Rng::new(1)).unwrap();
        NetLayout::new(&net)
    }

    /// (tm, resident, ks) of a plan.
    fn shape(p: Option<Plan>) -> Option<(usize, bool, usize)> {
        p.map(|p| (p.tm, p.resident, p.ks))
    }

    fn forward(widths: &[usize]) -> Option<(usize, bool, usize)> {
        shape(plan_forward(&layout(widths), Precision::F32))
    }

    fn backward(widths: &[usize]) -> Option<(usize, bool, usize)> {
        shape(plan_f32(&layout(widths), NetLayout::bwd_f32_len))
    }

    #[test]
    fn padding_and_chunks() {
        assert_eq!(
            [1, 32, 33, 64, 65, 128, 129, 256, 257, 600].map(pad),
            [32, 32, 64, 64, 128, 128, 256, 256, 512, 768]
        );
        assert_eq!([32, 64, 128, 256, 512].map(chunk), [32, 64, 128, 256, 256]);
    }

    /// The widths of tests/parity_coupling.rs reach every plan they claim to.
    #[test]
    fn plans_of_the_parity_widths() {
        // SMALL: resident, 64-row tiles both ways.
        assert_eq!(forward(&[2, 24, 17, 9]), Some((64, true, KS)));
        assert_eq!(backward(&[2, 24, 17, 9]), Some((64, true, KS)));
        // MEDIUM: resident forward, streamed 64-row backward.
        assert_eq!(forward(&[3, 128, 128, 8]), Some((64, true, KS)));
        assert_eq!(backward(&[3, 128, 128, 8]), Some((64, false, KS)));
        // STREAMED and DEEP: streamed forward, streamed 32-row backward.
        assert_eq!(forward(&[4, 200, 160, 10]), Some((64, false, KS)));
        assert_eq!(backward(&[4, 200, 160, 10]), Some((32, false, KS)));
        assert_eq!(forward(&[2, 256, 256, 256, 3]), Some((64, false, KS)));
        assert_eq!(backward(&[2, 256, 256, 256, 3]), Some((32, false, KS)));
        // WIDE: 32-row forward, 16-row backward.
        assert_eq!(forward(&[2, 512, 400, 4]), Some((32, false, KS)));
        assert_eq!(backward(&[2, 512, 400, 4]), Some((16, false, KS)));
        // Four layers of 512: only 16-row tiles with 8-deep slices fit the backward.
        assert_eq!(backward(&[2, 512, 512, 512, 4]), Some((16, false, KS / 2)));
        // Too wide for any tile.
        assert_eq!(backward(&[2, 1024, 1024, 1024, 4]), None);
    }

    #[test]
    fn bf16_plans() {
        let p = plan_forward(&layout(&[2, 64, 64, 6]), Precision::Bf16).unwrap();
        assert!(p.bf16 && p.resident);
        let p = plan_forward(&layout(&[4, 256, 256, 10]), Precision::Bf16).unwrap();
        assert!(p.bf16 && !p.resident);
        // The benchmark's conditioner (D = 64, hidden 256).
        let p = plan_forward(&layout(&[32, 256, 256, 64]), Precision::Bf16).unwrap();
        assert!(p.bf16 && !p.resident);
        // Too wide for 64-row bf16 tiles: the f32 kernel takes it.
        let p = plan_forward(&layout(&[2, 1024, 4]), Precision::Bf16).unwrap();
        assert!(!p.bf16);
    }

    #[test]
    fn every_plan_fits_and_fills_the_gpu() {
        for widths in [
            &[2usize, 24, 17, 9][..],
            &[32, 256, 256, 64],
            &[1, 64, 64, 2],
        ] {
            let lay = layout(widths);
            for p in [
                plan_forward(&lay, Precision::F32),
                plan_forward(&lay, Precision::Bf16),
                plan_f32(&lay, NetLayout::bwd_f32_len),
            ]
            .into_iter()
            .flatten()
            {
                assert!(p.smem_bytes() <= SMEM_LIMIT);
                assert_eq!(p.blocks(1), 1);
                let many = p.blocks(1 << 20);
                assert!((FILL_SMS..=8 * FILL_SMS).contains(&many), "{p:?}: {many}");
            }
        }
    }
}
