//! Coupling layers (RealNVP, NICE, rational-quadratic spline; eq. 18.10–18.15): one half of the
//! coordinates is copied and conditions an invertible map of the other half. The whole layer is
//! one fused backend op ([`CouplingOps`](crate::ops::coupling::CouplingOps)); this type holds its spec and conditioner weights.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::layer::{FlowLayer, LayerConfig, LayerState};
use crate::nn::mlp::{Activation, Mlp, Widths};
use crate::ops::Direction;
use crate::ops::coupling::CouplingSpec;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// A coupling layer on backend `B`: `spec` says which half is copied and which coupling function
/// transforms the other; `net` is the conditioner, `spec.net_in()` -> `spec.net_out()`.
pub struct CouplingLayer<B: Backend> {
    pub spec: CouplingSpec,
    pub net: Mlp<B::Mat>,
}

impl<B: Backend> Clone for CouplingLayer<B> {
    fn clone(&self) -> Self {
        CouplingLayer {
            spec: self.spec,
            net: self.net.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for CouplingLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CouplingLayer")
            .field("spec", &self.spec)
            .field("widths", &self.net.widths())
            .field("act", &self.net.act)
            .finish()
    }
}

impl<B: Backend> CouplingLayer<B> {
    /// A layer that starts as the identity: random hidden layers, a zero output layer (so
    /// s = b = 0 for affine and uniform bins with unit derivatives for splines).
    pub fn new(
        b: &B,
        spec: CouplingSpec,
        hidden: &[usize],
        act: Activation,
        rng: &mut Rng,
    ) -> Result<Self> {
        spec.check_spec("CouplingLayer::new")?;
        let mut widths = Vec::with_capacity(hidden.len() + 2);
        widths.push(spec.net_in());
        widths.extend_from_slice(hidden);
        widths.push(spec.net_out());
        let host = Mlp::new(&widths, act, rng)?.zero_last();
        spec.check("CouplingLayer::new", &host, &Tensor::zeros(0, spec.dim))?;
        Ok(CouplingLayer {
            spec,
            net: host.try_map(|t| b.upload(t))?,
        })
    }

    /// Rebuilds a layer from its [`LayerState`], checking the config and every tensor's name
    /// and shape. Errors carry no file path (the checkpoint loader adds it).
    pub fn from_state(b: &B, state: &LayerState) -> Result<Self> {
        let LayerConfig::Coupling { spec, act } = state.config else {
            return Err(Error::invalid(format!(
                "expected a coupling layer state, got {:?}",
                state.config
            )));
        };
        spec.check_spec("coupling layer state")?;
        let host = Mlp::from_named(
            "coupling layer state",
            act,
            &state.tensors,
            Widths::Input(spec.net_in()),
        )?;
        host.check_finite("coupling layer state")?;
        spec.check("coupling layer state", &host, &Tensor::zeros(0, spec.dim))?;
        Ok(CouplingLayer {
            spec,
            net: host.try_map(|t| b.upload(t))?,
        })
    }

    fn apply(&self, b: &B, input: &B::Mat, dir: Direction) -> Result<(B::Mat, B::Mat)> {
        b.coupling(&self.spec, &self.net, input, dir)
    }

    fn backward(
        &self,
        b: &B,
        input: &B::Mat,
        dir: Direction,
        d_out: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        let (d_in, grads) =
            b.coupling_backward(&self.spec, &self.net, input, dir, d_out, d_logdet)?;
        // Same order as `params()`: w0, b0, w1, b1, ...
        Ok((d_in, grads.into_tensors()))
    }
}

impl<B: Backend> FlowLayer<B> for CouplingLayer<B> {
    fn dim(&self) -> usize {
        self.spec.dim
    }

    fn forward(&self, b: &B, z: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        self.apply(b, z, Direction::Forward)
    }

    fn inverse(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        self.apply(b, x, Direction::Inverse)
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
        self.net.tensors()
    }

    fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        self.net.tensors_mut()
    }

    fn state(&self, b: &B) -> Result<LayerState> {
        let tensors = self.net.named_tensors(|t| b.download(t))?;
        Ok(LayerState {
            config: LayerConfig::Coupling {
                spec: self.spec,
                act: self.net.act,
            },
            tensors,
        })
    }
}
