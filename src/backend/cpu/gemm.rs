//! Row-major f32 matrix products on the host, through the `gemm` crate (AVX-512/AVX2 kernels
//! chosen at run time). Callers parallelise over batch chunks, so each product runs on one thread.

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
