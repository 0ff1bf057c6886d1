//! Hutchinson probes from a counter-based hash, so that a GPU kernel can draw the very same
//! probes on the device (one thread per entry, no generator state).
//!
//! Entry j of probe p of row r (column c = p·D + j of the B×(M·D) matrix) is a function of
//! (seed, n) with the counter n = r·(M·D) + c, as u64:
//!
//! ```text
//! mix(x):  x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27; x *= 0x94D049BB133111EB;
//!          x ^= x >> 31                       (wrapping u64 arithmetic; splitmix64's finaliser)
//! h      = mix(mix(n + 0x9E3779B97F4A7C15) ^ seed)
//! Rademacher: +1 if the top bit of h is 0, else −1
//! Gaussian:   u1 = ((h >> 32) + 0.5) / 2^32,  v = h & 0xFFFFFFFF                (in f64)
//!             ε  = (f32) (sqrt(−2·ln u1) · cos(2π·v / 2^32))              (Box–Muller, f64)
//! ```
//!
//! ln and cos are not the platform's: they are fixed polynomial evaluations by fused
//! multiply-adds in a fixed order ([`portable_ln`], [`portable_cos_turns`]), so that the
//! generator of kernels/rk45.cu, which performs the same operations, returns the same bits on
//! every device (IEEE arithmetic and fma are correctly rounded everywhere; libm's and CUDA's
//! cos and log are not the same functions). Their error is below 1e-15 relative, far inside
//! the f32 rounding of ε.
//!
//! A row's probes depend only on (seed, r, M, D), not on which other rows are in the batch or
//! which rows of a per-row solve are still active.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tensor::{Shaped, Tensor};

/// The distribution of Hutchinson probes: both have E[εεᵀ] = I, so E[εᵀAε] = Tr(A) (eq. 18.30).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// ±1 with equal probability (the lower-variance choice).
    Rademacher,
    /// Standard normal.
    Gaussian,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The probe entry with counter `n` (see the module documentation).
pub fn probe_value(kind: ProbeKind, seed: u64, n: u64) -> f32 {
    let h = mix(mix(n.wrapping_add(GOLDEN)) ^ seed);
    match kind {
        ProbeKind::Rademacher => {
            if h >> 63 == 0 {
                1.0
            } else {
                -1.0
            }
        }
        ProbeKind::Gaussian => {
            let u1 = ((h >> 32) as f64 + 0.5) / 4_294_967_296.0;
            let radius = (-2.0 * portable_ln(u1)).sqrt();
            (radius * portable_cos_turns((h & 0xFFFF_FFFF) as u32)) as f32
        }
    }
}

/// ln x for a normal x > 0: x = m·2^e with m in [√½, √2), and ln m = 2·atanh(s) with
/// s = (m − 1)/(m + 1) by its odd series to s^27 (|s| <= 0.172: truncation below 1e-19).
pub fn portable_ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7FF) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    // p = 1/3 + z/5 + … + z^12/27 by Horner's rule.
    let mut p = 1.0f64 / 27.0;
    for k in (1..13).rev() {
        p = p.mul_add(z, 1.0 / (2 * k + 1) as f64);
    }
    let t = (s * z).mul_add(p, s);
    (e as f64).mul_add(std::f64::consts::LN_2, 2.0 * t)
}

/// Inverse factorials 1/k! for k = 0..=19 (each k! is an exact f64).
const FACTORIALS: [f64; 20] = [
    1.0,
    1.0,
    2.0,
    6.0,
    24.0,
    120.0,
    720.0,
    5040.0,
    40320.0,
    362880.0,
    3628800.0,
    39916800.0,
    479001600.0,
    6227020800.0,
    87178291200.0,
    1307674368000.0,
    20922789888000.0,
    355687428096000.0,
    6402373705728000.0,
    121645100408832000.0,
];

