//! Continuous normalizing flows (Bishop & Bishop, ch. 18.3): a neural ODE dz/dt = f(z, t, w)
//! (eq. 18.22) carrying the base N(0, I) at t = 0 to the data at t = 1, its density by
//! d ln p(z(t))/dt = −Tr(∂f/∂z) (eq. 18.27–18.28) with the exact trace or Hutchinson's
//! estimator (eq. 18.29–18.30), maximum-likelihood gradients by the adjoint method
//! (eq. 18.24–18.26), and flow matching (Lipman et al. 2022).
//!
//! One job per file: [`field`] the vector field and its state, [`trace`] the estimator of a
//! solve, [`integrate`] the seam to the ODE solver, [`density`] the log-density solve,
//! [`adjoint`] the backward solve, [`matching`] the flow-matching loss, [`model`] the CNF, and
//! [`objective`] its training objectives.

pub mod adjoint;
pub mod density;
pub mod field;
pub mod integrate;
pub mod matching;
pub mod model;
pub mod objective;
pub mod scaled;
pub mod trace;

pub use field::{FieldConfig, FieldState, VectorField};
pub use model::{Cnf, CnfConfig, CnfState, Objective, SolverSettings};
pub use scaled::ScaledCnf;
pub use trace::Trace;
