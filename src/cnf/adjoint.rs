//! Gradients by the adjoint sensitivity method (eq. 18.24–18.26), FFJORD-style: after a forward
//! solve, the adjoint a(t) = ∂loss/∂z(t) is integrated backward in time with the same RK45,
//! z(t) recomputed on the way back, so memory does not depend on the number of steps.
//!
//! For the maximum-likelihood loss the forward solve is the density solve (t = 1 → 0, state
//! (z, L), see [`super::density`]); each row's loss −log p(x) = −log N(z(0)) + L(0) gives the
//! terminal adjoints a_z(0) = z(0) and a_L = 1, the batch mean enters as the weight 1/B of the
//! parameter quadrature, and the backward solve runs t = 0 → 1 (`integrate::solve_adjoint`).

use super::density::{check_batch, density};
use super::field::VectorField;
use super::integrate::solve_adjoint;
use super::trace::Trace;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ode::{OdeOptions, SolveStats};
use crate::tensor::{Shaped, Tensor};

/// The divergence part of a terminal adjoint: ∂loss/∂L at the end of a density-type solve
/// (B×1) and the Hutchinson probes that solve used (None: exact trace).
#[derive(Clone, Copy, Debug)]
pub struct DivAdjoint<'a> {
    pub a_div: &'a Tensor,
    pub probes: Option<&'a Tensor>,
}

/// What the backward solve returns.
#[derive(Debug)]
pub struct Sensitivity<B: Backend> {
    /// ∂loss/∂z at the start of the forward solve (B×D).
    pub a_start: Tensor,
    /// z at the start of the forward solve, recomputed backward (B×D).
    pub z_start: Tensor,
    /// ∂loss/∂w (times the requested scale), in `VectorField::params()` order.
    pub params: Vec<B::Mat>,
    pub stats: SolveStats,
    /// Rows evaluated by the parameter quadrature.
    pub quadrature_rows: usize,
}

/// The work of a maximum-likelihood gradient.
#[derive(Clone, Debug)]
pub struct AdjointStats {
    pub forward: SolveStats,
    pub backward: SolveStats,
    pub quadrature_rows: usize,
}

/// The adjoint of a forward solve over `span` = (t_start, t_end) that ended at `z_end`, for a
/// loss with ∂loss/∂z(t_end) = `a_end` (B×D) and, for a density-type solve, ∂loss/∂L(t_end)
/// in `div`. Parameter gradients are multiplied by `param_scale` (e.g. 1/B for a batch mean).
///
/// Errors: shapes that do not match the field and each other, empty or non-finite inputs, a
/// divergence term with ReLU, and solver failures.
#[allow(clippy::too_many_arguments)]
pub fn adjoint<B: Backend>(
    b: &B,
    field: &VectorField<B>,
    span: (f64, f64),
    z_end: &Tensor,
    a_end: &Tensor,
    div: Option<DivAdjoint<'_>>,
    opts: &OdeOptions,
    param_scale: f64,
) -> Result<Sensitivity<B>> {
    let dim = field.dim();
    check_batch("adjoint: z_end", z_end, dim)?;
    let rows = z_end.rows();
    a_end.expect_shape("adjoint: a_end", rows, dim)?;
    a_end.check_finite("adjoint: a_end")?;
    if !param_scale.is_finite() {
        return Err(Error::invalid(format!(
            "adjoint: parameter scale must be finite, got {param_scale}"
        )));
    }
    if let Some(d) = &div {
        crate::ops::rk45::needs_second_derivative("adjoint", field.act())?;
        d.a_div.expect_shape("adjoint: a_div", rows, 1)?;
        d.a_div.check_finite("adjoint: a_div")?;
        if let Some(p) = d.probes
            && (p.rows() != rows || p.cols() == 0 || !p.cols().is_multiple_of(dim))
        {
            return Err(Error::shape(
                "adjoint: probes",
                format!("{rows}x(M·{dim})"),
                format!("{}x{}", p.rows(), p.cols()),
            ));
        }
    }
    let out = solve_adjoint(
        b,
        field.net(),
        z_end,
        a_end,
        div.map(|d| d.a_div),
        span,
        opts,
        div.and_then(|d| d.probes),
        param_scale,
    )?;
    let params = out
        .grads
        .tensors()
        .into_iter()
        .map(|t| b.upload(t))
        .collect::<Result<Vec<_>>>()?;
    Ok(Sensitivity {
        a_start: out.a,
        z_start: out.z,
        params,
        stats: out.stats,
        quadrature_rows: out.quadrature_rows,
    })
}

/// The mean negative log-likelihood of `x` (B×D, host) and its gradient with respect to the
/// field's parameters by the adjoint method, with the given trace estimator for both solves.
pub fn nll_and_grad<B: Backend>(
    b: &B,
    field: &VectorField<B>,
    x: &Tensor,
    opts: &OdeOptions,
    trace: Trace,
) -> Result<(f64, Vec<B::Mat>, AdjointStats)> {
    let rows = x.rows();
    let probes = trace.probes(rows.max(1), field.dim())?;
    let dens = density(b, field, x, opts, probes.as_ref())?;
    let nll = -dens.log_prob.iter().sum::<f64>() / rows as f64;
    if !nll.is_finite() {
        return Err(Error::NonFinite {
            what: "negative log-likelihood".into(),
            row: 0,
            col: 0,
        });
    }
    // Row loss −log N(z(0)) + L(0): ∂/∂z(0) = z(0), ∂/∂L(0) = 1.
    let ones = Tensor::full(rows, 1, 1.0);
    let sens = adjoint(
        b,
        field,
        (1.0, 0.0),
        &dens.z,
        &dens.z,
        Some(DivAdjoint {
            a_div: &ones,
            probes: probes.as_ref(),
        }),
        opts,
        1.0 / rows as f64,
    )?;
    Ok((
        nll,
        sens.params,
        AdjointStats {
            forward: dens.stats,
            backward: sens.stats,
            quadrature_rows: sens.quadrature_rows,
        },
    ))
}
