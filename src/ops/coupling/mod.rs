//! Coupling layers as one fused op: the conditioner MLP on the copied half, the coupling
//! transform of the other half, and the per-row log-determinant (eq. 18.10–18.14).

pub mod cpu;
pub mod cuda;

use serde::{Deserialize, Serialize};

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::nn::mlp::Mlp;
use crate::ops::Direction;
use crate::tensor::Shaped;

/// Which half of the coordinates is copied and feeds the conditioner (Fig. 18.2). The lower
/// half is columns `0..D/2`, the upper half `D/2..D` (so for odd D the upper half is larger).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Half {
    Lower,
    Upper,
}

/// The coupling function h(z_B; conditioner output) of eq. 18.15.
///
/// Layout of the conditioner output (one row per batch row, `net_out()` columns), with
/// n_B = `transformed_cols().len()` and j = 0..n_B indexing the transformed columns in order:
/// - `Affine`: columns `0..n_B` hold raw s_j, columns `n_B..2·n_B` hold b_j (grouped by kind,
///   not interleaved).
/// - `Additive`: columns `0..n_B` hold b_j.
/// - `Spline`: one contiguous block of `3·bins − 1` columns per transformed column, block j at
///   `j·(3·bins − 1)`; inside a block: `bins` width logits, `bins` height logits, then
///   `bins − 1` interior-derivative pre-activations (see [`CouplingKind::Spline`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CouplingKind {
    /// RealNVP: x_B = exp(s) ⊙ z_B + b with the soft clamp s = clamp·tanh(raw/clamp).
    /// Conditioner output per transformed column: [raw s | b]. Forward log-det Σ s, inverse
    /// z_B = (x_B − b) ⊙ exp(−s) with log-det −Σ s.
    Affine { clamp: f32 },
    /// NICE: x_B = z_B + b; volume preserving. Conditioner output: `[b]`.
    Additive,
    /// Monotone rational-quadratic spline on [-bound, bound] with `bins` bins and the identity
    /// outside (Durkan et al. 2019). Conditioner output per transformed column:
    /// [bins widths | bins heights | bins-1 interior derivatives] (unnormalised).
    ///
    /// - Widths (and likewise heights): w = m + (1 − bins·m)·softmax(logits) with
    ///   m = [`SPLINE_MIN_BIN`], scaled by 2·bound; knots are −bound + cumulative sums, the last
    ///   knot set to +bound exactly.
    /// - Interior derivatives: δ = [`SPLINE_MIN_DERIVATIVE`] + softplus(a + c) with the shift
    ///   c = ln(e^(1 − min) − 1), so that a zero conditioner output gives δ = 1, uniform bins and
    ///   hence the identity (a zero-initialised last layer starts the layer as the identity).
    ///   The two boundary derivatives are fixed to 1, so the identity tails join in C¹.
    /// - Inside [−bound, bound] (bounds included) the spline applies; outside, the value passes
    ///   through with log-det 0. Forward uses the x-knots to pick the bin, inverse the y-knots
    ///   and the stable root ξ = 2c / (−b − sqrt(b² − 4ac)) of the bin's quadratic, with the
    ///   discriminant clamped at 0 and ξ clamped to [0, 1].
    Spline { bins: usize, bound: f32 },
}

/// The smallest spline bin, as a fraction of the domain (both widths and heights).
pub const SPLINE_MIN_BIN: f32 = 1e-3;
/// The smallest interior knot derivative of a spline.
pub const SPLINE_MIN_DERIVATIVE: f32 = 1e-3;
/// The most spline bins a layer may have (bounds per-thread scratch in the kernels; also keeps
/// `bins · SPLINE_MIN_BIN` well below 1).
pub const SPLINE_MAX_BINS: usize = 64;

impl CouplingKind {
    /// Conditioner outputs per transformed column.
    pub fn params_per_dim(&self) -> usize {
        match *self {
            CouplingKind::Affine { .. } => 2,
            CouplingKind::Additive => 1,
            // Saturating: a spec with 0 bins is rejected by `check_spec`, not by a panic here.
            CouplingKind::Spline { bins, .. } => (3 * bins).saturating_sub(1),
        }
    }

