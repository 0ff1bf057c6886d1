//! The stage and step-control ops of a device-resident Dormand–Prince RK45 (the solver of the
//! continuous flows, eq. 18.22), the right-hand sides of the three systems a CNF solves, and the
//! parameter quadrature of the adjoint (eq. 18.26). `ode::device` drives them; a grid backend
//! runs each as one kernel of kernels/rk45.cu, the CPU backend by the reference in
//! `step_cpu.rs`. The host f64 solver (`ode::solver`) stays the accuracy reference.
//!
//! Conventions shared by every op:
//! - a solve holds B rows ("the working set"; rows that finished leave it when it is compacted);
//!   y (B×W) is the state, k_s (B×W) the stage derivatives, t_s (B×1) stage times;
//! - the per-row solver state is a B×[`STATE_COLS`] f32 matrix, columns named in [`col`]: t, the
//!   end time, the direction, the step sizes, the error of the last attempt, step counts, the
//!   controller's memory, a [`RowStatus`], the verdict of the last attempt and the dense-output
//!   cursor. Counts are f32 integers (exact below 2^24, the row and step limits of a solve);
//! - y, t and h are f32 (the field is evaluated in f32); error norms, tolerance scales, the
//!   controller and the starting-step heuristic are computed in f64 from those f32 values and
//!   their step sizes rounded to f32 once. The CPU reference is exactly this arithmetic, calling
//!   `ode::controller` and `ode::initial_step` per row;
//! - an op touches only rows whose status is [`RowStatus::Active`] unless it says otherwise
//!   (rows that finished or failed keep their values);
//! - the smallest step of a row at time t is max(h_min, 10·ulp_f32(t)) (the f32 spacing of t
//!   towards its end; the smallest normal f32 at t = 0): shorter steps no longer move an f32 t.

use crate::backend::Device;
use crate::error::Result;
use crate::nn::mlp::Mlp;
use crate::ode::{Controller, OdeOptions};
use crate::ops::rk45::{DivCotangent, ProbeKind, TraceMode};
use crate::tensor::Shaped;

/// Columns of the per-row solver state.
pub mod col {
    /// The row's current time.
    pub const T: usize = 0;
    pub const T_END: usize = 1;
    /// +1 forward, −1 backward, 0 for an empty span.
    pub const DIR: usize = 2;
    /// Magnitude of the next step (before clamping to the span).
    pub const H_ABS: usize = 3;
    /// Signed step of the current attempt: t_new − t.
    pub const H: usize = 4;
    /// End time of the current attempt.
    pub const T_NEW: usize = 5;
    /// Scaled error norm of the last attempt (in shared stepping: the batch's worst).
    pub const ERR: usize = 6;
    pub const ACCEPTED: usize = 7;
    pub const REJECTED: usize = 8;
    /// Controller memory: the last attempt was rejected (1) or not (0).
    pub const LAST_REJECTED: usize = 9;
    /// Controller memory: error of the last accepted step (PI controller).
    pub const PREV_ERR: usize = 10;
    /// A [`RowStatus`](super::RowStatus) code.
    pub const STATUS: usize = 11;
    /// 1 when the last attempt was accepted, else 0 (the adjoint quadrature's mask).
    pub const VERDICT: usize = 12;
    /// Index of the next dense-output time.
    pub const NEXT_EVAL: usize = 13;
}

/// Columns of the per-row state (64 bytes per row; the last two are spare).
pub const STATE_COLS: usize = 16;

/// Where a row stands, stored as its code in [`col::STATUS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowStatus {
    Active = 0,
    /// Reached its end time.
    Done = 1,
    /// A stage derivative or the new state was NaN or infinite.
    NonFinite = 2,
    /// A rejected step fell below the smallest step.
    Underflow = 3,
    /// Used up its step attempts.
    MaxSteps = 4,
}

impl RowStatus {
    pub fn code(self) -> f32 {
        self as i32 as f32
    }

    pub fn from_code(v: f32) -> Option<Self> {
        Some(match v as i32 {
            0 => RowStatus::Active,
            1 => RowStatus::Done,
            2 => RowStatus::NonFinite,
            3 => RowStatus::Underflow,
            4 => RowStatus::MaxSteps,
            _ => return None,
        })
    }

