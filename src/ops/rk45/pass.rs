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
use super::narrow::{matmul_narrow, row_dots};
use super::scratch;
use crate::backend::cpu::gemm::{View, matmul};

use crate::nn::mlp::Mlp;
use crate::tensor::{Shaped, Tensor};

/// Defines `$name` as a dispatcher to copies of `$body` compiled for AVX-512 and for AVX2 with
/// FMA (picked at run time) or the baseline, so that the element-wise loops of a pass use the
/// widest vectors the CPU has. All copies perform the same operations in the same order (Rust
/// never fuses a multiply and an add on its own), so they return the same bits.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub(super) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU must support AVX-512F.
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn widest($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                /// # Safety
                /// The CPU must support AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `widest` is compiled for.
                    return unsafe { widest($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

multiversion!(
    /// The forward pass of `rows` rows (z: rows × D, t: rows), keeping what `derivs` asks for.
    fn forward(net: &Mlp<Tensor>, z: &[f32], t: &[f32], rows: usize, derivs: Derivs) -> Forward = forward_body
);

multiversion!(
    /// The tangents along `dirs`; needs `fwd` with first derivatives. With `keep` every
    /// layer's tangents stay for a reverse pass; without, only J·v (the last `adot`) and div.
    fn tangents(net: &Mlp<Tensor>, fwd: &Forward, dirs: &Directions, keep: bool) -> Tangents = tangents_body
);

multiversion!(
    /// The reverse pass: returns g_z (rows × D) and, when `grads` is given, adds the parameter
    /// gradients (rows weighted by `weights`) into it. `fwd` needs first derivatives, and
    /// second ones when `div` is given.
    fn backward(
        net: &Mlp<Tensor>,
        fwd: &Forward,
        a: &[f32],
        div: Option<&DivBar>,
        weights: Option<&[f32]>,
        grads: Option<&mut Mlp<Tensor>>
    ) -> Vec<f32> = backward_body
);

/// Outputs narrower than this go to the narrow-product loops (see [`mm`]).
const NARROW: usize = 16;

/// c (m×n) = a·b [+ c], as [`matmul`]; narrow outputs (n = D = 2 columns of a field) go to
/// [`matmul_narrow`], which vectorises along the long dimension.
#[inline(always)]
fn mm(c: &mut [f32], a: View, b: View, accumulate: bool) {
    let m = if a.t { a.cols } else { a.rows };
    let n = if b.t { b.rows } else { b.cols };
    if n >= NARROW || m <= n {
        matmul(c, a, b, accumulate);
    } else {
        matmul_narrow(c, a, b, accumulate);
    }
}

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
        let mut v = scratch::zeros(rows * dim * dim);
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

    pub fn recycle(self) {
        if let Cow::Owned(v) = self.v {
            scratch::recycle(v);
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
#[inline(always)]
fn affine(input: &[f32], rows: usize, w: &Tensor, b: &Tensor) -> Vec<f32> {
    let (k, m) = w.shape();
    let mut y = scratch::dirty(rows * m);
    for row in y.chunks_exact_mut(m) {
        row.copy_from_slice(b.data());
    }
    mm(
        &mut y,
        View::new(input, rows, k),
        View::new(w.data(), k, m),
        true,
    );
    y
}

#[inline(always)]
fn forward_body(net: &Mlp<Tensor>, z: &[f32], t: &[f32], rows: usize, derivs: Derivs) -> Forward {
    let dim = z.len() / rows.max(1);
    let mut x = scratch::dirty(rows * (dim + 1));
    for ((xr, zr), &tr) in x.chunks_exact_mut(dim + 1).zip(z.chunks_exact(dim)).zip(t) {
        xr[..dim].copy_from_slice(zr);
        xr[dim] = tr;
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
        let mut h = scratch::dirty(len);
        let mut g1 = if derivs == Derivs::None {
            Vec::new()
        } else {
            scratch::dirty(len)
        };
        let mut g2 = if derivs == Derivs::Second {
            scratch::dirty(len)
        } else {
            Vec::new()
        };
        activate(net.act, derivs, &pre, &mut h, &mut g1, &mut g2);
        scratch::recycle(pre);
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

impl Forward {
    /// Hands the buffers back to this thread's pool, except the output.
    pub fn recycle(self) -> Vec<f32> {
        scratch::recycle(self.x);
        scratch::recycle_all(self.hidden);
        scratch::recycle_all(self.d1);
        scratch::recycle_all(self.d2);
        self.out
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

impl Tangents {
    pub fn recycle(self) {
        scratch::recycle_all(self.adot);
        scratch::recycle_all(self.hdot);
    }
}

/// Multiplies each direction row (r, k) of `m` (rows·K × width) by row r of `d` (rows × width).
#[inline(always)]
fn scale_by_row(m: &mut [f32], d: &[f32], k: usize, width: usize) {
    for (block, dr) in m.chunks_exact_mut(k * width).zip(d.chunks_exact(width)) {
        for row in block.chunks_exact_mut(width) {
            for (x, &g) in row.iter_mut().zip(dr) {
                *x *= g;
            }
        }
    }
}

/// out (rows·K × width) = each direction row (r, k) of `m` times row r of `d`.
#[inline(always)]
fn scaled_by_row(m: &[f32], d: &[f32], k: usize, width: usize) -> Vec<f32> {
    let mut out = scratch::dirty(m.len());
    let blocks = out
        .chunks_exact_mut(k * width)
        .zip(m.chunks_exact(k * width));
    for ((oblock, block), dr) in blocks.zip(d.chunks_exact(width)) {
        for (orow, row) in oblock
            .chunks_exact_mut(width)
            .zip(block.chunks_exact(width))
        {
            for ((o, &x), &g) in orow.iter_mut().zip(row).zip(dr) {
                *o = x * g;
            }
        }
    }
    out
}

#[inline(always)]
fn tangents_body(net: &Mlp<Tensor>, fwd: &Forward, dirs: &Directions, keep: bool) -> Tangents {
    let (rows, dim, k) = (fwd.rows, fwd.dim, dirs.k);
    let rk = rows * k;
    let n = net.layers.len();
    let mut adot: Vec<Vec<f32>> = Vec::with_capacity(n);
    let mut hdot: Vec<Vec<f32>> = Vec::with_capacity(n - 1);
    for (l, layer) in net.layers.iter().enumerate() {
        let (win, wout) = layer.w.shape();
        let mut a = scratch::dirty(rk * wout);
        if l == 0 {
            // Only the z rows of W_0 see the tangent [v, 0].
            mm(
                &mut a,
                View::new(&dirs.v, rk, dim),
                View::new(&layer.w.data()[..dim * wout], dim, wout),
                false,
            );
        } else if keep {
            let h = scaled_by_row(&adot[l - 1], &fwd.d1[l - 1], k, win);
            mm(
                &mut a,
                View::new(&h, rk, win),
                View::new(layer.w.data(), win, wout),
                false,
            );
            hdot.push(h);
        } else {
            // Only J·v is wanted: scale the previous tangent in place and let it go.
            let mut h = adot.pop().expect("the previous layer's tangent");
            scale_by_row(&mut h, &fwd.d1[l - 1], k, win);
            mm(
                &mut a,
                View::new(&h, rk, win),
                View::new(layer.w.data(), win, wout),
                false,
            );
            scratch::recycle(h);
        }
        adot.push(a);
    }
    let jv = adot.last().expect("at least one layer");
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
#[inline(always)]
fn weighted<'m>(m: &'m [f32], w: Option<&[f32]>, per_row: usize, width: usize) -> Cow<'m, [f32]> {
    match w {
        None => Cow::Borrowed(m),
        Some(w) => {
            let mut out = scratch::dirty(m.len());
            let blocks = out
                .chunks_exact_mut(per_row * width)
                .zip(m.chunks_exact(per_row * width));
            for ((o, block), &wr) in blocks.zip(w) {
                for (o, &x) in o.iter_mut().zip(block) {
                    *o = x * wr;
                }
            }
            Cow::Owned(out)
        }
    }
}

#[inline(always)]
fn backward_body(
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
    let mut abar = scratch::dirty(a.len());
    abar.copy_from_slice(a);
    let mut tbar: Option<Vec<f32>> = div.map(|d| {
        let mut t = scratch::dirty(d.dirs.v.len());
        let blocks = t
            .chunks_exact_mut(k * dim)
            .zip(d.dirs.v.chunks_exact(k * dim));
        for ((o, block), &c) in blocks.zip(d.c) {
            let s = -c * d.dirs.alpha;
            for (o, &x) in o.iter_mut().zip(block) {
                *o = x * s;
            }
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
            mm(
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
            if let Cow::Owned(v) = ab {
                scratch::recycle(v);
            }
            if let (Some(tb), Some(d)) = (&tbar, div) {
                let tb = weighted(tb, weights, k, wout);
                if l == 0 {
                    mm(
                        &mut gl.w.data_mut()[..dim * wout],
                        View::new(&d.dirs.v, rk, dim).t(),
                        View::new(&tb, rk, wout),
                        true,
                    );
                } else {
                    mm(
                        gl.w.data_mut(),
                        View::new(&d.tan.hdot[l - 1], rk, win).t(),
                        View::new(&tb, rk, wout),
                        true,
                    );
                }
                if let Cow::Owned(v) = tb {
                    scratch::recycle(v);
                }
            }
        }
        if l == 0 {
            let mut gz = vec![0.0f32; rows * dim];
            mm(
                &mut gz,
                View::new(&abar, rows, wout),
                View::new(&w[..dim * wout], dim, wout).t(),
                false,
            );
            scratch::recycle(abar);
            if let Some(tb) = tbar {
                scratch::recycle(tb);
            }
            return gz;
        }
        let mut hbar = scratch::dirty(rows * win);
        mm(
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
            let mut hdbar = scratch::dirty(rk * win);
            mm(
                &mut hdbar,
                View::new(&tb, rk, wout),
                View::new(w, win, wout).t(),
                false,
            );
            // The σ'' term: the tangent ḣ = σ'(a) ⊙ ȧ also depends on a.
            let (d2, adot) = (&fwd.d2[l - 1], &d.tan.adot[l - 1]);
            let mut acc = scratch::dirty(win);
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
            scratch::recycle(acc);
            scratch::recycle(tb);
            scale_by_row(&mut hdbar, d1, k, win);
            tbar = Some(hdbar);
        }
        scratch::recycle(std::mem::replace(&mut abar, hbar));
    }
    unreachable!("the loop returns at layer 0")
}

/// The exact divergence of a field with at most two hidden layers as a form in the activation
/// slopes, with weights fixed for the whole call. With d_l = σ'(a_l) of row r and W0z the z
/// rows of W_0, the Jacobian is W0z·diag(d1)·W1·diag(d2)·W2 (row-vector convention), so by the
/// cyclic property of the trace
///   two hidden layers:  div = Σ_ab d1_a·W1[a,b]·d2_b·G[b,a] = d1ᵀ·C·d2,  G = W2·W0z,  C = W1 ∘ Gᵀ,
///   one hidden layer:   div = Σ_a d1_a·g_a,                              g_a = Σ_i W0[i,a]·W1[a,i],
///   none:               div = Σ_i W0[i,i],
/// one H1×H2 product per row whatever D is, instead of D tangent passes. Deeper fields do not
/// collapse this way (the form would be multilinear) and use the tangents.
pub(super) enum TraceForm {
    Constant(f32),
    Linear(Vec<f32>),
    /// C, H1 × H2.
    Bilinear(Vec<f32>),
}

/// The form of `net` (dimension `dim`), or None for more than two hidden layers.
pub(super) fn trace_form(net: &Mlp<Tensor>, dim: usize) -> Option<TraceForm> {
    let w = |l: usize| &net.layers[l].w;
    match net.layers.len() {
        1 => Some(TraceForm::Constant(
            (0..dim).map(|i| w(0).get(i, i) as f64).sum::<f64>() as f32,
        )),
        2 => {
            let h1 = w(0).cols();
            let g = (0..h1)
                .map(|a| {
                    let s: f64 = (0..dim)
                        .map(|i| w(0).get(i, a) as f64 * w(1).get(a, i) as f64)
                        .sum();
                    s as f32
                })
                .collect();
            Some(TraceForm::Linear(g))
        }
        3 => {
            // Gᵀ[a, b] = Σ_i W0[i, a]·W2[b, i], row by row of W0z (vectorised along b), then ∘ W1.
            let (h1, h2) = w(1).shape();
            let w2t = w(2).transpose();
            let mut c = vec![0.0f32; h1 * h2];
            for i in 0..dim {
                let w0row = &w(0).data()[i * h1..(i + 1) * h1];
                let w2col = w2t.row(i);
                for (crow, &w0ia) in c.chunks_exact_mut(h2).zip(w0row) {
                    for (cab, &w2bi) in crow.iter_mut().zip(w2col) {
                        *cab += w0ia * w2bi;
                    }
                }
            }
            for (cab, &w1ab) in c.iter_mut().zip(w(1).data()) {
                *cab *= w1ab;
            }
            Some(TraceForm::Bilinear(c))
        }
        _ => None,
    }
}

#[inline(always)]
fn form_div_body(form: &TraceForm, fwd: &Forward) -> Vec<f32> {
    match form {
        TraceForm::Constant(c) => vec![*c; fwd.rows],
        TraceForm::Linear(g) => fwd.d1[0]
            .chunks_exact(g.len())
            .map(|d| {
                d.iter()
                    .zip(g)
                    .map(|(&p, &q)| p as f64 * q as f64)
                    .sum::<f64>() as f32
            })
            .collect(),
        TraceForm::Bilinear(c) => {
            let (h1, h2) = (
                fwd.hidden[0].len() / fwd.rows,
                fwd.hidden[1].len() / fwd.rows,
            );
            let mut u = scratch::dirty(fwd.rows * h2);
            mm(
                &mut u,
                View::new(&fwd.d1[0], fwd.rows, h1),
                View::new(c, h1, h2),
                false,
            );
            let div = row_dots(&u, &fwd.d1[1], h2);
            scratch::recycle(u);
            div
        }
    }
}

multiversion!(
    /// The exact divergence of each row from its forward pass (with first derivatives).
    fn form_div(form: &TraceForm, fwd: &Forward) -> Vec<f32> = form_div_body
);
