//! Launches kernels/optim.cu.

use super::{AdamHyper, OptimOps};
use crate::backend::grid::{Grid, GridDevice, GridMat, KArg, LaunchCfg};
use crate::error::Result;
use crate::tensor::Shaped;

impl<G: GridDevice> OptimOps for Grid<G> {
    fn adam_step(
        &self,
        p: &mut GridMat<G>,
        g: &GridMat<G>,
        m: &mut GridMat<G>,
        v: &mut GridMat<G>,
        h: &AdamHyper,
        t: u32,
        grad_scale: f32,
    ) -> Result<()> {
        let (r, c) = p.shape();
        g.expect_shape("adam_step", r, c)?;
        m.expect_shape("adam_step", r, c)?;
        v.expect_shape("adam_step", r, c)?;
        if p.len() == 0 {
            return Ok(());
        }
        let (lr_t, c2) = h.corrections(t);
        let n = p.len();
        let (pb, mb, vb) = (
            p.buf_mut(&self.dev)?,
            m.buf_mut(&self.dev)?,
            v.buf_mut(&self.dev)?,
        );
        self.launch(
            "optim_adam_f32",
            LaunchCfg::stride(n),
            &[
                KArg::Buf(pb),
                KArg::Buf(g.buf()),
                KArg::Buf(mb),
                KArg::Buf(vb),
                KArg::I64(n as i64),
                KArg::F32(lr_t),
                KArg::F32(h.beta1),
                KArg::F32(h.beta2),
                KArg::F32(h.eps),
                KArg::F32(c2),
                KArg::F32(1.0 - h.lr * h.weight_decay),
                KArg::F32(grad_scale),
            ],
        )
    }
}
