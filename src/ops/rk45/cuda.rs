//! Launches kernels/rk45.cu on a grid device (CUDA or the emulator).
//!
//! - `field`, `field_div`: one launch of `rk45_field_f32` (the MLP with its JVPs along the
//!   directions: the D unit vectors for the exact trace, uploaded or generated probes);
//! - `field_vjp`: one launch of `rk45_field_vjp_f32` (forward with tangents, reverse pass,
//!   parameter gradients into per-block f64 partials), then `rk45_reduce_partials_f32` per
//!   parameter tensor (slots summed in a fixed order);
//! - the step ops (`OdeStepOps`): one kernel each; `ode_rhs` launches the field kernels with
//!   strided reads and writes so that a stage state [z, L] or [z, a] is read in place and the
//!   derivative [f, −div] or [f, −g_z] written in place (no packing passes).
//!
//! The public field ops report the first non-finite input (z, t, probes, a, a_div, weights) as
//! `Error::NonFinite`, from a flag the kernels set while they load (one 8-byte read back per
//! call); the solver ops do not (the step's ERROR phase catches non-finite rows). The kernels
//! keep a block's rows, their tangents and (when they fit) the weights in shared memory; fields
//! too wide for 227 KiB at one row per block are refused with `Error::Unsupported`.

use super::step::{
    Dense, OdeStepOps, OdeSummary, OdeSystem, Phase, STATE_COLS, ShareMode, StepControl,
    check_dense, check_state, check_step_end,
};
use super::{
    DivCotangent, FieldVjp, ParamGrads, ProbeKind, Rk45Ops, TraceMode, check_field, check_trace,
    check_vjp, needs_second_derivative,
};
use crate::backend::grid::{Grid, GridDevice, GridIdx, GridMat, KArg, LaunchCfg, dim_i32};
use crate::error::{Error, Result};
use crate::nn::mlp::Mlp;
use crate::ode::Controller;
use crate::tensor::Shaped;

/// Threads of the field and element kernels, and of the one-block batch reductions.
const THREADS: u32 = 256;
const REDUCE_THREADS: u32 = 1024;
/// Persistent blocks of the field kernels: 4 per SM of an H200.
const MAX_BLOCKS: usize = 528;
/// Shared memory a block aims for (two per SM fit in 227 KiB), and the hard limit.
const SMEM_TARGET: usize = 113 * 1024;
const SMEM_LIMIT: usize = 227 * 1024;
/// Weights are staged in shared memory when they take at most this much.
const STAGE_WEIGHTS_MAX: usize = 64 * 1024;
/// Rows per tile tried in order, and the most stacked rows (rows × streams) of a tile: a
/// 64-wide layer then has at least 256 micro-tiles of 4 × 4 for the 256 threads.
const TILE_ROWS: [usize; 7] = [64, 32, 16, 8, 4, 2, 1];
const MAX_STACKED: usize = 128;
/// The f64 partial slots of a parameter gradient stay below this many bytes.
const PARTIAL_BYTES: usize = 64 << 20;
/// Layers the fused kernels take.
const MAX_LAYERS: usize = 4;

fn ld(w: usize) -> usize {
    w | 1
}
fn round4(n: usize) -> usize {
    (n + 3) & !3
}

/// Which field kernel a layout is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Field,
    Vjp,
}

/// The shared-memory layout of a field kernel (the kernel's own arithmetic, in floats).
fn layout_floats(widths: &[usize], rows: usize, k: usize, stage: bool, kernel: Kernel) -> usize {
    let nl = widths.len() - 1;
    let s = 1 + k;
    let rs = rows * s;
    let max_out = widths[1..].iter().copied().max().unwrap_or(1).max(1);
    let mut n = 0;
    if stage {
        n += weight_floats(widths);
    }
    n += round4(rs * ld(widths[0]));
    match kernel {
        Kernel::Field => n += 2 * round4(rs * ld(max_out)),
        Kernel::Vjp => {
            for &w in &widths[1..nl] {
                let l = ld(w);
                n += round4(rs * l) + round4(rows * l);
                if k > 0 {
                    n += round4(rows * k * l) + round4(rows * l);
                }
            }
            n += round4(rs * ld(widths[nl]));
            n += 2 * round4(rs * ld(max_out));
            n += 2 * rows;
        }
    }
    n
}

fn weight_floats(widths: &[usize]) -> usize {
    widths
        .windows(2)
        .map(|w| round4(w[0] * ld(w[1])) + round4(w[1]))
        .sum()
}

/// Rows per tile, whether the weights are staged, and the shared memory of a launch.
#[derive(Clone, Copy, Debug)]
struct Plan {
    rows: usize,
    stage: bool,
    bytes: usize,
}

fn plan(op: &'static str, widths: &[usize], k: usize, kernel: Kernel) -> Result<Plan> {
    let s = 1 + k;
    let staging = if weight_floats(widths) * 4 <= STAGE_WEIGHTS_MAX {
        &[true, false][..]
    } else {
        &[false][..]
    };
    for (limit, stages) in [(SMEM_TARGET, staging), (SMEM_LIMIT, &[false][..])] {
        for &stage in stages {
            for &rows in &TILE_ROWS {
                if rows > 1 && rows * s > MAX_STACKED {
                    continue;
                }
                let bytes = layout_floats(widths, rows, k, stage, kernel) * 4;
                if bytes <= limit {
                    return Ok(Plan { rows, stage, bytes });
                }
            }
        }
    }
    Err(Error::Unsupported {
        op,
        backend: format!(
            "grid ({widths:?} with {k} tangents needs more than {} KiB of shared memory per row)",
            SMEM_LIMIT / 1024
        ),
    })
}

