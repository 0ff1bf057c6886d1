//! The affine (RealNVP, eq. 18.10–18.14) and additive (NICE) coupling functions on a block of
//! rows, and their backward.
//!
//! The affine transform gathers a block's transformed values and their [raw s | b] into flat
//! arrays and runs one element-wise loop over them: with no calls inside (see `vmath`) it
//! vectorises whatever the width of the transformed half (even one column, for D = 2), and it
//! is also compiled for AVX2+FMA and picked at run time, since the two exponentials per value
//! dominate the layer otherwise. Every path gives the same results (no reassociation, no
//! fused multiply-add contraction).

use std::ops::Range;

use crate::backend::cpu::vmath;
use crate::ops::Direction;

/// Where a block's pieces are: each row's conditioner output is `p` wide in `params`, rows are
/// `d` wide, and columns `t` of each row are transformed.
pub struct Rows<'a> {
    pub params: &'a [f32],
    pub p: usize,
    pub d: usize,
    pub t: Range<usize>,
    pub dir: Direction,
}

impl Rows<'_> {
    fn nb(&self) -> usize {
        self.t.len()
    }

    /// Column j of the transformed half, all rows, from a `d`-wide block.
    fn gather_t(&self, block: &[f32]) -> Vec<f32> {
        let mut v = Vec::with_capacity(block.len() / self.d * self.nb());
        for row in block.chunks_exact(self.d) {
            v.extend_from_slice(&row[self.t.clone()]);
        }
        v
    }

    /// Columns `offset..offset + n_B` of every row of `params`.
    fn gather_params(&self, offset: usize) -> Vec<f32> {
        let nb = self.nb();
        let mut v = Vec::with_capacity(self.params.len() / self.p * nb);
        for row in self.params.chunks_exact(self.p) {
            v.extend_from_slice(&row[offset..offset + nb]);
        }
        v
    }

    /// Writes flat per-row values (n_B per row) back into columns `cols` of `dst` rows.
    fn scatter(flat: &[f32], dst: &mut [f32], width: usize, cols: Range<usize>) {
        let nb = cols.len();
        for (row, src) in dst.chunks_exact_mut(width).zip(flat.chunks_exact(nb)) {
            row[cols.clone()].copy_from_slice(src);
        }
    }
}

/// Affine coupling of every row of `block` (in place); p = [raw s | b] per row. Each row's
/// log-det goes to `logdet`: Σ s forward, −Σ s inverse (summed in f64).
pub fn affine_apply_rows(clamp: f32, rs: &Rows, block: &mut [f32], logdet: &mut [f32]) {
    let nb = rs.nb();
    let mut v = rs.gather_t(block);
    let raw = rs.gather_params(0);
    let shift = rs.gather_params(nb);
    let mut s = vec![0.0f32; v.len()];
    affine_flat(clamp, rs.dir, &mut v, &raw, &shift, &mut s);
    Rows::scatter(&v, block, rs.d, rs.t.clone());
    for (ld, sr) in logdet.iter_mut().zip(s.chunks_exact(nb)) {
        let sum = sum_f64(sr);
        *ld = match rs.dir {
            Direction::Forward => sum,
            Direction::Inverse => -sum,
        } as f32;
    }
}

/// Backward of [`affine_apply_rows`]: `x` holds the block's input rows, `g` dL/d output on
/// entry and dL/d input (transformed columns only) on return, `d_logdet` dL/d(row log-det);
/// dL/d[raw s | b] is written into `g_params` (n × p).
pub fn affine_backward_rows(
    clamp: f32,
    rs: &Rows,
    x: &[f32],
    g: &mut [f32],
    d_logdet: &[f32],
    g_params: &mut [f32],
) {
    let nb = rs.nb();
    let xv = rs.gather_t(x);
    let mut gv = rs.gather_t(g);
    let raw = rs.gather_params(0);
    let shift = rs.gather_params(nb);
    // The row's dL/d logdet, once per transformed value.
    let g_ld: Vec<f32> = d_logdet
        .iter()
        .flat_map(|&l| std::iter::repeat_n(l, nb))
        .collect();
    let mut g_raw = vec![0.0f32; xv.len()];
    let mut g_shift = vec![0.0f32; xv.len()];
    let flat = Flat {
        x: &xv,
        raw: &raw,
        shift: &shift,
        g_ld: &g_ld,
    };
    affine_backward_flat(clamp, rs.dir, &flat, &mut gv, &mut g_raw, &mut g_shift);
    Rows::scatter(&gv, g, rs.d, rs.t.clone());
    Rows::scatter(&g_raw, g_params, rs.p, 0..nb);
    Rows::scatter(&g_shift, g_params, rs.p, nb..2 * nb);
}