    pub fn failed(self) -> bool {
        (self as i32) >= 2
    }
}

/// Tolerances, step limits and the controller of a solve (`OdeOptions` without the output
/// times and the stepping mode).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepControl {
    pub rtol: f64,
    pub atol: f64,
    pub h_min: f64,
    pub h_max: f64,
    pub max_steps: usize,
    pub controller: Controller,
}

impl From<&OdeOptions> for StepControl {
    fn from(o: &OdeOptions) -> Self {
        StepControl {
            rtol: o.rtol,
            atol: o.atol,
            h_min: o.h_min,
            h_max: o.h_max,
            max_steps: o.max_steps,
            controller: o.controller,
        }
    }
}

/// Which parts of [`OdeStepOps::ode_step_end`] run: a per-row solve runs all three in one
/// pass; shared stepping shares the error between ERROR and DECIDE, and the adjoint adds its
/// parameter quadrature between DECIDE and UPDATE (UPDATE overwrites the step's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phase(pub u32);

impl Phase {
    /// The scaled error norm into ERR; a non-finite stage derivative, new state or error marks
    /// the row NonFinite. Every row's VERDICT is reset to 0.
    pub const ERROR: Phase = Phase(1);
    /// The controller on ERR: VERDICT, the counts, the next step size and the controller's
    /// memory; Done when an accepted step reached the end, Underflow when a rejected step size
    /// fell below the smallest step, MaxSteps when the attempts ran out.
    pub const DECIDE: Phase = Phase(2);
    /// Rows with VERDICT 1: dense output inside (t, t_new], y ← y_new, k_0 ← k_6 (first same as
    /// last), t ← t_new. Then every active row's next attempt is proposed (as `ode_propose`).
    pub const UPDATE: Phase = Phase(4);
    pub const ALL: Phase = Phase(7);

    pub fn has(self, p: Phase) -> bool {
        self.0 & p.0 == p.0
    }
}

impl std::ops::BitOr for Phase {
    type Output = Phase;
    fn bitor(self, rhs: Phase) -> Phase {
        Phase(self.0 | rhs.0)
    }
}

/// Dense output: `y_eval` ((n·rows_total)×W, row `k·rows_total + id` for time k of the caller's
/// row id) at the times `t_eval` (1×n), with the working set's caller rows in `ids` (B×1).
#[derive(Debug)]
pub struct Dense<'a, M> {
    pub t_eval: &'a M,
    pub y_eval: &'a mut M,
    pub ids: &'a M,
    pub rows_total: usize,
}

/// The controller state of `rows` rows must be rows × [`STATE_COLS`]: one check for every
/// backend's step ops.
pub(crate) fn check_state<M: Shaped>(op: &'static str, state: &M, rows: usize) -> Result<()> {
    state.expect_shape(op, rows, STATE_COLS)
}

/// The dense-output arguments of a working set of `rows` rows of width `width`.
pub(crate) fn check_dense<M: Shaped>(
    op: &'static str,
    d: &Dense<'_, M>,
    rows: usize,
    width: usize,
) -> Result<()> {
    let n = d.t_eval.cols();
    d.t_eval.expect_shape(op, 1, n)?;
    d.y_eval.expect_shape(op, n * d.rows_total, width)?;
    d.ids.expect_shape(op, rows, 1)
}

/// The shapes `ode_step_end` takes, checked against y (B×W); returns (B, W).
pub(crate) fn check_step_end<M: Shaped>(
    y: &M,
    k0: &M,
    ks: &[&M],
    y_new: &M,
    state: &M,
    dense: Option<&Dense<'_, M>>,
) -> Result<(usize, usize)> {
    let op = "ode_step_end";
    let (rows, width) = y.shape();
    k0.expect_shape(op, rows, width)?;
    y_new.expect_shape(op, rows, width)?;
    for k in ks {
        k.expect_shape(op, rows, width)?;
    }
    check_state(op, state, rows)?;
    if let Some(d) = dense {
        check_dense(op, d, rows, width)?;
    }
    Ok((rows, width))
}

/// A batch reduction of a state column over the active rows, written back to each of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareMode {
    /// The smallest (shared starting step).
    Min,
    /// The largest, NaN counting as the largest (shared error: the worst row decides).
    Max,
}

