//! Training a CNF with the crate's trainer: the loss of a batch is the NLL with its adjoint
//! gradient (`Objective::Mle`) or the flow-matching regression (`Objective::FlowMatching`);
//! the held-out `nll` always integrates the density with the evaluation trace (exact by
//! default), so that it means the same as a discrete flow's.

use super::model::{Cnf, Objective};
use super::trace::Trace;
use super::{adjoint, matching};
use crate::backend::Backend;
use crate::error::Result;
use crate::rng::Rng;
use crate::train::trainer::Trainable;

impl<B: Backend> Trainable<B> for Cnf<B> {
    fn loss_and_grad(
        &mut self,
        b: &B,
        batch: &B::Mat,
        rng: &mut Rng,
    ) -> Result<(f64, Vec<B::Mat>)> {
        let x = b.download(batch)?;
        match self.objective {
            Objective::Mle { trace } => {
                // Fresh probes each step; fixed within the step's forward and backward solves.
                let trace = Trace::from_spec(trace, rng.next_u64());
                let opts = self.solver.options();
                let (nll, grads, _) = adjoint::nll_and_grad(b, self.field(), &x, &opts, trace)?;
                Ok((nll, grads))
            }
            Objective::FlowMatching { sigma_min } => {
                matching::loss_and_grad(b, self.field(), &x, sigma_min, rng)
            }
        }
    }

    fn nll(&self, b: &B, x: &B::Mat) -> Result<f64> {
        Cnf::nll(self, b, x)
    }

    fn params(&self) -> Vec<&B::Mat> {
        Cnf::params(self)
    }

    fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        Cnf::params_mut(self)
    }
}
