//! The batched adaptive Dormand–Prince solver in f64.
//!
//! A batch is B independent rows of dimension D. With `Stepping::PerRow` every row carries its
//! own t, h and controller memory, and each closure call receives only the rows still
//! integrating (compacted to the front of the work buffers), so a row that reaches its end time
//! stops costing evaluations and one hard row does not slow the others down. The step itself is
//! scipy's RK45 step: FSAL, 5th-order propagation, 4th-order embedded error estimate, the
//! controller of `controller.rs`, and Shampine's interpolant for output at `t_eval`.

use super::controller::{StepController, StepMemory, scaled_error_norm};
use super::initial_step;
use super::options::{OdeOptions, Span, Stepping};
use super::solution::{BatchSolution, SolveStats};
use super::tableau::{A, C, E, STAGES, dense_weights};
use crate::error::{Error, OdeFailure, Result};

/// Solves dy/dt = f(t, y) for every row of `y0` (rows × `dim`, row-major) over `span`.
///
/// `f(t, y, dy)` receives the active rows only: `t` holds one time per active row, `y` and `dy`
/// are active rows × dim. It must overwrite all of `dy` (the buffer is filled with NaN before
/// each call so that a forgotten entry is caught as a non-finite derivative). In shared stepping
/// every entry of `t` is the same.
pub fn solve_batch<F>(
    mut f: F,
    y0: &[f64],
    dim: usize,
    span: impl Into<Span>,
    opts: &OdeOptions,
) -> Result<BatchSolution>
where
    F: FnMut(&[f64], &[f64], &mut [f64]) -> Result<()>,
{
    solve_batch_rows(|_rows, t, y, dy| f(t, y, dy), y0, dim, span, opts)
}

/// As [`solve_batch`], but the closure also receives the original index of each active row
/// (`rows[i]` is the caller's row for the i-th row of `t`, `y`, `dy`), for vector fields with
/// per-row data such as a fixed noise probe or a conditioning vector.
pub fn solve_batch_rows<F>(
    f: F,
    y0: &[f64],
    dim: usize,
    span: impl Into<Span>,
    opts: &OdeOptions,
) -> Result<BatchSolution>
where
    F: FnMut(&[usize], &[f64], &[f64], &mut [f64]) -> Result<()>,
{
    solve_batch_rows_observed(f, &mut (), y0, dim, span, opts)
}

/// The steps accepted in one attempt of the batch, in the caller's row order of `rows`, as seen
/// before the rows advance: row i stepped from (`t[i]`, `y` row i) with signed step `h[i]`, and
/// `k[s]` row i is its stage derivative K_s (see [`super::tableau`]). A quadrature of another
/// quantity along the solution (e.g. an adjoint's parameter gradient) can rebuild the stage
/// states y + h·Σ_j A[s][j]·K_j from these and weight them by h·B5[s].
pub struct AcceptedSteps<'a> {
    pub dim: usize,
    pub rows: &'a [usize],
    pub t: &'a [f64],
    pub h: &'a [f64],
    /// rows.len() × dim.
    pub y: &'a [f64],
    /// STAGES slices of rows.len() × dim.
    pub k: [&'a [f64]; STAGES],
}

/// Sees every accepted step of a solve (see [`solve_batch_rows_observed`]).
pub trait StepObserver {
    /// Called once per attempt that accepted at least one row; an error stops the solve.
    fn accepted(&mut self, steps: &AcceptedSteps<'_>) -> Result<()>;

    /// False for the no-op observer, so that plain solves do not copy the stages.
    fn wants_steps(&self) -> bool {
        true
    }
}

/// The no-op observer.
impl StepObserver for () {
    fn accepted(&mut self, _steps: &AcceptedSteps<'_>) -> Result<()> {
        Ok(())
    }
    fn wants_steps(&self) -> bool {
        false
    }
}

/// As [`solve_batch_rows`], and `observer` is shown every accepted step (its start, step size
/// and stages) before the rows advance.
pub fn solve_batch_rows_observed<F, O>(
    f: F,
    observer: &mut O,
    y0: &[f64],
    dim: usize,
    span: impl Into<Span>,
    opts: &OdeOptions,
) -> Result<BatchSolution>
where
    F: FnMut(&[usize], &[f64], &[f64], &mut [f64]) -> Result<()>,
    O: StepObserver + ?Sized,
{
    let span = span.into();
    let rows = validate_state(y0, dim)?;
    opts.validate(&span, rows)?;
    let mut run = Run::new(f, y0, dim, &span, opts);
    run.start()?;
    while run.step_active_rows(observer)? {}
    Ok(run.finish())
}

/// Copies of the accepted steps of one attempt, for a [`StepObserver`].
#[derive(Default)]
struct AcceptedBuffer {
    rows: Vec<usize>,
    t: Vec<f64>,
    h: Vec<f64>,
    y: Vec<f64>,
    k: [Vec<f64>; STAGES],
}

impl AcceptedBuffer {
    fn clear(&mut self) {
        self.rows.clear();
        self.t.clear();
        self.h.clear();
        self.y.clear();
        self.k.iter_mut().for_each(Vec::clear);
    }
}

fn validate_state(y0: &[f64], dim: usize) -> Result<usize> {
    if dim == 0 {
        return Err(Error::invalid("ode state dimension must be positive"));
    }
    if y0.is_empty() {
        return Err(Error::Empty("ode initial state has no rows".into()));
    }
    if !y0.len().is_multiple_of(dim) {
        return Err(Error::shape(
            "ode initial state",
            format!("a multiple of dim = {dim} values"),
            y0.len(),
        ));
    }
    if let Some(k) = y0.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "ode initial state".into(),
            row: k / dim,
            col: k % dim,
        });
    }
    Ok(y0.len() / dim)
}

