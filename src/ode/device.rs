//! A batched adaptive Dormand–Prince solver whose state stays on the device: the driver of the
//! stage and step-control ops of `ops::rk45::step` (one kernel each on a grid backend), generic
//! over the backend like everything else. It solves the three systems of a continuous flow
//! (`OdeSystem`): the field, the field with its divergence (density), and the adjoint with its
//! parameter quadrature (training).
//!
//! Per attempt it launches 6 × (stage combination + right-hand side) and the step end (error
//! norm, controller and update fused into one pass for per-row steps), then reads back one
//! small summary (the number of active and failed rows) to decide whether to go on. Rows that
//! finished stop costing work: when the active rows fall to `compact_below` of the working set,
//! the finished rows are copied to the results (`ode_retire`) and the active ones gathered to
//! the front (`ode_active_rows` + `gather_rows`) with their FSAL stage, state, row indices and
//! per-row data (probes, a_div). Generated probes follow a row through compaction by its
//! original index, so a row sees the same probes in every step and in the backward solve.
//!
//! The step is the host solver's (`ode::solver`): per-row t and h (or one shared h judged by
//! the worst row), FSAL, 5th-order propagation with the embedded 4th-order error, the
//! controller of `ode::controller`, Hairer's starting step, Shampine's dense output at
//! `t_eval`. Differences: y, t and h are f32 (see `ops::rk45::step`), so the smallest step is
//! 10 ulp of an f32 t, and NFE can differ from the f64 solver by a few percent on problems whose
//! step sizes sit near a rejection. A failed row stops the solve with its `OdeFailure` (in
//! shared stepping the failure names the first row rather than the worst one).

use crate::backend::Backend;
use crate::error::{Error, OdeFailure, Result};
use crate::nn::mlp::Mlp;
use crate::ode::solution::SolveStats;
use crate::ode::tableau::{B5, STAGES};
use crate::ode::{OdeOptions, Span, Stepping};
use crate::ops::rk45::Dense;
use crate::ops::rk45::{
    DivCotangent, MAX_PROBE_ROW, OdeSystem, Phase, ProbeKind, RowStatus, STATE_COLS, ShareMode,
    StepControl, TraceMode, col, needs_second_derivative,
};
use crate::tensor::{Shaped, Tensor};

/// The trace estimator of a device solve.
#[derive(Debug)]
pub enum DeviceTrace<'a, M> {
    Exact,
    /// Hutchinson probes B×(M·D), one row per row of the batch (gathered with the rows).
    Probes(&'a M),
    /// Hutchinson probes generated on the device from (seed, original row): the same values as
    /// `ops::rk45::probes(B, D, m, kind, seed)` without storing them.
    Generated {
        m: usize,
        kind: ProbeKind,
        seed: u64,
    },
}

impl<M> Clone for DeviceTrace<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for DeviceTrace<'_, M> {}

/// The system to solve; the state y0 is B×W with W = D, D + 1 or 2D (see `OdeSystem`).
#[derive(Debug)]
pub enum DeviceSystem<'a, M> {
    /// dz/dt = f(z, t).
    Field,
    /// d(z, L)/dt = (f, −div).
    FieldDiv(DeviceTrace<'a, M>),
    /// d(z, a)/dt = (f, −(aᵀ ∂f/∂z − a_div·∂div/∂z)), the divergence term when `a_div` (B×1)
    /// is given. With `quadrature` = Some(scale), the parameter integral
    /// scale·Σ_steps h·Σ_s B5[s]·(aᵀ ∂f/∂w − a_div·∂div/∂w)(stage s) over every accepted step.
    Adjoint {
        a_div: Option<&'a M>,
        trace: DeviceTrace<'a, M>,
        quadrature: Option<f64>,
    },
}

/// Settings of a device solve: the host solver's options, and when to compact.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceOptions {
    pub ode: OdeOptions,
    /// Compact the working set when its active rows are at most this fraction of it (0 never,
    /// 1 after every step that finishes a row).
    pub compact_below: f64,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            ode: OdeOptions::default(),
            compact_below: 0.75,
        }
    }
}

impl From<OdeOptions> for DeviceOptions {
    fn from(ode: OdeOptions) -> Self {
        DeviceOptions {
            ode,
            ..DeviceOptions::default()
        }
    }
}

