//! The affine (RealNVP, eq. 18.10–18.14) and additive (NICE) coupling functions on a tile of
//! rows, and their backward.
//!
//! The affine transform is one element-wise loop over a row's transformed values and their
//! [raw s | b]: with no calls inside (see `vmath`) it vectorises, and the whole tile runs in a
//! copy compiled for the widest vector instructions available (`simd_dispatch`), since the two
//! exponentials per value would dominate the layer otherwise. A transformed half narrower than
//! a vector (D = 2 has one column) is first gathered across the tile's rows into flat arrays,
//! so that the loop still runs full vectors. Every path gives the same results (no
//! reassociation, no fused multiply-add contraction).

use std::ops::Range;

use crate::backend::cpu::scratch::Scratch;
use crate::backend::cpu::simd::simd_dispatch;
use crate::backend::cpu::vmath;
use crate::ops::Direction;

/// Transformed halves at least this wide run row by row; narrower ones are gathered.
const ROW_WISE: usize = 16;

/// Where a tile's pieces are: row r's conditioner output is `params[r·ldp .. r·ldp + p]`, rows
/// of the data are `d` wide, and columns `t` of each row are transformed.
pub struct Rows<'a> {
    pub params: &'a [f32],
    pub ldp: usize,
    pub p: usize,
    pub d: usize,
    pub t: Range<usize>,
    pub dir: Direction,
}

impl Rows<'_> {
    fn nb(&self) -> usize {
        self.t.len()
    }

    /// Each row's conditioner output (`p` values).
    pub fn param_rows(&self) -> impl Iterator<Item = &[f32]> {
        self.params.chunks_exact(self.ldp).map(|r| &r[..self.p])
    }

    /// Each row's `p` values of a buffer laid out like `params`.
    pub fn param_rows_mut<'b>(&self, buf: &'b mut [f32]) -> impl Iterator<Item = &'b mut [f32]> {
        let p = self.p;
        buf.chunks_exact_mut(self.ldp).map(move |r| &mut r[..p])
    }

    /// Columns `cols` of every `width`-wide row of `src`, as a flat array.
    #[inline(always)]
    fn gather(src: &[f32], width: usize, cols: Range<usize>) -> Scratch {
        let nb = cols.len();
        let mut v = Scratch::new(src.len() / width * nb);
        for (dst, row) in v.chunks_exact_mut(nb).zip(src.chunks_exact(width)) {
            for (d, &x) in dst.iter_mut().zip(&row[cols.clone()]) {
                *d = x;
            }
        }
        v
    }

    /// Writes flat per-row values (n_B per row) back into columns `cols` of `dst` rows.
    #[inline(always)]
    fn scatter(flat: &[f32], dst: &mut [f32], width: usize, cols: Range<usize>) {
        let nb = cols.len();
        for (row, src) in dst.chunks_exact_mut(width).zip(flat.chunks_exact(nb)) {
            for (d, &x) in row[cols.clone()].iter_mut().zip(src) {
                *d = x;
            }
        }
    }
}

/// Affine coupling of every row of `tile` (in place); p = [raw s | b] per row. Each row's
/// log-det goes to `logdet`: Σ s forward, −Σ s inverse (summed in f64).
pub fn affine_apply_rows(clamp: f32, rs: &Rows, tile: &mut [f32], logdet: &mut [f32]) {
    simd_dispatch!(apply_rows_impl(clamp: f32, rs: &Rows, tile: &mut [f32], logdet: &mut [f32]) -> ())
}

