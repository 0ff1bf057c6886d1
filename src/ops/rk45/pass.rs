//! One chunk of rows through the vector-field MLP on the host: the forward pass, the
//! forward-mode tangents along K directions per row (the JVPs J·v_k of the divergence), and the
//! reverse pass over both (the VJP of the augmented dynamics). The CPU ops run this per chunk.
//!
//! With a_l = h_l·W_l + b_l, h_{l+1} = σ(a_l), h_0 = [z, t], f = a_{n−1}, the tangent of
//! direction v is ḣ_0 = [v, 0], ȧ_l = ḣ_l·W_l, ḣ_{l+1} = σ'(a_l) ⊙ ȧ_l, so ȧ_{n−1} = J·v and
//! div = α·Σ_k v_k·ȧ_{n−1,k}. The reverse pass of Φ = a·f − c·div runs through both chains:
//!   ā_{n−1} = a,  ǡ_{n−1,k} = −c·α·v_k,
//!   W̄_l += h_lᵀ ā_l + Σ_k ḣ_{l,k}ᵀ ǡ_{l,k},  b̄_l += Σ_rows ā_l,
//!   ā_{l−1} = σ'(a_{l−1}) ⊙ (ā_l W_lᵀ) + σ''(a_{l−1}) ⊙ Σ_k (ǡ_{l,k} W_lᵀ) ⊙ ȧ_{l−1,k},
//!   ǡ_{l−1,k} = σ'(a_{l−1}) ⊙ (ǡ_{l,k} W_lᵀ),
//!   z̄ = (ā_0 W_0ᵀ)[:D]  (the tangent input [v, 0] does not depend on z).
//! Tangent rows are stored direction-minor: row r·K + k is direction k of row r.

use std::borrow::Cow;

use super::fastact::{Derivs, activate};
use crate::backend::cpu::gemm::{View, matmul};
use crate::nn::mlp::Mlp;
use crate::tensor::{Shaped, Tensor};

/// The K directions of each row of a chunk, with the weight α of the divergence sum.
pub(super) struct Directions<'a> {
    /// (rows·K) × D.
    pub v: Cow<'a, [f32]>,
    pub k: usize,
    pub alpha: f32,
}

impl<'a> Directions<'a> {
    /// The D unit vectors for every row: the exact trace.
    pub fn exact(rows: usize, dim: usize) -> Self {
        let mut v = vec![0.0f32; rows * dim * dim];
        for r in 0..rows {
            for k in 0..dim {
                v[(r * dim + k) * dim + k] = 1.0;
            }
        }
        Directions {
            v: Cow::Owned(v),
            k: dim,
            alpha: 1.0,
        }
    }

    /// The rows' Hutchinson probes (rows × (M·D), which is (rows·M) × D as stored).
    pub fn probes(v: &'a [f32], dim: usize, m: usize) -> Self {
        debug_assert_eq!(v.len() % (dim * m), 0);
        Directions {
            v: Cow::Borrowed(v),
            k: m,
            alpha: 1.0 / m as f32,
        }
    }
}

/// The forward pass of a chunk and what the tangent and reverse passes need from it.
pub(super) struct Forward {
    pub rows: usize,
    pub dim: usize,
    /// [z, t]: rows × (D + 1).
    pub x: Vec<f32>,
    /// σ(a_l) for the hidden layers l = 0..n−1: the input of layer l + 1.
    pub hidden: Vec<Vec<f32>>,
    /// σ'(a_l) (empty unless asked for).
    pub d1: Vec<Vec<f32>>,
    /// σ''(a_l) (empty unless asked for).
    pub d2: Vec<Vec<f32>>,
    /// f: rows × D.
    pub out: Vec<f32>,
}

/// `bias` repeated on every row, then += input·W.
fn affine(input: &[f32], rows: usize, w: &Tensor, b: &Tensor) -> Vec<f32> {
    let (k, m) = w.shape();
    let mut y = Vec::with_capacity(rows * m);
    for _ in 0..rows {
        y.extend_from_slice(b.data());
    }
    matmul(
        &mut y,
        View::new(input, rows, k),
        View::new(w.data(), k, m),
        true,
    );
    y
}

