//! Row-major (rows × D) <-> feature-major (D × ld) conversions with the columns permuted, as
//! the MADE passes need at both ends of every call. One value at a time they cost a load and
//! a store each (about 5% of a MAF log-density at D = 16); with AVX-512 a 16 × 16 block is
//! moved as 16 vector loads, 32 two-source permutes and 16 vector stores. Pure data movement,
//! so every path gives the same bits as [`reference_gather`] and [`reference_scatter`].

use super::simd::Isa;

/// out[k·ld + r] = x[r·d + order[k]] for r < rows, and 0 for rows <= r < ld: column
/// `order[k]` of the row-major `x` becomes feature row k.
pub fn gather_columns(
    isa: Isa,
    x: &[f32],
    d: usize,
    rows: usize,
    order: &[usize],
    out: &mut [f32],
    ld: usize,
) {
    check(x, d, rows, order, out.len(), ld);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && isa.is_supported() && d.is_multiple_of(16) {
        let block_rows = rows - rows % 16;
        // SAFETY: `check` bounds every index below, d is a multiple of 16, block rows are
        // whole blocks of 16 below `rows`, and the CPU has AVX-512 F.
        unsafe { gather_avx512(x, d, block_rows, order, out, ld) };
        gather_rows(x, d, block_rows..rows, order, out, ld);
        for k in 0..d {
            out[k * ld + rows..(k + 1) * ld].fill(0.0);
        }
        return;
    }
    let _ = isa;
    reference_gather(x, d, rows, order, out, ld);
}

/// x[r·d + order[k]] = t[k·ld + r] for r < rows: the inverse of [`gather_columns`].
pub fn scatter_columns(
    isa: Isa,
    t: &[f32],
    ld: usize,
    rows: usize,
    order: &[usize],
    x: &mut [f32],
    d: usize,
) {
    check(x, d, rows, order, t.len(), ld);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && isa.is_supported() && d.is_multiple_of(16) {
        let block_rows = rows - rows % 16;
        // SAFETY: as in `gather_columns`.
        unsafe { scatter_avx512(t, ld, block_rows, order, x, d) };
        scatter_rows(t, ld, block_rows..rows, order, x, d);
        return;
    }
    let _ = isa;
    reference_scatter(t, ld, rows, order, x, d);
}

/// Bounds every index the paths reach: a failure is a bug in the crate, hence a panic.
fn check(x: &[f32], d: usize, rows: usize, order: &[usize], feature_len: usize, ld: usize) {
    assert_eq!(order.len(), d, "transpose: order length");
    assert!(
        order.iter().all(|&c| c < d),
        "transpose: order out of range"
    );
    assert!(x.len() >= rows * d, "transpose: row-major side too small");
    assert!(
        ld >= rows && feature_len >= d * ld,
        "transpose: feature side"
    );
}

/// The definition of [`gather_columns`], one value at a time.
pub fn reference_gather(
    x: &[f32],
    d: usize,
    rows: usize,
    order: &[usize],
    out: &mut [f32],
    ld: usize,
) {
    gather_rows(x, d, 0..rows, order, out, ld);
    for k in 0..d {
        out[k * ld + rows..(k + 1) * ld].fill(0.0);
    }
}

/// The definition of [`scatter_columns`], one value at a time.
pub fn reference_scatter(
    t: &[f32],
    ld: usize,
    rows: usize,
    order: &[usize],
    x: &mut [f32],
    d: usize,
) {
    scatter_rows(t, ld, 0..rows, order, x, d);
}

fn gather_rows(
    x: &[f32],
    d: usize,
    rows: std::ops::Range<usize>,
    order: &[usize],
    out: &mut [f32],
    ld: usize,
) {
    for (k, &col) in order.iter().enumerate() {
        for r in rows.clone() {
            out[k * ld + r] = x[r * d + col];
        }
    }
}

fn scatter_rows(
    t: &[f32],
    ld: usize,
    rows: std::ops::Range<usize>,
    order: &[usize],
    x: &mut [f32],
    d: usize,
) {
    for (k, &col) in order.iter().enumerate() {
        for r in rows.clone() {
            x[r * d + col] = t[k * ld + r];
        }
    }
}

/// Feature row of each column: `pos[order[k]] = k`.
fn positions(order: &[usize]) -> Vec<usize> {
    let mut pos = vec![0; order.len()];
    for (k, &c) in order.iter().enumerate() {
        pos[c] = k;
    }
    pos
}

