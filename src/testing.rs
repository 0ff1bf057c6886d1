//! Checks shared by the test suites and the parity runs: tolerance comparison that reports the
//! first mismatches (after llm.c's validate_result), and finite-difference Jacobians in f64.

use crate::tensor::{Shaped, Tensor};

/// How many mismatches a failed comparison lists.
const SHOWN: usize = 8;

/// Passes when |got - want| <= atol + rtol·|want| everywhere (and shapes agree); otherwise the
/// message names the worst error and lists the first mismatches with their positions.
pub fn compare(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    atol: f32,
    rtol: f32,
) -> Result<(), String> {
    compare_elementwise(what, got, want, atol, rtol, |_| 0.0)
}

/// [`compare`] with an extra per-element allowance `slack[k]` (same shape as `want`): for
/// values whose reference is itself ill-conditioned, e.g. `slack` = a few times the change of
/// the reference under a rounding-sized perturbation of its inputs.
pub fn compare_with_slack(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    atol: f32,
    rtol: f32,
    slack: &Tensor,
) -> Result<(), String> {
    if slack.shape() != want.shape() {
        return Err(format!(
            "{what}: slack shape {:?} vs reference {:?}",
            slack.shape(),
            want.shape()
        ));
    }
    compare_elementwise(what, got, want, atol, rtol, |k| slack.data()[k])
}

fn compare_elementwise(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    atol: f32,
    rtol: f32,
    extra: impl Fn(usize) -> f32,
) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!(
            "{what}: shape {:?} vs reference {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let cols = want.cols().max(1);
    let mut bad = Vec::new();
    let mut count = 0usize;
    let mut worst = 0.0f32;
    for (k, (&g, &w)) in got.data().iter().zip(want.data()).enumerate() {
        let err = (g - w).abs();
        let ok = err <= atol + rtol * w.abs() + extra(k) || (g.is_nan() && w.is_nan());
        if !ok || !g.is_finite() && w.is_finite() {
            count += 1;
            worst = worst.max(if err.is_nan() { f32::INFINITY } else { err });
            if bad.len() < SHOWN {
                bad.push(format!(
                    "  [{}, {}] got {g:.7e} want {w:.7e} (|diff| {err:.3e})",
                    k / cols,
                    k % cols
                ));
            }
        }
    }
    if count == 0 {
        Ok(())
    } else {
        Err(format!(
            "{what}: {count} of {} values outside atol {atol:e} + rtol {rtol:e}·|ref| (worst {worst:.3e}); first:\n{}",
            want.len(),
            bad.join("\n")
        ))
    }
}

/// Panics with `compare`'s report on failure (for use inside tests).
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
    if let Err(msg) = compare(what, got, want, atol, rtol) {
        panic!("{msg}");
    }
}

/// Central-difference Jacobian of a map R^n -> R^m evaluated in f64: J[i][j] = ∂f_i/∂x_j.
pub fn fd_jacobian(f: impl Fn(&[f64]) -> Vec<f64>, x: &[f64], eps: f64) -> Vec<Vec<f64>> {
    let m = f(x).len();
    let mut jac = vec![vec![0.0; x.len()]; m];
    for j in 0..x.len() {
        let mut xp = x.to_vec();
        let mut xm = x.to_vec();
        xp[j] += eps;
        xm[j] -= eps;
        let (fp, fm) = (f(&xp), f(&xm));
        for i in 0..m {
            jac[i][j] = (fp[i] - fm[i]) / (2.0 * eps);
        }
    }
    jac
}

/// log|det A| of a square matrix by LU decomposition with partial pivoting, in f64.
pub fn log_abs_det(a: &[Vec<f64>]) -> f64 {
    let n = a.len();
    let mut m: Vec<Vec<f64>> = a.to_vec();
    let mut acc = 0.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs()))
            .unwrap_or(c);
        m.swap(c, p);
        let piv = m[c][c];
        if piv == 0.0 {
            return f64::NEG_INFINITY;
        }
        acc += piv.abs().ln();
        let (top, below) = m.split_at_mut(c + 1);
        let pivot_row = &top[c];
        for row in below {
            let f = row[c] / piv;
            for (x, p) in row[c..].iter_mut().zip(&pivot_row[c..]) {
                *x -= f * p;
            }
        }
    }
    acc
}

/// Central-difference gradient of a scalar function: g_j = ∂f/∂x_j.
pub fn fd_gradient(f: impl Fn(&[f64]) -> f64, x: &[f64], eps: f64) -> Vec<f64> {
    (0..x.len())
        .map(|j| {
            let mut xp = x.to_vec();
            let mut xm = x.to_vec();
            xp[j] += eps;
            xm[j] -= eps;
            (f(&xp) - f(&xm)) / (2.0 * eps)
        })
        .collect()
}

/// A tensor as f64 values.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

/// f64 values back to a rows×cols tensor.
pub fn from_f64(rows: usize, cols: usize, v: &[f64]) -> Tensor {
    Tensor::from_vec(rows, cols, v.iter().map(|&x| x as f32).collect()).expect("sizes agree")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_abs_det_of_known_matrix() {
        let a = vec![
            vec![2.0, 1.0, 0.0],
            vec![1.0, 3.0, 1.0],
            vec![0.0, 1.0, 4.0],
        ];
        // det = 2·(12-1) - 1·(4-0) = 18
        assert!((log_abs_det(&a) - 18f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn compare_reports_mismatch_positions() {
        let want = Tensor::from_vec(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let got = Tensor::from_vec(2, 2, vec![1.0, 2.5, 3.0, f32::NAN]).unwrap();
        let msg = compare("t", &got, &want, 1e-3, 1e-3).unwrap_err();
        assert!(msg.contains("2 of 4"), "{msg}");
        assert!(msg.contains("[0, 1]") && msg.contains("[1, 1]"), "{msg}");
        assert!(compare("t", &want, &want, 0.0, 0.0).is_ok());
    }
}
