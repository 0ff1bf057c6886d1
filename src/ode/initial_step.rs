//! The starting step size heuristic of Hairer, Nørsett & Wanner (*Solving ODEs I*, §II.4,
//! "Starting Step Size"), as in scipy's `select_initial_step`. It costs one extra evaluation of
//! the vector field, which the batched solver makes for all rows in one call; the two halves
//! around that evaluation are pure per-row functions.

use super::controller::tolerance_scale;
use super::tableau::ERROR_ORDER;

/// RMS of x_i / (atol + rtol·|y0_i|).
fn scaled_rms(x: impl Iterator<Item = f64>, y0: &[f64], rtol: f64, atol: f64) -> f64 {
    let mut sum = 0.0;
    for (xi, &yi) in x.zip(y0) {
        let r = xi / tolerance_scale(yi.abs(), rtol, atol);
        sum += r * r;
    }
    (sum / y0.len().max(1) as f64).sqrt()
}

/// First guess h0 = 0.01·‖y0‖/‖f0‖ (in the tolerance-scaled norm; 1e-6 when either is tiny),
/// capped at the length of the interval. The probe evaluation is then made at
/// (t0 + h0·dir, y0 + h0·dir·f0).
pub fn first_guess(y0: &[f64], f0: &[f64], rtol: f64, atol: f64, interval: f64) -> f64 {
    let d0 = scaled_rms(y0.iter().copied(), y0, rtol, atol);
    let d1 = scaled_rms(f0.iter().copied(), y0, rtol, atol);
    let h0 = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6
    } else {
        0.01 * d0 / d1
    };
    h0.min(interval)
}

/// Final choice from the probe f1: with d2 ≈ ‖y''‖ estimated by (f1 − f0)/h0, pick h1 so that
/// h1^(p+1)·max(‖f0‖, d2) = 0.01 (p = 4, the estimator's order), then min(100·h0, h1, interval).
pub fn refine(
    y0: &[f64],
    f0: &[f64],
    f1: &[f64],
    h0: f64,
    rtol: f64,
    atol: f64,
    interval: f64,
) -> f64 {
    let d1 = scaled_rms(f0.iter().copied(), y0, rtol, atol);
    let d2 = scaled_rms(f1.iter().zip(f0).map(|(a, b)| a - b), y0, rtol, atol) / h0;
    let h1 = if d1 <= 1e-15 && d2 <= 1e-15 {
        (h0 * 1e-3).max(1e-6)
    } else {
        (0.01 / d1.max(d2)).powf(1.0 / (ERROR_ORDER as f64 + 1.0))
    };
    (100.0 * h0).min(h1).min(interval)
}
