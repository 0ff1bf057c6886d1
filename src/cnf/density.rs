//! The log-density of a continuous flow by integrating the data back to the base (eq. 18.28):
//! with the base N(0, I) at t = 0 and the data at t = 1, solve d(z, L)/dt = (f, −div) from
//! (x, 0) at t = 1 to t = 0. Then L(0) = ∫₀¹ Tr(∂f/∂z) dt and
//!
//!   log p(x) = log N(z(0); 0, I) − L(0) = log N(z(0); 0, I) − ∫₀¹ Tr(∂f/∂z(z(t), t)) dt.

use super::field::VectorField;
use super::integrate::solve_field_div;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ode::{OdeOptions, SolveStats};
use crate::ops::logdet::HALF_LOG_2PI;
use crate::tensor::{Shaped, Tensor};

/// The result of a density solve, on the host.
#[derive(Clone, Debug)]
pub struct Density {
    /// z(0), B×D.
    pub z: Tensor,
    /// L(0) = ∫₀¹ div dt per row (f64).
    pub integral: Vec<f64>,
    /// log p(x) per row (f64).
    pub log_prob: Vec<f64>,
    pub stats: SolveStats,
}

/// log N(z; 0, I) in f64.
pub fn base_log_prob(z: &[f64]) -> f64 {
    let sq: f64 = z.iter().map(|&v| v * v).sum();
    -0.5 * sq - z.len() as f64 * HALF_LOG_2PI
}

/// Checks a user batch: B×D with B > 0 and finite entries.
pub fn check_batch(op: &'static str, x: &Tensor, dim: usize) -> Result<()> {
    if x.rows() == 0 {
        return Err(Error::Empty(format!("{op}: a batch of zero rows")));
    }
    x.expect_shape(op, x.rows(), dim)?;
    x.check_finite(op)
}

/// Integrates x (B×D, host) from t = 1 to t = 0 with its divergence; `probes` selects
/// Hutchinson's estimator.
pub fn density<B: Backend>(
    b: &B,
    field: &VectorField<B>,
    x: &Tensor,
    opts: &OdeOptions,
    probes: Option<&Tensor>,
) -> Result<Density> {
    let dim = field.dim();
    check_batch("Cnf::log_prob", x, dim)?;
    let sol = solve_field_div(b, field.net(), x, (1.0, 0.0), opts, probes)?;
    let width = dim + 1;
    let mut z = Vec::with_capacity(x.rows() * dim);
    let mut integral = Vec::with_capacity(x.rows());
    let mut log_prob = Vec::with_capacity(x.rows());
    for row in sol.y.chunks_exact(width) {
        let l = row[dim];
        log_prob.push(base_log_prob(&row[..dim]) - l);
        integral.push(l);
        z.extend(row[..dim].iter().map(|&v| v as f32));
    }
    Ok(Density {
        z: Tensor::from_vec(x.rows(), dim, z)?,
        integral,
        log_prob,
        stats: sol.stats,
    })
}