#[inline(always)]
fn apply_rows_impl(clamp: f32, rs: &Rows, tile: &mut [f32], logdet: &mut [f32]) {
    let nb = rs.nb();
    let mut s = Scratch::new(logdet.len() * nb);
    if nb >= ROW_WISE {
        let rows = tile
            .chunks_exact_mut(rs.d)
            .zip(rs.param_rows())
            .zip(s.chunks_exact_mut(nb));
        for ((row, p), s_row) in rows {
            let (raw, shift) = p.split_at(nb);
            affine_flat(clamp, rs.dir, &mut row[rs.t.clone()], raw, shift, s_row);
        }
    } else {
        let mut v = Rows::gather(tile, rs.d, rs.t.clone());
        let raw = Rows::gather(rs.params, rs.ldp, 0..nb);
        let shift = Rows::gather(rs.params, rs.ldp, nb..2 * nb);
        affine_flat(clamp, rs.dir, &mut v, &raw, &shift, &mut s);
        Rows::scatter(&v, tile, rs.d, rs.t.clone());
    }
    for (ld, sr) in logdet.iter_mut().zip(s.chunks_exact(nb)) {
        let sum = sum_f64(sr);
        *ld = match rs.dir {
            Direction::Forward => sum,
            Direction::Inverse => -sum,
        } as f32;
    }
}

/// [`affine_apply_rows`] with the conditioner output feature-major: raw s_j of row r at
/// `params[j·ld + r]`, b_j at `params[(n_B + j)·ld + r]`. Runs along the rows one
/// transformed column at a time; log-dets are summed over the columns in f64, in order.
#[allow(clippy::too_many_arguments)]
pub fn affine_apply_fm(
    clamp: f32,
    dir: Direction,
    params: &[f32],
    ld: usize,
    d: usize,
    t: Range<usize>,
    tile: &mut [f32],
    logdet: &mut [f32],
) {
    simd_dispatch!(apply_fm_impl(
        clamp: f32,
        dir: Direction,
        params: &[f32],
        ld: usize,
        d: usize,
        t: Range<usize>,
        tile: &mut [f32],
        logdet: &mut [f32],
    ) -> ())
}

/// The most rows [`affine_apply_fm`] takes at once (a tile of the conditioner).
const FM_ROWS: usize = crate::backend::cpu::mlp::TILE_ROWS;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply_fm_impl(
    clamp: f32,
    dir: Direction,
    params: &[f32],
    ld: usize,
    d: usize,
    t: Range<usize>,
    tile: &mut [f32],
    logdet: &mut [f32],
) {
    let (rows, nb) = (logdet.len(), t.len());
    assert!(rows <= FM_ROWS, "affine_apply_fm: at most {FM_ROWS} rows");
    let (mut v, mut s) = ([0.0f32; FM_ROWS], [0.0f32; FM_ROWS]);
    let mut sum = [0.0f64; FM_ROWS];
    for (j, col) in t.enumerate() {
        let (raw, shift) = (&params[j * ld..][..rows], &params[(nb + j) * ld..][..rows]);
        v.iter_mut()
            .zip(tile.chunks_exact(d))
            .for_each(|(v, row)| *v = row[col]);
        affine_flat(clamp, dir, &mut v[..rows], raw, shift, &mut s[..rows]);
        for (row, &v) in tile.chunks_exact_mut(d).zip(&v) {
            row[col] = v;
        }
        sum.iter_mut()
            .zip(&s[..rows])
            .for_each(|(a, &s)| *a += s as f64);
    }
    for (ld, &sum) in logdet.iter_mut().zip(&sum) {
        *ld = match dir {
            Direction::Forward => sum,
            Direction::Inverse => -sum,
        } as f32;
    }
}

/// Backward of [`affine_apply_rows`]: `x` holds the tile's input rows, `g` dL/d output on
/// entry and dL/d input (transformed columns only) on return, `d_logdet` dL/d(row log-det);
/// dL/d[raw s | b] is written into `g_params` (row stride `rs.ldp`).
pub fn affine_backward_rows(
    clamp: f32,
    rs: &Rows,
    x: &[f32],
    g: &mut [f32],
    d_logdet: &[f32],
    g_params: &mut [f32],
) {
    simd_dispatch!(backward_rows_impl(
        clamp: f32,
        rs: &Rows,
        x: &[f32],
        g: &mut [f32],
        d_logdet: &[f32],
        g_params: &mut [f32],
    ) -> ())
}

