//! Multi-layer perceptron parameters, generic over where they live (host `Tensor` or a device
//! buffer). Convention: a batch is B×in, weights are in×out, so a layer is y = x·W + b.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};

/// Hidden-layer nonlinearity. The output layer is always linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    Tanh,
    /// x·sigmoid(x): smooth, used where second derivatives are needed (CNF trace terms).
    Silu,
    /// log(1 + e^x): smooth.
    Softplus,
}

impl Activation {
    /// The integer code passed to the kernels (see kernels/common.cuh `ff_act`).
    pub fn code(self) -> i32 {
        match self {
            Activation::Relu => 0,
            Activation::Tanh => 1,
            Activation::Silu => 2,
            Activation::Softplus => 3,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "relu" => Ok(Activation::Relu),
            "tanh" => Ok(Activation::Tanh),
            "silu" => Ok(Activation::Silu),
            "softplus" => Ok(Activation::Softplus),
            _ => Err(Error::invalid(format!(
                "unknown activation '{s}' (relu, tanh, silu, softplus)"
            ))),
        }
    }

    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Softplus => softplus(x),
        }
    }

    /// First derivative at pre-activation x.
    #[inline]
    pub fn grad(self, x: f32) -> f32 {
        match self {
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            Activation::Softplus => sigmoid(x),
        }
    }

    /// Second derivative at pre-activation x (zero almost everywhere for ReLU).
    #[inline]
    pub fn grad2(self, x: f32) -> f32 {
        match self {
            Activation::Relu => 0.0,
            Activation::Tanh => {
                let t = x.tanh();
                -2.0 * t * (1.0 - t * t)
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
            }
            Activation::Softplus => {
                let s = sigmoid(x);
                s * (1.0 - s)
            }
        }
    }

    /// Third derivative at pre-activation x (needed by the gradient of the exact CNF trace).
    #[inline]
    pub fn grad3(self, x: f32) -> f32 {
        match self {
            Activation::Relu => 0.0,
            Activation::Tanh => {
                let t = x.tanh();
                let d = 1.0 - t * t;
                -2.0 * d * (d - 2.0 * t * t)
            }
            Activation::Silu => {
                let s = sigmoid(x);
                let d1 = s * (1.0 - s);
                let d2 = d1 * (1.0 - 2.0 * s);
                let d3 = d1 * (1.0 - 6.0 * s + 6.0 * s * s);
                3.0 * d2 + x * d3
            }
            Activation::Softplus => {
                let s = sigmoid(x);
                s * (1.0 - s) * (1.0 - 2.0 * s)
            }
        }
    }
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// log(1 + e^x) without overflow.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

/// One affine layer: y = x·W + b with W of shape in×out and b of shape 1×out.
#[derive(Clone, Debug)]
pub struct Linear<M> {
    pub w: M,
    pub b: M,
}

/// Layers applied in order, `act` between them (not after the last).
#[derive(Clone, Debug)]
pub struct Mlp<M> {
    pub layers: Vec<Linear<M>>,
    pub act: Activation,
}

impl<M: Shaped> Mlp<M> {
    pub fn in_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.w.rows())
    }

    pub fn out_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.w.cols())
    }

    /// Widths from input to output, e.g. [2, 64, 64, 4].
    pub fn widths(&self) -> Vec<usize> {
        let mut v = vec![self.in_dim()];
        v.extend(self.layers.iter().map(|l| l.w.cols()));
        v
    }

    /// The widest layer (sizes scratch space in the kernels).
    pub fn max_width(&self) -> usize {
        self.widths().into_iter().max().unwrap_or(0)
    }

    /// Checks that consecutive layers fit together and biases are 1×out.
    pub fn check(&self, op: &'static str) -> Result<()> {
        if self.layers.is_empty() {
            return Err(Error::invalid(format!(
                "{op}: an MLP needs at least one layer"
            )));
        }
        let mut width = self.in_dim();
        for l in &self.layers {
            l.w.expect_shape(op, width, l.w.cols())?;
            l.b.expect_shape(op, 1, l.w.cols())?;
            width = l.w.cols();
        }
        Ok(())
    }
}