    /// The integer code passed to kernels: 0 affine, 1 additive, 2 spline.
    pub fn code(&self) -> i32 {
        match self {
            CouplingKind::Affine { .. } => 0,
            CouplingKind::Additive => 1,
            CouplingKind::Spline { .. } => 2,
        }
    }
}

/// Everything about a coupling layer except its conditioner weights.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CouplingSpec {
    pub dim: usize,
    pub copied: Half,
    pub kind: CouplingKind,
}

impl CouplingSpec {
    /// Columns of the copied (conditioning) half.
    pub fn copied_cols(&self) -> std::ops::Range<usize> {
        let mid = self.dim / 2;
        match self.copied {
            Half::Lower => 0..mid,
            Half::Upper => mid..self.dim,
        }
    }

    /// Columns of the transformed half.
    pub fn transformed_cols(&self) -> std::ops::Range<usize> {
        let mid = self.dim / 2;
        match self.copied {
            Half::Lower => mid..self.dim,
            Half::Upper => 0..mid,
        }
    }

    /// Width of the conditioner input.
    pub fn net_in(&self) -> usize {
        self.copied_cols().len()
    }

    /// Width of the conditioner output.
    pub fn net_out(&self) -> usize {
        self.transformed_cols().len() * self.kind.params_per_dim()
    }

    /// Checks the spec, the conditioner's shape and the batch's shape together.
    pub fn check<M: Shaped>(&self, op: &'static str, net: &Mlp<M>, input: &M) -> Result<()> {
        self.check_spec(op)?;
        net.check(op)?;
        if net.in_dim() != self.net_in() || net.out_dim() != self.net_out() {
            return Err(Error::shape(
                op,
                format!("conditioner {} -> {}", self.net_in(), self.net_out()),
                format!("{} -> {}", net.in_dim(), net.out_dim()),
            ));
        }
        input.expect_shape(op, input.rows(), self.dim)
    }

    /// Checks the spec alone: dim >= 2, a positive finite affine clamp, 2..=[`SPLINE_MAX_BINS`]
    /// spline bins and a positive finite spline bound.
    pub fn check_spec(&self, op: &'static str) -> Result<()> {
        if self.dim < 2 {
            return Err(Error::invalid(format!(
                "{op}: coupling needs dim >= 2, got {}",
                self.dim
            )));
        }
        match self.kind {
            CouplingKind::Affine { clamp } if !(clamp > 0.0 && clamp.is_finite()) => {
                return Err(Error::invalid(format!(
                    "{op}: affine clamp must be positive, got {clamp}"
                )));
            }
            CouplingKind::Spline { bins, bound }
                if !((2..=SPLINE_MAX_BINS).contains(&bins) && bound > 0.0 && bound.is_finite()) =>
            {
                return Err(Error::invalid(format!(
                    "{op}: spline needs 2..={SPLINE_MAX_BINS} bins and a positive bound, got {bins} bins on ±{bound}"
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

pub trait CouplingOps: Device {
    /// Applies the layer to a batch (B×D). Forward: z -> x; Inverse: x -> z.
    /// Returns the output (B×D) and log|det ∂out/∂in| per row (B×1). The copied half is
    /// returned unchanged (bit for bit).
    ///
    /// Errors: a bad spec or conditioner shape (see [`CouplingSpec::check`]), an empty batch
    /// (`Error::Empty`), a non-finite input or conditioner parameter, or a non-finite result
    /// (`Error::NonFinite`).
    fn coupling(
        &self,
        spec: &CouplingSpec,
        net: &Mlp<Self::Mat>,
        input: &Self::Mat,
        dir: Direction,
    ) -> Result<(Self::Mat, Self::Mat)>;

    /// Backward of `coupling` with the same arguments: given dL/d output (B×D) and
    /// dL/d logdet (B×1), returns dL/d input (B×D) and dL/d conditioner parameters.
    /// The conditioner activations are recomputed, not stored. dL/d input includes, for the
    /// copied half, both the pass-through gradient and the gradient through the conditioner.
    /// Parameter gradients are summed over the batch (not averaged).
    #[allow(clippy::too_many_arguments)]
    fn coupling_backward(
        &self,
        spec: &CouplingSpec,
        net: &Mlp<Self::Mat>,
        input: &Self::Mat,
        dir: Direction,
        d_out: &Self::Mat,
        d_logdet: &Self::Mat,
    ) -> Result<(Self::Mat, Mlp<Self::Mat>)>;
}