#[inline(always)]
fn backward_rows_impl(
    clamp: f32,
    rs: &Rows,
    x: &[f32],
    g: &mut [f32],
    d_logdet: &[f32],
    g_params: &mut [f32],
) {
    let nb = rs.nb();
    if nb >= ROW_WISE {
        let rows = g
            .chunks_exact_mut(rs.d)
            .zip(x.chunks_exact(rs.d))
            .zip(rs.param_rows().zip(rs.param_rows_mut(g_params)))
            .zip(d_logdet);
        for (((g_row, x_row), (p, g_p)), &l) in rows {
            let (raw, shift) = p.split_at(nb);
            let (g_raw, g_shift) = g_p.split_at_mut(nb);
            let flat = Flat {
                x: &x_row[rs.t.clone()],
                raw,
                shift,
                g_ld: |_| l,
            };
            let g_t = &mut g_row[rs.t.clone()];
            affine_backward_flat(clamp, rs.dir, &flat, g_t, g_raw, g_shift);
        }
        return;
    }
    let xv = Rows::gather(x, rs.d, rs.t.clone());
    let mut gv = Rows::gather(g, rs.d, rs.t.clone());
    let raw = Rows::gather(rs.params, rs.ldp, 0..nb);
    let shift = Rows::gather(rs.params, rs.ldp, nb..2 * nb);
    // The row's dL/d logdet, once per transformed value.
    let mut g_ld = Scratch::new(xv.len());
    for (dst, &l) in g_ld.chunks_exact_mut(nb).zip(d_logdet) {
        dst.fill(l);
    }
    let mut g_raw = Scratch::new(xv.len());
    let mut g_shift = Scratch::new(xv.len());
    let flat = Flat {
        x: &xv,
        raw: &raw,
        shift: &shift,
        g_ld: |i| g_ld[i],
    };
    affine_backward_flat(clamp, rs.dir, &flat, &mut gv, &mut g_raw, &mut g_shift);
    Rows::scatter(&gv, g, rs.d, rs.t.clone());
    Rows::scatter(&g_raw, g_params, rs.ldp, 0..nb);
    Rows::scatter(&g_shift, g_params, rs.ldp, nb..2 * nb);
}

/// The element-wise affine transform over flat arrays. (Indexed loops over slices cut to one
/// length: a long `zip` chain here stops LLVM from vectorising once inlined row by row.)
#[inline(always)]
fn affine_flat(
    clamp: f32,
    dir: Direction,
    v: &mut [f32],
    raw: &[f32],
    shift: &[f32],
    s: &mut [f32],
) {
    let n = v.len();
    let (raw, shift, s) = (&raw[..n], &shift[..n], &mut s[..n]);
    match dir {
        // x_B = z_B·e^s + b (eq. 18.10).
        Direction::Forward => {
            for i in 0..n {
                s[i] = soft_clamp(raw[i], clamp);
                v[i] = v[i] * vmath::exp(s[i]) + shift[i];
            }
        }
        // z_B = (x_B − b)·e^(−s).
        Direction::Inverse => {
            for i in 0..n {
                s[i] = soft_clamp(raw[i], clamp);
                v[i] = (v[i] - shift[i]) * vmath::exp(-s[i]);
            }
        }
    }
}

/// Inputs of the affine backward: the layer's input half and [raw s | b], as flat arrays or
/// one row's slices, and dL/d logdet for value i.
struct Flat<'a, L: Fn(usize) -> f32> {
    x: &'a [f32],
    raw: &'a [f32],
    shift: &'a [f32],
    g_ld: L,
}

