//! Adam over a list of parameter tensors, with global-norm gradient clipping. The update itself
//! is the backend's `adam_step` op, so parameters and moments never leave the device.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::optim::AdamHyper;
use crate::tensor::Shaped;

pub struct Adam<B: Backend> {
    pub hyper: AdamHyper,
    /// Clip the global gradient norm to this value (None: no clipping).
    pub clip_norm: Option<f32>,
    m: Vec<B::Mat>,
    v: Vec<B::Mat>,
    t: u32,
}

impl<B: Backend> Adam<B> {
    pub fn new(
        b: &B,
        params: &[&B::Mat],
        hyper: AdamHyper,
        clip_norm: Option<f32>,
    ) -> Result<Self> {
        let zeros = |p: &&B::Mat| b.zeros(p.rows(), p.cols());
        Ok(Adam {
            hyper,
            clip_norm,
            m: params.iter().map(zeros).collect::<Result<_>>()?,
            v: params.iter().map(zeros).collect::<Result<_>>()?,
            t: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.t
    }

    /// One update with learning rate `lr` (for schedules). Returns the gradient norm before
    /// clipping. A non-finite gradient is an error and leaves the parameters untouched.
    pub fn step(
        &mut self,
        b: &B,
        params: Vec<&mut B::Mat>,
        grads: &[B::Mat],
        lr: f32,
    ) -> Result<f64> {
        if params.len() != grads.len() || params.len() != self.m.len() {
            return Err(Error::shape(
                "Adam::step",
                format!("{} parameter tensors", self.m.len()),
                format!("{} params, {} grads", params.len(), grads.len()),
            ));
        }
        let refs: Vec<&B::Mat> = grads.iter().collect();
        let norm = b.sq_norm(&refs)?.sqrt();
        if !norm.is_finite() {
            return Err(Error::NonFinite {
                what: "gradient".into(),
                row: 0,
                col: 0,
            });
        }
        let scale = match self.clip_norm {
            Some(c) if norm > c as f64 => (c as f64 / norm) as f32,
            _ => 1.0,
        };
        self.t += 1;
        let hyper = AdamHyper { lr, ..self.hyper };
        for (((p, g), m), v) in params
            .into_iter()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            b.adam_step(p, g, m, v, &hyper, self.t, scale)?;
        }
        Ok(norm)
    }
}
