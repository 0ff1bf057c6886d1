//! Adaptive Dormand–Prince RK45 for batches of ODEs (the solver behind the continuous flows of
//! eq. 18.22), built like diffrax from separate pieces: the tableau, a step-size controller and
//! the solver loop; the adjoint method (eq. 18.24–18.26) drives the same solver backward in time.
//!
//! - [`solve_batch`] / [`solve_batch_rows`]: B rows × D in f64, each row with its own t and h
//!   (or one shared h with [`Stepping::Shared`]), closures called on the active rows only.
//! - [`solve_ivp`]: one system, `Vec<f64>` in and out.
//! - [`controller`], [`initial_step`], [`tableau`]: pure per-row functions, reusable as the CPU
//!   reference of a GPU kernel.

pub mod controller;
pub mod device;
pub mod initial_step;
mod ivp;
mod options;
mod solution;
mod solver;
pub mod tableau;

pub use controller::{
    Controller, IController, PiController, StepController, StepDecision, StepMemory,
    scaled_error_norm,
};
pub use ivp::{IvpSolution, solve_ivp};
pub use options::{OdeOptions, Span, Stepping};
pub use solution::{BatchSolution, SolveStats};
pub use solver::{
    AcceptedSteps, StepObserver, solve_batch, solve_batch_rows, solve_batch_rows_observed,
};