/// `g` holds dL/d output on entry and dL/d input on return.
#[inline(always)]
fn affine_backward_flat<L: Fn(usize) -> f32>(
    clamp: f32,
    dir: Direction,
    f: &Flat<L>,
    g: &mut [f32],
    g_raw: &mut [f32],
    g_shift: &mut [f32],
) {
    let n = g.len();
    let (x, raw, shift) = (&f.x[..n], &f.raw[..n], &f.shift[..n]);
    let (g_raw, g_shift) = (&mut g_raw[..n], &mut g_shift[..n]);
    match dir {
        // x = z·e^s + b, logdet += s: ∂x/∂z = e^s, ∂x/∂s = z·e^s, ∂x/∂b = 1.
        Direction::Forward => {
            for i in 0..n {
                let t = vmath::tanh(raw[i] / clamp);
                let e = vmath::exp(clamp * t);
                let g_s = g[i] * x[i] * e + (f.g_ld)(i);
                // d(c·tanh(r/c))/dr = 1 − tanh².
                g_raw[i] = g_s * (1.0 - t * t);
                g_shift[i] = g[i];
                g[i] *= e;
            }
        }
        // z = (x − b)·e^(−s), logdet −= s: ∂z/∂x = e^(−s), ∂z/∂s = −z, ∂z/∂b = −e^(−s).
        Direction::Inverse => {
            for i in 0..n {
                let t = vmath::tanh(raw[i] / clamp);
                let e = vmath::exp(-clamp * t);
                let z = (x[i] - shift[i]) * e;
                let g_s = -g[i] * z - (f.g_ld)(i);
                g_raw[i] = g_s * (1.0 - t * t);
                g_shift[i] = -g[i] * e;
                g[i] *= e;
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
#[inline(always)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, scale: f32, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32 * scale).collect()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// The dispatched copies (compiled for the widest vector instructions) against the same
    /// code compiled for baseline x86-64 (the scalar reference), bit for bit: a gathered
    /// narrow half, a row-wise wide one, both directions, raw scales large enough to clamp.
    #[test]
    fn dispatched_transforms_match_the_baseline_exactly() {
        let mut rng = Rng::new(5);
        let clamp = 1.5;
        for (d, t) in [(2, 1..2), (7, 0..3), (40, 8..40)] {
            let (rows, nb) = (37, t.len());
            let (p, ldp) = (2 * nb, 2 * nb + 5);
            let params = random(rows * ldp, 2.0, &mut rng);
            let x = random(rows * d, 1.0, &mut rng);
            for dir in [Direction::Forward, Direction::Inverse] {
                let rs = Rows {
                    params: &params,
                    ldp,
                    p,
                    d,
                    t: t.clone(),
                    dir,
                };
                let (mut y0, mut y1) = (x.clone(), x.clone());
                let (mut ld0, mut ld1) = (vec![0.0; rows], vec![0.0; rows]);
                apply_rows_impl(clamp, &rs, &mut y0, &mut ld0);
                affine_apply_rows(clamp, &rs, &mut y1, &mut ld1);
                assert!(same_bits(&y0, &y1) && same_bits(&ld0, &ld1), "apply d={d}");

                let g = random(rows * d, 1.0, &mut rng);
                let d_ld = random(rows, 1.0, &mut rng);
                let (mut g0, mut g1) = (g.clone(), g.clone());
                let (mut gp0, mut gp1) = (vec![0.0; rows * ldp], vec![0.0; rows * ldp]);
                backward_rows_impl(clamp, &rs, &x, &mut g0, &d_ld, &mut gp0);
                affine_backward_rows(clamp, &rs, &x, &mut g1, &d_ld, &mut gp1);
                assert!(
                    same_bits(&g0, &g1) && same_bits(&gp0, &gp1),
                    "backward d={d}"
                );

                // Feature-major: raw s and b of column j at rows j and n_B + j of `fm`.
                let ld = rows + 3;
                let fm = random(2 * nb * ld, 2.0, &mut rng);
                let (mut y0, mut y1) = (x.clone(), x.clone());
                apply_fm_impl(clamp, dir, &fm, ld, d, t.clone(), &mut y0, &mut ld0);
                affine_apply_fm(clamp, dir, &fm, ld, d, t.clone(), &mut y1, &mut ld1);
                assert!(same_bits(&y0, &y1) && same_bits(&ld0, &ld1), "fm d={d}");
            }
        }
    }
}