/// What a device solve returns; matrices stay on the device.
#[derive(Debug)]
pub struct DeviceSolution<M> {
    /// The state of each row at its end time, B×W.
    pub y: M,
    /// Dense output ((n·B)×W, row k·B + r is row r at t_eval[k]), when t_eval was given.
    pub y_eval: Option<M>,
    /// nfe, accepted and rejected per row as the host solver counts them; `closure_calls` is
    /// the number of right-hand-side evaluations and `row_evaluations` the rows they covered
    /// (finished rows still in the working set included: the real work).
    pub stats: SolveStats,
    /// The parameter quadrature of an adjoint solve, in the field's structure.
    pub params: Option<Mlp<M>>,
    /// Rows evaluated by the parameter quadrature (5 stages × the working set per step).
    pub quadrature_rows: usize,
    /// Step attempts of the batch (loop iterations), and compactions of the working set.
    pub attempts: usize,
    pub compactions: usize,
}

/// The rows being integrated and everything that travels with them.
struct Work<M> {
    y: M,
    /// f(t, y): the FSAL stage k_0 of each row's next step.
    k0: M,
    state: M,
    /// The caller's row of each working row (f32 integers).
    ids: M,
    probes: Option<M>,
    a_div: Option<M>,
}

impl<M: Shaped> Work<M> {
    fn rows(&self) -> usize {
        self.y.rows()
    }
}

/// Solves `system` for the field `net` from y0 (B×W, on the device) over `span`.
///
/// Errors: the shapes of the field, y0 and the system's data; more than 2^24 rows; invalid
/// options or span (as the host solver); a divergence term with ReLU; and the first failed
/// row's `OdeFailure`.
pub fn solve_device<B: Backend>(
    b: &B,
    net: &Mlp<B::Mat>,
    y0: &B::Mat,
    span: impl Into<Span>,
    system: DeviceSystem<'_, B::Mat>,
    opts: &DeviceOptions,
) -> Result<DeviceSolution<B::Mat>> {
    let span = span.into();
    let op = "solve_device";
    net.check(op)?;
    let dim = net.out_dim();
    if net.in_dim() != dim + 1 {
        return Err(Error::shape(
            op,
            format!("a vector field {} -> {dim}", dim + 1),
            format!("{} -> {dim}", net.in_dim()),
        ));
    }
    let rows = y0.rows();
    if rows == 0 {
        return Err(Error::Empty(format!("{op}: a batch of zero rows")));
    }
    if rows >= MAX_PROBE_ROW {
        return Err(Error::invalid(format!(
            "{op}: {rows} rows; a device solve indexes rows by f32 integers (below 2^24)"
        )));
    }
    opts.ode.validate(&span, rows)?;
    if !(0.0..=1.0).contains(&opts.compact_below) {
        return Err(Error::invalid(format!(
            "{op}: compact_below must lie in [0, 1], got {}",
            opts.compact_below
        )));
    }
    let width = match &system {
        DeviceSystem::Field => dim,
        DeviceSystem::FieldDiv(_) => dim + 1,
        DeviceSystem::Adjoint { .. } => 2 * dim,
    };
    y0.expect_shape(op, rows, width)?;
    let trace = match &system {
        DeviceSystem::Field => DeviceTrace::Exact,
        DeviceSystem::FieldDiv(t) => *t,
        DeviceSystem::Adjoint { a_div, trace, .. } => {
            if let Some(c) = a_div {
                c.expect_shape(op, rows, 1)?;
                needs_second_derivative(op, net.act)?;
                *trace
            } else {
                DeviceTrace::Exact
            }
        }
    };
    match trace {
        DeviceTrace::Probes(p) if p.rows() != rows || p.cols() == 0 || p.cols() % dim != 0 => {
            return Err(Error::shape(
                op,
                format!("Hutchinson probes {rows}x(M·{dim})"),
                format!("{}x{}", p.rows(), p.cols()),
            ));
        }
        DeviceTrace::Generated { m: 0, .. } => {
            return Err(Error::invalid(format!(
                "{op}: Hutchinson's estimator needs at least one probe"
            )));
        }
        _ => {}
    }
    let mut run = Run::new(b, net, y0, &span, system, trace, opts)?;
    run.solve()
}

struct Run<'a, B: Backend> {
    b: &'a B,
    net: &'a Mlp<B::Mat>,
    opts: &'a DeviceOptions,
    ctl: StepControl,
    kind: SystemKind,
    trace: DeviceTrace<'a, B::Mat>,
    quadrature: Option<f64>,
    rows: usize,
    work: Work<B::Mat>,
    out_y: B::Mat,
    out_state: B::Mat,
    t_eval: Option<B::Mat>,
    y_eval: Option<B::Mat>,
    acc: Option<B::ParamAcc>,
    rhs_calls: usize,
    row_evaluations: usize,
    quadrature_rows: usize,
    attempts: usize,
    compactions: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SystemKind {
    Field,
    FieldDiv,
    Adjoint { div: bool },
}

