//! The vector field f(z, t, w) of a continuous flow (eq. 18.22): an MLP on [z, t] (time as the
//! last input) with D outputs, and its serialisable state for checkpoints (the same shape as a
//! flow layer's `LayerState`: a config and named tensors).

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::mlp::{Activation, Mlp, Widths, tensor_names};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Everything about a vector field but its weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldConfig {
    /// D: the state's dimension (the MLP maps D + 1 inputs to D outputs).
    pub dim: usize,
    /// Widths of the hidden layers, e.g. [64, 64].
    pub hidden: Vec<usize>,
    pub act: Activation,
}

impl FieldConfig {
    /// Widths from input to output: [D + 1, hidden…, D].
    pub fn widths(&self) -> Vec<usize> {
        let mut w = vec![self.dim + 1];
        w.extend(&self.hidden);
        w.push(self.dim);
        w
    }

    fn check(&self) -> Result<()> {
        if self.dim == 0 || self.hidden.contains(&0) {
            return Err(Error::invalid(format!(
                "a vector field needs dim >= 1 and positive hidden widths (dim {}, hidden {:?})",
                self.dim, self.hidden
            )));
        }
        Ok(())
    }
}

/// A field moved to the host: its config and its tensors named w0, b0, w1, b1, ….
#[derive(Clone, Debug, PartialEq)]
pub struct FieldState {
    pub config: FieldConfig,
    pub tensors: Vec<(String, Tensor)>,
}

pub struct VectorField<B: Backend> {
    config: FieldConfig,
    net: Mlp<B::Mat>,
}

impl<B: Backend> VectorField<B> {
    /// A field with PyTorch-style uniform initialisation (seeded).
    pub fn new(b: &B, config: FieldConfig, rng: &mut Rng) -> Result<Self> {
        config.check()?;
        let net = Mlp::new(&config.widths(), config.act, rng)?;
        Self::upload(b, config, &net)
    }

    /// A field from host weights; the MLP must map D + 1 inputs to D outputs.
    pub fn from_mlp(b: &B, net: &Mlp<Tensor>) -> Result<Self> {
        net.check("VectorField::from_mlp")?;
        let widths = net.widths();
        let (n_in, n_out) = (net.in_dim(), net.out_dim());
        if n_in != n_out + 1 {
            return Err(Error::shape(
                "VectorField::from_mlp",
                format!("an MLP with D + 1 inputs and D outputs (D = {n_out})"),
                format!("{n_in} -> {n_out}"),
            ));
        }
        let config = FieldConfig {
            dim: n_out,
            hidden: widths[1..widths.len() - 1].to_vec(),
            act: net.act,
        };
        config.check()?;
        Self::upload(b, config, net)
    }

    fn upload(b: &B, config: FieldConfig, net: &Mlp<Tensor>) -> Result<Self> {
        net.check_finite("vector field")?;
        Ok(VectorField {
            config,
            net: net.try_map(|t| b.upload(t))?,
        })
    }

    pub fn from_state(b: &B, state: &FieldState) -> Result<Self> {
        state.config.check()?;
        let widths = state.config.widths();
        let names = tensor_names(widths.len() - 1);
        if state.tensors.len() != names.len() {
            return Err(Error::invalid(format!(
                "vector field state: expected {} tensors, found {}",
                names.len(),
                state.tensors.len()
            )));
        }
        // The state's tensors may come in any order; put them in w0, b0, ... order.
        let ordered = names
            .iter()
            .map(|name| {
                state
                    .tensors
                    .iter()
                    .find(|(n, _)| n == name)
                    .cloned()
                    .ok_or_else(|| Error::invalid(format!("vector field state: missing '{name}'")))
            })
            .collect::<Result<Vec<_>>>()?;
        let net = Mlp::from_named(
            "VectorField::from_state",
            state.config.act,
            &ordered,
            Widths::Exact(&widths),
        )?;
        Self::upload(b, state.config.clone(), &net)
    }

    /// The config and the tensors, downloaded.
    pub fn state(&self, b: &B) -> Result<FieldState> {
        let tensors = self.net.named_tensors(|t| b.download(t))?;
        Ok(FieldState {
            config: self.config.clone(),
            tensors,
        })
    }

    /// The weights on the host.
    pub fn to_host(&self, b: &B) -> Result<Mlp<Tensor>> {
        self.net.try_map(|t| b.download(t))
    }

    pub fn config(&self) -> &FieldConfig {
        &self.config
    }

    pub fn dim(&self) -> usize {
        self.config.dim
    }

    pub fn act(&self) -> Activation {
        self.config.act
    }

    pub fn net(&self) -> &Mlp<B::Mat> {
        &self.net
    }

    /// Trainable tensors in the order w0, b0, w1, b1, ….
    pub fn params(&self) -> Vec<&B::Mat> {
        self.net.tensors()
    }

    pub fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        self.net.tensors_mut()
    }
}
