//! What a solve is asked to do: the time span (shared or per row), tolerances, limits, output
//! times and the stepping mode. Validation lives here so the solver itself can assume sane input.

use super::controller::{Controller, IController, PiController};
use crate::error::{Error, Result};

/// The integration interval of each row. t1 < t0 integrates backward in time.
#[derive(Clone, Debug, PartialEq)]
pub enum Span {
    /// Every row from t0 to t1.
    Uniform { t0: f64, t1: f64 },
    /// Row r from t0[r] to t1[r]; rows may differ in length and in direction.
    PerRow { t0: Vec<f64>, t1: Vec<f64> },
}

impl Span {
    pub fn uniform(t0: f64, t1: f64) -> Self {
        Span::Uniform { t0, t1 }
    }

    pub fn per_row(t0: Vec<f64>, t1: Vec<f64>) -> Self {
        Span::PerRow { t0, t1 }
    }

    /// (t0, t1) of row r; `r` must be below the row count checked by `validate`.
    pub(crate) fn row(&self, r: usize) -> (f64, f64) {
        match self {
            Span::Uniform { t0, t1 } => (*t0, *t1),
            Span::PerRow { t0, t1 } => (t0[r], t1[r]),
        }
    }

    /// True when every row has the same (t0, t1).
    fn is_uniform(&self) -> bool {
        match self {
            Span::Uniform { .. } => true,
            Span::PerRow { t0, t1 } => {
                t0.windows(2).all(|w| w[0] == w[1]) && t1.windows(2).all(|w| w[0] == w[1])
            }
        }
    }
}

impl From<(f64, f64)> for Span {
    fn from((t0, t1): (f64, f64)) -> Self {
        Span::Uniform { t0, t1 }
    }
}

/// How step sizes are chosen across the rows of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stepping {
    /// Each row has its own t, h and accept/reject history; a finished row stops costing work.
    #[default]
    PerRow,
    /// The whole batch shares one t and h, and a step is judged by the worst row's error (the
    /// usual way a batched neural ODE is solved, kept for comparison). Needs a uniform span.
    Shared,
}

/// Solver settings. The defaults are scipy's `solve_ivp` defaults (rtol 1e-3, atol 1e-6, its
/// step controller) with a step budget of 10 000 attempts per row.
#[derive(Clone, Debug, PartialEq)]
pub struct OdeOptions {
    pub rtol: f64,
    pub atol: f64,
    /// Most step attempts (accepted + rejected) per row before `OdeFailure::MaxSteps`.
    pub max_steps: usize,
    /// First step magnitude; `None` picks it by Hairer's heuristic (one extra evaluation).
    pub h0: Option<f64>,
    /// Smallest step magnitude allowed when a step is rejected; below it (or below 10 ulp of t,
    /// whichever is larger) the solve fails with `OdeFailure::StepUnderflow`.
    pub h_min: f64,
    /// Largest step magnitude.
    pub h_max: f64,
    /// Times at which the solution is reported by dense output, the same for every row: in the
    /// direction of integration and inside every row's span.
    pub t_eval: Vec<f64>,
    pub stepping: Stepping,
    pub controller: Controller,
}

impl Default for OdeOptions {
    fn default() -> Self {
        OdeOptions {
            rtol: 1e-3,
            atol: 1e-6,
            max_steps: 10_000,
            h0: None,
            h_min: 0.0,
            h_max: f64::INFINITY,
            t_eval: Vec::new(),
            stepping: Stepping::PerRow,
            controller: Controller::default(),
        }
    }
}

impl OdeOptions {
    /// Default options with the given tolerances.
    pub fn with_tolerances(rtol: f64, atol: f64) -> Self {
        OdeOptions {
            rtol,
            atol,
            ..Self::default()
        }
    }

    pub fn t_eval(mut self, t_eval: Vec<f64>) -> Self {
        self.t_eval = t_eval;
        self
    }

    pub fn stepping(mut self, stepping: Stepping) -> Self {
        self.stepping = stepping;
        self
    }

    pub fn max_steps(mut self, max_steps: usize) -> Self {
        self.max_steps = max_steps;
        self
    }

    pub fn h0(mut self, h0: f64) -> Self {
        self.h0 = Some(h0);
        self
    }

    pub fn controller(mut self, controller: Controller) -> Self {
        self.controller = controller;
        self
    }