/// The element-wise affine transform over flat arrays, on the best instruction set available.
fn affine_flat(
    clamp: f32,
    dir: Direction,
    v: &mut [f32],
    raw: &[f32],
    shift: &[f32],
    s: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if vmath::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { affine_flat_avx2(clamp, dir, v, raw, shift, s) };
    }
    affine_flat_body(clamp, dir, v, raw, shift, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn affine_flat_avx2(
    clamp: f32,
    dir: Direction,
    v: &mut [f32],
    raw: &[f32],
    shift: &[f32],
    s: &mut [f32],
) {
    affine_flat_body(clamp, dir, v, raw, shift, s)
}

#[inline(always)]
fn affine_flat_body(
    clamp: f32,
    dir: Direction,
    v: &mut [f32],
    raw: &[f32],
    shift: &[f32],
    s: &mut [f32],
) {
    let items = v.iter_mut().zip(raw).zip(shift).zip(s.iter_mut());
    match dir {
        // x_B = z_B·e^s + b (eq. 18.10).
        Direction::Forward => {
            for (((x, &r), &b), sj) in items {
                *sj = soft_clamp(r, clamp);
                *x = *x * vmath::exp(*sj) + b;
            }
        }
        // z_B = (x_B − b)·e^(−s).
        Direction::Inverse => {
            for (((x, &r), &b), sj) in items {
                *sj = soft_clamp(r, clamp);
                *x = (*x - b) * vmath::exp(-*sj);
            }
        }
    }
}

/// Flat inputs of the affine backward: the layer's input half, [raw s | b], and each value's
/// row dL/d logdet.
struct Flat<'a> {
    x: &'a [f32],
    raw: &'a [f32],
    shift: &'a [f32],
    g_ld: &'a [f32],
}

fn affine_backward_flat(
    clamp: f32,
    dir: Direction,
    f: &Flat,
    g: &mut [f32],
    g_raw: &mut [f32],
    g_shift: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if vmath::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { affine_backward_flat_avx2(clamp, dir, f, g, g_raw, g_shift) };
    }
    affine_backward_flat_body(clamp, dir, f, g, g_raw, g_shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn affine_backward_flat_avx2(
    clamp: f32,
    dir: Direction,
    f: &Flat,
    g: &mut [f32],
    g_raw: &mut [f32],
    g_shift: &mut [f32],
) {
    affine_backward_flat_body(clamp, dir, f, g, g_raw, g_shift)
}

/// `g` holds dL/d output on entry and dL/d input on return.
#[inline(always)]
fn affine_backward_flat_body(
    clamp: f32,
    dir: Direction,
    f: &Flat,
    g: &mut [f32],
    g_raw: &mut [f32],
    g_shift: &mut [f32],
) {
    let items = g
        .iter_mut()
        .zip(f.x)
        .zip(f.raw.iter().zip(f.shift))
        .zip(f.g_ld)
        .zip(g_raw.iter_mut().zip(g_shift.iter_mut()));
    match dir {
        // x = z·e^s + b, logdet += s: ∂x/∂z = e^s, ∂x/∂s = z·e^s, ∂x/∂b = 1.
        Direction::Forward => {
            for ((((gv, &z), (&r, _)), &g_ld), (gr, gb)) in items {
                let t = vmath::tanh(r / clamp);
                let e = vmath::exp(clamp * t);
                let g_s = *gv * z * e + g_ld;
                // d(c·tanh(r/c))/dr = 1 − tanh².
                *gr = g_s * (1.0 - t * t);
                *gb = *gv;
                *gv *= e;
            }
        }
        // z = (x − b)·e^(−s), logdet −= s: ∂z/∂x = e^(−s), ∂z/∂s = −z, ∂z/∂b = −e^(−s).
        Direction::Inverse => {
            for ((((gv, &x), (&r, &b)), &g_ld), (gr, gb)) in items {
                let t = vmath::tanh(r / clamp);
                let e = vmath::exp(-clamp * t);
                let z = (x - b) * e;
                let g_s = -*gv * z - g_ld;
                *gr = g_s * (1.0 - t * t);
                *gb = -*gv * e;
                *gv *= e;
            }
        }
    }
}

/// Transforms `v` in place from the conditioner row p = [b] (log-det 0).
pub fn additive_apply(p: &[f32], v: &mut [f32], dir: Direction) {
    match dir {
        Direction::Forward => v.iter_mut().zip(p).for_each(|(x, &b)| *x += b),
        Direction::Inverse => v.iter_mut().zip(p).for_each(|(x, &b)| *x -= b),
    }
}

/// Backward of [`additive_apply`]: dL/d input equals dL/d output (`g` is left as it is);
/// dL/db = ±dL/d output.
pub fn additive_backward(dir: Direction, g: &[f32], g_p: &mut [f32]) {
    match dir {
        Direction::Forward => g_p.copy_from_slice(&g[..g_p.len()]),
        Direction::Inverse => g_p.iter_mut().zip(g).for_each(|(gb, &gv)| *gb = -gv),
    }
}

/// Σ v in f64 over four interleaved partial sums (a fixed order, so still deterministic): one
/// serial chain of f64 adds would cost more than the row's exponentials.
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = v.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    let tail: f64 = rest.iter().map(|&x| x as f64).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// s = c·tanh(raw/c): close to raw for small values, never beyond ±c (DESIGN.md "Numerics").
#[inline(always)]
fn soft_clamp(raw: f32, clamp: f32) -> f32 {
    clamp * vmath::tanh(raw / clamp)
}
