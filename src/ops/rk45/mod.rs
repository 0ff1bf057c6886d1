//! The vector-field ops of continuous flows (eq. 18.22): the field f(z, t) of an MLP, the field
//! together with its divergence Tr(∂f/∂z) (eq. 18.28, exact or by Hutchinson's estimator,
//! eq. 18.29–18.30), and the vector–Jacobian product of the augmented dynamics that the adjoint
//! method integrates (eq. 18.25–18.26). kernels/rk45.cu holds the same ops (the field MLP
//! evaluated together with its JVPs on the directions, in the same pass; `cuda.rs` launches
//! them) next to the stage and step-control kernels of the device-resident solver
//! ([`step`], driven by `ode::device`).
//!
//! Conventions shared by every op:
//! - the field is an `Mlp` taking [z, t] (D + 1 inputs, time last) to D outputs;
//! - z is B×D, t is B×1 (each row has its own time: per-row steps), every result is per row;
//! - the divergence of row r is div_r = α·Σ_k v_kᵀ (∂f/∂z) v_k over K directions v_k: the D unit
//!   vectors with α = 1 for [`TraceMode::Exact`], or the M probes of row r with α = 1/M for
//!   [`TraceMode::Hutchinson`]. Both are computed by forward-mode JVPs J·v_k through the MLP
//!   (the exact trace of a field with at most two hidden layers by a cheaper closed form);
//! - the activation needs a second derivative wherever the gradient of the divergence is taken
//!   (reverse over forward mode): ReLU is refused there. `field_div` itself accepts ReLU (its
//!   divergence is then piecewise constant in z).

pub mod cpu;
pub mod cuda;
mod fastact;
mod narrow;
mod pass;
mod probes;
mod scratch;
pub mod step;
mod step_cpu;

use serde::{Deserialize, Serialize};

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::nn::mlp::{Activation, Mlp};
use crate::tensor::Shaped;

pub use probes::{MAX_PROBE_ROW, ProbeKind, generated_probes, probe_value, probes};
pub use step::{
    Dense, OdeStepOps, OdeSummary, OdeSystem, Phase, RowStatus, STATE_COLS, ShareMode, StepControl,
    col,
};

/// How the divergence Tr(∂f/∂z) is computed.
#[derive(Debug)]
pub enum TraceMode<'a, M> {
    /// Exactly. On the CPU, for a field with at most two hidden layers `field_div` evaluates
    /// the trace as a bilinear form in the activation slopes (one H1×H2 product per row,
    /// whatever D is); deeper fields, the gradient in `field_vjp`, and every field on a grid
    /// device use D forward-mode JVPs along the unit vectors, fused in one pass.
    Exact,
    /// Hutchinson's estimator (1/M)·Σ_m ε_mᵀ (∂f/∂z) ε_m with the probes of each row: a B×(M·D)
    /// matrix whose row r holds ε_0, …, ε_{M−1} of row r one after the other (see [`probes`]).
    Hutchinson(&'a M),
    /// Hutchinson's estimator with `m` probes drawn where they are used, by the counter hash of
    /// [`probe_value`] (a grid device generates them in the kernel: no probe matrix is read).
    /// Row r of the batch uses the probes of row `rows[r]` (a B×1 matrix of integer-valued row
    /// indices below [`MAX_PROBE_ROW`], e.g. the caller's rows of a compacted active set), or
    /// of row r itself when `rows` is None: the same numbers as [`generated_probes`].
    Generated {
        m: usize,
        kind: ProbeKind,
        seed: u64,
        rows: Option<&'a M>,
    },
}

impl<M> Clone for TraceMode<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for TraceMode<'_, M> {}

impl<M: Shaped> TraceMode<'_, M> {
    /// Directions per row: D for the exact trace, M for Hutchinson.
    pub fn directions(&self, dim: usize) -> usize {
        match self {
            TraceMode::Exact => dim,
            TraceMode::Hutchinson(p) => p.cols() / dim.max(1),
            TraceMode::Generated { m, .. } => *m,
        }
    }

    fn check(&self, op: &'static str, rows: usize, dim: usize) -> Result<()> {
        match self {
            TraceMode::Hutchinson(p)
                if p.rows() != rows || p.cols() == 0 || !p.cols().is_multiple_of(dim) =>
            {
                Err(Error::shape(
                    op,
                    format!("Hutchinson probes {rows}x(M·{dim}) with M >= 1"),
                    format!("{}x{}", p.rows(), p.cols()),
                ))
            }
            TraceMode::Generated { m: 0, .. } => Err(Error::invalid(format!(
                "{op}: Hutchinson's estimator needs at least one probe"
            ))),
            TraceMode::Generated {
                rows: Some(ids), ..
            } => ids.expect_shape(op, rows, 1),
            _ => Ok(()),
        }
    }
}

/// The cotangent of the divergence output in [`Rk45Ops::field_vjp`]: the augmented dynamics
/// are (dz/dt, dL/dt) = (f, −div), and `a_div` (B×1) is the adjoint of L.
#[derive(Debug)]
pub struct DivCotangent<'a, M> {
    pub a_div: &'a M,
    pub trace: TraceMode<'a, M>,
}

impl<M> Clone for DivCotangent<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for DivCotangent<'_, M> {}

