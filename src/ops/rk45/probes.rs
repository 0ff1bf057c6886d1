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
//! Gaussian:   u1 = ((h >> 32) + 0.5) / 2^32,  u2 = (h & 0xFFFFFFFF) / 2^32   (in f64)
//!             ε  = (f32) (sqrt(−2·ln u1) · cos(2π·u2))                      (Box–Muller, f64)
//! ```
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
            let u2 = (h & 0xFFFF_FFFF) as f64 / 4_294_967_296.0;
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        }
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
                if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && (v as usize) < MAX_PROBE_ROW
                {
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
