//! The continuous normalizing flow: a vector field, the base N(0, I) at t = 0 and the data at
//! t = 1. Sampling integrates a base draw from 0 to 1; the density integrates x from 1 back to
//! 0 with its divergence (see [`super::density`] for the signs). Every solve reports its work.

use serde::{Deserialize, Serialize};

use super::density::{Density, check_batch, density};
use super::field::{FieldConfig, FieldState, VectorField};
use super::integrate::solve_field;
use super::trace::Trace;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ode::{OdeOptions, SolveStats, Stepping};
use crate::ops::rk45::{ProbeKind, TraceSpec};
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};

/// Tolerances and limits of every solve of a CNF.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SolverSettings {
    pub rtol: f64,
    pub atol: f64,
    /// Step attempts per row before the solve fails.
    pub max_steps: usize,
    /// One step size for the whole batch instead of one per row.
    pub shared_steps: bool,
}

impl Default for SolverSettings {
    fn default() -> Self {
        SolverSettings {
            rtol: 1e-5,
            atol: 1e-5,
            max_steps: 10_000,
            shared_steps: false,
        }
    }
}

impl SolverSettings {
    pub fn options(&self) -> OdeOptions {
        OdeOptions::with_tolerances(self.rtol, self.atol)
            .max_steps(self.max_steps)
            .stepping(if self.shared_steps {
                Stepping::Shared
            } else {
                Stepping::PerRow
            })
    }
}

/// What training minimises.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Objective {
    /// The negative log-likelihood, its gradient by the adjoint method (FFJORD). Hutchinson
    /// probes are drawn afresh for every step.
    Mle { trace: TraceSpec },
    /// Conditional flow matching on the optimal-transport path (no ODE solve in training).
    FlowMatching { sigma_min: f32 },
}

impl Default for Objective {
    fn default() -> Self {
        Objective::FlowMatching { sigma_min: 1e-4 }
    }
}

/// Everything about a CNF but its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CnfConfig {
    pub field: FieldConfig,
    pub solver: SolverSettings,
    pub objective: Objective,
    /// The estimator of `log_prob` and `nll` (exact by default, so that a held-out NLL means
    /// the same as for a discrete flow).
    pub eval_trace: TraceSpec,
    /// Seed of the evaluation probes when `eval_trace` is Hutchinson's.
    pub eval_seed: u64,
}

impl CnfConfig {
    /// A field D+1 → hidden… → D with the default solver (rtol = atol = 1e-5, per-row steps),
    /// flow-matching training and exact-trace evaluation.
    pub fn new(dim: usize, hidden: &[usize], act: crate::nn::mlp::Activation) -> Self {
        CnfConfig {
            field: FieldConfig {
                dim,
                hidden: hidden.to_vec(),
                act,
            },
            solver: SolverSettings::default(),
            objective: Objective::default(),
            eval_trace: TraceSpec::Exact,
            eval_seed: 0,
        }
    }
}

/// A CNF moved to the host: its config and its field's tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct CnfState {
    pub config: CnfConfig,
    pub tensors: Vec<(String, Tensor)>,
}

pub struct Cnf<B: Backend> {
    field: VectorField<B>,
    pub solver: SolverSettings,
    pub objective: Objective,
    pub eval_trace: TraceSpec,
    pub eval_seed: u64,
}

fn check_trace_spec(spec: TraceSpec) -> Result<()> {
    if let TraceSpec::Hutchinson { probes: 0, .. } = spec {
        return Err(Error::invalid(
            "Hutchinson's estimator needs at least one probe",
        ));
    }
    Ok(())
}

impl<B: Backend> Cnf<B> {
    /// A freshly initialised CNF.
    pub fn new(b: &B, config: CnfConfig, rng: &mut Rng) -> Result<Self> {
        let field = VectorField::new(b, config.field.clone(), rng)?;
        Self::with_field(field, &config)
    }

    /// A CNF around an existing field; the field's own config wins over `config.field`.
    pub fn with_field(field: VectorField<B>, config: &CnfConfig) -> Result<Self> {
        check_trace_spec(config.eval_trace)?;
        match config.objective {
            Objective::Mle { trace } => {
                check_trace_spec(trace)?;
                crate::ops::rk45::needs_second_derivative("Cnf (maximum likelihood)", field.act())?;
            }
            Objective::FlowMatching { sigma_min } => super::matching::check_sigma_min(sigma_min)?,
        }
        Ok(Cnf {
            field,
            solver: config.solver,
            objective: config.objective,
            eval_trace: config.eval_trace,
            eval_seed: config.eval_seed,
        })
    }

    pub fn from_state(b: &B, state: &CnfState) -> Result<Self> {
        let field = VectorField::from_state(
            b,
            &FieldState {
                config: state.config.field.clone(),
                tensors: state.tensors.clone(),
            },
        )?;
        Self::with_field(field, &state.config)
    }

    pub fn state(&self, b: &B) -> Result<CnfState> {
        let field = self.field.state(b)?;
        Ok(CnfState {
            config: self.config(),
            tensors: field.tensors,
        })
    }