/// Which parameter gradients [`Rk45Ops::field_vjp`] returns.
#[derive(Debug)]
pub enum ParamGrads<'a, M> {
    /// None (only g_z is wanted).
    Skip,
    /// Summed over rows.
    Sum,
    /// Summed over rows with weight w_r (B×1), e.g. an adjoint quadrature's −h·b_k.
    Weighted(&'a M),
}

impl<M> Clone for ParamGrads<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for ParamGrads<'_, M> {}

/// What [`Rk45Ops::field_vjp`] returns.
#[derive(Clone, Debug)]
pub struct FieldVjp<M> {
    /// f(z, t), B×D (computed on the way).
    pub f: M,
    /// aᵀ ∂f/∂z − a_div·∂div/∂z, B×D (unweighted).
    pub g_z: M,
    /// Σ_r w_r·(a_rᵀ ∂f/∂w − a_div,r·∂div_r/∂w), in the MLP's structure.
    pub g_params: Option<Mlp<M>>,
}

/// Vector-field ops; see the module documentation for the conventions.
pub trait Rk45Ops: Device + OdeStepOps {
    /// f(z, t): B×D.
    ///
    /// Errors: the MLP is not D+1 → D, z is not B×D or t not B×1, B = 0, a non-finite z or t.
    fn field(&self, net: &Mlp<Self::Mat>, z: &Self::Mat, t: &Self::Mat) -> Result<Self::Mat>;

    /// (f, div): f as in [`field`](Self::field) and div (B×1) = α·Σ_k v_kᵀ (∂f/∂z) v_k,
    /// exactly or by Hutchinson's estimator with the given probes (B×(M·D)).
    ///
    /// Errors: those of `field`, and probes of the wrong shape or non-finite.
    fn field_div(
        &self,
        net: &Mlp<Self::Mat>,
        z: &Self::Mat,
        t: &Self::Mat,
        trace: TraceMode<'_, Self::Mat>,
    ) -> Result<(Self::Mat, Self::Mat)>;

    /// The vector–Jacobian product of the augmented dynamics (f, −div) at (z, t) with the
    /// cotangent (a, a_div):
    ///   g_z = aᵀ ∂f/∂z − a_div·∂div/∂z                          (B×D),
    ///   g_w = Σ_r w_r·(a_rᵀ ∂f/∂w − a_div,r·∂div_r/∂w)           (per `params`),
    /// with the divergence term left out when `div` is None. ∂div/∂z and ∂div/∂w are
    /// reverse-mode derivatives of the forward-mode JVPs (second derivatives of the activation).
    ///
    /// Errors: those of `field`; a (B×D), a_div and weights (B×1) of the wrong shape or
    /// non-finite; a divergence term with ReLU (no second derivative).
    fn field_vjp(
        &self,
        net: &Mlp<Self::Mat>,
        z: &Self::Mat,
        t: &Self::Mat,
        a: &Self::Mat,
        div: Option<DivCotangent<'_, Self::Mat>>,
        params: ParamGrads<'_, Self::Mat>,
    ) -> Result<FieldVjp<Self::Mat>>;
}

/// Checks the field's shape against z (B×D) and t (B×1); returns (B, D).
pub fn check_field<M: Shaped>(
    op: &'static str,
    net: &Mlp<M>,
    z: &M,
    t: &M,
) -> Result<(usize, usize)> {
    net.check(op)?;
    let (rows, dim) = z.shape();
    if dim == 0 || net.in_dim() != dim + 1 || net.out_dim() != dim {
        return Err(Error::shape(
            op,
            format!("a vector field {} -> {dim} for z of width {dim}", dim + 1),
            format!("{} -> {}", net.in_dim(), net.out_dim()),
        ));
    }
    if rows == 0 {
        return Err(Error::Empty(format!("{op}: a batch of zero rows")));
    }
    t.expect_shape(op, rows, 1)?;
    Ok((rows, dim))
}

/// Checks the arguments of `field_vjp` beyond those of `field`.
pub fn check_vjp<M: Shaped>(
    op: &'static str,
    act: Activation,
    rows: usize,
    dim: usize,
    a: &M,
    div: Option<&DivCotangent<'_, M>>,
    params: &ParamGrads<'_, M>,
) -> Result<()> {
    a.expect_shape(op, rows, dim)?;
    if let Some(d) = div {
        d.a_div.expect_shape(op, rows, 1)?;
        d.trace.check(op, rows, dim)?;
        needs_second_derivative(op, act)?;
    }
    if let ParamGrads::Weighted(w) = params {
        w.expect_shape(op, rows, 1)?;
    }
    Ok(())
}

/// Checks the probes of a Hutchinson trace.
pub fn check_trace<M: Shaped>(
    op: &'static str,
    trace: &TraceMode<'_, M>,
    rows: usize,
    dim: usize,
) -> Result<()> {
    trace.check(op, rows, dim)
}

/// The gradient of a divergence differentiates the activation twice; ReLU's second derivative
/// is zero almost everywhere and its divergence jumps, so such a gradient would be silently
/// wrong where it matters.
pub fn needs_second_derivative(op: &'static str, act: Activation) -> Result<()> {
    if act == Activation::Relu {
        return Err(Error::invalid(format!(
            "{op}: the gradient of the divergence needs a twice-differentiable activation \
             (tanh, silu, softplus), not relu"
        )));
    }
    Ok(())
}

/// The trace estimator of a CNF, as configured (the probes themselves are drawn per solve).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TraceSpec {
    Exact,
    Hutchinson { probes: usize, probe: ProbeKind },
}