/// Distance from t to the next representable number in direction `dir`: steps shorter than a
/// few of these no longer advance t.
fn spacing_toward(t: f64, dir: f64) -> f64 {
    if t == 0.0 {
        return f64::from_bits(1);
    }
    let a = t.abs();
    let bits = a.to_bits();
    if (t > 0.0) == (dir > 0.0) {
        f64::from_bits(bits + 1) - a
    } else {
        a - f64::from_bits(bits - 1)
    }
}

/// Calls the vector field on `rows.len()` compacted rows, counts the work, and turns a
/// non-finite derivative into `OdeFailure::NonFinite` naming the caller's row.
fn evaluate<F>(
    f: &mut F,
    stats: &mut SolveStats,
    rows: &[usize],
    t: &[f64],
    y: &[f64],
    dy: &mut [f64],
) -> Result<()>
where
    F: FnMut(&[usize], &[f64], &[f64], &mut [f64]) -> Result<()>,
{
    dy.fill(f64::NAN);
    f(rows, t, y, dy)?;
    stats.closure_calls += 1;
    stats.row_evaluations += rows.len();
    for &r in rows {
        stats.nfe[r] += 1;
    }
    let dim = dy.len() / rows.len().max(1);
    if let Some(k) = dy.iter().position(|v| !v.is_finite()) {
        let i = k / dim;
        return Err(OdeFailure::NonFinite {
            row: rows[i],
            t: t[i],
        }
        .into());
    }
    Ok(())
}

/// The state of one solve. Per-row arrays are indexed by the caller's row; work buffers hold
/// the active rows compacted to the front.
struct Run<'a, F> {
    f: F,
    opts: &'a OdeOptions,
    rows: usize,
    dim: usize,
    t: Vec<f64>,
    t_end: Vec<f64>,
    /// +1 forward, −1 backward, 0 for an empty span.
    dir: Vec<f64>,
    h_abs: Vec<f64>,
    memory: Vec<StepMemory>,
    y: Vec<f64>,
    /// f(t, y) of each row: the FSAL stage K_0 of its next step.
    f_now: Vec<f64>,
    done: Vec<bool>,
    next_eval: Vec<usize>,
    y_eval: Vec<f64>,
    stats: SolveStats,
    active: Vec<usize>,
    h: Vec<f64>,
    t_new: Vec<f64>,
    err: Vec<f64>,
    t_stage: Vec<f64>,
    y_stage: Vec<f64>,
    k: [Vec<f64>; STAGES],
    err_vec: Vec<f64>,
    /// The row with the largest error in the last shared step.
    worst_row: usize,
    accepted_steps: AcceptedBuffer,
}

