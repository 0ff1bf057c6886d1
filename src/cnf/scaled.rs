//! A CNF trained in standardised coordinates, with the fixed affine map that carries it to the
//! data's own units. Log-densities come back in data units: log p(x) = log p_u(u) + log|det ∂u/∂x|
//! with u = (x − mean)/std, the change of variables of eq. 18.1.

use super::model::Cnf;
use crate::backend::Backend;
use crate::error::Result;
use crate::flows::FlowLayer;
use crate::flows::actnorm::ActNorm;
use crate::ode::SolveStats;
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};
use crate::train::trainer::Trainable;

pub struct ScaledCnf<B: Backend> {
    pub cnf: Cnf<B>,
    /// Standardised -> data units (forward), data -> standardised (inverse); None: identity.
    pub scale: Option<ActNorm<B>>,
}

impl<B: Backend> ScaledCnf<B> {
    pub fn new(cnf: Cnf<B>, scale: Option<ActNorm<B>>) -> Self {
        ScaledCnf { cnf, scale }
    }

    /// x in data units -> (u in the CNF's coordinates, log|det ∂u/∂x| per row).
    fn to_model(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, Option<B::Mat>)> {
        match &self.scale {
            Some(s) => {
                let (u, ld) = s.inverse(b, x)?;
                Ok((u, Some(ld)))
            }
            None => Ok((x.clone(), None)),
        }
    }

    fn to_data(&self, b: &B, u: B::Mat) -> Result<B::Mat> {
        match &self.scale {
            Some(s) => Ok(s.forward(b, &u)?.0),
            None => Ok(u),
        }
    }

    /// log p(x) per row in data units, and the solve's work.
    pub fn log_prob(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, SolveStats)> {
        let (u, ld) = self.to_model(b, x)?;
        let (lp, stats) = self.cnf.log_prob(b, &u)?;
        let lp = match ld {
            Some(ld) => b.axpby(1.0, &lp, 1.0, &ld)?,
            None => lp,
        };
        Ok((lp, stats))
    }

    /// `n` samples in data units and the solve's work.
    pub fn sample(&self, b: &B, n: usize, rng: &mut Rng) -> Result<(B::Mat, SolveStats)> {
        let z = b.upload(&Tensor::randn(n, self.cnf.dim(), rng))?;
        let (u, stats) = self.cnf.forward(b, &z)?;
        Ok((self.to_data(b, u)?, stats))
    }

    /// States of `n` samples at `times` (Fig. 18.6), in data units.
    pub fn trajectories(
        &self,
        b: &B,
        n: usize,
        times: &[f64],
        rng: &mut Rng,
    ) -> Result<(Vec<Tensor>, SolveStats)> {
        let (states, stats) = self.cnf.sample_with_trajectories(b, n, times, rng)?;
        let states = states
            .into_iter()
            .map(|s| b.download(&self.to_data(b, b.upload(&s)?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok((states, stats))
    }
}

impl<B: Backend> Trainable<B> for ScaledCnf<B> {
    fn loss_and_grad(
        &mut self,
        b: &B,
        batch: &B::Mat,
        rng: &mut Rng,
    ) -> Result<(f64, Vec<B::Mat>)> {
        // The standardisation is fixed: it shifts the NLL by a constant and has no parameters.
        let (u, ld) = self.to_model(b, batch)?;
        let (loss, grads) = self.cnf.loss_and_grad(b, &u, rng)?;
        let shift = match (&ld, self.cnf.objective) {
            (Some(ld), super::Objective::Mle { .. }) => -b.sum(ld)? / ld.rows() as f64,
            _ => 0.0,
        };
        Ok((loss + shift, grads))
    }

    fn nll(&self, b: &B, x: &B::Mat) -> Result<f64> {
        let (u, ld) = self.to_model(b, x)?;
        let nll = self.cnf.nll(b, &u)?;
        Ok(match ld {
            Some(ld) => nll - b.sum(&ld)? / ld.rows() as f64,
            None => nll,
        })
    }

    fn params(&self) -> Vec<&B::Mat> {
        self.cnf.params()
    }

    fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        self.cnf.params_mut()
    }
}
