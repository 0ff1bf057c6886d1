//! The single-system convenience API, in the manner of scipy's `solve_ivp`: one state vector,
//! a closure f(t, y, dy), and the solution at t1 and at the requested times.

use super::options::OdeOptions;
use super::solver::solve_batch;
use crate::error::Result;

/// The solution of one initial value problem.
#[derive(Clone, Debug, PartialEq)]
pub struct IvpSolution {
    /// The end time t1.
    pub t: f64,
    /// y(t1).
    pub y: Vec<f64>,
    pub t_eval: Vec<f64>,
    /// y(t_eval[k]) for each k.
    pub y_eval: Vec<Vec<f64>>,
    /// Vector-field evaluations (as scipy's `nfev`).
    pub nfe: usize,
    pub accepted: usize,
    pub rejected: usize,
}

/// Solves dy/dt = f(t, y), y(t0) = y0 from t0 to t1 (t1 < t0 integrates backward).
pub fn solve_ivp<F>(
    mut f: F,
    t0: f64,
    t1: f64,
    y0: &[f64],
    opts: &OdeOptions,
) -> Result<IvpSolution>
where
    F: FnMut(f64, &[f64], &mut [f64]) -> Result<()>,
{
    let sol = solve_batch(|t, y, dy| f(t[0], y, dy), y0, y0.len(), (t0, t1), opts)?;
    let y_eval = (0..sol.t_eval.len())
        .map(|k| sol.eval_row(k, 0).to_vec())
        .collect();
    Ok(IvpSolution {
        t: t1,
        y: sol.y,
        t_eval: sol.t_eval,
        y_eval,
        nfe: sol.stats.nfe[0],
        accepted: sol.stats.accepted[0],
        rejected: sol.stats.rejected[0],
    })
}
