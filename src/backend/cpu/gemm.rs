//! Row-major f32 matrix products on the host, through the `gemm` crate (AVX-512/AVX2 kernels
//! chosen at run time). Callers parallelise over batch chunks, so each product runs on one thread.
//!
//! Products with a dimension of at most `SMALL` (4) (the first and last layers of a conditioner
//! on 2-D data, and their gradients) leave the crate's register tiles mostly empty — a
//! 256×64·64×2 product ran at a tenth of its usual speed — so they take plain loops vectorised
//! along a long dimension instead.

use std::borrow::Cow;

/// The largest dimension handled by the plain loops rather than the `gemm` crate.
const SMALL: usize = 4;

/// A row-major matrix view: `data[i * cols + j]`, or its transpose when `t` is set.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Use the transpose of the stored matrix.
    pub t: bool,
}

impl<'a> View<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert!(data.len() >= rows * cols);
        View {
            data,
            rows,
            cols,
            t: false,
        }
    }

    pub fn t(self) -> Self {
        View { t: !self.t, ..self }
    }

    /// Shape as used (after the optional transpose).
    fn used_shape(&self) -> (usize, usize) {
        if self.t {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Entry (i, j) of the matrix as used.
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        if self.t {
            self.data[j * self.cols + i]
        } else {
            self.data[i * self.cols + j]
        }
    }

    /// The matrix as used, row-major and contiguous (borrowed when it already is).
    fn used_rows(&self) -> Cow<'a, [f32]> {
        let (r, c) = self.used_shape();
        if self.t {
            let mut v = Vec::with_capacity(r * c);
            for i in 0..r {
                v.extend((0..c).map(|j| self.at(i, j)));
            }
            Cow::Owned(v)
        } else {
            Cow::Borrowed(&self.data[..r * c])
        }
    }

    /// (row stride, column stride) of the matrix as used.
    fn strides(&self) -> (isize, isize) {
        if self.t {
            (1, self.cols as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// c (m×n, row-major) = [c +] a·b, where a is m×k and b is k×n as used.
///
/// Panics if the shapes disagree: callers check user-facing shapes before reaching here, so a
/// mismatch is a bug in the crate.
pub fn matmul(c: &mut [f32], a: View, b: View, accumulate: bool) {
    let (m, k) = a.used_shape();
    let (k2, n) = b.used_shape();
    assert_eq!(k, k2, "gemm inner dimensions");
    assert!(c.len() >= m * n, "gemm output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    if small_matmul(c, a, b, accumulate) {
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    // SAFETY: the asserts above and the View invariant (data covers rows×cols) keep every
    // index the strides reach inside the three slices; c does not alias a or b (&mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// c = [c +] a·b by plain loops when a dimension is at most [`SMALL`]; returns false, doing
/// nothing, for other shapes. Shapes are checked by the caller. Compiled for AVX2+FMA as well
/// and picked at run time (the same arithmetic in the same order, so the same results).
fn small_matmul(c: &mut [f32], a: View, b: View, accumulate: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { small_matmul_avx2(c, a, b, accumulate) };
    }
    small_matmul_body(c, a, b, accumulate)
}

/// [`small_matmul_body`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn small_matmul_avx2(c: &mut [f32], a: View, b: View, accumulate: bool) -> bool {
    small_matmul_body(c, a, b, accumulate)
}

#[inline(always)]
fn small_matmul_body(c: &mut [f32], a: View, b: View, accumulate: bool) -> bool {
    let (m, k) = a.used_shape();
    let n = b.used_shape().1;
    if k <= SMALL || m <= SMALL {
        // c[i, :] = Σ_l a(i, l)·b[l, :]: row updates along n (the first one overwrites unless
        // accumulating, which saves a separate zeroing pass).
        let b_rows = b.used_rows();
        for (i, c_row) in c[..m * n].chunks_exact_mut(n).enumerate() {
            let mut terms = b_rows.chunks_exact(n).enumerate();
            if !accumulate {
                // k >= 1 here (matmul returns early for k = 0).
                if let Some((l, b_row)) = terms.next() {
                    let s = a.at(i, l);
                    for (y, &x) in c_row.iter_mut().zip(b_row) {
                        *y = s * x;
                    }
                }
            }
            for (l, b_row) in terms {
                axpy(c_row, a.at(i, l), b_row);
            }
        }
        true
    } else if n <= SMALL && !a.t {
        // c[i, j] = a[i, :]·b[:, j]: dot products along k with b's columns gathered.
        let b_cols = b.t().used_rows();
        for (c_row, a_row) in c[..m * n].chunks_exact_mut(n).zip(a.data.chunks_exact(k)) {
            for (cij, b_col) in c_row.iter_mut().zip(b_cols.chunks_exact(k)) {
                let d = dot(a_row, b_col);
                *cij = if accumulate { *cij + d } else { d };
            }
        }
        true
    } else if n <= SMALL {
        // a is used transposed, so its stored rows run along m: build cᵀ[j, :] = Σ_l b(l, j)·
        // (stored row l of a) by row updates along m, then add it into c.
        let mut ct = vec![0.0f32; n * m];
        for (j, ct_row) in ct.chunks_exact_mut(m).enumerate() {
            for (l, a_row) in a.data[..k * m].chunks_exact(m).enumerate() {
                axpy(ct_row, b.at(l, j), a_row);
            }
        }
        for (i, c_row) in c[..m * n].chunks_exact_mut(n).enumerate() {
            for (j, cij) in c_row.iter_mut().enumerate() {
                let v = ct[j * m + i];
                *cij = if accumulate { *cij + v } else { v };
            }
        }
        true
    } else {
        false
    }
}

/// y += s·x.
#[inline(always)]
fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += s * xi;
    }
}

/// a·b with sixteen partial sums combined pairwise (a fixed order), so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const W: usize = 16;
    let (ca, cb) = (a.chunks_exact(W), b.chunks_exact(W));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0.0f32; W];
    for (x, y) in ca.zip(cb) {
        for ((s, &xl), &yl) in acc.iter_mut().zip(x).zip(y) {
            *s += xl * yl;
        }
    }
    let mut w = W;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    c[i * n + j] += a[i * k + l] * b[l * n + j];
                }
            }
        }
        c
    }

    /// Every path (plain loops and the gemm crate), every transpose combination, with and
    /// without accumulation, against the naive triple loop.
    #[test]
    fn all_paths_match_naive() {
        let shapes = [
            (256, 1, 64),
            (256, 64, 2),
            (64, 256, 2),
            (256, 2, 64),
            (1, 256, 64),
            (256, 64, 1),
            (3, 9, 17),
            (33, 17, 3),
            (40, 24, 16),
        ];
        for (m, k, n) in shapes {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = naive(&a, &b, m, k, n);
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = if ta {
                    View::new(&at, k, m).t()
                } else {
                    View::new(&a, m, k)
                };
                let bv = if tb {
                    View::new(&bt, n, k).t()
                } else {
                    View::new(&b, k, n)
                };
                for accumulate in [false, true] {
                    let mut c = vec![0.5f32; m * n];
                    matmul(&mut c, av, bv, accumulate);
                    let base = if accumulate { 0.5 } else { 0.0 };
                    for (idx, (x, y)) in c.iter().zip(&want).enumerate() {
                        assert!(
                            (x - (y + base)).abs() < 1e-4 * (1.0 + y.abs()),
                            "{m}x{k}x{n} t=({ta},{tb}) acc={accumulate} [{idx}]: {x} vs {}",
                            y + base
                        );
                    }
                }
            }
        }
    }

    /// The AVX2 copy of the plain loops against the same loops compiled for baseline x86-64
    /// (the scalar reference), bit for bit: every small shape, transpose and accumulation.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_small_loops_match_the_baseline_exactly() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        for (m, k, n) in [
            (256, 1, 64),
            (256, 64, 2),
            (64, 256, 2),
            (33, 17, 3),
            (5, 40, 37),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = if ta {
                    View::new(&at, k, m).t()
                } else {
                    View::new(&a, m, k)
                };
                let bv = if tb {
                    View::new(&bt, n, k).t()
                } else {
                    View::new(&b, k, n)
                };
                for accumulate in [false, true] {
                    let mut want = vec![0.5f32; m * n];
                    let took = small_matmul_body(&mut want, av, bv, accumulate);
                    let mut got = vec![0.5f32; m * n];
                    // SAFETY: AVX2 and FMA were detected above.
                    let took_avx2 = unsafe { small_matmul_avx2(&mut got, av, bv, accumulate) };
                    assert_eq!(took, took_avx2);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{m}x{k}x{n} t=({ta},{tb}) acc={accumulate}");
                }
            }
        }
    }

    #[test]
    fn matches_naive_with_transposes() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0; m * n];
        matmul(&mut c, View::new(&a, m, k), View::new(&b, k, n), false);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // (a^T stored) and (b^T stored), used transposed.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut c2 = vec![1.0; m * n];
        matmul(
            &mut c2,
            View::new(&at, k, m).t(),
            View::new(&bt, n, k).t(),
            true,
        );
        for (x, y) in c2.iter().zip(&want) {
            assert!((x - (y + 1.0)).abs() < 1e-5);
        }
    }
}