pub(super) fn forward(
    net: &Mlp<Tensor>,
    z: &[f32],
    t: &[f32],
    rows: usize,
    derivs: Derivs,
) -> Forward {
    let dim = z.len() / rows.max(1);
    let mut x = Vec::with_capacity(rows * (dim + 1));
    for (zr, &tr) in z.chunks_exact(dim).zip(t) {
        x.extend_from_slice(zr);
        x.push(tr);
    }
    let n = net.layers.len();
    let mut hidden: Vec<Vec<f32>> = Vec::with_capacity(n - 1);
    let mut d1 = Vec::new();
    let mut d2 = Vec::new();
    let mut out = Vec::new();
    for (l, layer) in net.layers.iter().enumerate() {
        let input: &[f32] = if l == 0 { &x } else { &hidden[l - 1] };
        let pre = affine(input, rows, &layer.w, &layer.b);
        if l + 1 == n {
            out = pre;
            break;
        }
        let len = pre.len();
        let mut h = vec![0.0f32; len];
        let mut g1 = if derivs == Derivs::None {
            Vec::new()
        } else {
            vec![0.0f32; len]
        };
        let mut g2 = if derivs == Derivs::Second {
            vec![0.0f32; len]
        } else {
            Vec::new()
        };
        activate(net.act, derivs, &pre, &mut h, &mut g1, &mut g2);
        hidden.push(h);
        d1.push(g1);
        d2.push(g2);
    }
    Forward {
        rows,
        dim,
        x,
        hidden,
        d1,
        d2,
        out,
    }
}

/// The tangents of a chunk along its directions.
pub(super) struct Tangents {
    /// ȧ_l, (rows·K) × width of layer l's output; the last is J·v.
    pub adot: Vec<Vec<f32>>,
    /// ḣ_{l+1} = σ'(a_l) ⊙ ȧ_l: the tangent input of layer l + 1.
    pub hdot: Vec<Vec<f32>>,
    /// α·Σ_k v_k·(J v_k) per row.
    pub div: Vec<f32>,
}

/// Multiplies each direction row (r, k) of `m` (rows·K × width) by row r of `d` (rows × width).
fn scale_by_row(m: &mut [f32], d: &[f32], k: usize, width: usize) {
    for (block, dr) in m.chunks_exact_mut(k * width).zip(d.chunks_exact(width)) {
        for row in block.chunks_exact_mut(width) {
            for (x, &g) in row.iter_mut().zip(dr) {
                *x *= g;
            }
        }
    }
}

/// Needs `fwd` with first derivatives.
pub(super) fn tangents(net: &Mlp<Tensor>, fwd: &Forward, dirs: &Directions) -> Tangents {
    let (rows, dim, k) = (fwd.rows, fwd.dim, dirs.k);
    let rk = rows * k;
    let n = net.layers.len();
    let mut adot: Vec<Vec<f32>> = Vec::with_capacity(n);
    let mut hdot: Vec<Vec<f32>> = Vec::with_capacity(n - 1);
    for (l, layer) in net.layers.iter().enumerate() {
        let (win, wout) = layer.w.shape();
        let mut a = vec![0.0f32; rk * wout];
        if l == 0 {
            // Only the z rows of W_0 see the tangent [v, 0].
            matmul(
                &mut a,
                View::new(&dirs.v, rk, dim),
                View::new(&layer.w.data()[..dim * wout], dim, wout),
                false,
            );
        } else {
            let mut h = adot[l - 1].clone();
            scale_by_row(&mut h, &fwd.d1[l - 1], k, win);
            matmul(
                &mut a,
                View::new(&h, rk, win),
                View::new(layer.w.data(), win, wout),
                false,
            );
            hdot.push(h);
        }
        adot.push(a);
    }
    let jv = &adot[n - 1];
    let div = (0..rows)
        .map(|r| {
            let span = r * k * dim..(r + 1) * k * dim;
            let s: f64 = dirs.v[span.clone()]
                .iter()
                .zip(&jv[span])
                .map(|(&v, &j)| v as f64 * j as f64)
                .sum();
            (s * dirs.alpha as f64) as f32
        })
        .collect();
    Tangents { adot, hdot, div }
}

/// The cotangent of the divergence: its per-row weight c (a_div) with the tangents and
/// directions of the forward pass.
pub(super) struct DivBar<'a> {
    pub c: &'a [f32],
    pub tan: &'a Tangents,
    pub dirs: &'a Directions<'a>,
}

/// `m` (rows·per_row × width) with every row of input row r multiplied by w_r, or `m` itself.
fn weighted<'m>(m: &'m [f32], w: Option<&[f32]>, per_row: usize, width: usize) -> Cow<'m, [f32]> {
    match w {
        None => Cow::Borrowed(m),
        Some(w) => {
            let mut out = m.to_vec();
            for (block, &wr) in out.chunks_exact_mut(per_row * width).zip(w) {
                block.iter_mut().for_each(|x| *x *= wr);
            }
            Cow::Owned(out)
        }
    }
}

