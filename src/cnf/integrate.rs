//! The seam between a continuous flow and an ODE integrator: the three systems a CNF solves,
//!
//! - the field alone, dz/dt = f(z, t) (sampling, the forward and inverse maps, trajectories);
//! - the field with its divergence, d(z, L)/dt = (f, −div) with L = 0 at the start (density);
//! - the adjoint system of either, with a quadrature of the parameter gradient (training);
//!
//! each as one function of host tensors in and out. Backends that keep data on a device (the
//! grid backends: `device_resident_ode()`) solve with the device-resident driver
//! (`ode::device`): the state is uploaded once, stages, error norms and per-row step control run
//! in kernels, and only a small summary comes back per step. The CPU backend drives the host
//! f64 solver (`ode::solve_batch_rows`), the accuracy reference: every call of its closure
//! gathers the active rows (f64 → f32), runs one backend op and writes the result back.

use std::borrow::Cow;
use std::ops::Range;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::mlp::Mlp;
use crate::ode::device::{DeviceOptions, DeviceSolution, DeviceSystem, DeviceTrace, solve_device};
use crate::ode::tableau::{A, B5, C, STAGES};
use crate::ode::{
    AcceptedSteps, BatchSolution, OdeOptions, SolveStats, StepObserver, solve_batch_rows,
    solve_batch_rows_observed,
};
use crate::ops::rk45::{DivCotangent, ParamGrads, TraceMode};
use crate::tensor::{Shaped, Tensor};

/// Columns `cols` of every row of a row-major f64 state `width` wide, as an f32 matrix on the
/// device.
fn upload_cols<B: Backend>(b: &B, y: &[f64], width: usize, cols: Range<usize>) -> Result<B::Mat> {
    let n = y.len() / width;
    let mut data = Vec::with_capacity(n * cols.len());
    for row in y.chunks_exact(width) {
        data.extend(row[cols.clone()].iter().map(|&v| v as f32));
    }
    b.upload(&Tensor::from_vec(n, cols.len(), data)?)
}

fn upload_times<B: Backend>(b: &B, t: &[f64]) -> Result<B::Mat> {
    b.upload(&Tensor::from_vec(
        t.len(),
        1,
        t.iter().map(|&v| v as f32).collect(),
    )?)
}

/// Per-row data fixed for a whole solve (probes, a_div), uploaded once; a closure call that
/// sees only some rows gets those rows gathered and uploaded.
struct RowData<'a, B: Backend> {
    host: &'a Tensor,
    all: B::Mat,
}

impl<'a, B: Backend> RowData<'a, B> {
    fn new(b: &B, host: &'a Tensor) -> Result<Self> {
        Ok(RowData {
            host,
            all: b.upload(host)?,
        })
    }

    /// The rows named by `rows` (the solver lists active rows in increasing order, so all rows
    /// means every row in order).
    fn rows(&self, b: &B, rows: &[usize]) -> Result<Cow<'_, B::Mat>> {
        if rows.len() == self.host.rows() {
            Ok(Cow::Borrowed(&self.all))
        } else {
            Ok(Cow::Owned(b.upload(&self.host.gather_rows(rows)?)?))
        }
    }
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

/// Writes `src` (rows × `cols.len()`) into columns `cols` of `dst` (rows × width), times `sign`.
fn write_cols(dst: &mut [f64], width: usize, cols: Range<usize>, src: &Tensor, sign: f64) {
    for (drow, srow) in dst
        .chunks_exact_mut(width)
        .zip(src.data().chunks_exact(cols.len()))
    {
        for (d, &s) in drow[cols.clone()].iter_mut().zip(srow) {
            *d = sign * s as f64;
        }
    }
}

/// dz/dt = f(z, t) from `span.0` to `span.1` for every row of `z0` (B×D), with dense output at
/// `opts.t_eval`.
pub fn solve_field<B: Backend>(
    b: &B,
    net: &Mlp<B::Mat>,
    z0: &Tensor,
    span: (f64, f64),
    opts: &OdeOptions,
) -> Result<BatchSolution> {
    if b.device_resident_ode() {
        check_initial_state(z0)?;
        let sol = solve_device(
            b,
            net,
            &b.upload(z0)?,
            span,
            DeviceSystem::Field,
            &DeviceOptions::from(opts.clone()),
        )?;
        return batch_solution(b, sol, opts);
    }
    let dim = z0.cols();
    solve_batch_rows(
        |_rows, t, y, dy| {
            let f = b.field(net, &upload_cols(b, y, dim, 0..dim)?, &upload_times(b, t)?)?;
            write_cols(dy, dim, 0..dim, &b.download(&f)?, 1.0);
            Ok(())
        },
        &to_f64(z0),
        dim,
        span,
        opts,
    )
}