/// The network as kernel arguments: w0, b0, …, w3, b3 (null past the last layer), the five
/// widths (0 past the output), the number of layers and the activation code.
fn net_args<'a, G: GridDevice>(
    op: &'static str,
    net: &'a Mlp<GridMat<G>>,
) -> Result<Vec<KArg<'a, G::Buf>>> {
    let nl = net.layers.len();
    if nl == 0 || nl > MAX_LAYERS {
        return Err(Error::Unsupported {
            op,
            backend: format!("grid (fields of 1 to {MAX_LAYERS} layers, got {nl})"),
        });
    }
    let mut args = Vec::with_capacity(15);
    for l in 0..MAX_LAYERS {
        match net.layers.get(l) {
            Some(layer) => {
                args.push(KArg::Buf(layer.w.buf()));
                args.push(KArg::Buf(layer.b.buf()));
            }
            None => {
                args.push(KArg::Null);
                args.push(KArg::Null);
            }
        }
    }
    let widths = net.widths();
    for l in 0..=MAX_LAYERS {
        args.push(KArg::I32(dim_i32(op, widths.get(l).copied().unwrap_or(0))?));
    }
    args.push(KArg::I32(nl as i32));
    args.push(KArg::I32(net.act.code()));
    Ok(args)
}

/// Where a field kernel's directions come from: (mode, K, probes, kind, seed, row ids).
struct Dirs<'a, G: GridDevice> {
    mode: i32,
    k: usize,
    probes: Option<&'a G::Buf>,
    kind: i32,
    seed: u64,
    ids: Option<&'a G::Buf>,
}

impl<'a, G: GridDevice> Dirs<'a, G> {
    fn none() -> Self {
        Dirs {
            mode: 0,
            k: 0,
            probes: None,
            kind: 0,
            seed: 0,
            ids: None,
        }
    }

    fn of(trace: &TraceMode<'a, GridMat<G>>, dim: usize) -> Self {
        match *trace {
            TraceMode::Exact => Dirs {
                mode: 1,
                k: dim,
                ..Self::none()
            },
            TraceMode::Hutchinson(p) => Dirs {
                mode: 2,
                k: p.cols() / dim,
                probes: Some(p.buf()),
                ..Self::none()
            },
            TraceMode::Generated {
                m,
                kind,
                seed,
                rows,
            } => Dirs {
                mode: 3,
                k: m,
                kind: probe_code(kind),
                seed,
                ids: rows.map(|r| r.buf()),
                ..Self::none()
            },
        }
    }

    fn args(&self) -> [KArg<'a, G::Buf>; 6] {
        let opt = |b: Option<&'a G::Buf>| b.map_or(KArg::Null, KArg::Buf);
        [
            KArg::I32(self.mode),
            KArg::I32(self.k as i32),
            opt(self.probes),
            KArg::I32(self.kind),
            KArg::I64(self.seed as i64),
            opt(self.ids),
        ]
    }
}

fn probe_code(kind: ProbeKind) -> i32 {
    match kind {
        ProbeKind::Rademacher => 0,
        ProbeKind::Gaussian => 1,
    }
}

fn opt_buf<G: GridDevice>(m: Option<&GridMat<G>>) -> KArg<'_, G::Buf> {
    m.map_or(KArg::Null, |m| KArg::Buf(m.buf()))
}

fn f64_arg<'a, B>(v: f64) -> KArg<'a, B> {
    KArg::I64(v.to_bits() as i64)
}

/// What the non-finite report of a public field op names, by the kernels' codes.
struct BadInput {
    op: &'static str,
    dim: usize,
    probe_cols: usize,
}

impl BadInput {
    fn error(&self, key: u64) -> Error {
        let code = key >> 40;
        let idx = (key & ((1 << 40) - 1)) as usize;
        let (what, cols) = match code {
            1 => (format!("{}: z", self.op), self.dim),
            2 => (format!("{}: t", self.op), 1),
            3 => ("Hutchinson probes".to_string(), self.probe_cols.max(1)),
            4 => (format!("{}: a", self.op), self.dim),
            5 => (format!("{}: a_div", self.op), 1),
            _ => (format!("{}: row weights", self.op), 1),
        };
        Error::NonFinite {
            what,
            row: idx / cols,
            col: idx % cols,
        }
    }
}

/// The state arguments of the step kernels: tolerances, step bounds, step budget, controller.
fn control_args<'a, B>(ctl: &StepControl) -> Vec<KArg<'a, B>> {
    let (pi, safety, min_f, max_f, alpha, beta) = match ctl.controller {
        Controller::Integral(c) => (0, c.safety, c.min_factor, c.max_factor, 0.2, 0.0),
        Controller::ProportionalIntegral(c) => {
            (1, c.safety, c.min_factor, c.max_factor, c.alpha, c.beta)
        }
    };
    vec![
        f64_arg(ctl.rtol),
        f64_arg(ctl.atol),
        f64_arg(ctl.h_min),
        f64_arg(ctl.h_max),
        KArg::I32(ctl.max_steps.min(i32::MAX as usize) as i32),
        KArg::I32(pi),
        f64_arg(safety),
        f64_arg(min_f),
        f64_arg(max_f),
        f64_arg(alpha),
        f64_arg(beta),
    ]
}

