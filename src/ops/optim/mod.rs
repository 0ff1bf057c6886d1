//! The optimiser update, applied where the parameters live.

pub mod cpu;
pub mod cuda;

use serde::{Deserialize, Serialize};

use crate::backend::Device;
use crate::error::Result;

/// Adam (Kingma & Ba) with decoupled weight decay (AdamW) when `weight_decay` > 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamHyper {
    fn default() -> Self {
        AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamHyper {
    /// The bias-corrected step size and second-moment correction for step `t` (1-based):
    /// the kernel computes p -= lr_t · m / (sqrt(v / c2) + eps) with lr_t = lr / (1 - β1^t).
    pub fn corrections(&self, t: u32) -> (f32, f32) {
        let t = t.max(1) as i32;
        let c1 = 1.0 - (self.beta1 as f64).powi(t);
        let c2 = 1.0 - (self.beta2 as f64).powi(t);
        ((self.lr as f64 / c1) as f32, c2 as f32)
    }
}

pub trait OptimOps: Device {
    /// One Adam step (1-based `t`) on one tensor: the gradient is multiplied by `grad_scale`
    /// (global-norm clipping), the moments `m`, `v` are updated, then the parameter.
    #[allow(clippy::too_many_arguments)]
    fn adam_step(
        &self,
        p: &mut Self::Mat,
        g: &Self::Mat,
        m: &mut Self::Mat,
        v: &mut Self::Mat,
        hyper: &AdamHyper,
        t: u32,
        grad_scale: f32,
    ) -> Result<()>;
}
