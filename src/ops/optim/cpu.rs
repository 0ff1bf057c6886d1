//! Reference Adam update.

use super::{AdamHyper, OptimOps};
use crate::backend::Cpu;
use crate::backend::cpu::par_blocks;
use crate::backend::cpu::simd::simd_dispatch;
use crate::backend::cpu::vmath::all_finite;
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
        let step = Step {
            lr_t,
            c2,
            decay: 1.0 - h.lr * h.weight_decay,
            grad_scale,
        };
        let g = g.data();
        let slices = [p.data_mut(), m.data_mut(), v.data_mut()];
        // Each block's new parameters are scanned while in cache, so that the next op need
        // not scan them again (see `Tensor::known_finite`).
        let finite = par_blocks(slices, ADAM_CHUNK, |start, [p, m, v]| {
            adam(h, &step, p, &g[start..start + p.len()], m, v);
            all_finite(p)
        });
        if finite.iter().all(|&f| f) {
            p.mark_finite();
        }
        Ok(())
    }
}

/// Values per parallel block: a 64×64 weight (4096) is two blocks, so a training step's
/// optimiser updates keep both threads busy (and the pool's helpers awake between the
/// backward and the next forward); smaller tensors are one block, on the calling thread.
const ADAM_CHUNK: usize = 2048;

/// The per-call constants of one Adam step.
struct Step {
    lr_t: f32,
    c2: f32,
    decay: f32,
    grad_scale: f32,
}

/// The update over every element, in the widest vector instructions available (the same
/// operations in the same order on every path, so the same results).
fn adam(h: &AdamHyper, s: &Step, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    simd_dispatch!(adam_impl(
        h: &AdamHyper,
        s: &Step,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> ())
}

/// Indexed over slices of one length (a four-way `zip` does not vectorise).
#[inline(always)]
fn adam_impl(h: &AdamHyper, s: &Step, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = g[i] * s.grad_scale;
        m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
        v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
        p[i] = p[i] * s.decay - s.lr_t * m[i] / ((v[i] / s.c2).sqrt() + h.eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The dispatched update against the same loop compiled for baseline x86-64 (the scalar
    /// reference), bit for bit, over a length with a vector tail and with weight decay.
    #[test]
    fn dispatched_adam_matches_the_baseline_exactly() {
        let mut rng = Rng::new(3);
        let n = 1000 + 13;
        let mut random = |s: f32| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32 * s).collect() };
        let (p, g, m) = (random(1.0), random(0.1), random(0.01));
        let v: Vec<f32> = random(0.01).iter().map(|x| x * x).collect();
        let h = AdamHyper {
            weight_decay: 0.01,
            ..AdamHyper::default()
        };
        let (lr_t, c2) = h.corrections(7);
        let s = Step {
            lr_t,
            c2,
            decay: 1.0 - h.lr * h.weight_decay,
            grad_scale: 0.5,
        };
        let (mut p0, mut m0, mut v0) = (p.clone(), m.clone(), v.clone());
        adam_impl(&h, &s, &mut p0, &g, &mut m0, &mut v0);
        let (mut p1, mut m1, mut v1) = (p, m, v);
        adam(&h, &s, &mut p1, &g, &mut m1, &mut v1);
        for (a, b) in [(&p0, &p1), (&m0, &m1), (&v0, &v1)] {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}
