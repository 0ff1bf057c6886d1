//! The trace estimator of one solve: exact, or Hutchinson's with M probes of a kind drawn from a
//! seed (eq. 18.29–18.30). A row's probes are fixed for the whole solve, forward and backward.

use crate::error::Result;
use crate::ops::rk45::{ProbeKind, TraceSpec, probes};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trace {
    Exact,
    Hutchinson {
        probes: usize,
        kind: ProbeKind,
        seed: u64,
    },
}

impl Trace {
    /// The configured estimator with this solve's seed.
    pub fn from_spec(spec: TraceSpec, seed: u64) -> Self {
        match spec {
            TraceSpec::Exact => Trace::Exact,
            TraceSpec::Hutchinson { probes, probe } => Trace::Hutchinson {
                probes,
                kind: probe,
                seed,
            },
        }
    }

    /// The probes of `rows` rows of dimension `dim` (None for the exact trace).
    pub fn probes(&self, rows: usize, dim: usize) -> Result<Option<Tensor>> {
        match *self {
            Trace::Exact => Ok(None),
            Trace::Hutchinson {
                probes: m,
                kind,
                seed,
            } => probes(rows, dim, m, kind, seed).map(Some),
        }
    }
}