/// d(z, L)/dt = (f, −div) from `span.0` to `span.1` with z = `x` (B×D) and L = 0 at the start:
/// the state has D + 1 columns, L last. `probes` (B×(M·D)) selects Hutchinson's estimator,
/// fixed per row for the whole solve; None the exact trace.
pub fn solve_field_div<B: Backend>(
    b: &B,
    net: &Mlp<B::Mat>,
    x: &Tensor,
    span: (f64, f64),
    opts: &OdeOptions,
    probes: Option<&Tensor>,
) -> Result<BatchSolution> {
    let dim = x.cols();
    let width = dim + 1;
    if b.device_resident_ode() {
        check_initial_state(x)?;
        let y0 = Tensor::from_fn(
            x.rows(),
            width,
            |r, c| if c < dim { x.get(r, c) } else { 0.0 },
        );
        let probes = probes.map(|p| b.upload(p)).transpose()?;
        let trace = match &probes {
            Some(p) => DeviceTrace::Probes(p),
            None => DeviceTrace::Exact,
        };
        let sol = solve_device(
            b,
            net,
            &b.upload(&y0)?,
            span,
            DeviceSystem::FieldDiv(trace),
            &DeviceOptions::from(opts.clone()),
        )?;
        return batch_solution(b, sol, opts);
    }
    let probes = probes.map(|p| RowData::new(b, p)).transpose()?;
    let mut y0 = Vec::with_capacity(x.rows() * width);
    for r in 0..x.rows() {
        y0.extend(x.row(r).iter().map(|&v| v as f64));
        y0.push(0.0);
    }
    solve_batch_rows(
        |rows, t, y, dy| {
            let z = upload_cols(b, y, width, 0..dim)?;
            let tm = upload_times(b, t)?;
            let p = probes.as_ref().map(|p| p.rows(b, rows)).transpose()?;
            let trace = match &p {
                Some(p) => TraceMode::Hutchinson(p.as_ref()),
                None => TraceMode::Exact,
            };
            let (f, div) = b.field_div(net, &z, &tm, trace)?;
            write_cols(dy, width, 0..dim, &b.download(&f)?, 1.0);
            write_cols(dy, width, dim..width, &b.download(&div)?, -1.0);
            Ok(())
        },
        &y0,
        width,
        span,
        opts,
    )
}

/// What the adjoint solve returns.
#[derive(Clone, Debug)]
pub struct AdjointSolve {
    /// The adjoint a_z at the start of the forward solve (B×D): ∂loss/∂z(t_start).
    pub a: Tensor,
    /// z(t_start) recomputed by the backward solve (B×D).
    pub z: Tensor,
    /// ∂loss/∂w, scaled by `param_scale`.
    pub grads: Mlp<Tensor>,
    pub stats: SolveStats,
    /// Rows evaluated by the parameter quadrature (5 per accepted step of a row).
    pub quadrature_rows: usize,
}

/// The stages of the Dormand–Prince step with a non-zero 5th-order weight (K_1 and the FSAL
/// stage K_6 have none).
fn weighted_stages() -> Vec<usize> {
    (0..STAGES).filter(|&s| B5[s] != 0.0).collect()
}

/// Accumulates the parameter gradient as a quadrature over each accepted step of the adjoint
/// solve: ∫ g_w dt ≈ Σ_steps h·Σ_s B5[s]·g_w(stage s), the stage states rebuilt from the step's
/// K_s, all stages of all accepted rows in one weighted `field_vjp` call.
struct ParamQuadrature<'a, B: Backend> {
    b: &'a B,
    net: &'a Mlp<B::Mat>,
    dim: usize,
    a_div: Option<&'a Tensor>,
    probes: Option<&'a Tensor>,
    /// Multiplies every weight: −1 turns ∫ from t_end to t_start into the gradient (see
    /// `solve_adjoint`), times the caller's scale.
    scale: f64,
    stages: Vec<usize>,
    sums: Vec<Vec<f64>>,
    rows_evaluated: usize,
}