/// Row groups of the per-row step kernels: a thread per row, or a warp for wide rows.
fn lanes_for(width: usize) -> usize {
    if width >= 32 { 32 } else { 1 }
}

fn rows_cfg(rows: usize, lanes: usize) -> LaunchCfg {
    let threads = (rows * lanes).max(1) as u64;
    LaunchCfg::new(
        [threads.div_ceil(THREADS as u64) as u32, 1, 1],
        [THREADS, 1, 1],
        0,
    )
}

fn reduce_cfg() -> LaunchCfg {
    LaunchCfg::new([1, 1, 1], [REDUCE_THREADS, 1, 1], 0)
}

/// Strided views of the field kernels' inputs and outputs: (matrix, row stride, column).
struct Strided<'a, G: GridDevice> {
    m: &'a GridMat<G>,
    ld: usize,
    off: usize,
}

impl<'a, G: GridDevice> Strided<'a, G> {
    fn whole(m: &'a GridMat<G>) -> Self {
        Strided {
            m,
            ld: m.cols(),
            off: 0,
        }
    }
    fn args(&self, op: &'static str) -> Result<[KArg<'a, G::Buf>; 3]> {
        Ok([
            KArg::Buf(self.m.buf()),
            KArg::I32(dim_i32(op, self.ld)?),
            KArg::I32(dim_i32(op, self.off)?),
        ])
    }
}

fn opt_strided<'a, G: GridDevice>(
    op: &'static str,
    s: Option<&Strided<'a, G>>,
) -> Result<[KArg<'a, G::Buf>; 3]> {
    match s {
        Some(s) => s.args(op),
        None => Ok([KArg::Null, KArg::I32(0), KArg::I32(0)]),
    }
}

/// Everything a launch of `rk45_field_vjp_f32` takes beyond the network and the rows.
struct VjpLaunch<'a, G: GridDevice> {
    z: Strided<'a, G>,
    a: Strided<'a, G>,
    t: &'a GridMat<G>,
    a_div: Option<&'a GridMat<G>>,
    dirs: Dirs<'a, G>,
    weights: Option<&'a GridMat<G>>,
    wstate: Option<&'a GridMat<G>>,
    wscale: f64,
    partial: Option<(&'a G::Buf, usize)>,
    out_f: Option<Strided<'a, G>>,
    out_g: Option<Strided<'a, G>>,
    gsign: f32,
    bad: Option<&'a G::Buf>,
}

