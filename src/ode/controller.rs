//! Error norm and step-size control, written as pure per-row scalar functions so that a GPU
//! kernel's CPU reference can call exactly this code for each row.
//!
//! The controllers follow Hairer, Nørsett & Wanner (*Solving ODEs I*, §II.4) with scipy's
//! constants (safety 0.9, factor in [0.2, 10]); the PI variant is Gustafsson/Söderlind's
//! (the "Lund stabilisation" of Hairer's DOPRI5 code, and diffrax's `PIDController` with d = 0).

use super::tableau::ERROR_ORDER;

/// RMS norm of the local error scaled by the mixed tolerance:
/// sc_i = atol + rtol·max(|y0_i|, |y1_i|), err = sqrt(mean((e_i / sc_i)²)).
/// `y0`, `y1` are the row's state before and after the step, `e` its error estimate.
/// A step is acceptable when the result is at most 1.
pub fn scaled_error_norm(y0: &[f64], y1: &[f64], e: &[f64], rtol: f64, atol: f64) -> f64 {
    debug_assert!(y0.len() == y1.len() && y0.len() == e.len());
    if e.is_empty() {
        return 0.0;
    }
    let mut sum = 0.0;
    for ((&a, &b), &ei) in y0.iter().zip(y1).zip(e) {
        let sc = tolerance_scale(a.abs().max(b.abs()), rtol, atol);
        let r = ei / sc;
        sum += r * r;
    }
    (sum / e.len() as f64).sqrt()
}

/// atol + rtol·|y|, kept strictly positive so that a pure relative tolerance (atol = 0) at
/// y = 0 does not divide by zero.
pub fn tolerance_scale(abs_y: f64, rtol: f64, atol: f64) -> f64 {
    (atol + rtol * abs_y).max(f64::MIN_POSITIVE)
}

/// What a controller remembers about one row between step attempts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepMemory {
    /// The last attempt was rejected: the next accepted step must not grow h (a step that just
    /// failed is evidence that the error model is optimistic here).
    pub last_rejected: bool,
    /// Error norm of the last accepted step (used by the PI controller), floored at 1e-4.
    pub prev_err: f64,
}

impl Default for StepMemory {
    fn default() -> Self {
        StepMemory {
            last_rejected: false,
            prev_err: 1.0,
        }
    }
}

/// The verdict on one attempted step: accept it or not, and the factor for the next h.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepDecision {
    pub accept: bool,
    /// h_next = |h|·factor.
    pub factor: f64,
}

/// A step-size controller: from a step's scaled error norm (accept iff err ≤ 1) and the row's
/// memory, decide acceptance and the next step size. Pure and per row.
pub trait StepController {
    fn decide(&self, err: f64, memory: &mut StepMemory) -> StepDecision;
}

/// Exponent of the elementary controller for an embedded estimator of order 4: the local error
/// of the estimator scales as h^5, so h·err^(−1/5) equalises it with the tolerance.
const ERROR_EXPONENT: f64 = 1.0 / (ERROR_ORDER as f64 + 1.0);

/// The elementary ("integral") controller: h_new = h·clamp(safety·err^(−1/5), min, max),
/// with no growth on the step right after a rejection. scipy's RK45 uses exactly this.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IController {
    pub safety: f64,
    pub min_factor: f64,
    pub max_factor: f64,
}

impl Default for IController {
    /// scipy's constants.
    fn default() -> Self {
        IController {
            safety: 0.9,
            min_factor: 0.2,
            max_factor: 10.0,
        }
    }
}

impl StepController for IController {
    fn decide(&self, err: f64, memory: &mut StepMemory) -> StepDecision {
        if err <= 1.0 {
            let mut factor = if err == 0.0 {
                self.max_factor
            } else {
                (self.safety * err.powf(-ERROR_EXPONENT)).min(self.max_factor)
            };
            if memory.last_rejected {
                factor = factor.min(1.0);
            }
            memory.last_rejected = false;
            memory.prev_err = err.max(PREV_ERR_FLOOR);
            StepDecision {
                accept: true,
                factor,
            }
        } else {
            memory.last_rejected = true;
            StepDecision {
                accept: false,
                factor: reject_factor(err, ERROR_EXPONENT, self.safety, self.min_factor),
            }
        }
    }
}

/// Floor of the remembered error: keeps err_prev^β bounded after an exact step.
const PREV_ERR_FLOOR: f64 = 1e-4;

/// Shrink factor after a rejection. A non-finite error (overflow in the estimate) shrinks by
/// the most allowed instead of propagating NaN into h. (max/min rather than `clamp`, which
/// panics on inverted bounds: these functions must not panic whatever the parameters.)
fn reject_factor(err: f64, alpha: f64, safety: f64, min_factor: f64) -> f64 {
    if err.is_finite() {
        (safety * err.powf(-alpha)).max(min_factor).min(1.0)
    } else {
        min_factor
    }
}

/// Proportional–integral controller: h_new = h·clamp(safety·err^(−α)·err_prev^(β), min, max),
/// where err_prev is the error of the last accepted step. Remembering the last error damps the
/// oscillation of h that the elementary controller shows when stability, not accuracy, limits
/// the step. Defaults are Hairer's DOPRI5 values β = 0.04, α = 1/5 − 0.75·β.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PiController {
    pub safety: f64,
    pub min_factor: f64,
    pub max_factor: f64,
    pub alpha: f64,
    pub beta: f64,
}

impl Default for PiController {
    fn default() -> Self {
        let beta = 0.04;
        PiController {
            safety: 0.9,
            min_factor: 0.2,
            max_factor: 10.0,
            alpha: ERROR_EXPONENT - 0.75 * beta,
            beta,
        }
    }
}

impl StepController for PiController {
    fn decide(&self, err: f64, memory: &mut StepMemory) -> StepDecision {
        if err <= 1.0 {
            let err_floor = err.max(PREV_ERR_FLOOR);
            let mut factor =
                (self.safety * err_floor.powf(-self.alpha) * memory.prev_err.powf(self.beta))
                    .max(self.min_factor)
                    .min(self.max_factor);
            if memory.last_rejected {
                factor = factor.min(1.0);
            }
            memory.last_rejected = false;
            memory.prev_err = err_floor;
            StepDecision {
                accept: true,
                factor,
            }
        } else {
            memory.last_rejected = true;
            StepDecision {
                accept: false,
                factor: reject_factor(err, self.alpha, self.safety, self.min_factor),
            }
        }
    }
}

/// The controllers the solver can be configured with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Controller {
    Integral(IController),
    ProportionalIntegral(PiController),
}

impl Default for Controller {
    fn default() -> Self {
        Controller::Integral(IController::default())
    }
}

impl StepController for Controller {
    fn decide(&self, err: f64, memory: &mut StepMemory) -> StepDecision {
        match self {
            Controller::Integral(c) => c.decide(err, memory),
            Controller::ProportionalIntegral(c) => c.decide(err, memory),
        }
    }
}
