//! Products whose output has only a few columns (a field's D = 2 outputs, the gradient of its
//! last layer). A general GEMM vectorises along the output's columns and would waste most of
//! each vector, or pack a large operand to turn the problem round; these loops vectorise along
//! the long dimension instead, with no packing of the large operand.

use super::scratch;
use crate::backend::cpu::gemm::View;

/// The (i, k) entry of a view as used.
#[inline(always)]
fn at(v: &View, i: usize, k: usize) -> f32 {
    if v.t {
        v.data[k * v.cols + i]
    } else {
        v.data[i * v.cols + k]
    }
}

/// Lanes of the partial sums in [`dot`].
const LANES: usize = 16;

/// The lanes summed pairwise (lane l + 8 onto l, then + 4, + 2, + 1).
#[inline(always)]
fn lane_sum(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// Σ a_i·b_i with 16 independent partial sums (lane l takes i ≡ l mod 16), then the tail.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut acc = [0.0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = lane_sum(acc);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// [`dot_portable`] with its 16 partial sums in one 16-wide register: the same operations in
/// the same order (multiply, then add: no FMA), so the same result.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::{
        _mm512_add_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut lanes = [0.0f32; LANES];
    // SAFETY: every load reads the 16 f32 of one chunk, the store writes the 16 of `lanes`;
    // AVX-512F is available (the caller's contract).
    unsafe {
        let mut acc = _mm512_setzero_ps();
        for (x, y) in ca.zip(cb) {
            let p = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(y.as_ptr()));
            acc = _mm512_add_ps(acc, p);
        }
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    }
    let mut s = lane_sum(lanes);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// [`dot_portable`] with its 16 partial sums in two 8-wide registers: the same operations in
/// the same order (multiply, then add: no FMA), so the same result. LLVM's SLP vectoriser
/// splits the portable loop into 2-wide pieces, hence the intrinsics.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut lanes = [0.0f32; LANES];
    // SAFETY: every load reads 8 f32 inside a chunk of 16 (offsets 0 and 8), every store
    // writes 8 f32 inside `lanes`; AVX2 is available (the caller's contract).
    unsafe {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (x, y) in ca.zip(cb) {
            let (xp, yp) = (x.as_ptr(), y.as_ptr());
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(xp), _mm256_loadu_ps(yp)));
            hi = _mm256_add_ps(
                hi,
                _mm256_mul_ps(_mm256_loadu_ps(xp.add(8)), _mm256_loadu_ps(yp.add(8))),
            );
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    }
    let mut s = lane_sum(lanes);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// c (m×n) [+]= a (m×k) · b (k×n) for small n, with `dot` for the row-major case.
#[inline(always)]
fn narrow_body(
    c: &mut [f32],
    a: View,
    b: View,
    accumulate: bool,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let (m, k) = if a.t {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let n = if b.t { b.rows } else { b.cols };
    if !a.t {
        // Rows of a are contiguous: one dot product per output, against bᵀ packed (n×k, small).
        let mut bt = scratch::dirty(n * k);
        for j in 0..n {
            for kk in 0..k {
                bt[j * k + kk] = at(&b, kk, j);
            }
        }
        for (i, row) in c.chunks_exact_mut(n).enumerate().take(m) {
            let ar = &a.data[i * k..(i + 1) * k];
            for (j, x) in row.iter_mut().enumerate() {
                let v = dot(ar, &bt[j * k..(j + 1) * k]);
                *x = if accumulate { *x + v } else { v };
            }
        }
        scratch::recycle(bt);
    } else {
        // a = Xᵀ with X (k×m) stored by rows: cᵀ[j, :] += b(kk, j)·X[kk, :], along m.
        let mut ct = scratch::zeros(n * m);
        for kk in 0..k {
            let xr = &a.data[kk * m..(kk + 1) * m];
            for j in 0..n {
                let s = at(&b, kk, j);
                for (o, &x) in ct[j * m..(j + 1) * m].iter_mut().zip(xr) {
                    *o += s * x;
                }
            }
        }
        for (i, row) in c.chunks_exact_mut(n).enumerate().take(m) {
            for (j, x) in row.iter_mut().enumerate() {
                let v = ct[j * m + i];
                *x = if accumulate { *x + v } else { v };
            }
        }
        scratch::recycle(ct);
    }
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn narrow_avx512(c: &mut [f32], a: View, b: View, accumulate: bool) {
    // SAFETY: this function's own contract (AVX-512F is available).
    narrow_body(c, a, b, accumulate, |x, y| unsafe { dot_avx512(x, y) })
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn narrow_avx2(c: &mut [f32], a: View, b: View, accumulate: bool) {
    // SAFETY: this function's own contract (AVX2 and FMA are available).
    narrow_body(c, a, b, accumulate, |x, y| unsafe { dot_avx2(x, y) })
}

/// c (m×n, row-major) [+]= a·b with a, b as used (after their transposes); for small n.
pub(super) fn matmul_narrow(c: &mut [f32], a: View, b: View, accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { narrow_avx512(c, a, b, accumulate) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { narrow_avx2(c, a, b, accumulate) };
            return;
        }
    }
    narrow_body(c, a, b, accumulate, dot_portable)
}

/// Σ over each row of x ⊙ y (rows × width), by the 16-lane dot product.
pub(super) fn row_dots(x: &[f32], y: &[f32], width: usize) -> Vec<f32> {
    let rows = x.chunks_exact(width).zip(y.chunks_exact(width));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features `dot_avx512` is compiled for.
            return rows.map(|(a, b)| unsafe { dot_avx512(a, b) }).collect();
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features `dot_avx2` is compiled for.
            return rows.map(|(a, b)| unsafe { dot_avx2(a, b) }).collect();
        }
    }
    rows.map(|(a, b)| dot_portable(a, b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &View, b: &View, m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    c[i * n + j] += at(a, i, l) * at(b, l, j);
                }
            }
        }
        c
    }

    #[test]
    fn the_wide_dot_equals_the_portable_one() {
        let a: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..70).map(|i| (i as f32 * 0.11).cos()).collect();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            for n in [0, 5, 16, 64, 70] {
                // SAFETY: the features were detected.
                let wide = unsafe { dot_avx2(&a[..n], &b[..n]) };
                assert_eq!(wide.to_bits(), dot_portable(&a[..n], &b[..n]).to_bits());
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            for n in [0, 5, 16, 64, 70] {
                // SAFETY: the feature was detected.
                let wide = unsafe { dot_avx512(&a[..n], &b[..n]) };
                assert_eq!(wide.to_bits(), dot_portable(&a[..n], &b[..n]).to_bits());
            }
        }
    }

    #[test]
    fn matches_naive_for_every_layout() {
        let (m, k, n) = (37, 21, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let av = if ta {
                View::new(&a, k, m).t()
            } else {
                View::new(&a, m, k)
            };
            let bv = if tb {
                View::new(&b, n, k).t()
            } else {
                View::new(&b, k, n)
            };
            let want = naive(&av, &bv, m, k, n);
            let mut c = vec![1.0; m * n];
            matmul_narrow(&mut c, av, bv, true);
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    (x - (y + 1.0)).abs() < 1e-4,
                    "{ta} {tb}: {x} vs {}",
                    y + 1.0
                );
            }
            matmul_narrow(&mut c, av, bv, false);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4);
            }
        }
    }
}