/// # Safety
/// `check` passed, d is a multiple of 16, `rows` a multiple of 16, and the CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_avx512(
    x: &[f32],
    d: usize,
    rows: usize,
    order: &[usize],
    out: &mut [f32],
    ld: usize,
) {
    let pos = positions(order);
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..d).step_by(16) {
            // SAFETY: rows r0..r0 + 16 <= rows and columns c0..c0 + 16 <= d lie in `x`
            // (x.len() >= rows·d); feature rows pos[c] < d, lanes r0..r0 + 16 <= rows <= ld
            // lie in `out` (len >= d·ld).
            unsafe {
                let src = std::array::from_fn(|i| x.as_ptr().add((r0 + i) * d + c0));
                let dst = std::array::from_fn(|j| out.as_mut_ptr().add(pos[c0 + j] * ld + r0));
                transpose16(src, dst);
            }
        }
    }
}

/// # Safety
/// As [`gather_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scatter_avx512(
    t: &[f32],
    ld: usize,
    rows: usize,
    order: &[usize],
    x: &mut [f32],
    d: usize,
) {
    let pos = positions(order);
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..d).step_by(16) {
            // SAFETY: as in `gather_avx512`, with source and destination exchanged.
            unsafe {
                let src = std::array::from_fn(|j| t.as_ptr().add(pos[c0 + j] * ld + r0));
                let dst = std::array::from_fn(|i| x.as_mut_ptr().add((r0 + i) * d + c0));
                transpose16(src, dst);
            }
        }
    }
}

/// dst[j][i] = src[i][j] for a 16 × 16 block given by row pointers.
///
/// Transposing swaps the four bits of the row index with those of the column index; stage s
/// swaps bit s of each, pairing rows a and b = a + 2^s: in a, the columns with bit s set take
/// b's values from 2^s columns to the left; in b, the columns with bit s clear take a's from
/// 2^s to the right.
///
/// # Safety
/// Each pointer addresses 16 readable (src) or writable (dst) f32; the CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: [*const f32; 16], dst: [*mut f32; 16]) {
    use std::arch::x86_64::*;
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src[i]));
        for s in 0..4 {
            let step = 1usize << s;
            let idx = |low: bool| {
                let lanes: [i32; 16] = std::array::from_fn(|c| {
                    let set = c & step != 0;
                    match (low, set) {
                        (true, false) => c as i32,
                        (true, true) => (16 + c - step) as i32,
                        (false, false) => (c + step) as i32,
                        (false, true) => (16 + c) as i32,
                    }
                });
                _mm512_loadu_si512(lanes.as_ptr().cast())
            };
            let (lo, hi) = (idx(true), idx(false));
            for a in (0..16).filter(|a| a & step == 0) {
                let (x, y) = (v[a], v[a + step]);
                v[a] = _mm512_permutex2var_ps(x, lo, y);
                v[a + step] = _mm512_permutex2var_ps(x, hi, y);
            }
        }
        for (j, row) in v.iter().enumerate() {
            _mm512_storeu_ps(dst[j], *row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every path against the scalar definitions, bit for bit: widths that are and are not
    /// multiples of 16, row counts with and without a tail, a shuffled column order.
    #[test]
    fn every_path_matches_the_reference() {
        let mut rng = Rng::new(31);
        for (d, rows) in [(16usize, 64usize), (16, 37), (32, 50), (5, 37), (16, 7)] {
            let ld = rows.next_multiple_of(16) + 16;
            let mut order: Vec<usize> = (0..d).rev().collect();
            order.swap(0, d / 2);
            let x: Vec<f32> = (0..rows * d).map(|_| rng.normal() as f32).collect();
            let mut want = vec![f32::NAN; d * ld];
            reference_gather(&x, d, rows, &order, &mut want, ld);
            let mut back_want = vec![f32::NAN; rows * d];
            reference_scatter(&want, ld, rows, &order, &mut back_want, d);
            assert_eq!(back_want, x, "the reference round trip");
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; d * ld];
                gather_columns(isa, &x, d, rows, &order, &mut got, ld);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?} gather d={d} rows={rows}");
                let mut back = vec![f32::NAN; rows * d];
                scatter_columns(isa, &want, ld, rows, &order, &mut back, d);
                assert_eq!(back, x, "{isa:?} scatter d={d} rows={rows}");
            }
        }
    }
}