    /// Checks the settings and the span for `rows` rows.
    pub(crate) fn validate(&self, span: &Span, rows: usize) -> Result<()> {
        let finite_nonneg = |x: f64| x.is_finite() && x >= 0.0;
        if !finite_nonneg(self.rtol) || !finite_nonneg(self.atol) || self.rtol + self.atol <= 0.0 {
            return Err(Error::invalid(format!(
                "ode tolerances must be finite, non-negative and not both zero (rtol {}, atol {})",
                self.rtol, self.atol
            )));
        }
        if self.max_steps == 0 {
            return Err(Error::invalid("ode max_steps must be positive"));
        }
        if let Some(h0) = self.h0
            && !(h0.is_finite() && h0 > 0.0)
        {
            return Err(Error::invalid(format!(
                "ode h0 must be finite and positive, got {h0}"
            )));
        }
        if !finite_nonneg(self.h_min) || self.h_max.is_nan() || self.h_max <= self.h_min {
            return Err(Error::invalid(format!(
                "ode step bounds must satisfy 0 <= h_min < h_max (h_min {}, h_max {})",
                self.h_min, self.h_max
            )));
        }
        validate_controller(&self.controller)?;
        validate_span(span, rows)?;
        if self.stepping == Stepping::Shared && !span.is_uniform() {
            return Err(Error::invalid(
                "shared stepping needs the same (t0, t1) for every row",
            ));
        }
        self.validate_t_eval(span, rows)
    }

    fn validate_t_eval(&self, span: &Span, rows: usize) -> Result<()> {
        if let Some(k) = self.t_eval.iter().position(|t| !t.is_finite()) {
            return Err(Error::invalid(format!("ode t_eval[{k}] is not finite")));
        }
        if self.t_eval.is_empty() {
            return Ok(());
        }
        let check_row = |r: usize| -> Result<()> {
            let (t0, t1) = span.row(r);
            let (lo, hi) = (t0.min(t1), t0.max(t1));
            if let Some(k) = self.t_eval.iter().position(|&t| t < lo || t > hi) {
                return Err(Error::invalid(format!(
                    "ode t_eval[{k}] = {} lies outside row {r}'s span [{t0}, {t1}]",
                    self.t_eval[k]
                )));
            }
            let dir = (t1 - t0).signum();
            if let Some(k) = self
                .t_eval
                .windows(2)
                .position(|w| dir * (w[1] - w[0]) < 0.0)
            {
                return Err(Error::invalid(format!(
                    "ode t_eval must run from t0 towards t1 (t_eval[{k}] = {}, t_eval[{}] = {})",
                    self.t_eval[k],
                    k + 1,
                    self.t_eval[k + 1]
                )));
            }
            Ok(())
        };
        match span {
            Span::Uniform { .. } => check_row(0),
            Span::PerRow { .. } => (0..rows).try_for_each(check_row),
        }
    }
}

fn validate_span(span: &Span, rows: usize) -> Result<()> {
    if let Span::PerRow { t0, t1 } = span
        && (t0.len() != rows || t1.len() != rows)
    {
        return Err(Error::shape(
            "ode span",
            format!("{rows} start and end times"),
            format!("{} and {}", t0.len(), t1.len()),
        ));
    }
    let count = if matches!(span, Span::Uniform { .. }) {
        1
    } else {
        rows
    };
    for r in 0..count {
        let (t0, t1) = span.row(r);
        if !t0.is_finite() || !t1.is_finite() {
            return Err(Error::invalid(format!(
                "ode span of row {r} is not finite: [{t0}, {t1}]"
            )));
        }
    }
    Ok(())
}

fn validate_controller(controller: &Controller) -> Result<()> {
    let (safety, min_factor, max_factor) = match controller {
        Controller::Integral(IController {
            safety,
            min_factor,
            max_factor,
        }) => (*safety, *min_factor, *max_factor),
        Controller::ProportionalIntegral(PiController {
            safety,
            min_factor,
            max_factor,
            alpha,
            beta,
        }) => {
            if !(alpha.is_finite() && *alpha > 0.0 && beta.is_finite() && *beta >= 0.0) {
                return Err(Error::invalid(format!(
                    "PI controller needs alpha > 0 and beta >= 0 (alpha {alpha}, beta {beta})"
                )));
            }
            (*safety, *min_factor, *max_factor)
        }
    };
    // A factor range that cannot shrink after a failure or cannot grow after a success would
    // make the solver loop without progress or never recover.
    let ok = safety > 0.0
        && safety <= 1.0
        && min_factor > 0.0
        && min_factor < 1.0
        && max_factor.is_finite()
        && max_factor > 1.0;
    if !ok {
        return Err(Error::invalid(format!(
            "step controller needs 0 < safety <= 1, 0 < min_factor < 1 < max_factor (got {safety}, {min_factor}, {max_factor})"
        )));
    }
    Ok(())
}