impl<G: GridDevice> Grid<G> {
    /// One launch of `rk45_field_f32`: f to `out_f`, sign·div to `out_d` when directions are
    /// given.
    #[allow(clippy::too_many_arguments)]
    fn launch_field(
        &self,
        op: &'static str,
        net: &Mlp<GridMat<G>>,
        z: Strided<'_, G>,
        t: &GridMat<G>,
        rows: usize,
        dirs: Dirs<'_, G>,
        out_f: Option<Strided<'_, G>>,
        out_d: Option<(Strided<'_, G>, f32)>,
        bad: Option<&G::Buf>,
    ) -> Result<()> {
        let widths = net.widths();
        let p = plan(op, &widths, dirs.k, Kernel::Field)?;
        let tiles = rows.div_ceil(p.rows);
        let grid = tiles.clamp(1, MAX_BLOCKS) as u32;
        let mut args = net_args(op, net)?;
        args.extend(z.args(op)?);
        args.push(KArg::Buf(t.buf()));
        args.push(KArg::I32(dim_i32(op, rows)?));
        args.extend(dirs.args());
        args.extend(opt_strided(op, out_f.as_ref())?);
        match &out_d {
            Some((d, sign)) => {
                args.extend(d.args(op)?);
                args.push(KArg::F32(*sign));
            }
            None => {
                args.extend([KArg::Null, KArg::I32(0), KArg::I32(0), KArg::F32(1.0)]);
            }
        }
        args.push(bad.map_or(KArg::Null, KArg::Buf));
        args.push(KArg::I32(p.rows as i32));
        args.push(KArg::I32(p.stage as i32));
        self.launch(
            "rk45_field_f32",
            LaunchCfg::new([grid, 1, 1], [THREADS, 1, 1], p.bytes as u32),
            &args,
        )
    }

    /// The tile plan and grid of a VJP launch over `rows` rows with `k` tangents.
    fn vjp_grid(
        op: &'static str,
        net: &Mlp<GridMat<G>>,
        rows: usize,
        k: usize,
    ) -> Result<(Plan, usize)> {
        let p = plan(op, &net.widths(), k, Kernel::Vjp)?;
        Ok((p, rows.div_ceil(p.rows).clamp(1, MAX_BLOCKS)))
    }

    fn launch_vjp(
        &self,
        op: &'static str,
        net: &Mlp<GridMat<G>>,
        rows: usize,
        grid: usize,
        plan: Plan,
        v: VjpLaunch<'_, G>,
    ) -> Result<()> {
        let mut args = net_args(op, net)?;
        args.extend(v.z.args(op)?);
        args.extend(v.a.args(op)?);
        args.push(KArg::Buf(v.t.buf()));
        args.push(KArg::I32(dim_i32(op, rows)?));
        args.push(opt_buf(v.a_div));
        args.extend(v.dirs.args());
        args.push(opt_buf(v.weights));
        args.push(opt_buf(v.wstate));
        args.push(f64_arg(v.wscale));
        match v.partial {
            Some((buf, nparams)) => {
                args.push(KArg::Buf(buf));
                args.push(KArg::I32(dim_i32(op, nparams)?));
            }
            None => args.extend([KArg::Null, KArg::I32(0)]),
        }
        args.extend(opt_strided(op, v.out_f.as_ref())?);
        args.extend(opt_strided(op, v.out_g.as_ref())?);
        args.push(KArg::F32(v.gsign));
        args.push(v.bad.map_or(KArg::Null, KArg::Buf));
        args.push(KArg::I32(plan.rows as i32));
        args.push(KArg::I32(plan.stage as i32));
        self.launch(
            "rk45_field_vjp_f32",
            LaunchCfg::new([grid as u32, 1, 1], [THREADS, 1, 1], plan.bytes as u32),
            &args,
        )
    }

    /// A zeroed non-finite report (8 bytes).
    fn bad_report(&self) -> Result<GridMat<G>> {
        self.alloc_mat(1, 2)
    }

    fn check_bad(&self, report: &GridMat<G>, what: BadInput) -> Result<()> {
        let mut v = [0u8; 8];
        self.dev.dtoh(report.buf(), &mut v)?;
        match u64::from_le_bytes(v) {
            0 => Ok(()),
            x => Err(what.error(!x)),
        }
    }

    /// The f64 partials of `slots` blocks summed into one f32 tensor per parameter.
    fn reduce_partials(
        &self,
        partial: &GridMat<G>,
        slots: usize,
        net: &Mlp<GridMat<G>>,
    ) -> Result<Mlp<GridMat<G>>> {
        let nparams: usize = net.tensors().iter().map(|t| t.len()).sum();
        let mut offset = 0;
        let mut out = Vec::with_capacity(net.tensors().len());
        for t in net.tensors() {
            let m = self.alloc_mat(t.rows(), t.cols())?;
            self.launch(
                "rk45_reduce_partials_f32",
                LaunchCfg::stride(t.len()),
                &[
                    KArg::Buf(partial.buf()),
                    KArg::Buf(m.buf()),
                    KArg::I32(dim_i32("reduce_partials", slots)?),
                    KArg::I32(dim_i32("reduce_partials", nparams)?),
                    KArg::I32(dim_i32("reduce_partials", offset)?),
                    KArg::I32(dim_i32("reduce_partials", t.len())?),
                ],
            )?;
            offset += t.len();
            out.push(m);
        }
        Mlp::from_tensors(net.act, out)
    }

    fn nparams(net: &Mlp<GridMat<G>>) -> usize {
        net.tensors().iter().map(|t| t.len()).sum()
    }
}

impl<G: GridDevice> Rk45Ops for Grid<G> {
    fn field(&self, net: &Mlp<GridMat<G>>, z: &GridMat<G>, t: &GridMat<G>) -> Result<GridMat<G>> {
        let (rows, dim) = check_field("field", net, z, t)?;
        let f = self.alloc_mat(rows, dim)?;
        let bad = self.bad_report()?;
        self.launch_field(
            "field",
            net,
            Strided::whole(z),
            t,
            rows,
            Dirs::none(),
            Some(Strided::whole(&f)),
            None,
            Some(bad.buf()),
        )?;
        self.check_bad(
            &bad,
            BadInput {
                op: "field",
                dim,
                probe_cols: 0,
            },
        )?;
        Ok(f)
    }

    fn field_div(
        &self,
        net: &Mlp<GridMat<G>>,
        z: &GridMat<G>,
        t: &GridMat<G>,
        trace: TraceMode<'_, GridMat<G>>,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        let (rows, dim) = check_field("field_div", net, z, t)?;
        check_trace("field_div", &trace, rows, dim)?;
        let f = self.alloc_mat(rows, dim)?;
        let div = self.alloc_mat(rows, 1)?;
        let bad = self.bad_report()?;
        let dirs = Dirs::of(&trace, dim);
        let probe_cols = dirs.k * dim;
        self.launch_field(
            "field_div",
            net,
            Strided::whole(z),
            t,
            rows,
            dirs,
            Some(Strided::whole(&f)),
            Some((Strided::whole(&div), 1.0)),
            Some(bad.buf()),
        )?;
        self.check_bad(
            &bad,
            BadInput {
                op: "field_div",
                dim,
                probe_cols,
            },
        )?;
        Ok((f, div))
    }