impl<'a, B: Backend> Run<'a, B> {
    fn new(
        b: &'a B,
        net: &'a Mlp<B::Mat>,
        y0: &B::Mat,
        span: &Span,
        system: DeviceSystem<'a, B::Mat>,
        trace: DeviceTrace<'a, B::Mat>,
        opts: &'a DeviceOptions,
    ) -> Result<Self> {
        let rows = y0.rows();
        let (kind, a_div, quadrature) = match system {
            DeviceSystem::Field => (SystemKind::Field, None, None),
            DeviceSystem::FieldDiv(_) => (SystemKind::FieldDiv, None, None),
            DeviceSystem::Adjoint {
                a_div, quadrature, ..
            } => (
                SystemKind::Adjoint {
                    div: a_div.is_some(),
                },
                a_div,
                quadrature,
            ),
        };
        let (t0, t1) = match span {
            Span::Uniform { t0, t1 } => {
                (b.fill(rows, 1, *t0 as f32)?, b.fill(rows, 1, *t1 as f32)?)
            }
            Span::PerRow { t0, t1 } => {
                let col =
                    |v: &[f64]| Tensor::from_vec(rows, 1, v.iter().map(|&x| x as f32).collect());
                (b.upload(&col(t0)?)?, b.upload(&col(t1)?)?)
            }
        };
        let state = b.ode_init_state(&t0, &t1, opts.ode.h0)?;
        let ids = b.upload(&Tensor::from_fn(rows, 1, |r, _| r as f32))?;
        let width = y0.cols();
        let mut run = Run {
            b,
            net,
            opts,
            ctl: StepControl::from(&opts.ode),
            kind,
            trace,
            quadrature,
            rows,
            work: Work {
                y: y0.clone(),
                // Replaced by the first evaluation below.
                k0: t0.clone(),
                state,
                ids,
                probes: match trace {
                    DeviceTrace::Probes(p) => Some(p.clone()),
                    _ => None,
                },
                a_div: a_div.cloned(),
            },
            out_y: b.zeros(rows, width)?,
            out_state: b.zeros(rows, STATE_COLS)?,
            t_eval: None,
            y_eval: None,
            acc: None,
            rhs_calls: 0,
            row_evaluations: 0,
            quadrature_rows: 0,
            attempts: 0,
            compactions: 0,
        };
        if !opts.ode.t_eval.is_empty() {
            let n = opts.ode.t_eval.len();
            let te = Tensor::from_vec(1, n, opts.ode.t_eval.iter().map(|&t| t as f32).collect())?;
            run.t_eval = Some(b.upload(&te)?);
            run.y_eval = Some(b.zeros(n * rows, width)?);
        }
        if run.quadrature.is_some() {
            run.acc = Some(b.ode_quad_new(net)?);
        }
        let y = run.work.y.clone();
        run.work.k0 = run.rhs(&y, &t0)?;
        Ok(run)
    }