impl<M> Mlp<M> {
    /// The parameters in a fixed order: w0, b0, w1, b1, ...
    pub fn tensors(&self) -> Vec<&M> {
        self.layers.iter().flat_map(|l| [&l.w, &l.b]).collect()
    }

    /// The parameters by value, in `tensors()` order (e.g. gradients handed to an optimiser).
    pub fn into_tensors(self) -> Vec<M> {
        self.layers.into_iter().flat_map(|l| [l.w, l.b]).collect()
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut M> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.w, &mut l.b])
            .collect()
    }

    /// Names matching `tensors()`: "w0", "b0", ...
    pub fn tensor_names(&self) -> Vec<String> {
        tensor_names(self.layers.len())
    }

    /// `tensors()` with their names, each converted by `f` (e.g. downloaded from a device):
    /// the tensor list of a layer or field state.
    pub fn named_tensors<N>(&self, mut f: impl FnMut(&M) -> Result<N>) -> Result<Vec<(String, N)>> {
        self.tensor_names()
            .into_iter()
            .zip(self.tensors())
            .map(|(name, t)| Ok((name, f(t)?)))
            .collect()
    }

    /// The same network with every tensor converted (e.g. uploaded to a device).
    pub fn try_map<N>(&self, mut f: impl FnMut(&M) -> Result<N>) -> Result<Mlp<N>> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Linear {
                    w: f(&l.w)?,
                    b: f(&l.b)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp {
            layers,
            act: self.act,
        })
    }

    /// Rebuilds a network of this structure from tensors in `tensors()` order.
    pub fn from_tensors(act: Activation, tensors: Vec<M>) -> Result<Mlp<M>> {
        if tensors.is_empty() || !tensors.len().is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "an MLP needs an even, non-zero number of tensors, got {}",
                tensors.len()
            )));
        }
        let mut it = tensors.into_iter();
        let mut layers = Vec::new();
        while let (Some(w), Some(b)) = (it.next(), it.next()) {
            layers.push(Linear { w, b });
        }
        Ok(Mlp { layers, act })
    }
}

impl Mlp<crate::tensor::Tensor> {
    /// Errors on the first non-finite value, naming its tensor by `what(name)` (formatted only
    /// for an error); otherwise marks every tensor known finite (an op's gradients, checked
    /// once here, are not scanned again by the optimiser or the next op).
    pub(crate) fn check_finite_and_mark(&mut self, what: impl Fn(&str) -> String) -> Result<()> {
        for (i, t) in self.tensors_mut().into_iter().enumerate() {
            t.check_finite_with(|| what(&tensor_name(i)))?;
            t.mark_finite();
        }
        Ok(())
    }
}

/// The names of the tensors of an MLP with `layers` layers: "w0", "b0", "w1", "b1", ...
pub fn tensor_names(layers: usize) -> Vec<String> {
    (0..2 * layers).map(tensor_name).collect()
}

/// The name of tensor `i` of [`Mlp::tensors`]: w0, b0, w1, b1, ...
pub fn tensor_name(i: usize) -> String {
    let kind = if i.is_multiple_of(2) { "w" } else { "b" };
    format!("{kind}{}", i / 2)
}

/// The widths a list of named tensors must have to rebuild an MLP ([`Mlp::from_named`]).
#[derive(Clone, Copy, Debug)]
pub enum Widths<'a> {
    /// Exactly these widths, input to output (at least two).
    Exact(&'a [usize]),
    /// This input width; every later width is read from its weight and may be any positive
    /// number (the caller checks the output against its own spec).
    Input(usize),
}

