//! Affine autoregressive layers with a MADE conditioner: MAF (eq. 18.17–18.18) and IAF
//! (eq. 18.19–18.20). Both share the transform x_i = z_i·exp(s_i) + b_i with a triangular
//! Jacobian; they differ in which variable the MADE reads, and so in which direction is one
//! parallel pass and which is sequential:
//!
//! | layer | forward (z -> x, sampling)     | inverse (x -> z, density)      |
//! |-------|--------------------------------|--------------------------------|
//! | MAF   | `ar_sequential(Forward)` on z  | `ar_parallel(Inverse)` on x    |
//! | IAF   | `ar_parallel(Forward)` on z    | `ar_sequential(Inverse)` on x  |
//!
//! The backward of the parallel direction is `ar_parallel_backward`. The backward of the
//! sequential direction is obtained by implicit differentiation (see `sequential_backward`),
//! written with backend ops only so that it runs on every backend.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::layer::{ArKind, FlowLayer, LayerConfig, LayerState};
use crate::nn::made::{Order, layer_mask, made};
use crate::nn::mlp::{Activation, Mlp, Widths};
use crate::ops::Direction;
use crate::ops::made::MadeSpec;
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};

/// A MAF or IAF layer on backend `B`.
pub struct AutoregressiveLayer<B: Backend> {
    pub kind: ArKind,
    pub spec: MadeSpec,
    /// The MADE, D -> hidden.. -> 2D, outputs [b | raw s].
    pub net: Mlp<B::Mat>,
    /// `spec.degrees`, uploaded (one index vector per layer).
    pub degrees: Vec<B::Idx>,
}

impl<B: Backend> Clone for AutoregressiveLayer<B> {
    fn clone(&self) -> Self {
        AutoregressiveLayer {
            kind: self.kind,
            spec: self.spec.clone(),
            net: self.net.clone(),
            degrees: self.degrees.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for AutoregressiveLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoregressiveLayer")
            .field("kind", &self.kind)
            .field("dim", &self.spec.dim)
            .field("widths", &self.net.widths())
            .field("act", &self.net.act)
            .field("clamp", &self.spec.clamp)
            .finish()
    }
}

impl<B: Backend> AutoregressiveLayer<B> {
    /// A layer that starts as the identity (zero MADE output layer); see [`made`] for the
    /// degrees and the errors.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &B,
        kind: ArKind,
        dim: usize,
        hidden: &[usize],
        act: Activation,
        order: Order,
        clamp: f32,
        rng: &mut Rng,
    ) -> Result<Self> {
        let (spec, net) = made(dim, hidden, act, order, clamp, rng)?;
        Self::from_host(b, kind, spec, &net)
    }

    /// A layer from a spec and host weights (checked against each other), uploaded to `b`.
    pub fn from_host(b: &B, kind: ArKind, spec: MadeSpec, net: &Mlp<Tensor>) -> Result<Self> {
        spec.check("AutoregressiveLayer", net, &Tensor::zeros(0, spec.dim))?;
        net.check_finite("autoregressive layer")?;
        let degrees = spec
            .degrees
            .iter()
            .map(|d| b.upload_idx(d))
            .collect::<Result<Vec<_>>>()?;
        Ok(AutoregressiveLayer {
            kind,
            spec,
            net: net.try_map(|t| b.upload(t))?,
            degrees,
        })
    }

    /// Rebuilds a layer from its [`LayerState`]: the config must be autoregressive and the
    /// tensors exactly w0, b0, w1, b1, ... with the shapes the degrees imply.
    pub fn from_state(b: &B, state: &LayerState) -> Result<Self> {
        let LayerConfig::Autoregressive { kind, spec, act } = &state.config else {
            return Err(Error::invalid(format!(
                "expected an autoregressive layer state, got {:?}",
                state.config
            )));
        };
        let layers = spec.degrees.len().saturating_sub(1);
        if layers == 0 {
            return Err(Error::invalid(
                "autoregressive layer state: the spec needs at least input and output degrees",
            ));
        }
        let widths: Vec<usize> = spec.degrees.iter().map(Vec::len).collect();
        let net = Mlp::from_named(
            "autoregressive layer state",
            *act,
            &state.tensors,
            Widths::Exact(&widths),
        )?;
        Self::from_host(b, *kind, spec.clone(), &net)
    }

