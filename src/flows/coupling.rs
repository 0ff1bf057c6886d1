//! Coupling layers (RealNVP, NICE, rational-quadratic spline; eq. 18.10–18.15): one half of the
//! coordinates is copied and conditions an invertible map of the other half. The whole layer is
//! one fused backend op ([`CouplingOps`](crate::ops::coupling::CouplingOps)); this type holds its spec and conditioner weights.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::layer::{FlowLayer, LayerConfig, LayerState};
use crate::nn::mlp::{Activation, Mlp};
use crate::ops::Direction;
use crate::ops::coupling::CouplingSpec;
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};

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
        let n = state.tensors.len();
        if n == 0 || !n.is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "coupling layer state: expected an even, non-zero number of tensors (w0, b0, ...), got {n}"
            )));
        }
        let mut width = spec.net_in();
        let mut host = Vec::with_capacity(n);
        for (i, (name, t)) in state.tensors.iter().enumerate() {
            let layer = i / 2;
            let is_weight = i % 2 == 0;
            let want = if is_weight {
                format!("w{layer}")
            } else {
                format!("b{layer}")
            };
            if *name != want {
                return Err(Error::invalid(format!(
                    "coupling layer state: tensor {i} should be '{want}', found '{name}'"
                )));
            }
            if is_weight {
                // Any output width, but the input must match the previous layer.
                if t.rows() != width || t.cols() == 0 {
                    return Err(Error::shape(
                        "coupling layer state",
                        format!("{want}: {width}x(positive)"),
                        format!("{want}: {}x{}", t.rows(), t.cols()),
                    ));
                }
                width = t.cols();
            } else {
                t.expect_shape("coupling layer state", 1, width)
                    .map_err(|_| {
                        Error::shape(
                            "coupling layer state",
                            format!("{want}: 1x{width}"),
                            format!("{want}: {}x{}", t.rows(), t.cols()),
                        )
                    })?;
            }
            t.check_finite(&format!("coupling layer state tensor '{name}'"))?;
            host.push(t.clone());
        }
        let host = Mlp::from_tensors(act, host)?;
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
        let grads = grads.layers.into_iter().flat_map(|l| [l.w, l.b]).collect();
        Ok((d_in, grads))
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
        let tensors = self
            .net
            .tensor_names()
            .into_iter()
            .zip(self.net.tensors())
            .map(|(name, t)| Ok((name, b.download(t)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(LayerState {
            config: LayerConfig::Coupling {
                spec: self.spec,
                act: self.net.act,
            },
            tensors,
        })
    }
}