impl Mlp<Tensor> {
    /// Rebuilds a network from tensors named w0, b0, w1, b1, ... in exactly that order (a layer
    /// or field state, a checkpoint), checking their count, names and shapes; `what` names the
    /// source in the errors. Values are not checked (see [`Mlp::check_finite`]).
    pub fn from_named(
        what: &'static str,
        act: Activation,
        tensors: &[(String, Tensor)],
        widths: Widths,
    ) -> Result<Self> {
        let n = tensors.len();
        let mut width = match widths {
            Widths::Exact(w) => {
                if w.len() < 2 || n != 2 * (w.len() - 1) {
                    return Err(Error::invalid(format!(
                        "{what}: expected {} tensors (w0, b0, ...), got {n}",
                        2 * w.len().saturating_sub(1)
                    )));
                }
                w[0]
            }
            Widths::Input(w) => {
                if n == 0 || !n.is_multiple_of(2) {
                    return Err(Error::invalid(format!(
                        "{what}: expected an even, non-zero number of tensors (w0, b0, ...), got {n}"
                    )));
                }
                w
            }
        };
        let names = tensor_names(n / 2);
        let mut host = Vec::with_capacity(n);
        for (i, ((name, t), want)) in tensors.iter().zip(&names).enumerate() {
            if name != want {
                return Err(Error::invalid(format!(
                    "{what}: tensor {i} should be '{want}', found '{name}'"
                )));
            }
            let shape_error = |expected: String| {
                Error::shape(
                    what,
                    format!("{want}: {expected}"),
                    format!("{want}: {}x{}", t.rows(), t.cols()),
                )
            };
            if i % 2 == 0 {
                // The input must match the previous layer; the output is given or free.
                let cols = match widths {
                    Widths::Exact(w) => Some(w[i / 2 + 1]),
                    Widths::Input(_) => None,
                };
                if t.rows() != width || !cols.map_or(t.cols() > 0, |c| t.cols() == c) {
                    let cols = cols.map_or("(positive)".to_string(), |c| c.to_string());
                    return Err(shape_error(format!("{width}x{cols}")));
                }
                width = t.cols();
            } else if t.shape() != (1, width) {
                return Err(shape_error(format!("1x{width}")));
            }
            host.push(t.clone());
        }
        Mlp::from_tensors(act, host)
    }

    /// Fails with [`Error::NonFinite`] naming the first tensor (as "`what` tensor 'w0'") that
    /// holds a NaN or an infinity.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        for (name, t) in self.tensor_names().iter().zip(self.tensors()) {
            t.check_finite(&format!("{what} tensor '{name}'"))?;
        }
        Ok(())
    }

    /// Uniform(-1/sqrt(in), 1/sqrt(in)) weights and biases, like PyTorch's default `nn.Linear`.
    pub fn new(widths: &[usize], act: Activation, rng: &mut Rng) -> Result<Self> {
        if widths.len() < 2 || widths.contains(&0) {
            return Err(Error::invalid(format!(
                "MLP widths must have at least two positive entries, got {widths:?}"
            )));
        }
        let layers = widths
            .windows(2)
            .map(|w| {
                let bound = 1.0 / (w[0] as f32).sqrt();
                Linear {
                    w: Tensor::rand_uniform(w[0], w[1], -bound, bound, rng),
                    b: Tensor::rand_uniform(1, w[1], -bound, bound, rng),
                }
            })
            .collect();
        Ok(Mlp { layers, act })
    }

    /// Zeroes the output layer so that a coupling or autoregressive layer starts as the identity.
    pub fn zero_last(mut self) -> Self {
        if let Some(l) = self.layers.last_mut() {
            l.w = Tensor::zeros(l.w.rows(), l.w.cols());
            l.b = Tensor::zeros(1, l.b.cols());
        }
        self
    }

    /// Zeros of the same shapes (gradient buffers, Adam moments).
    pub fn zeros_like(&self) -> Self {
        self.try_map(|t| Ok(Tensor::zeros(t.rows(), t.cols())))
            .expect("zeros_like cannot fail")
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.tensors().iter().map(|t| t.len()).sum()
    }
}