    fn parallel(&self, b: &B, input: &B::Mat, dir: Direction) -> Result<(B::Mat, B::Mat)> {
        b.ar_parallel(&self.spec, &self.net, &self.degrees, input, dir)
    }

    fn sequential(&self, b: &B, input: &B::Mat, dir: Direction) -> Result<(B::Mat, B::Mat)> {
        b.ar_sequential(&self.spec, &self.net, &self.degrees, input, dir)
    }

    fn parallel_backward(
        &self,
        b: &B,
        input: &B::Mat,
        dir: Direction,
        d_out: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        let (d_in, grads) = b.ar_parallel_backward(
            &self.spec,
            &self.net,
            &self.degrees,
            input,
            dir,
            d_out,
            d_logdet,
        )?;
        // Same order as `params()`: w0, b0, w1, b1, ...
        Ok((d_in, grads.into_tensors()))
    }

    /// The diagonal of the Jacobian of `ar_parallel(dir)` at `y`, per element: e^s forward,
    /// e^−s inverse, with s = s(y).
    ///
    /// The transform of coordinate j is affine in y_j with that slope, and s_j does not depend
    /// on y_j. Shifting every input by 1 would move s, so the shift is undone inside the MADE:
    /// with b0' = b0 − 1ᵀ(W0 ⊙ M0) the first layer sees (y + 1)·(W0 ⊙ M0) + b0' =
    /// y·(W0 ⊙ M0) + b0, and the difference of the two transforms is exactly the slope.
    /// (The column sums come from `col_moments`: D times the column means.)
    fn jacobian_diagonal(&self, b: &B, y: &B::Mat, dir: Direction) -> Result<B::Mat> {
        let d = self.spec.dim;
        let first = &self.net.layers[0];
        let mask = b.upload(&layer_mask(&self.spec, 0)?)?;
        let masked = b.mul(&first.w, &mask)?;
        let (col_mean, _) = b.col_moments(&masked)?;
        let mut shifted_net = self.net.clone();
        shifted_net.layers[0].b = b.axpby(1.0, &first.b, -(d as f32), &col_mean)?;
        let ones = b.fill(y.rows(), d, 1.0)?;
        let y_plus = b.axpby(1.0, y, 1.0, &ones)?;
        let (shifted, _) = b.ar_parallel(&self.spec, &shifted_net, &self.degrees, &y_plus, dir)?;
        let (plain, _) = self.parallel(b, y, dir)?;
        b.axpby(1.0, &shifted, -1.0, &plain)
    }