impl<B: Backend> StepObserver for ParamQuadrature<'_, B> {
    fn accepted(&mut self, steps: &AcceptedSteps<'_>) -> Result<()> {
        let (d, width) = (self.dim, steps.dim);
        let n = steps.rows.len() * self.stages.len();
        let mut z = Vec::with_capacity(n * d);
        let mut a = Vec::with_capacity(n * d);
        let mut t = Vec::with_capacity(n);
        let mut w = Vec::with_capacity(n);
        let mut source = Vec::with_capacity(n);
        let mut y = vec![0.0f64; width];
        for (i, &row) in steps.rows.iter().enumerate() {
            let h = steps.h[i];
            for &s in &self.stages {
                // The stage state exactly as the solver formed it.
                for (j, yj) in y.iter_mut().enumerate() {
                    let mut acc = 0.0;
                    for (q, &aq) in A[s][..s].iter().enumerate() {
                        acc += aq * steps.k[q][i * width + j];
                    }
                    *yj = steps.y[i * width + j] + h * acc;
                }
                z.extend(y[..d].iter().map(|&v| v as f32));
                a.extend(y[d..2 * d].iter().map(|&v| v as f32));
                t.push((steps.t[i] + C[s] * h) as f32);
                w.push((self.scale * h * B5[s]) as f32);
                source.push(row);
            }
        }
        let b = self.b;
        let up =
            |rows: usize, cols: usize, v: Vec<f32>| b.upload(&Tensor::from_vec(rows, cols, v)?);
        let (zm, am, tm, wm) = (up(n, d, z)?, up(n, d, a)?, up(n, 1, t)?, up(n, 1, w)?);
        let gather = |m: Option<&Tensor>| -> Result<Option<B::Mat>> {
            m.map(|m| b.upload(&m.gather_rows(&source)?)).transpose()
        };
        let (cm, pm) = (gather(self.a_div)?, gather(self.probes)?);
        let div = cm.as_ref().map(|c| DivCotangent {
            a_div: c,
            trace: match &pm {
                Some(p) => TraceMode::Hutchinson(p),
                None => TraceMode::Exact,
            },
        });
        let out = b.field_vjp(self.net, &zm, &tm, &am, div, ParamGrads::Weighted(&wm))?;
        if let Some(g) = out.g_params {
            for (sum, m) in self.sums.iter_mut().zip(g.tensors()) {
                for (acc, &v) in sum.iter_mut().zip(b.download(m)?.data()) {
                    *acc += v as f64;
                }
            }
        }
        self.rows_evaluated += n;
        Ok(())
    }
}

/// The adjoint system of [`solve_field`] (`a_div` None) or of [`solve_field_div`], solved from
/// the forward solve's end back to its start (eq. 18.25–18.26):
///
///   dz/dt = f,   da/dt = −(aᵀ ∂f/∂z − a_div·∂div/∂z),   a_div constant (nothing depends on L),
///   ∂loss/∂w = ∫_{t_start}^{t_end} (aᵀ ∂f/∂w − a_div·∂div/∂w) dt,
///
/// with z(t_end) = `z_end`, a(t_end) = `a_end` = ∂loss/∂z(t_end) (B×D) and `a_div` (B×1) =
/// ∂loss/∂L(t_end). z is recomputed backward rather than stored, so memory does not grow with
/// the number of steps. Step control sees (z, a) only: the parameter gradient is not part of
/// the state but a quadrature over the accepted steps' stages (a seminorm in the sense of
/// Kidger et al. 2021). Since the backward steps h run from t_end to t_start, the quadrature
/// weights are −h·B5[s]·`param_scale`. With per-row steps each row contributes its own steps;
/// the gradient is the sum over rows.
#[allow(clippy::too_many_arguments)]
pub fn solve_adjoint<B: Backend>(
    b: &B,
    net: &Mlp<B::Mat>,
    z_end: &Tensor,
    a_end: &Tensor,
    a_div: Option<&Tensor>,
    span: (f64, f64),
    opts: &OdeOptions,
    probes: Option<&Tensor>,
    param_scale: f64,
) -> Result<AdjointSolve> {
    let (t_start, t_end) = span;
    let dim = z_end.cols();
    let width = 2 * dim;
    if b.device_resident_ode() {
        return solve_adjoint_on_device(
            b,
            net,
            z_end,
            a_end,
            a_div,
            span,
            opts,
            probes,
            param_scale,
        );
    }
    let c = a_div.map(|c| RowData::new(b, c)).transpose()?;
    let p = match a_div {
        Some(_) => probes.map(|p| RowData::new(b, p)).transpose()?,
        None => None,
    };
    let mut y0 = Vec::with_capacity(z_end.rows() * width);
    for r in 0..z_end.rows() {
        y0.extend(z_end.row(r).iter().map(|&v| v as f64));
        y0.extend(a_end.row(r).iter().map(|&v| v as f64));
    }
    let mut quad = ParamQuadrature {
        b,
        net,
        dim,
        a_div,
        probes: a_div.and(probes),
        scale: -param_scale,
        stages: weighted_stages(),
        sums: net.tensors().iter().map(|t| vec![0.0; t.len()]).collect(),
        rows_evaluated: 0,
    };
    let sol = solve_batch_rows_observed(
        |rows, t, y, dy| {
            let z = upload_cols(b, y, width, 0..dim)?;
            let a = upload_cols(b, y, width, dim..width)?;
            let tm = upload_times(b, t)?;
            let cm = c.as_ref().map(|c| c.rows(b, rows)).transpose()?;
            let pm = p.as_ref().map(|p| p.rows(b, rows)).transpose()?;
            let div = cm.as_ref().map(|cm| DivCotangent {
                a_div: cm.as_ref(),
                trace: match &pm {
                    Some(pm) => TraceMode::Hutchinson(pm.as_ref()),
                    None => TraceMode::Exact,
                },
            });
            let out = b.field_vjp(net, &z, &tm, &a, div, ParamGrads::Skip)?;
            write_cols(dy, width, 0..dim, &b.download(&out.f)?, 1.0);
            write_cols(dy, width, dim..width, &b.download(&out.g_z)?, -1.0);
            Ok(())
        },
        &mut quad,
        &y0,
        width,
        (t_end, t_start),
        opts,
    )?;
    let rows = z_end.rows();
    let pick = |cols: Range<usize>| {
        let v: Vec<f32> = sol
            .y
            .chunks_exact(width)
            .flat_map(|r| r[cols.clone()].iter().map(|&v| v as f32))
            .collect();
        Tensor::from_vec(rows, cols.len(), v)
    };
    let grads = Mlp::from_tensors(
        net.act,
        net.tensors()
            .iter()
            .zip(&quad.sums)
            .map(|(t, s)| {
                Tensor::from_vec(t.rows(), t.cols(), s.iter().map(|&v| v as f32).collect())
            })
            .collect::<Result<Vec<_>>>()?,
    )?;
    Ok(AdjointSolve {
        a: pick(dim..width)?,
        z: pick(0..dim)?,
        grads,
        stats: sol.stats,
        quadrature_rows: quad.rows_evaluated,
    })
}