    fn field_vjp(
        &self,
        net: &Mlp<GridMat<G>>,
        z: &GridMat<G>,
        t: &GridMat<G>,
        a: &GridMat<G>,
        div: Option<DivCotangent<'_, GridMat<G>>>,
        params: ParamGrads<'_, GridMat<G>>,
    ) -> Result<FieldVjp<GridMat<G>>> {
        let op = "field_vjp";
        let (rows, dim) = check_field(op, net, z, t)?;
        check_vjp(op, net.act, rows, dim, a, div.as_ref(), &params)?;
        let dirs = div
            .as_ref()
            .map_or_else(Dirs::none, |d| Dirs::of(&d.trace, dim));
        let probe_cols = dirs.k * dim;
        let (plan, grid) = Self::vjp_grid(op, net, rows, dirs.k)?;
        let nparams = Self::nparams(net);
        let partial = match params {
            ParamGrads::Skip => None,
            _ => Some(self.alloc_mat(1, 2 * grid * nparams)?),
        };
        let f = self.alloc_mat(rows, dim)?;
        let g_z = self.alloc_mat(rows, dim)?;
        let bad = self.bad_report()?;
        self.launch_vjp(
            op,
            net,
            rows,
            grid,
            plan,
            VjpLaunch {
                z: Strided::whole(z),
                a: Strided::whole(a),
                t,
                a_div: div.as_ref().map(|d| d.a_div),
                dirs,
                weights: match params {
                    ParamGrads::Weighted(w) => Some(w),
                    _ => None,
                },
                wstate: None,
                wscale: 1.0,
                partial: partial.as_ref().map(|p| (p.buf(), nparams)),
                out_f: Some(Strided::whole(&f)),
                out_g: Some(Strided::whole(&g_z)),
                gsign: 1.0,
                bad: Some(bad.buf()),
            },
        )?;
        self.check_bad(
            &bad,
            BadInput {
                op,
                dim,
                probe_cols,
            },
        )?;
        let g_params = match &partial {
            Some(p) => Some(self.reduce_partials(p, grid, net)?),
            None => None,
        };
        Ok(FieldVjp { f, g_z, g_params })
    }
}

/// The running parameter quadrature of an adjoint solve on a grid device: one f64 slot of
/// every parameter per block of the VJP kernel, summed in slot order at the end.
pub struct GridQuadrature<G: GridDevice> {
    partial: GridMat<G>,
    slots: usize,
}

impl<G: GridDevice> OdeStepOps for Grid<G> {
    type ParamAcc = GridQuadrature<G>;

    fn device_resident_ode(&self) -> bool {
        true
    }

    fn generate_probes(
        &self,
        rows: usize,
        dim: usize,
        m: usize,
        kind: ProbeKind,
        seed: u64,
        ids: Option<&GridMat<G>>,
    ) -> Result<GridMat<G>> {
        let op = "generate_probes";
        if rows == 0 {
            return Err(Error::Empty("Hutchinson probes for zero rows".into()));
        }
        if dim == 0 || m == 0 {
            return Err(Error::invalid(format!(
                "Hutchinson probes need dim >= 1 and at least one probe (dim {dim}, probes {m})"
            )));
        }
        if let Some(ids) = ids {
            ids.expect_shape(op, rows, 1)?;
        }
        let cols = m * dim;
        let out = self.alloc_mat(rows, cols)?;
        self.launch(
            "rk45_probes_f32",
            LaunchCfg::stride(rows * cols),
            &[
                KArg::Buf(out.buf()),
                KArg::I32(dim_i32(op, rows)?),
                KArg::I32(dim_i32(op, cols)?),
                KArg::I32(probe_code(kind)),
                KArg::I64(seed as i64),
                opt_buf(ids),
            ],
        )?;
        Ok(out)
    }

    fn ode_rhs(
        &self,
        net: &Mlp<GridMat<G>>,
        y: &GridMat<G>,
        t: &GridMat<G>,
        system: OdeSystem<'_, GridMat<G>>,
    ) -> Result<GridMat<G>> {
        let op = "ode_rhs";
        net.check(op)?;
        let dim = net.out_dim();
        if net.in_dim() != dim + 1 {
            return Err(Error::shape(
                op,
                format!("a vector field {} -> {dim}", dim + 1),
                format!("{} -> {dim}", net.in_dim()),
            ));
        }
        let width = system.width(dim);
        let rows = y.rows();
        y.expect_shape(op, rows, width)?;
        t.expect_shape(op, rows, 1)?;
        let k = self.alloc_mat(rows, width)?;
        if rows == 0 {
            return Ok(k);
        }
        let at = |off: usize| Strided {
            m: y,
            ld: width,
            off,
        };
        let out = |off: usize| Strided {
            m: &k,
            ld: width,
            off,
        };
        match system {
            OdeSystem::Field => self.launch_field(
                op,
                net,
                at(0),
                t,
                rows,
                Dirs::none(),
                Some(out(0)),
                None,
                None,
            )?,
            OdeSystem::FieldDiv(trace) => {
                check_trace(op, &trace, rows, dim)?;
                self.launch_field(
                    op,
                    net,
                    at(0),
                    t,
                    rows,
                    Dirs::of(&trace, dim),
                    Some(out(0)),
                    Some((out(dim), -1.0)),
                    None,
                )?
            }
            OdeSystem::Adjoint(div) => {
                if let Some(d) = &div {
                    d.a_div.expect_shape(op, rows, 1)?;
                    check_trace(op, &d.trace, rows, dim)?;
                    needs_second_derivative(op, net.act)?;
                }
                let dirs = div
                    .as_ref()
                    .map_or_else(Dirs::none, |d| Dirs::of(&d.trace, dim));
                let (plan, grid) = Self::vjp_grid(op, net, rows, dirs.k)?;
                self.launch_vjp(
                    op,
                    net,
                    rows,
                    grid,
                    plan,
                    VjpLaunch {
                        z: at(0),
                        a: at(dim),
                        t,
                        a_div: div.as_ref().map(|d| d.a_div),
                        dirs,
                        weights: None,
                        wstate: None,
                        wscale: 1.0,
                        partial: None,
                        out_f: Some(out(0)),
                        out_g: Some(out(dim)),
                        gsign: -1.0,
                        bad: None,
                    },
                )?
            }
        }
        Ok(k)
    }