/// What a solve reads back each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OdeSummary {
    pub active: usize,
    pub failed: usize,
    /// The first failed row of the working set.
    pub first_failed: Option<usize>,
}

/// The right-hand sides of the systems a CNF solves, for a field f(z, t) with z of width D.
#[derive(Debug)]
pub enum OdeSystem<'a, M> {
    /// y = z (W = D): y' = f(z, t).
    Field,
    /// y = [z, L] (W = D + 1): y' = [f, −div] (eq. 18.28).
    FieldDiv(TraceMode<'a, M>),
    /// y = [z, a] (W = 2D): y' = [f, −(aᵀ ∂f/∂z − a_div·∂div/∂z)] (eq. 18.25), the divergence
    /// term when given.
    Adjoint(Option<DivCotangent<'a, M>>),
}

impl<M> Clone for OdeSystem<'_, M> {
    fn clone(&self) -> Self {
        match self {
            OdeSystem::Field => OdeSystem::Field,
            OdeSystem::FieldDiv(t) => OdeSystem::FieldDiv(*t),
            OdeSystem::Adjoint(d) => OdeSystem::Adjoint(*d),
        }
    }
}

impl<M> OdeSystem<'_, M> {
    /// The state width W for a field of dimension `dim`.
    pub fn width(&self, dim: usize) -> usize {
        match self {
            OdeSystem::Field => dim,
            OdeSystem::FieldDiv(_) => dim + 1,
            OdeSystem::Adjoint(_) => 2 * dim,
        }
    }
}

/// The ops of a device-resident RK45; see the module documentation for the conventions.
/// Shapes are checked; values inside the working set are trusted (the kernels never index
/// memory with them), and non-finite values are caught by the ERROR phase as row failures.
pub trait OdeStepOps: Device {
    /// The running sum of a parameter quadrature (f64 where the backend can).
    type ParamAcc: Send;

    /// True where a CNF should solve with the device-resident driver (`ode::device`) rather
    /// than the host solver: the grid backends, for which the host solver would copy the
    /// active rows to and from the device at every evaluation.
    fn device_resident_ode(&self) -> bool {
        false
    }

    /// The probes of [`TraceMode::Generated`] as a `rows`×(m·dim) matrix (the device's own
    /// generator on a grid device): bit for bit [`generated_probes`](super::generated_probes).
    #[allow(clippy::too_many_arguments)]
    fn generate_probes(
        &self,
        rows: usize,
        dim: usize,
        m: usize,
        kind: ProbeKind,
        seed: u64,
        ids: Option<&Self::Mat>,
    ) -> Result<Self::Mat>;

    /// k = the right-hand side of `system` at (y, t), B×W. Inputs are not searched for
    /// non-finite values (the step's ERROR phase is).
    ///
    /// Errors: the field's shape, y not B×W or t not B×1, the system's data of the wrong shape,
    /// a divergence term with ReLU in the adjoint.
    fn ode_rhs(
        &self,
        net: &Mlp<Self::Mat>,
        y: &Self::Mat,
        t: &Self::Mat,
        system: OdeSystem<'_, Self::Mat>,
    ) -> Result<Self::Mat>;

    /// A fresh state from each row's span t0 → t1 (B×1 each): t = t0, direction, status Done
    /// for an empty span, the controller memory reset, and H_ABS = `h0` when given (else 0,
    /// to be set by the starting-step ops).
    fn ode_init_state(&self, t0: &Self::Mat, t1: &Self::Mat, h0: Option<f64>) -> Result<Self::Mat>;

    /// The first half of Hairer's starting step (`initial_step::first_guess`) per active row:
    /// H_ABS = h0, and the probe point (y0 + h0·dir·f0, t + h0·dir) returned as (y, t). A
    /// non-finite f0 marks the row NonFinite.
    fn ode_initial_probe(
        &self,
        y0: &Self::Mat,
        f0: &Self::Mat,
        state: &mut Self::Mat,
        ctl: &StepControl,
    ) -> Result<(Self::Mat, Self::Mat)>;