/// cos(2π·v/2^32): the quadrant from the top two bits of v, the rest r = (v mod 2^30)/2^30
/// (exact), and sin and cos of (π/2)·r, or of (π/2)·(1 − r) past the octant, by their Taylor
/// polynomials to x^19 and x^18 on [0, π/4] (truncation below 1e-18).
pub fn portable_cos_turns(v: u32) -> f64 {
    let quadrant = v >> 30;
    let r = (v & 0x3FFF_FFFF) as f64 / 1_073_741_824.0;
    let swap = r > 0.5;
    let x = std::f64::consts::FRAC_PI_2 * if swap { 1.0 - r } else { r };
    let y = -(x * x);
    let mut ts = 1.0 / FACTORIALS[19];
    for k in (1..9).rev() {
        ts = ts.mul_add(y, 1.0 / FACTORIALS[2 * k + 1]);
    }
    let sin = (x * y).mul_add(ts, x);
    let mut tc = 1.0 / FACTORIALS[18];
    for k in (1..9).rev() {
        tc = tc.mul_add(y, 1.0 / FACTORIALS[2 * k]);
    }
    let cos = y.mul_add(tc, 1.0);
    let (sin_phi, cos_phi) = if swap { (cos, sin) } else { (sin, cos) };
    match quadrant {
        0 => cos_phi,
        1 => -sin_phi,
        2 => -cos_phi,
        _ => sin_phi,
    }
}

/// `m` probes of dimension `dim` for each of `rows` rows: a rows×(m·dim) matrix.
///
/// Errors: `rows`, `dim` or `m` zero.
pub fn probes(rows: usize, dim: usize, m: usize, kind: ProbeKind, seed: u64) -> Result<Tensor> {
    if rows == 0 {
        return Err(Error::Empty("Hutchinson probes for zero rows".into()));
    }
    if dim == 0 || m == 0 {
        return Err(Error::invalid(format!(
            "Hutchinson probes need dim >= 1 and at least one probe (dim {dim}, probes {m})"
        )));
    }
    let cols = m * dim;
    Ok(Tensor::from_fn(rows, cols, |r, c| {
        probe_value(kind, seed, (r * cols + c) as u64)
    }))
}

/// Row indices of generated probes (and of the rows of a device solve) travel as f32 values,
/// which are exact integers below 2^24.
pub const MAX_PROBE_ROW: usize = 1 << 24;

/// The probes of [`TraceMode::Generated`](super::TraceMode::Generated) as a matrix: `rows`×(m·dim),
/// row r holding the probes of row `ids[r]` (or of r itself), the same values as rows of
/// [`probes`] with the same seed.
///
/// Errors: zero rows, dim or m; ids of the wrong shape, or not integers in [0, 2^24).
pub fn generated_probes(
    rows: usize,
    dim: usize,
    m: usize,
    kind: ProbeKind,
    seed: u64,
    ids: Option<&Tensor>,
) -> Result<Tensor> {
    if rows == 0 {
        return Err(Error::Empty("Hutchinson probes for zero rows".into()));
    }
    if dim == 0 || m == 0 {
        return Err(Error::invalid(format!(
            "Hutchinson probes need dim >= 1 and at least one probe (dim {dim}, probes {m})"
        )));
    }
    let row_of = |r: usize| -> Result<usize> {
        match ids {
            None if r < MAX_PROBE_ROW => Ok(r),
            None => Err(Error::invalid(format!(
                "generated probes: row {r} is beyond the 2^24 rows that f32 row indices reach"
            ))),
            Some(ids) => {
                let v = ids.data()[r];
                if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && (v as usize) < MAX_PROBE_ROW {
                    Ok(v as usize)
                } else {
                    Err(Error::invalid(format!(
                        "generated probes: row index {v} (row {r}) is not an integer in [0, 2^24)"
                    )))
                }
            }
        }
    };
    if let Some(ids) = ids {
        ids.expect_shape("generated probes: row indices", rows, 1)?;
    }
    let cols = m * dim;
    let mut data = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let base = (row_of(r)? * cols) as u64;
        data.extend((0..cols as u64).map(|c| probe_value(kind, seed, base + c)));
    }
    Tensor::from_vec(rows, cols, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_functions_are_accurate() {
        for i in 1..2000u64 {
            let x = (i as f64 * 0.000_497).min(1.0);
            let (got, want) = (portable_ln(x), x.ln());
            assert!(
                (got - want).abs() <= 4e-16 * want.abs().max(1e-300) + 1e-300,
                "ln {x}"
            );
        }
        for v in (0..u32::MAX)
            .step_by(9_999_991)
            .chain([0, 1 << 30, 1 << 31, 3 << 30, u32::MAX])
        {
            let want = (2.0 * std::f64::consts::PI * v as f64 / 4_294_967_296.0).cos();
            assert!(
                (portable_cos_turns(v) - want).abs() < 1e-15,
                "cos turns {v}"
            );
        }
    }
}