    fn ode_init_state(
        &self,
        t0: &GridMat<G>,
        t1: &GridMat<G>,
        h0: Option<f64>,
    ) -> Result<GridMat<G>> {
        let op = "ode_init_state";
        let rows = t0.rows();
        t0.expect_shape(op, rows, 1)?;
        t1.expect_shape(op, rows, 1)?;
        let state = self.alloc_mat(rows, STATE_COLS)?;
        if rows > 0 {
            self.launch(
                "rk45_init_state_f32",
                LaunchCfg::stride(rows),
                &[
                    KArg::Buf(t0.buf()),
                    KArg::Buf(t1.buf()),
                    KArg::Buf(state.buf()),
                    KArg::I32(dim_i32(op, rows)?),
                    KArg::I32(h0.is_some() as i32),
                    f64_arg(h0.unwrap_or(0.0)),
                ],
            )?;
        }
        Ok(state)
    }

    fn ode_initial_probe(
        &self,
        y0: &GridMat<G>,
        f0: &GridMat<G>,
        state: &mut GridMat<G>,
        ctl: &StepControl,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        let op = "ode_initial_probe";
        let (rows, width) = y0.shape();
        f0.expect_shape(op, rows, width)?;
        check_state(op, state, rows)?;
        let yp = self.alloc_mat(rows, width)?;
        let tp = self.alloc_mat(rows, 1)?;
        self.initial_step(y0, f0, None, state, Some((&yp, &tp)), ctl)?;
        Ok((yp, tp))
    }

    fn ode_initial_refine(
        &self,
        y0: &GridMat<G>,
        f0: &GridMat<G>,
        f1: &GridMat<G>,
        state: &mut GridMat<G>,
        ctl: &StepControl,
    ) -> Result<()> {
        let op = "ode_initial_refine";
        let (rows, width) = y0.shape();
        f0.expect_shape(op, rows, width)?;
        f1.expect_shape(op, rows, width)?;
        check_state(op, state, rows)?;
        self.initial_step(y0, f0, Some(f1), state, None, ctl)
    }

    fn ode_share(&self, state: &mut GridMat<G>, column: usize, mode: ShareMode) -> Result<()> {
        let op = "ode_share";
        if state.cols() != STATE_COLS || column >= STATE_COLS {
            return Err(Error::shape(
                op,
                format!("a state of {STATE_COLS} columns and a column below it"),
                format!("{} columns, column {column}", state.cols()),
            ));
        }
        let rows = dim_i32(op, state.rows())?;
        let buf = state.buf_mut(&self.dev)?;
        self.launch(
            "rk45_share_f32",
            reduce_cfg(),
            &[
                KArg::Buf(buf),
                KArg::I32(rows),
                KArg::I32(column as i32),
                KArg::I32(match mode {
                    ShareMode::Min => 0,
                    ShareMode::Max => 1,
                }),
            ],
        )
    }

    fn ode_propose(&self, state: &mut GridMat<G>, ctl: &StepControl) -> Result<()> {
        let op = "ode_propose";
        if state.cols() != STATE_COLS {
            return Err(Error::shape(op, STATE_COLS, state.cols()));
        }
        let rows = state.rows();
        if rows == 0 {
            return Ok(());
        }
        let buf = state.buf_mut(&self.dev)?;
        let mut args = vec![KArg::Buf(buf), KArg::I32(dim_i32(op, rows)?)];
        args.extend(control_args(ctl));
        self.launch("rk45_propose_f32", LaunchCfg::stride(rows), &args)
    }

    fn ode_stage(
        &self,
        y: &GridMat<G>,
        k: &[&GridMat<G>],
        state: &GridMat<G>,
        stage: usize,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        let op = "ode_stage";
        let (rows, width) = y.shape();
        if stage >= 7 || k.len() != stage {
            return Err(Error::invalid(format!(
                "ode_stage: stage {stage} needs {stage} stage derivatives (got {}), stages 0..7",
                k.len()
            )));
        }
        for ks in k {
            ks.expect_shape(op, rows, width)?;
        }
        check_state(op, state, rows)?;
        let ys = if stage == 0 {
            y.clone()
        } else {
            self.alloc_mat(rows, width)?
        };
        let ts = self.alloc_mat(rows, 1)?;
        if rows * width > 0 {
            let mut args = vec![KArg::Buf(y.buf())];
            for j in 0..6 {
                args.push(k.get(j).map_or(KArg::Null, |m| KArg::Buf(m.buf())));
            }
            args.push(KArg::Buf(state.buf()));
            args.push(if stage == 0 {
                KArg::Null
            } else {
                KArg::Buf(ys.buf())
            });
            args.push(KArg::Buf(ts.buf()));
            args.push(KArg::I32(dim_i32(op, rows)?));
            args.push(KArg::I32(dim_i32(op, width)?));
            args.push(KArg::I32(stage as i32));
            self.launch("rk45_stage_f32", LaunchCfg::stride(rows * width), &args)?;
        }
        Ok((ys, ts))
    }