    /// Backward of the sequential direction `seq` (MAF forward, IAF inverse) at `given`, by
    /// implicit differentiation.
    ///
    /// Let P = ar_parallel(par) with par = seq reversed, so the sequential map is S = P⁻¹:
    /// y = S(given) solves P(y) = given, and its logdet is −ld_P(y). For a loss L(y, ld) with
    /// g = dL/dy and gl = dL/dld:
    /// - through y and the logdet, the total derivative with respect to y is
    ///   u = g − gl·∂ld_P/∂y;
    /// - dL/dgiven = J_S(given)ᵀ u = J_P(y)⁻ᵀ u =: λ, the solution of J_Pᵀ λ = u;
    /// - from P(y, w) = given, dy/dw = −J_P⁻¹ ∂P/∂w, so dL/dw = −λᵀ ∂P/∂w − gl·∂ld_P/∂w.
    ///
    /// J_P = diag(q⁻¹) + N with N strictly lower triangular in degree order (output i sees only
    /// inputs of lower degree) and q⁻¹ = e^s forward, e^−s inverse. The iteration
    ///   λ ← λ + q ⊙ (u − J_Pᵀ λ)
    /// has error map e ← −(q ⊙ Nᵀ) e, which is nilpotent: after D steps λ is exact. Since
    /// `ar_parallel_backward(y, d_out = λ, d_logdet = gl)` returns J_Pᵀ λ + gl·∂ld_P/∂y, one
    /// step is λ ← λ + q ⊙ (g − that), from λ = 0. The parameter gradient is then one more
    /// backward with d_out = −λ, d_logdet = −gl.
    ///
    /// Cost: one sequential pass (to recover y), two parallel passes (q, see
    /// `jacobian_diagonal`) and D + 1 parallel backward passes.
    fn sequential_backward(
        &self,
        b: &B,
        given: &B::Mat,
        seq: Direction,
        g: &B::Mat,
        gl: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        let d = self.spec.dim;
        let op = "autoregressive sequential backward";
        g.expect_shape(op, given.rows(), d)?;
        gl.expect_shape(op, given.rows(), 1)?;
        let par = seq.reversed();
        let (y, _) = self.sequential(b, given, seq)?;
        // 1 / diag(J_P) is the diagonal of the Jacobian of the opposite-direction map.
        let q = self.jacobian_diagonal(b, &y, seq)?;
        let mut lambda = b.zeros(given.rows(), d)?;
        for _ in 0..d {
            let (jt_lambda, _) =
                b.ar_parallel_backward(&self.spec, &self.net, &self.degrees, &y, par, &lambda, gl)?;
            let residual = b.axpby(1.0, g, -1.0, &jt_lambda)?;
            let step = b.mul(&q, &residual)?;
            lambda = b.axpby(1.0, &lambda, 1.0, &step)?;
        }
        let neg_lambda = b.axpby(-1.0, &lambda, 0.0, &lambda)?;
        let neg_gl = b.axpby(-1.0, gl, 0.0, gl)?;
        let (_, grads) = self.parallel_backward(b, &y, par, &neg_lambda, &neg_gl)?;
        Ok((lambda, grads))
    }
}

impl<B: Backend> FlowLayer<B> for AutoregressiveLayer<B> {
    fn dim(&self) -> usize {
        self.spec.dim
    }

    fn forward(&self, b: &B, z: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        match self.kind {
            ArKind::Maf => self.sequential(b, z, Direction::Forward),
            ArKind::Iaf => self.parallel(b, z, Direction::Forward),
        }
    }

    fn inverse(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        match self.kind {
            ArKind::Maf => self.parallel(b, x, Direction::Inverse),
            ArKind::Iaf => self.sequential(b, x, Direction::Inverse),
        }
    }

    fn inverse_backward(
        &self,
        b: &B,
        x: &B::Mat,
        d_z: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        match self.kind {
            ArKind::Maf => self.parallel_backward(b, x, Direction::Inverse, d_z, d_logdet),
            ArKind::Iaf => self.sequential_backward(b, x, Direction::Inverse, d_z, d_logdet),
        }
    }

    fn forward_backward(
        &self,
        b: &B,
        z: &B::Mat,
        d_x: &B::Mat,
        d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        match self.kind {
            ArKind::Maf => self.sequential_backward(b, z, Direction::Forward, d_x, d_logdet),
            ArKind::Iaf => self.parallel_backward(b, z, Direction::Forward, d_x, d_logdet),
        }
    }

    fn params(&self) -> Vec<&B::Mat> {
        self.net.tensors()
    }

    fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        self.net.tensors_mut()
    }

    fn state(&self, b: &B) -> Result<LayerState> {
        let tensors = self.net.named_tensors(|t| b.download(t))?;
        Ok(LayerState {
            config: LayerConfig::Autoregressive {
                kind: self.kind,
                spec: self.spec.clone(),
                act: self.net.act,
            },
            tensors,
        })
    }
}