/// The reverse pass: returns g_z (rows × D) and, when `grads` is given, adds the parameter
/// gradients (rows weighted by `weights`) into it. `fwd` needs first derivatives, and second
/// ones when `div` is given.
pub(super) fn backward(
    net: &Mlp<Tensor>,
    fwd: &Forward,
    a: &[f32],
    div: Option<&DivBar>,
    weights: Option<&[f32]>,
    mut grads: Option<&mut Mlp<Tensor>>,
) -> Vec<f32> {
    let (rows, dim) = (fwd.rows, fwd.dim);
    let k = div.map_or(0, |d| d.dirs.k);
    let rk = rows * k;
    let mut abar = a.to_vec();
    let mut tbar: Option<Vec<f32>> = div.map(|d| {
        let mut t = d.dirs.v.to_vec();
        for (block, &c) in t.chunks_exact_mut(k * dim).zip(d.c) {
            let s = -c * d.dirs.alpha;
            block.iter_mut().for_each(|x| *x *= s);
        }
        t
    });
    for l in (0..net.layers.len()).rev() {
        let layer = &net.layers[l];
        let (win, wout) = layer.w.shape();
        let w = layer.w.data();
        if let Some(g) = grads.as_deref_mut() {
            let input: &[f32] = if l == 0 { &fwd.x } else { &fwd.hidden[l - 1] };
            let ab = weighted(&abar, weights, 1, wout);
            let gl = &mut g.layers[l];
            matmul(
                gl.w.data_mut(),
                View::new(input, rows, win).t(),
                View::new(&ab, rows, wout),
                true,
            );
            for row in ab.chunks_exact(wout) {
                for (acc, &v) in gl.b.data_mut().iter_mut().zip(row) {
                    *acc += v;
                }
            }
            if let (Some(tb), Some(d)) = (&tbar, div) {
                let tb = weighted(tb, weights, k, wout);
                if l == 0 {
                    matmul(
                        &mut gl.w.data_mut()[..dim * wout],
                        View::new(&d.dirs.v, rk, dim).t(),
                        View::new(&tb, rk, wout),
                        true,
                    );
                } else {
                    matmul(
                        gl.w.data_mut(),
                        View::new(&d.tan.hdot[l - 1], rk, win).t(),
                        View::new(&tb, rk, wout),
                        true,
                    );
                }
            }
        }
        if l == 0 {
            let mut gz = vec![0.0f32; rows * dim];
            matmul(
                &mut gz,
                View::new(&abar, rows, wout),
                View::new(&w[..dim * wout], dim, wout).t(),
                false,
            );
            return gz;
        }
        let mut hbar = vec![0.0f32; rows * win];
        matmul(
            &mut hbar,
            View::new(&abar, rows, wout),
            View::new(w, win, wout).t(),
            false,
        );
        let d1 = &fwd.d1[l - 1];
        for (x, &g) in hbar.iter_mut().zip(d1) {
            *x *= g;
        }
        if let (Some(tb), Some(d)) = (tbar.take(), div) {
            let mut hdbar = vec![0.0f32; rk * win];
            matmul(
                &mut hdbar,
                View::new(&tb, rk, wout),
                View::new(w, win, wout).t(),
                false,
            );
            // The σ'' term: the tangent ḣ = σ'(a) ⊙ ȧ also depends on a.
            let (d2, adot) = (&fwd.d2[l - 1], &d.tan.adot[l - 1]);
            let mut acc = vec![0.0f32; win];
            for r in 0..rows {
                acc.fill(0.0);
                let block = r * k * win..(r + 1) * k * win;
                for (hd, ad) in hdbar[block.clone()]
                    .chunks_exact(win)
                    .zip(adot[block].chunks_exact(win))
                {
                    for ((s, &x), &y) in acc.iter_mut().zip(hd).zip(ad) {
                        *s += x * y;
                    }
                }
                let out = &mut hbar[r * win..(r + 1) * win];
                for ((o, &s), &g2) in out.iter_mut().zip(&acc).zip(&d2[r * win..(r + 1) * win]) {
                    *o += g2 * s;
                }
            }
            scale_by_row(&mut hdbar, d1, k, win);
            tbar = Some(hdbar);
        }
        abar = hbar;
    }
    unreachable!("the loop returns at layer 0")
}