/// The host solver's check of an initial state, for the device path (which cannot search the
/// device copy cheaply).
fn check_initial_state(y0: &Tensor) -> Result<()> {
    if y0.rows() == 0 {
        return Err(Error::Empty("ode initial state has no rows".into()));
    }
    y0.check_finite("ode initial state")
}

/// A device solve's results on the host, as the host solver returns them.
fn batch_solution<B: Backend>(
    b: &B,
    sol: DeviceSolution<B::Mat>,
    opts: &OdeOptions,
) -> Result<BatchSolution> {
    let y = b.download(&sol.y)?;
    let y_eval = match &sol.y_eval {
        Some(m) => to_f64(&b.download(m)?),
        None => Vec::new(),
    };
    Ok(BatchSolution {
        rows: y.rows(),
        dim: y.cols(),
        y: to_f64(&y),
        t_eval: opts.t_eval.clone(),
        y_eval,
        stats: sol.stats,
    })
}

/// [`solve_adjoint`] by the device-resident driver: the state [z, a] and the per-row data
/// (a_div, probes) uploaded once, the parameter quadrature accumulated on the device.
#[allow(clippy::too_many_arguments)]
fn solve_adjoint_on_device<B: Backend>(
    b: &B,
    net: &Mlp<B::Mat>,
    z_end: &Tensor,
    a_end: &Tensor,
    a_div: Option<&Tensor>,
    span: (f64, f64),
    opts: &OdeOptions,
    probes: Option<&Tensor>,
    param_scale: f64,
) -> Result<AdjointSolve> {
    let (t_start, t_end) = span;
    let dim = z_end.cols();
    let rows = z_end.rows();
    a_end.expect_shape("solve_adjoint: a_end", rows, dim)?;
    let y0 = Tensor::from_fn(rows, 2 * dim, |r, c| {
        if c < dim {
            z_end.get(r, c)
        } else {
            a_end.get(r, c - dim)
        }
    });
    check_initial_state(&y0)?;
    let c = a_div.map(|c| b.upload(c)).transpose()?;
    let p = match a_div {
        Some(_) => probes.map(|p| b.upload(p)).transpose()?,
        None => None,
    };
    let trace = match &p {
        Some(p) => DeviceTrace::Probes(p),
        None => DeviceTrace::Exact,
    };
    let sol = solve_device(
        b,
        net,
        &b.upload(&y0)?,
        (t_end, t_start),
        DeviceSystem::Adjoint {
            a_div: c.as_ref(),
            trace,
            quadrature: Some(-param_scale),
        },
        &DeviceOptions::from(opts.clone()),
    )?;
    let y = b.download(&sol.y)?;
    let pick =
        |cols: Range<usize>| Tensor::from_fn(rows, cols.len(), |r, j| y.get(r, cols.start + j));
    let grads = sol
        .params
        .as_ref()
        .ok_or_else(|| Error::invalid("solve_adjoint: the device solve returned no quadrature"))?
        .try_map(|m| b.download(m))?;
    Ok(AdjointSolve {
        a: pick(dim..2 * dim),
        z: pick(0..dim),
        grads,
        stats: sol.stats,
        quadrature_rows: sol.quadrature_rows,
    })
}