impl<'a, F> Run<'a, F>
where
    F: FnMut(&[usize], &[f64], &[f64], &mut [f64]) -> Result<()>,
{
    fn new(f: F, y0: &[f64], dim: usize, span: &Span, opts: &'a OdeOptions) -> Self {
        let rows = y0.len() / dim;
        let (t, t_end): (Vec<f64>, Vec<f64>) = (0..rows).map(|r| span.row(r)).unzip();
        let dir = t
            .iter()
            .zip(&t_end)
            .map(|(a, b)| if a == b { 0.0 } else { (b - a).signum() })
            .collect();
        Run {
            f,
            opts,
            rows,
            dim,
            t,
            t_end,
            dir,
            h_abs: vec![0.0; rows],
            memory: vec![StepMemory::default(); rows],
            y: y0.to_vec(),
            f_now: vec![0.0; rows * dim],
            done: vec![false; rows],
            next_eval: vec![0; rows],
            y_eval: vec![0.0; opts.t_eval.len() * rows * dim],
            stats: SolveStats::new(rows),
            active: Vec::with_capacity(rows),
            h: vec![0.0; rows],
            t_new: vec![0.0; rows],
            err: vec![0.0; rows],
            t_stage: vec![0.0; rows],
            y_stage: vec![0.0; rows * dim],
            k: std::array::from_fn(|_| vec![0.0; rows * dim]),
            err_vec: vec![0.0; dim],
            worst_row: 0,
            accepted_steps: AcceptedBuffer::default(),
        }
    }

    /// Output at t0, the first derivative and the starting step of every row.
    fn start(&mut self) -> Result<()> {
        let d = self.dim;
        for r in 0..self.rows {
            let t0 = self.t[r];
            self.emit_points_at_current(r, t0);
            if self.dir[r] == 0.0 {
                self.done[r] = true;
            }
        }
        self.collect_active();
        let n = self.active.len();
        if n == 0 {
            return Ok(());
        }
        for (i, &r) in self.active.iter().enumerate() {
            self.t_stage[i] = self.t[r];
            self.y_stage[i * d..(i + 1) * d].copy_from_slice(&self.y[r * d..(r + 1) * d]);
        }
        evaluate(
            &mut self.f,
            &mut self.stats,
            &self.active,
            &self.t_stage[..n],
            &self.y_stage[..n * d],
            &mut self.k[0][..n * d],
        )?;
        for (i, &r) in self.active.iter().enumerate() {
            self.f_now[r * d..(r + 1) * d].copy_from_slice(&self.k[0][i * d..(i + 1) * d]);
        }
        match self.opts.h0 {
            Some(h0) => self.active.iter().for_each(|&r| self.h_abs[r] = h0),
            None => self.select_initial_steps()?,
        }
        if self.opts.stepping == Stepping::Shared {
            let h = self
                .active
                .iter()
                .map(|&r| self.h_abs[r])
                .fold(f64::INFINITY, f64::min);
            self.active.iter().for_each(|&r| self.h_abs[r] = h);
        }
        for &r in &self.active {
            self.h_abs[r] = self.h_abs[r].min(self.opts.h_max);
        }
        Ok(())
    }

    /// Hairer's starting step for every active row, with one batched probe evaluation.
    fn select_initial_steps(&mut self) -> Result<()> {
        let (d, n) = (self.dim, self.active.len());
        let (rtol, atol) = (self.opts.rtol, self.opts.atol);
        for (i, &r) in self.active.iter().enumerate() {
            let interval = (self.t_end[r] - self.t[r]).abs();
            let (y0, f0) = (&self.y[r * d..(r + 1) * d], &self.f_now[r * d..(r + 1) * d]);
            let h0 = initial_step::first_guess(y0, f0, rtol, atol, interval);
            self.h[i] = h0;
            let step = h0 * self.dir[r];
            self.t_stage[i] = self.t[r] + step;
            for j in 0..d {
                self.y_stage[i * d + j] = y0[j] + step * f0[j];
            }
        }
        evaluate(
            &mut self.f,
            &mut self.stats,
            &self.active,
            &self.t_stage[..n],
            &self.y_stage[..n * d],
            &mut self.k[1][..n * d],
        )?;
        for (i, &r) in self.active.iter().enumerate() {
            let interval = (self.t_end[r] - self.t[r]).abs();
            self.h_abs[r] = initial_step::refine(
                &self.y[r * d..(r + 1) * d],
                &self.f_now[r * d..(r + 1) * d],
                &self.k[1][i * d..(i + 1) * d],
                self.h[i],
                rtol,
                atol,
                interval,
            );
        }
        Ok(())
    }

    fn collect_active(&mut self) {
        self.active.clear();
        self.active
            .extend((0..self.rows).filter(|&r| !self.done[r]));
    }

    /// Smallest step magnitude row r may use at its current t.
    fn min_step(&self, r: usize) -> f64 {
        self.opts
            .h_min
            .max(10.0 * spacing_toward(self.t[r], self.dir[r]))
    }

    /// One step attempt for every active row. Returns false when no row is left.
    fn step_active_rows<O: StepObserver + ?Sized>(&mut self, observer: &mut O) -> Result<bool> {
        self.collect_active();
        let n = self.active.len();
        if n == 0 {
            return Ok(false);
        }
        self.propose_steps();
        self.run_stages()?;
        self.estimate_errors()?;
        let observe = observer.wants_steps();
        if observe {
            self.accepted_steps.clear();
        }
        self.apply_decisions(observe)?;
        if observe && !self.accepted_steps.rows.is_empty() {
            let b = &self.accepted_steps;
            observer.accepted(&AcceptedSteps {
                dim: self.dim,
                rows: &b.rows,
                t: &b.t,
                h: &b.h,
                y: &b.y,
                k: std::array::from_fn(|s| b.k[s].as_slice()),
            })?;
        }
        Ok(true)
    }

    /// The signed step h and end time t_new of each active row, clipped to its end time.
    fn propose_steps(&mut self) {
        for i in 0..self.active.len() {
            let r = self.active[i];
            let mut h_abs = self.h_abs[r].min(self.opts.h_max);
            // After an accepted step a tiny proposal is raised to the floor (as scipy does); after
            // a rejection the underflow check in `apply_decisions` has already vetted it.
            if !self.memory[r].last_rejected {
                h_abs = h_abs.max(self.min_step(r));
            }
            let dir = self.dir[r];
            let mut t_new = self.t[r] + h_abs * dir;
            if dir * (t_new - self.t_end[r]) > 0.0 {
                t_new = self.t_end[r];
            }
            self.t_new[i] = t_new;
            self.h[i] = t_new - self.t[r];
        }
    }

    /// Stages 1..7 of the Dormand–Prince step (stage 0 is the row's FSAL derivative). After
    /// the last stage, `y_stage` holds the 5th-order solution y_new and `k[6]` = f(t_new, y_new).
    fn run_stages(&mut self) -> Result<()> {
        let (d, n) = (self.dim, self.active.len());
        for (i, &r) in self.active.iter().enumerate() {
            self.k[0][i * d..(i + 1) * d].copy_from_slice(&self.f_now[r * d..(r + 1) * d]);
        }
        for s in 1..STAGES {
            let (done_stages, rest) = self.k.split_at_mut(s);
            for (i, &r) in self.active.iter().enumerate() {
                let h = self.h[i];
                self.t_stage[i] = if C[s] == 1.0 {
                    self.t_new[i]
                } else {
                    self.t[r] + C[s] * h
                };
                for j in 0..d {
                    let mut acc = 0.0;
                    for (ks, &a) in done_stages.iter().zip(&A[s][..s]) {
                        acc += a * ks[i * d + j];
                    }
                    self.y_stage[i * d + j] = self.y[r * d + j] + h * acc;
                }
            }
            evaluate(
                &mut self.f,
                &mut self.stats,
                &self.active,
                &self.t_stage[..n],
                &self.y_stage[..n * d],
                &mut rest[0][..n * d],
            )?;
        }
        Ok(())
    }

    /// Scaled error norm of each active row; in shared stepping every row gets the worst one.
    fn estimate_errors(&mut self) -> Result<()> {
        let d = self.dim;
        let (rtol, atol) = (self.opts.rtol, self.opts.atol);
        for (i, &r) in self.active.iter().enumerate() {
            let y_new = &self.y_stage[i * d..(i + 1) * d];
            if y_new.iter().any(|v| !v.is_finite()) {
                return Err(OdeFailure::NonFinite {
                    row: r,
                    t: self.t_new[i],
                }
                .into());
            }
            let h = self.h[i];
            for j in 0..d {
                let mut acc = 0.0;
                for (ks, &e) in self.k.iter().zip(&E) {
                    acc += e * ks[i * d + j];
                }
                self.err_vec[j] = h * acc;
            }
            self.err[i] = scaled_error_norm(
                &self.y[r * d..(r + 1) * d],
                y_new,
                &self.err_vec,
                rtol,
                atol,
            );
        }
        if self.opts.stepping == Stepping::Shared {
            let n = self.active.len();
            // NaN counts as the worst error, so that it rejects the shared step.
            let mut worst = 0;
            for i in 1..n {
                if self.err[i].is_nan() || self.err[i] > self.err[worst] {
                    worst = i;
                }
            }
            self.worst_row = self.active[worst];
            let worst_err = self.err[worst];
            self.err[..n].fill(worst_err);
        }
        Ok(())
    }

    /// Accepts or rejects each row's attempt, writes dense output, advances accepted rows and
    /// sets the next step size; fails on step-size underflow or an exhausted step budget.
    fn apply_decisions(&mut self, observe: bool) -> Result<()> {
        let d = self.dim;
        let controller = self.opts.controller;
        // In shared stepping the row with the largest error limits the step: a failure names it.
        let blame = (self.opts.stepping == Stepping::Shared).then_some(self.worst_row);
        for i in 0..self.active.len() {
            let r = self.active[i];
            let decision = controller.decide(self.err[i], &mut self.memory[r]);
            let h = self.h[i];
            if decision.accept {
                if observe {
                    self.record_accepted(i, r);
                }
                self.emit_dense_output(i, r);
                self.y[r * d..(r + 1) * d].copy_from_slice(&self.y_stage[i * d..(i + 1) * d]);
                self.f_now[r * d..(r + 1) * d]
                    .copy_from_slice(&self.k[STAGES - 1][i * d..(i + 1) * d]);
                self.t[r] = self.t_new[i];
                self.stats.accepted[r] += 1;
                self.done[r] = self.t[r] == self.t_end[r];
            } else {
                self.stats.rejected[r] += 1;
            }
            self.h_abs[r] = h.abs() * decision.factor;
            let failed_row = blame.unwrap_or(r);
            if !decision.accept && self.h_abs[r] < self.min_step(r) {
                return Err(OdeFailure::StepUnderflow {
                    row: failed_row,
                    t: self.t[r],
                    h: self.h_abs[r],
                }
                .into());
            }
            if !self.done[r] && self.stats.steps(r) >= self.opts.max_steps {
                return Err(OdeFailure::MaxSteps {
                    row: failed_row,
                    t: self.t[r],
                    max_steps: self.opts.max_steps,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Copies active row i's (caller's row r) accepted step for the observer, before it advances.
    fn record_accepted(&mut self, i: usize, r: usize) {
        let d = self.dim;
        let b = &mut self.accepted_steps;
        b.rows.push(r);
        b.t.push(self.t[r]);
        b.h.push(self.h[i]);
        b.y.extend_from_slice(&self.y[r * d..(r + 1) * d]);
        for (dst, src) in b.k.iter_mut().zip(&self.k) {
            dst.extend_from_slice(&src[i * d..(i + 1) * d]);
        }
    }

    /// Writes row r's output for every t_eval point at its current time (used at t0, and for
    /// rows whose span is empty).
    fn emit_points_at_current(&mut self, r: usize, t: f64) {
        let (d, rows) = (self.dim, self.rows);
        while let Some(&te) = self.opts.t_eval.get(self.next_eval[r]) {
            if self.dir[r] * (te - t) > 0.0 {
                break;
            }
            let k = self.next_eval[r];
            let out = (k * rows + r) * d;
            self.y_eval[out..out + d].copy_from_slice(&self.y[r * d..(r + 1) * d]);
            self.next_eval[r] += 1;
        }
    }

    /// Dense output for the t_eval points inside the accepted step (t, t_new] of active row i
    /// (caller's row r), by Shampine's interpolant; a point at t_new takes y_new exactly.
    fn emit_dense_output(&mut self, i: usize, r: usize) {
        let (d, rows) = (self.dim, self.rows);
        let (t_old, t_new, h, dir) = (self.t[r], self.t_new[i], self.h[i], self.dir[r]);
        while let Some(&te) = self.opts.t_eval.get(self.next_eval[r]) {
            if dir * (te - t_new) > 0.0 {
                break;
            }
            let k = self.next_eval[r];
            let out = (k * rows + r) * d;
            if te == t_new {
                self.y_eval[out..out + d].copy_from_slice(&self.y_stage[i * d..(i + 1) * d]);
            } else {
                let w = dense_weights((te - t_old) / h);
                for j in 0..d {
                    let mut acc = 0.0;
                    for (ks, &ws) in self.k.iter().zip(&w) {
                        acc += ws * ks[i * d + j];
                    }
                    self.y_eval[out + j] = self.y[r * d + j] + h * acc;
                }
            }
            self.next_eval[r] += 1;
        }
    }

    fn finish(self) -> BatchSolution {
        BatchSolution {
            rows: self.rows,
            dim: self.dim,
            y: self.y,
            t_eval: self.opts.t_eval.clone(),
            y_eval: self.y_eval,
            stats: self.stats,
        }
    }
}
