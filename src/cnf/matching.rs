//! Conditional flow matching with the optimal-transport path (Lipman et al. 2022): a
//! simulation-free way to train the vector field. For a data point x1, a base draw x0 ~ N(0, I)
//! and t ~ U(0, 1),
//!
//!   x_t = (1 − (1 − σ_min)·t)·x0 + t·x1,    u = x1 − (1 − σ_min)·x0,
//!
//! and the loss is the batch mean of ‖f(x_t, t) − u‖². Its minimiser is the marginal field that
//! carries N(0, I) at t = 0 to the data (smoothed by σ_min) at t = 1. No ODE is solved.

use super::field::VectorField;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::rk45::ParamGrads;
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};

/// One batch of regression targets on the probability path.
#[derive(Clone, Debug, PartialEq)]
pub struct PathSample {
    /// Points x_t on the path (B×D).
    pub x_t: Tensor,
    /// Times (B×1).
    pub t: Tensor,
    /// Target velocities u (B×D).
    pub u: Tensor,
}

pub fn check_sigma_min(sigma_min: f32) -> Result<()> {
    if !(sigma_min.is_finite() && (0.0..1.0).contains(&sigma_min)) {
        return Err(Error::invalid(format!(
            "flow matching needs 0 <= sigma_min < 1, got {sigma_min}"
        )));
    }
    Ok(())
}

/// The optimal-transport path at the given x0 (B×D), x1 (B×D) and t (B×1).
pub fn ot_path(x0: &Tensor, x1: &Tensor, t: &Tensor, sigma_min: f32) -> Result<PathSample> {
    check_sigma_min(sigma_min)?;
    let (rows, dim) = x1.shape();
    x0.expect_shape("ot_path: x0", rows, dim)?;
    t.expect_shape("ot_path: t", rows, 1)?;
    let shrink = 1.0 - sigma_min;
    let x_t = Tensor::from_fn(rows, dim, |i, j| {
        let ti = t.get(i, 0);
        (1.0 - shrink * ti) * x0.get(i, j) + ti * x1.get(i, j)
    });
    let u = Tensor::from_fn(rows, dim, |i, j| x1.get(i, j) - shrink * x0.get(i, j));
    Ok(PathSample {
        x_t,
        t: t.clone(),
        u,
    })
}

/// x0 ~ N(0, I) and t ~ U(0, 1) for each row of x1, from `rng`.
pub fn sample_path(x1: &Tensor, sigma_min: f32, rng: &mut Rng) -> Result<PathSample> {
    let (rows, dim) = x1.shape();
    let x0 = Tensor::randn(rows, dim, rng);
    let t = Tensor::rand_uniform(rows, 1, 0.0, 1.0, rng);
    ot_path(&x0, x1, &t, sigma_min)
}

/// The loss mean_r ‖f(x_t, t) − u‖² of a path sample and, when `want_grad`, its gradient.
pub fn regression_loss<B: Backend>(
    b: &B,
    field: &VectorField<B>,
    path: &PathSample,
    want_grad: bool,
) -> Result<(f64, Option<Vec<B::Mat>>)> {
    let rows = path.x_t.rows();
    if rows == 0 {
        return Err(Error::Empty("flow matching: a batch of zero rows".into()));
    }
    let (x, t) = (b.upload(&path.x_t)?, b.upload(&path.t)?);
    let f = b.download(&b.field(field.net(), &x, &t)?)?;
    let mut loss = 0.0f64;
    let scale = 2.0 / rows as f64;
    let residual: Vec<f32> = f
        .data()
        .iter()
        .zip(path.u.data())
        .map(|(&fv, &uv)| {
            let r = fv as f64 - uv as f64;
            loss += r * r;
            (scale * r) as f32
        })
        .collect();
    let loss = loss / rows as f64;
    if !want_grad {
        return Ok((loss, None));
    }
    let a = b.upload(&Tensor::from_vec(rows, field.dim(), residual)?)?;
    let out = b.field_vjp(field.net(), &x, &t, &a, None, ParamGrads::Sum)?;
    let grads = out
        .g_params
        .ok_or_else(|| Error::invalid("field_vjp returned no parameter gradients"))?;
    Ok((
        loss,
        Some(grads.layers.into_iter().flat_map(|l| [l.w, l.b]).collect()),
    ))
}

/// One flow-matching step's loss and gradient (in `VectorField::params()` order) for the data
/// batch `x1` (B×D, host), with x0 and t drawn from `rng`.
pub fn loss_and_grad<B: Backend>(
    b: &B,
    field: &VectorField<B>,
    x1: &Tensor,
    sigma_min: f32,
    rng: &mut Rng,
) -> Result<(f64, Vec<B::Mat>)> {
    super::density::check_batch("flow matching", x1, field.dim())?;
    let path = sample_path(x1, sigma_min, rng)?;
    let (loss, grads) = regression_loss(b, field, &path, true)?;
    let grads = grads.ok_or_else(|| Error::invalid("flow matching: no gradient computed"))?;
    Ok((loss, grads))
}