    fn ode_step_end(
        &self,
        phase: Phase,
        y: &mut GridMat<G>,
        k0: &mut GridMat<G>,
        ks: [&GridMat<G>; 6],
        y_new: &GridMat<G>,
        state: &mut GridMat<G>,
        ctl: &StepControl,
        dense: Option<Dense<'_, GridMat<G>>>,
    ) -> Result<()> {
        let op = "ode_step_end";
        let (rows, width) = check_step_end(y, k0, &ks, y_new, state, dense.as_ref())?;
        if rows == 0 {
            return Ok(());
        }
        let lanes = lanes_for(width);
        let (yb, kb, sb) = (
            y.buf_mut(&self.dev)?,
            k0.buf_mut(&self.dev)?,
            state.buf_mut(&self.dev)?,
        );
        let mut args = vec![KArg::Buf(yb), KArg::Buf(kb)];
        args.extend(ks.iter().map(|k| KArg::Buf(k.buf())));
        args.push(KArg::Buf(y_new.buf()));
        args.push(KArg::Buf(sb));
        args.push(KArg::I32(dim_i32(op, rows)?));
        args.push(KArg::I32(dim_i32(op, width)?));
        args.push(KArg::I32(lanes as i32));
        args.push(KArg::I32(phase.0 as i32));
        match dense {
            Some(d) => {
                let n = d.t_eval.cols();
                let total = dim_i32(op, d.rows_total)?;
                let ye = d.y_eval.buf_mut(&self.dev)?;
                args.push(KArg::Buf(d.t_eval.buf()));
                args.push(KArg::I32(dim_i32(op, n)?));
                args.push(KArg::Buf(ye));
                args.push(KArg::Buf(d.ids.buf()));
                args.push(KArg::I32(total));
                args.extend(control_args(ctl));
                self.launch("rk45_step_end_f32", rows_cfg(rows, lanes), &args)
            }
            None => {
                args.extend([
                    KArg::Null,
                    KArg::I32(0),
                    KArg::Null,
                    KArg::Null,
                    KArg::I32(0),
                ]);
                args.extend(control_args(ctl));
                self.launch("rk45_step_end_f32", rows_cfg(rows, lanes), &args)
            }
        }
    }

    fn ode_dense_start(
        &self,
        y: &GridMat<G>,
        state: &mut GridMat<G>,
        dense: Dense<'_, GridMat<G>>,
    ) -> Result<()> {
        let op = "ode_dense_start";
        let (rows, width) = y.shape();
        check_state(op, state, rows)?;
        check_dense(op, &dense, rows, width)?;
        if rows == 0 {
            return Ok(());
        }
        let n = dense.t_eval.cols();
        let total = dim_i32(op, dense.rows_total)?;
        let sb = state.buf_mut(&self.dev)?;
        let ye = dense.y_eval.buf_mut(&self.dev)?;
        self.launch(
            "rk45_dense_start_f32",
            LaunchCfg::stride(rows),
            &[
                KArg::Buf(y.buf()),
                KArg::Buf(sb),
                KArg::Buf(dense.t_eval.buf()),
                KArg::I32(dim_i32(op, n)?),
                KArg::Buf(ye),
                KArg::Buf(dense.ids.buf()),
                KArg::I32(dim_i32(op, rows)?),
                KArg::I32(dim_i32(op, width)?),
                KArg::I32(total),
            ],
        )
    }

    fn ode_summary(&self, state: &GridMat<G>) -> Result<OdeSummary> {
        let op = "ode_summary";
        if state.cols() != STATE_COLS {
            return Err(Error::shape(op, STATE_COLS, state.cols()));
        }
        let out = self.alloc_mat(1, 3)?;
        self.launch(
            "rk45_summary_f32",
            reduce_cfg(),
            &[
                KArg::Buf(state.buf()),
                KArg::I32(dim_i32(op, state.rows())?),
                KArg::Buf(out.buf()),
            ],
        )?;
        let mut v = [0u8; 12];
        self.dev.dtoh(out.buf(), &mut v)?;
        let f: Vec<f32> = v
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(OdeSummary {
            active: f[0] as usize,
            failed: f[1] as usize,
            first_failed: (f[2] >= 0.0).then_some(f[2] as usize),
        })
    }

    fn ode_active_rows(&self, state: &GridMat<G>, count: usize) -> Result<GridIdx<G>> {
        let op = "ode_active_rows";
        if state.cols() != STATE_COLS {
            return Err(Error::shape(op, STATE_COLS, state.cols()));
        }
        let idx = self.alloc_idx(count)?;
        self.launch(
            "rk45_active_rows_f32",
            reduce_cfg(),
            &[
                KArg::Buf(state.buf()),
                KArg::I32(dim_i32(op, state.rows())?),
                KArg::Buf(idx.buf()),
                KArg::I32(dim_i32(op, count)?),
            ],
        )?;
        Ok(idx)
    }

