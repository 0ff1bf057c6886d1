//! ActNorm (Kingma & Dhariwal 2018): a per-coordinate affine layer x = z ⊙ exp(log_scale) + loc,
//! initialised from data so that the first batch leaves it with zero mean and unit variance.
//! With `trainable: false` it is the fixed standardisation layer that carries the data's units,
//! so log-densities come out in the data's own units.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::layer::{FlowLayer, LayerConfig, LayerState};
use crate::ops::Direction;
use crate::tensor::{Shaped, Tensor};

pub struct ActNorm<B: Backend> {
    dim: usize,
    loc: B::Mat,
    log_scale: B::Mat,
    trainable: bool,
}

impl<B: Backend> ActNorm<B> {
    /// The identity, to be initialised from data (trainable).
    pub fn new(b: &B, dim: usize) -> Result<Self> {
        Ok(ActNorm {
            dim,
            loc: b.zeros(1, dim)?,
            log_scale: b.zeros(1, dim)?,
            trainable: true,
        })
    }

    /// A fixed layer mapping standardised values back to data units: x = z ⊙ std + mean.
    pub fn standardization(b: &B, mean: &[f32], std: &[f32]) -> Result<Self> {
        if mean.len() != std.len() || mean.is_empty() {
            return Err(Error::shape(
                "ActNorm::standardization",
                mean.len(),
                std.len(),
            ));
        }
        if std.iter().any(|&s| !(s > 0.0 && s.is_finite())) || mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::invalid(
                "standardisation needs finite means and positive finite scales",
            ));
        }
        let d = mean.len();
        Ok(ActNorm {
            dim: d,
            loc: b.upload(&Tensor::from_vec(1, d, mean.to_vec())?)?,
            log_scale: b.upload(&Tensor::from_fn(1, d, |_, j| std[j].ln()))?,
            trainable: false,
        })
    }

    pub fn from_state(b: &B, state: &LayerState) -> Result<Self> {
        let LayerConfig::ActNorm { dim, trainable } = state.config else {
            return Err(Error::invalid("not an ActNorm layer config"));
        };
        let find = |name: &str| -> Result<B::Mat> {
            let (_, t) = state
                .tensors
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::invalid(format!("ActNorm: missing tensor '{name}'")))?;
            t.expect_shape("ActNorm::from_state", 1, dim)?;
            b.upload(t)
        };
        if state.tensors.len() != 2 {
            return Err(Error::invalid(format!(
                "ActNorm: expected tensors loc and log_scale, found {}",
                state.tensors.len()
            )));
        }
        Ok(ActNorm {
            dim,
            loc: find("loc")?,
            log_scale: find("log_scale")?,
            trainable,
        })
    }

    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// Backward of the map in direction `dir` at `input`; the parameter gradients in
    /// `params()` order (none for the fixed layer).
    fn backward(
        &self,
        b: &B,
        input: &B::Mat,
        dir: Direction,
        d_out: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        let (d_in, dloc, dls) =
            b.scale_shift_backward(input, &self.loc, &self.log_scale, dir, d_out, d_logdet)?;
        let grads = if self.trainable {
            vec![dloc, dls]
        } else {
            vec![]
        };
        Ok((d_in, grads))
    }
}

impl<B: Backend> FlowLayer<B> for ActNorm<B> {
    fn dim(&self) -> usize {
        self.dim
    }

    fn forward(&self, b: &B, z: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        b.scale_shift(z, &self.loc, &self.log_scale, Direction::Forward)
    }

    fn inverse(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        b.scale_shift(x, &self.loc, &self.log_scale, Direction::Inverse)
    }

    fn inverse_backward(
        &self,
        b: &B,
        x: &B::Mat,
        d_z: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        self.backward(b, x, Direction::Inverse, d_z, d_logdet)
    }

    fn forward_backward(
        &self,
        b: &B,
        z: &B::Mat,
        d_x: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        self.backward(b, z, Direction::Forward, d_x, d_logdet)
    }

    fn params(&self) -> Vec<&B::Mat> {
        if self.trainable {
            vec![&self.loc, &self.log_scale]
        } else {
            vec![]
        }
    }

    fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        if self.trainable {
            vec![&mut self.loc, &mut self.log_scale]
        } else {
            vec![]
        }
    }

    /// Sets loc and log_scale so that `inverse(x)` has zero mean and unit variance per column.
    fn init_from_data(&mut self, b: &B, x: &B::Mat) -> Result<()> {
        if !self.trainable {
            return Ok(());
        }
        let (mean, std) = b.col_moments(x)?;
        let std = b.download(&std)?;
        // A constant column would give log 0; leave its scale at 1.
        let log_scale = std.map(|s| {
            if s > 1e-6 && s.is_finite() {
                s.ln()
            } else {
                0.0
            }
        });
        self.loc = mean;
        self.log_scale = b.upload(&log_scale)?;
        Ok(())
    }

    fn state(&self, b: &B) -> Result<LayerState> {
        Ok(LayerState {
            config: LayerConfig::ActNorm {
                dim: self.dim,
                trainable: self.trainable,
            },
            tensors: vec![
                ("loc".to_string(), b.download(&self.loc)?),
                ("log_scale".to_string(), b.download(&self.log_scale)?),
            ],
        })
    }
}