    pub fn config(&self) -> CnfConfig {
        CnfConfig {
            field: self.field.config().clone(),
            solver: self.solver,
            objective: self.objective,
            eval_trace: self.eval_trace,
            eval_seed: self.eval_seed,
        }
    }

    pub fn field(&self) -> &VectorField<B> {
        &self.field
    }

    pub fn field_mut(&mut self) -> &mut VectorField<B> {
        &mut self.field
    }

    pub fn dim(&self) -> usize {
        self.field.dim()
    }

    /// The trace estimator used by `log_prob` and `nll`.
    pub fn eval_trace(&self) -> Trace {
        Trace::from_spec(self.eval_trace, self.eval_seed)
    }

    /// log p(x) per row (B×1) with the evaluation trace, and the solve's work.
    pub fn log_prob(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, SolveStats)> {
        self.log_prob_with(b, x, self.eval_trace())
    }

    /// log p(x) per row (B×1) with the given trace estimator.
    pub fn log_prob_with(&self, b: &B, x: &B::Mat, trace: Trace) -> Result<(B::Mat, SolveStats)> {
        let d = self.density(b, &b.download(x)?, trace)?;
        let lp = Tensor::from_vec(
            d.log_prob.len(),
            1,
            d.log_prob.iter().map(|&v| v as f32).collect(),
        )?;
        Ok((b.upload(&lp)?, d.stats))
    }

    /// The whole density solve on the host: z(0), ∫ div, log p (f64) and the work.
    pub fn density(&self, b: &B, x: &Tensor, trace: Trace) -> Result<Density> {
        if let Trace::Hutchinson { probes: 0, .. } = trace {
            return Err(Error::invalid(
                "Hutchinson's estimator needs at least one probe",
            ));
        }
        let probes = trace.probes(x.rows().max(1), self.dim())?;
        density(b, &self.field, x, &self.solver.options(), probes.as_ref())
    }

    /// Mean negative log-likelihood of a batch with the evaluation trace, nats per sample.
    pub fn nll(&self, b: &B, x: &B::Mat) -> Result<f64> {
        let d = self.density(b, &b.download(x)?, self.eval_trace())?;
        let nll = -d.log_prob.iter().sum::<f64>() / d.log_prob.len() as f64;
        if !nll.is_finite() {
            return Err(Error::NonFinite {
                what: "negative log-likelihood".into(),
                row: 0,
                col: 0,
            });
        }
        Ok(nll)
    }

    fn map(
        &self,
        b: &B,
        input: &B::Mat,
        span: (f64, f64),
        op: &'static str,
    ) -> Result<(B::Mat, SolveStats)> {
        let host = b.download(input)?;
        check_batch(op, &host, self.dim())?;
        let sol = solve_field(b, self.field.net(), &host, span, &self.solver.options())?;
        let out = Tensor::from_vec(
            host.rows(),
            self.dim(),
            sol.y.iter().map(|&v| v as f32).collect(),
        )?;
        Ok((b.upload(&out)?, sol.stats))
    }

    /// The flow map z -> x: integrates dz/dt = f from t = 0 to 1.
    pub fn forward(&self, b: &B, z: &B::Mat) -> Result<(B::Mat, SolveStats)> {
        self.map(b, z, (0.0, 1.0), "Cnf::forward")
    }

    /// The inverse map x -> z: integrates from t = 1 to 0.
    pub fn inverse(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, SolveStats)> {
        self.map(b, x, (1.0, 0.0), "Cnf::inverse")
    }

    /// `n` samples: base draws from `rng` pushed from t = 0 to 1.
    pub fn sample(&self, b: &B, n: usize, rng: &mut Rng) -> Result<B::Mat> {
        let z = b.upload(&Tensor::randn(n, self.dim(), rng))?;
        Ok(self.forward(b, &z)?.0)
    }

    /// `n` base draws and their states at each of `times` (increasing, within [0, 1]) by dense
    /// output, for figures in the style of Fig. 18.6: one n×D tensor per time.
    pub fn sample_with_trajectories(
        &self,
        b: &B,
        n: usize,
        times: &[f64],
        rng: &mut Rng,
    ) -> Result<(Vec<Tensor>, SolveStats)> {
        if times.is_empty() {
            return Err(Error::Empty("trajectory times".into()));
        }
        if n == 0 {
            return Err(Error::Empty(
                "Cnf::sample_with_trajectories: zero samples".into(),
            ));
        }
        let z = Tensor::randn(n, self.dim(), rng);
        let opts = self.solver.options().t_eval(times.to_vec());
        let sol = solve_field(b, self.field.net(), &z, (0.0, 1.0), &opts)?;
        let states = (0..times.len())
            .map(|k| {
                Tensor::from_vec(
                    n,
                    self.dim(),
                    sol.eval_at(k).iter().map(|&v| v as f32).collect(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((states, sol.stats))
    }

    pub fn params(&self) -> Vec<&B::Mat> {
        self.field.params()
    }

    pub fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        self.field.params_mut()
    }
}

/// A convenience for configs: Hutchinson's estimator with `probes` Rademacher probes.
pub fn rademacher(probes: usize) -> TraceSpec {
    TraceSpec::Hutchinson {
        probes,
        probe: ProbeKind::Rademacher,
    }
}