    fn ode_retire(
        &self,
        y: &GridMat<G>,
        state: &GridMat<G>,
        ids: &GridMat<G>,
        out_y: &mut GridMat<G>,
        out_state: &mut GridMat<G>,
    ) -> Result<()> {
        let op = "ode_retire";
        let (rows, width) = y.shape();
        check_state(op, state, rows)?;
        ids.expect_shape(op, rows, 1)?;
        let total = out_y.rows();
        out_y.expect_shape(op, total, width)?;
        out_state.expect_shape(op, total, STATE_COLS)?;
        if rows == 0 {
            return Ok(());
        }
        let (oy, os) = (out_y.buf_mut(&self.dev)?, out_state.buf_mut(&self.dev)?);
        self.launch(
            "rk45_retire_f32",
            LaunchCfg::stride(rows * (width + STATE_COLS)),
            &[
                KArg::Buf(y.buf()),
                KArg::Buf(state.buf()),
                KArg::Buf(ids.buf()),
                KArg::Buf(oy),
                KArg::Buf(os),
                KArg::I32(dim_i32(op, rows)?),
                KArg::I32(dim_i32(op, width)?),
                KArg::I32(dim_i32(op, total)?),
            ],
        )
    }

    fn ode_quad_new(&self, net: &Mlp<GridMat<G>>) -> Result<GridQuadrature<G>> {
        let nparams = Self::nparams(net).max(1);
        let slots = (PARTIAL_BYTES / (8 * nparams)).clamp(1, MAX_BLOCKS);
        Ok(GridQuadrature {
            partial: self.alloc_mat(1, 2 * slots * nparams)?,
            slots,
        })
    }

    fn ode_quad_add(
        &self,
        acc: &mut GridQuadrature<G>,
        net: &Mlp<GridMat<G>>,
        y_s: &GridMat<G>,
        t_s: &GridMat<G>,
        state: &GridMat<G>,
        factor: f64,
        div: Option<DivCotangent<'_, GridMat<G>>>,
    ) -> Result<()> {
        let op = "ode_quad_add";
        net.check(op)?;
        let dim = net.out_dim();
        let rows = y_s.rows();
        y_s.expect_shape(op, rows, 2 * dim)?;
        t_s.expect_shape(op, rows, 1)?;
        check_state(op, state, rows)?;
        let nparams = Self::nparams(net);
        if acc.partial.len() != 2 * acc.slots * nparams.max(1) {
            return Err(Error::invalid(
                "ode_quad_add: an accumulator of another network",
            ));
        }
        if let Some(d) = &div {
            d.a_div.expect_shape(op, rows, 1)?;
            check_trace(op, &d.trace, rows, dim)?;
            needs_second_derivative(op, net.act)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let dirs = div
            .as_ref()
            .map_or_else(Dirs::none, |d| Dirs::of(&d.trace, dim));
        let (plan, grid) = Self::vjp_grid(op, net, rows, dirs.k)?;
        let grid = grid.min(acc.slots);
        let slots = acc.slots;
        let partial = acc.partial.buf_mut(&self.dev)?;
        debug_assert!(grid <= slots);
        let at = |off: usize| Strided {
            m: y_s,
            ld: 2 * dim,
            off,
        };
        self.launch_vjp(
            op,
            net,
            rows,
            grid,
            plan,
            VjpLaunch {
                z: at(0),
                a: at(dim),
                t: t_s,
                a_div: div.as_ref().map(|d| d.a_div),
                dirs,
                weights: None,
                wstate: Some(state),
                wscale: factor,
                partial: Some((partial, nparams)),
                out_f: None,
                out_g: None,
                gsign: 1.0,
                bad: None,
            },
        )
    }

    fn ode_quad_finish(
        &self,
        acc: GridQuadrature<G>,
        net: &Mlp<GridMat<G>>,
    ) -> Result<Mlp<GridMat<G>>> {
        self.reduce_partials(&acc.partial, acc.slots, net)
    }
}

impl<G: GridDevice> Grid<G> {
    fn initial_step(
        &self,
        y0: &GridMat<G>,
        f0: &GridMat<G>,
        f1: Option<&GridMat<G>>,
        state: &mut GridMat<G>,
        probe: Option<(&GridMat<G>, &GridMat<G>)>,
        ctl: &StepControl,
    ) -> Result<()> {
        let op = "ode_initial_step";
        let (rows, width) = y0.shape();
        if rows == 0 {
            return Ok(());
        }
        let lanes = lanes_for(width);
        let sb = state.buf_mut(&self.dev)?;
        self.launch(
            "rk45_initial_step_f32",
            rows_cfg(rows, lanes),
            &[
                KArg::Buf(y0.buf()),
                KArg::Buf(f0.buf()),
                opt_buf(f1),
                KArg::Buf(sb),
                opt_buf(probe.map(|p| p.0)),
                opt_buf(probe.map(|p| p.1)),
                KArg::I32(dim_i32(op, rows)?),
                KArg::I32(dim_i32(op, width)?),
                KArg::I32(lanes as i32),
                f64_arg(ctl.rtol),
                f64_arg(ctl.atol),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_fit_the_shared_memory() {
        // The bench field: the field alone at 64 rows, the VJP with two tangents at 32.
        let w = [3, 64, 64, 2];
        let p = plan("t", &w, 0, Kernel::Field).unwrap();
        assert_eq!((p.rows, p.stage), (64, true));
        let p = plan("t", &w, 2, Kernel::Vjp).unwrap();
        assert!(p.stage && p.rows >= 16 && p.bytes <= SMEM_TARGET, "{p:?}");
        // A field too wide for one row per block is refused.
        assert!(plan("t", &[3, 20_000, 2], 2, Kernel::Vjp).is_err());
    }
}
