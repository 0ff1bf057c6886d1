//! A flow: the standard-normal base density and a stack of invertible layers (eq. 18.1–18.4).
//! `layers[0]` acts first on a base sample z; the last layer produces the data x. The density
//! runs the other way: x -> layers[K-1]⁻¹ -> ... -> layers[0]⁻¹ -> z, and
//! log p(x) = log N(z; 0, I) + Σ_k log|det ∂z_k/∂x_k| (eq. 18.7).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::layer::{FlowLayer, LayerState};
use crate::ops::Direction;
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};

pub struct Flow<B: Backend> {
    dim: usize,
    layers: Vec<Box<dyn FlowLayer<B>>>,
}

impl<B: Backend> Flow<B> {
    pub fn new(dim: usize, layers: Vec<Box<dyn FlowLayer<B>>>) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("a flow needs dim >= 1"));
        }
        if let Some((i, l)) = layers.iter().enumerate().find(|(_, l)| l.dim() != dim) {
            return Err(Error::shape(
                "Flow::new",
                format!("layers of width {dim}"),
                format!("layer {i} of width {}", l.dim()),
            ));
        }
        Ok(Flow { dim, layers })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn layers(&self) -> &[Box<dyn FlowLayer<B>>] {
        &self.layers
    }

    /// Adds a layer on the data side.
    pub fn push(&mut self, layer: Box<dyn FlowLayer<B>>) -> Result<()> {
        if layer.dim() != self.dim {
            return Err(Error::shape("Flow::push", self.dim, layer.dim()));
        }
        self.layers.push(layer);
        Ok(())
    }

    fn check_batch(&self, op: &'static str, m: &B::Mat) -> Result<()> {
        if m.rows() == 0 {
            return Err(Error::Empty(format!("{op}: a batch of zero rows")));
        }
        m.expect_shape(op, m.rows(), self.dim)
    }

    /// z -> x with the total log|det ∂x/∂z| per row.
    pub fn forward(&self, b: &B, z: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        self.check_batch("Flow::forward", z)?;
        self.chain(b, z, Direction::Forward)
    }

    /// x -> z with the total log|det ∂z/∂x| per row.
    pub fn inverse(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        self.check_batch("Flow::inverse", x)?;
        self.chain(b, x, Direction::Inverse)
    }

    /// Every layer in turn (data side last for Forward, first for Inverse), summing log-dets.
    fn chain(&self, b: &B, input: &B::Mat, dir: Direction) -> Result<(B::Mat, B::Mat)> {
        let mut out: Option<B::Mat> = None;
        let mut total = b.fill(input.rows(), 1, 0.0)?;
        let apply = |layer: &dyn FlowLayer<B>, x: &B::Mat| match dir {
            Direction::Forward => layer.forward(b, x),
            Direction::Inverse => layer.inverse(b, x),
        };
        let mut step = |layer: &dyn FlowLayer<B>| -> Result<()> {
            let (y, ld) = apply(layer, out.as_ref().unwrap_or(input))?;
            total = b.axpby(1.0, &total, 1.0, &ld)?;
            out = Some(y);
            Ok(())
        };
        match dir {
            Direction::Forward => self.layers.iter().try_for_each(|l| step(l.as_ref()))?,
            Direction::Inverse => self
                .layers
                .iter()
                .rev()
                .try_for_each(|l| step(l.as_ref()))?,
        }
        Ok((out.unwrap_or_else(|| input.clone()), total))
    }

    /// log p(x) per row (B×1).
    pub fn log_prob(&self, b: &B, x: &B::Mat) -> Result<B::Mat> {
        let (z, ld) = self.inverse(b, x)?;
        let base = b.gaussian_log_prob(&z)?;
        b.axpby(1.0, &base, 1.0, &ld)
    }

    /// Mean negative log-likelihood of a batch, in nats per sample.
    pub fn nll(&self, b: &B, x: &B::Mat) -> Result<f64> {
        let lp = self.log_prob(b, x)?;
        let nll = -b.sum(&lp)? / lp.rows() as f64;
        if !nll.is_finite() {
            return Err(Error::NonFinite {
                what: "negative log-likelihood".into(),
                row: 0,
                col: 0,
            });
        }
        Ok(nll)
    }

    /// `n` seeded samples: z ~ N(0, I) drawn on the host, then pushed through the layers.
    pub fn sample(&self, b: &B, n: usize, rng: &mut Rng) -> Result<B::Mat> {
        let z = b.upload(&Tensor::randn(n, self.dim, rng))?;
        Ok(self.forward(b, &z)?.0)
    }

    /// The base batch and its image after each layer (for figures in the style of Fig. 18.3).
    pub fn forward_stages(&self, b: &B, z: &B::Mat) -> Result<Vec<Tensor>> {
        self.check_batch("Flow::forward_stages", z)?;
        let mut stages = vec![b.download(z)?];
        let mut x = z.clone();
        for layer in &self.layers {
            x = layer.forward(b, &x)?.0;
            stages.push(b.download(&x)?);
        }
        Ok(stages)
    }

    /// The mean NLL of the batch and its gradient with respect to every parameter, in
    /// `params()` order. One inverse pass keeps each layer's input; the backward pass then
    /// runs from the base back to the data.
    pub fn nll_and_grad(&self, b: &B, x: &B::Mat) -> Result<(f64, Vec<B::Mat>)> {
        self.check_batch("Flow::nll_and_grad", x)?;
        let n = x.rows();
        let k = self.layers.len();
        // inputs[i] is what layer i's inverse receives.
        let mut inputs: Vec<B::Mat> = Vec::with_capacity(k);
        let mut z = x.clone();
        let mut total = b.fill(n, 1, 0.0)?;
        for layer in self.layers.iter().rev() {
            let (y, ld) = layer.inverse(b, &z)?;
            total = b.axpby(1.0, &total, 1.0, &ld)?;
            inputs.push(std::mem::replace(&mut z, y));
        }
        inputs.reverse();
        let lp = b.axpby(1.0, &b.gaussian_log_prob(&z)?, 1.0, &total)?;
        let nll = -b.sum(&lp)? / n as f64;
        if !nll.is_finite() {
            return Err(Error::NonFinite {
                what: "negative log-likelihood".into(),
                row: 0,
                col: 0,
            });
        }
        // -d/dz log N(z) = z, and every log-det enters with weight -1; both averaged over rows.
        let inv_n = 1.0 / n as f32;
        let mut grad = b.axpby(inv_n, &z, 0.0, &z)?;
        let d_logdet = b.fill(n, 1, -inv_n)?;
        let mut per_layer: Vec<Vec<B::Mat>> = Vec::with_capacity(k);
        for (layer, input) in self.layers.iter().zip(&inputs) {
            let (g_in, g_params) = layer.inverse_backward(b, input, &grad, &d_logdet)?;
            per_layer.push(g_params);
            grad = g_in;
        }
        Ok((nll, per_layer.into_iter().flatten().collect()))
    }

    /// Every trainable tensor, layer by layer.
    pub fn params(&self) -> Vec<&B::Mat> {
        self.layers.iter().flat_map(|l| l.params()).collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.params_mut())
            .collect()
    }

    /// Data-dependent initialisation: passes the batch down the inverse direction and lets
    /// each layer (ActNorm) set itself from what reaches it.
    pub fn init_from_data(&mut self, b: &B, x: &B::Mat) -> Result<()> {
        self.check_batch("Flow::init_from_data", x)?;
        let mut z = x.clone();
        for layer in self.layers.iter_mut().rev() {
            layer.init_from_data(b, &z)?;
            z = layer.inverse(b, &z)?.0;
        }
        Ok(())
    }

    /// Every layer's config and tensors, on the host.
    pub fn states(&self, b: &B) -> Result<Vec<LayerState>> {
        self.layers.iter().map(|l| l.state(b)).collect()
    }
}
