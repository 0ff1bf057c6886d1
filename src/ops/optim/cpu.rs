//! Reference Adam update.

use super::{AdamHyper, OptimOps};
use crate::backend::Cpu;
use crate::error::Result;
use crate::tensor::{Shaped, Tensor};

impl OptimOps for Cpu {
    fn adam_step(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        h: &AdamHyper,
        t: u32,
        grad_scale: f32,
    ) -> Result<()> {
        let (r, c) = p.shape();
        g.expect_shape("adam_step", r, c)?;
        m.expect_shape("adam_step", r, c)?;
        v.expect_shape("adam_step", r, c)?;
        let (lr_t, c2) = h.corrections(t);
        let decay = 1.0 - h.lr * h.weight_decay;
        for (((pi, &gi), mi), vi) in p
            .data_mut()
            .iter_mut()
            .zip(g.data())
            .zip(m.data_mut())
            .zip(v.data_mut())
        {
            let gi = gi * grad_scale;
            *mi = h.beta1 * *mi + (1.0 - h.beta1) * gi;
            *vi = h.beta2 * *vi + (1.0 - h.beta2) * gi * gi;
            *pi = *pi * decay - lr_t * *mi / ((*vi / c2).sqrt() + h.eps);
        }
        Ok(())
    }
}