    /// The second half (`initial_step::refine`) from the probe's derivative f1: H_ABS = h1.
    /// A non-finite f1 marks the row NonFinite.
    fn ode_initial_refine(
        &self,
        y0: &Self::Mat,
        f0: &Self::Mat,
        f1: &Self::Mat,
        state: &mut Self::Mat,
        ctl: &StepControl,
    ) -> Result<()>;

    /// Column `column` of every active row set to its min or max over the active rows.
    fn ode_share(&self, state: &mut Self::Mat, column: usize, mode: ShareMode) -> Result<()>;

    /// The next attempt of every active row (the solver's `propose_steps`):
    /// |h| = min(H_ABS, h_max), raised to the smallest step unless the last attempt was
    /// rejected; t_new = t + |h|·dir clamped to the end; H = t_new − t.
    fn ode_propose(&self, state: &mut Self::Mat, ctl: &StepControl) -> Result<()>;

    /// Stage s of the step: (y_s, t_s) with y_s = y + H·Σ_{j<s} A[s][j]·k_j (f32, j in order)
    /// and t_s = t + C[s]·H (T_NEW where C[s] = 1); `k` holds k_0 … k_{s−1}. Stage 0 is
    /// (y, t). Every row of the working set is computed (finished rows keep finite values).
    fn ode_stage(
        &self,
        y: &Self::Mat,
        k: &[&Self::Mat],
        state: &Self::Mat,
        stage: usize,
    ) -> Result<(Self::Mat, Self::Mat)>;

    /// The end of a step attempt (see [`Phase`]): the 5th-order y_new = y_6 (the last stage's
    /// input), the embedded error h·Σ E_s k_s in the RMS norm with the scale
    /// atol + rtol·max(|y|, |y_new|), the controller, and the update with dense output.
    /// `ks` = k_1 … k_6; k_0 is updated in place.
    #[allow(clippy::too_many_arguments)]
    fn ode_step_end(
        &self,
        phase: Phase,
        y: &mut Self::Mat,
        k0: &mut Self::Mat,
        ks: [&Self::Mat; 6],
        y_new: &Self::Mat,
        state: &mut Self::Mat,
        ctl: &StepControl,
        dense: Option<Dense<'_, Self::Mat>>,
    ) -> Result<()>;

    /// Dense output of the points at or before each row's start (the solver's output at t0).
    fn ode_dense_start(
        &self,
        y: &Self::Mat,
        state: &mut Self::Mat,
        dense: Dense<'_, Self::Mat>,
    ) -> Result<()>;

    /// Counts of active and failed rows, and the first failed row.
    fn ode_summary(&self, state: &Self::Mat) -> Result<OdeSummary>;

    /// The working-set indices of the active rows in order; `count` is their number (from
    /// [`ode_summary`](Self::ode_summary)). For `gather_rows`.
    fn ode_active_rows(&self, state: &Self::Mat, count: usize) -> Result<Self::Idx>;

    /// Every row that is not active copied to row `ids[r]` of `out_y` and `out_state` (the
    /// results of the whole batch).
    fn ode_retire(
        &self,
        y: &Self::Mat,
        state: &Self::Mat,
        ids: &Self::Mat,
        out_y: &mut Self::Mat,
        out_state: &mut Self::Mat,
    ) -> Result<()>;

    /// A zero parameter quadrature for `net`.
    fn ode_quad_new(&self, net: &Mlp<Self::Mat>) -> Result<Self::ParamAcc>;

    /// Adds one stage of the adjoint's parameter quadrature: with y_s = [z, a] (B×2D) at t_s,
    /// Σ_r w_r·(a_rᵀ ∂f/∂w − a_div,r·∂div_r/∂w) where w_r = VERDICT_r·H_r·`factor` (rows whose
    /// last attempt was rejected, or that were not active, add nothing).
    #[allow(clippy::too_many_arguments)]
    fn ode_quad_add(
        &self,
        acc: &mut Self::ParamAcc,
        net: &Mlp<Self::Mat>,
        y_s: &Self::Mat,
        t_s: &Self::Mat,
        state: &Self::Mat,
        factor: f64,
        div: Option<DivCotangent<'_, Self::Mat>>,
    ) -> Result<()>;

    /// The sums, in the MLP's structure.
    fn ode_quad_finish(&self, acc: Self::ParamAcc, net: &Mlp<Self::Mat>) -> Result<Mlp<Self::Mat>>;
}