    /// The trace of the working set.
    fn trace_mode(&self) -> TraceMode<'_, B::Mat> {
        match self.trace {
            DeviceTrace::Exact => TraceMode::Exact,
            DeviceTrace::Probes(_) => {
                TraceMode::Hutchinson(self.work.probes.as_ref().expect("probes travel with rows"))
            }
            DeviceTrace::Generated { m, kind, seed } => TraceMode::Generated {
                m,
                kind,
                seed,
                rows: Some(&self.work.ids),
            },
        }
    }

    fn div_cotangent(&self) -> Option<DivCotangent<'_, B::Mat>> {
        self.work.a_div.as_ref().map(|c| DivCotangent {
            a_div: c,
            trace: self.trace_mode(),
        })
    }

    fn rhs(&mut self, y: &B::Mat, t: &B::Mat) -> Result<B::Mat> {
        let system = match self.kind {
            SystemKind::Field => OdeSystem::Field,
            SystemKind::FieldDiv => OdeSystem::FieldDiv(self.trace_mode()),
            SystemKind::Adjoint { .. } => OdeSystem::Adjoint(self.div_cotangent()),
        };
        let k = self.b.ode_rhs(self.net, y, t, system)?;
        self.rhs_calls += 1;
        self.row_evaluations += y.rows();
        Ok(k)
    }

    /// Output at t0, the starting step and the first proposal.
    fn start(&mut self) -> Result<()> {
        let b = self.b;
        if let (Some(t_eval), Some(y_eval)) = (&self.t_eval, &mut self.y_eval) {
            let dense = Dense {
                t_eval,
                y_eval,
                ids: &self.work.ids,
                rows_total: self.rows,
            };
            b.ode_dense_start(&self.work.y, &mut self.work.state, dense)?;
        }
        if self.opts.ode.h0.is_none() {
            let (yp, tp) =
                b.ode_initial_probe(&self.work.y, &self.work.k0, &mut self.work.state, &self.ctl)?;
            let f1 = self.rhs(&yp, &tp)?;
            b.ode_initial_refine(
                &self.work.y,
                &self.work.k0,
                &f1,
                &mut self.work.state,
                &self.ctl,
            )?;
        }
        if self.opts.ode.stepping == Stepping::Shared {
            b.ode_share(&mut self.work.state, col::H_ABS, ShareMode::Min)?;
        }
        b.ode_propose(&mut self.work.state, &self.ctl)
    }

    fn solve(&mut self) -> Result<DeviceSolution<B::Mat>> {
        self.start()?;
        // Every row fails by MaxSteps within max_steps attempts; the bound only guards
        // against a broken op.
        let limit = self.opts.ode.max_steps.saturating_add(2);
        loop {
            let sum = self.b.ode_summary(&self.work.state)?;
            if let Some(r) = sum.first_failed {
                return Err(self.failure(r));
            }
            if sum.active == 0 {
                break;
            }
            if self.attempts > limit {
                return Err(Error::invalid(format!(
                    "solve_device: {} rows still active after {} attempts",
                    sum.active, self.attempts
                )));
            }
            let working = self.work.rows();
            if sum.active < working && sum.active as f64 <= self.opts.compact_below * working as f64
            {
                self.compact(sum.active)?;
            }
            self.attempt()?;
        }
        self.retire()?;
        self.finish()
    }

    /// One step attempt of every row in the working set.
    fn attempt(&mut self) -> Result<()> {
        let b = self.b;
        let mut ks: Vec<B::Mat> = Vec::with_capacity(STAGES - 1);
        // Stage states 0..5 for the quadrature, and y_6 = y_new.
        let mut stage_states: Vec<(B::Mat, B::Mat)> = Vec::new();
        let quad = self.quadrature.is_some();
        if quad {
            stage_states.push(b.ode_stage(&self.work.y, &[], &self.work.state, 0)?);
        }
        let mut y_new = None;
        for s in 1..STAGES {
            let (ys, ts) = {
                let mut refs: Vec<&B::Mat> = Vec::with_capacity(s);
                refs.push(&self.work.k0);
                refs.extend(ks.iter());
                b.ode_stage(&self.work.y, &refs, &self.work.state, s)?
            };
            ks.push(self.rhs(&ys, &ts)?);
            if s + 1 == STAGES {
                y_new = Some(ys);
            } else if quad {
                stage_states.push((ys, ts));
            }
        }
        let y_new = y_new.expect("the last stage is the new state");
        let k: [&B::Mat; 6] = std::array::from_fn(|i| &ks[i]);
        let shared = self.opts.ode.stepping == Stepping::Shared;
        let work = &mut self.work;
        let ctl = &self.ctl;
        if !shared && !quad {
            let dense = match (&self.t_eval, &mut self.y_eval) {
                (Some(t_eval), Some(y_eval)) => Some(Dense {
                    t_eval,
                    y_eval,
                    ids: &work.ids,
                    rows_total: self.rows,
                }),
                _ => None,
            };
            b.ode_step_end(
                Phase::ALL,
                &mut work.y,
                &mut work.k0,
                k,
                &y_new,
                &mut work.state,
                ctl,
                dense,
            )?;
        } else {
            let first = if shared {
                Phase::ERROR
            } else {
                Phase::ERROR | Phase::DECIDE
            };
            b.ode_step_end(
                first,
                &mut work.y,
                &mut work.k0,
                k,
                &y_new,
                &mut work.state,
                ctl,
                None,
            )?;
            if shared {
                b.ode_share(&mut work.state, col::ERR, ShareMode::Max)?;
                b.ode_step_end(
                    Phase::DECIDE,
                    &mut work.y,
                    &mut work.k0,
                    k,
                    &y_new,
                    &mut work.state,
                    ctl,
                    None,
                )?;
            }
            if let Some(scale) = self.quadrature {
                self.add_quadrature(&stage_states, scale)?;
            }
            drop(stage_states);
            let work = &mut self.work;
            let dense = match (&self.t_eval, &mut self.y_eval) {
                (Some(t_eval), Some(y_eval)) => Some(Dense {
                    t_eval,
                    y_eval,
                    ids: &work.ids,
                    rows_total: self.rows,
                }),
                _ => None,
            };
            b.ode_step_end(
                Phase::UPDATE,
                &mut work.y,
                &mut work.k0,
                k,
                &y_new,
                &mut work.state,
                &self.ctl,
                dense,
            )?;
        }
        self.attempts += 1;
        Ok(())
    }

    /// The stages with a 5th-order weight, each weighted by h·B5[s]·scale on accepted rows.
    fn add_quadrature(&mut self, stages: &[(B::Mat, B::Mat)], scale: f64) -> Result<()> {
        let mut acc = self
            .acc
            .take()
            .expect("a quadrature solve has an accumulator");
        for (s, (ys, ts)) in stages.iter().enumerate() {
            if B5[s] == 0.0 {
                continue;
            }
            let div = self.div_cotangent();
            self.b.ode_quad_add(
                &mut acc,
                self.net,
                ys,
                ts,
                &self.work.state,
                scale * B5[s],
                div,
            )?;
            self.quadrature_rows += ys.rows();
        }
        self.acc = Some(acc);
        Ok(())
    }

    /// Finished rows to the results, active rows to the front of a smaller working set.
    fn compact(&mut self, active: usize) -> Result<()> {
        self.retire()?;
        let b = self.b;
        let idx = b.ode_active_rows(&self.work.state, active)?;
        let w = &self.work;
        let gather = |m: &B::Mat| b.gather_rows(m, &idx);
        self.work = Work {
            y: gather(&w.y)?,
            k0: gather(&w.k0)?,
            state: gather(&w.state)?,
            ids: gather(&w.ids)?,
            probes: w.probes.as_ref().map(gather).transpose()?,
            a_div: w.a_div.as_ref().map(gather).transpose()?,
        };
        self.compactions += 1;
        Ok(())
    }

    fn retire(&mut self) -> Result<()> {
        let w = &self.work;
        self.b
            .ode_retire(&w.y, &w.state, &w.ids, &mut self.out_y, &mut self.out_state)
    }

    /// The typed error of working row r.
    fn failure(&self, r: usize) -> Error {
        let read = || -> Result<(Tensor, Tensor)> {
            Ok((
                self.b.download(&self.work.state)?,
                self.b.download(&self.work.ids)?,
            ))
        };
        let (state, ids) = match read() {
            Ok(v) => v,
            Err(e) => return e,
        };
        let s = state.row(r);
        let row = ids.data()[r] as usize;
        let t = s[col::T] as f64;
        match RowStatus::from_code(s[col::STATUS]) {
            Some(RowStatus::NonFinite) => OdeFailure::NonFinite {
                row,
                t: s[col::T_NEW] as f64,
            }
            .into(),
            Some(RowStatus::Underflow) => OdeFailure::StepUnderflow {
                row,
                t,
                h: s[col::H_ABS] as f64,
            }
            .into(),
            Some(RowStatus::MaxSteps) => OdeFailure::MaxSteps {
                row,
                t,
                max_steps: self.opts.ode.max_steps,
            }
            .into(),
            other => Error::invalid(format!(
                "solve_device: row {row} reported as failed with status {other:?}"
            )),
        }
    }

    fn finish(&mut self) -> Result<DeviceSolution<B::Mat>> {
        let state = self.b.download(&self.out_state)?;
        let mut stats = SolveStats::new(self.rows);
        let start_evals = 1 + self.opts.ode.h0.is_none() as usize;
        for r in 0..self.rows {
            let s = state.row(r);
            let (acc, rej) = (s[col::ACCEPTED] as usize, s[col::REJECTED] as usize);
            stats.accepted[r] = acc;
            stats.rejected[r] = rej;
            stats.nfe[r] = if s[col::DIR] == 0.0 {
                0
            } else {
                start_evals + (STAGES - 1) * (acc + rej)
            };
        }
        stats.closure_calls = self.rhs_calls;
        stats.row_evaluations = self.row_evaluations;
        let params = match self.acc.take() {
            Some(acc) => Some(self.b.ode_quad_finish(acc, self.net)?),
            None => None,
        };
        Ok(DeviceSolution {
            y: self.out_y.clone(),
            y_eval: self.y_eval.take(),
            stats,
            params,
            quadrature_rows: self.quadrature_rows,
            attempts: self.attempts,
            compactions: self.compactions,
        })
    }
}
