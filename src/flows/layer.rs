//! The layer interface every flow layer implements, and the serialisable description from which
//! a layer is rebuilt (checkpoints, moving a model between backends).

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::Result;
use crate::nn::mlp::Activation;
use crate::ops::coupling::CouplingSpec;
use crate::ops::made::MadeSpec;
use crate::tensor::Tensor;

/// Which way round an autoregressive layer is fast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArKind {
    /// Masked autoregressive flow: density in one pass, sampling in D passes (eq. 18.17).
    Maf,
    /// Inverse autoregressive flow: sampling in one pass, density in D passes (eq. 18.19).
    Iaf,
}

/// Everything but the tensors of a layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LayerConfig {
    Coupling {
        spec: CouplingSpec,
        act: Activation,
    },
    Autoregressive {
        kind: ArKind,
        spec: MadeSpec,
        act: Activation,
    },
    /// Element-wise x = z ⊙ exp(log_scale) + loc. `trainable: false` is the fixed
    /// standardisation layer that carries the data's own units.
    ActNorm {
        dim: usize,
        trainable: bool,
    },
    /// x[:, j] = z[:, perm[j]].
    Permute {
        perm: Vec<u32>,
    },
}

/// A layer moved to the host: its config and its named tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerState {
    pub config: LayerConfig,
    pub tensors: Vec<(String, Tensor)>,
}

/// One invertible layer x = f(z) of a flow (eq. 18.1). Log-determinants are per row (B×1).
pub trait FlowLayer<B: Backend>: Send + Sync {
    fn dim(&self) -> usize;

    /// z -> x, with log|det ∂x/∂z|.
    fn forward(&self, b: &B, z: &B::Mat) -> Result<(B::Mat, B::Mat)>;

    /// x -> z, with log|det ∂z/∂x|.
    fn inverse(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, B::Mat)>;

    /// Backward of `inverse` at `x`: from dL/dz and dL/dlogdet to dL/dx and the gradients of
    /// `params()`, in the same order.
    fn inverse_backward(
        &self,
        b: &B,
        x: &B::Mat,
        d_z: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)>;

    /// Backward of `forward` at `z`: from dL/dx and dL/dlogdet to dL/dz and the gradients of
    /// `params()`.
    fn forward_backward(
        &self,
        b: &B,
        z: &B::Mat,
        d_x: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)>;

    /// Trainable tensors (empty for parameter-free layers).
    fn params(&self) -> Vec<&B::Mat>;
    fn params_mut(&mut self) -> Vec<&mut B::Mat>;

    /// Data-dependent initialisation from a batch reaching this layer in the inverse
    /// direction (ActNorm); most layers ignore it.
    fn init_from_data(&mut self, _b: &B, _x: &B::Mat) -> Result<()> {
        Ok(())
    }

    /// The config and the tensors, downloaded.
    fn state(&self, b: &B) -> Result<LayerState>;
}
