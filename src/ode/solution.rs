//! What a solve returns: final states, dense output at the requested times, and the work done.

/// Work counters of one solve. Row counters are indexed by the caller's row order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SolveStats {
    /// Vector-field evaluations of each row (the initial evaluation and the starting-step probe
    /// included), as scipy counts `nfev`.
    pub nfe: Vec<usize>,
    pub accepted: Vec<usize>,
    pub rejected: Vec<usize>,
    /// Calls of the vector-field closure.
    pub closure_calls: usize,
    /// Rows passed to the closure, summed over calls (= the sum of `nfe`): the real work.
    pub row_evaluations: usize,
}

impl SolveStats {
    pub(crate) fn new(rows: usize) -> Self {
        SolveStats {
            nfe: vec![0; rows],
            accepted: vec![0; rows],
            rejected: vec![0; rows],
            closure_calls: 0,
            row_evaluations: 0,
        }
    }

    /// Step attempts (accepted + rejected) of row r.
    pub fn steps(&self, row: usize) -> usize {
        self.accepted[row] + self.rejected[row]
    }

    /// The most evaluations any row needed.
    pub fn max_nfe(&self) -> usize {
        self.nfe.iter().copied().max().unwrap_or(0)
    }
}

/// The result of a batched solve. States are row-major, rows × dim.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSolution {
    pub rows: usize,
    pub dim: usize,
    /// The state of each row at its end time t1.
    pub y: Vec<f64>,
    /// The requested output times (a copy of `OdeOptions::t_eval`).
    pub t_eval: Vec<f64>,
    /// Dense output, t_eval.len() × rows × dim: `y_eval[(k·rows + r)·dim + j]` is component j
    /// of row r at t_eval[k].
    pub y_eval: Vec<f64>,
    pub stats: SolveStats,
}

impl BatchSolution {
    /// Final state of row r.
    pub fn final_row(&self, row: usize) -> &[f64] {
        &self.y[row * self.dim..(row + 1) * self.dim]
    }

    /// State of row r at t_eval[k].
    pub fn eval_row(&self, k: usize, row: usize) -> &[f64] {
        let start = (k * self.rows + row) * self.dim;
        &self.y_eval[start..start + self.dim]
    }

    /// All rows at t_eval[k] (rows × dim).
    pub fn eval_at(&self, k: usize) -> &[f64] {
        let len = self.rows * self.dim;
        &self.y_eval[k * len..(k + 1) * len]
    }
}
