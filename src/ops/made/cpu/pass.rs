//! The three passes over one chunk of rows: the one-pass transform, its backward, and the
//! sequential transform. Buffers are feature-major (units × rows, degree order), so that a
//! tile's rows, the prefix it reads, and one coordinate across the chunk are all contiguous;
//! the chunk's input and output are row-major in the data's column order.

use super::plan::{PackedLayer, Plan};
use super::scratch::Scratch;
use crate::backend::cpu::gemm::{View, matmul};
use crate::backend::cpu::vmath;
use crate::nn::mlp::Activation;
use crate::ops::Direction;

/// Calls `$imp` compiled for the widest vector instructions this CPU has. The crate is built
/// for baseline x86-64, where the element-wise loops (transform, activations, transposes)
/// would run 4 lanes wide; `$imp` and its helpers are `#[inline(always)]` so that they are
/// compiled again inside each `#[target_feature]` copy. (The GEMM dispatches by itself.)
macro_rules! simd_dispatch {
    ($imp:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
            fn v4($($arg: $ty),*) -> $ret {
                $imp($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            fn v3($($arg: $ty),*) -> $ret {
                $imp($($arg),*)
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: every feature `v4` is compiled for was detected on this CPU.
                return unsafe { v4($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: every feature `v3` is compiled for was detected on this CPU.
                return unsafe { v3($($arg),*) };
            }
        }
        $imp($($arg),*)
    }};
}

/// The affine step of one coordinate across a chunk, with the soft clamp
/// s = clamp·tanh(raw/clamp): y = g·e^s + b forward (eq. 18.19), (g − b)·e^−s inverse
/// (eq. 18.18), where g is the given value (raw/clamp is taken as raw·(1/clamp), within an
/// ulp). Writes s to `s_out` for the logdet.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transform(
    dir: Direction,
    clamp: f32,
    g: &[f32],
    b: &[f32],
    raw: &[f32],
    y: &mut [f32],
    s_out: &mut [f32],
) {
    let inv = 1.0 / clamp;
    let it = y
        .iter_mut()
        .zip(s_out.iter_mut())
        .zip(g.iter().zip(b).zip(raw));
    match dir {
        Direction::Forward => {
            for ((y, s_out), ((&g, &b), &raw)) in it {
                let s = clamp * vmath::tanh(raw * inv);
                *y = g * vmath::exp(s) + b;
                *s_out = s;
            }
        }
        Direction::Inverse => {
            for ((y, s_out), ((&g, &b), &raw)) in it {
                let s = clamp * vmath::tanh(raw * inv);
                *y = (g - b) * vmath::exp(-s);
                *s_out = s;
            }
        }
    }
}

/// Adds ±s of one coordinate to each row's logdet (f64, so the sum over D terms is exact
/// enough for any D): +s forward, −s inverse.
#[inline(always)]
fn add_logdet(dir: Direction, s: &[f32], ld: &mut [f64]) {
    let it = ld.iter_mut().zip(s);
    match dir {
        Direction::Forward => it.for_each(|(l, &s)| *l += s as f64),
        Direction::Inverse => it.for_each(|(l, &s)| *l -= s as f64),
    }
}

/// dL/d of one coordinate's inputs of `transform`, from dL/dy (`go`) and dL/d logdet (`gl`).
struct TransformGrads<'a> {
    /// dL/dg through the affine step only (the MADE path is added later).
    dg: &'a mut [f32],
    db: &'a mut [f32],
    draw: &'a mut [f32],
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn transform_backward(
    dir: Direction,
    clamp: f32,
    g: &[f32],
    b: &[f32],
    raw: &[f32],
    go: &[f32],
    gl: &[f32],
    out: TransformGrads,
) {
    let inv = 1.0 / clamp;
    let it = (out
        .dg
        .iter_mut()
        .zip(out.db.iter_mut())
        .zip(out.draw.iter_mut()))
    .zip(g.iter().zip(b).zip(raw).zip(go.iter().zip(gl)));
    // ds/draw = 1 − t² with t = tanh(raw/clamp).
    match dir {
        Direction::Forward => {
            for (((dg, db), draw), (((&g, _), &raw), (&go, &gl))) in it {
                let t = vmath::tanh(raw * inv);
                let e = vmath::exp(clamp * t);
                *dg = go * e;
                *db = go;
                *draw = (go * g * e + gl) * (1.0 - t * t);
            }
        }
        Direction::Inverse => {
            for (((dg, db), draw), (((&g, &b), &raw), (&go, &gl))) in it {
                let t = vmath::tanh(raw * inv);
                let e = vmath::exp(-clamp * t);
                let z = (g - b) * e;
                *dg = go * e;
                *db = -go * e;
                *draw = (-go * z - gl) * (1.0 - t * t);
            }
        }
    }
}

/// rows × D row-major in column order -> D × rows in degree order.
#[inline(always)]
fn to_degree_major(plan: &Plan, x: &[f32], rows: usize) -> Scratch {
    let d = plan.dim;
    let mut t = Scratch::new(d * rows);
    for (k, &col) in plan.order.iter().enumerate() {
        for (r, v) in t[k * rows..(k + 1) * rows].iter_mut().enumerate() {
            *v = x[r * d + col];
        }
    }
    t
}

/// D × rows in degree order -> rows × D row-major in column order.
#[inline(always)]
fn to_row_major(plan: &Plan, t: &[f32], rows: usize) -> Vec<f32> {
    let d = plan.dim;
    let mut x = vec![0.0f32; rows * d];
    for (k, &col) in plan.order.iter().enumerate() {
        for (r, &v) in t[k * rows..(k + 1) * rows].iter().enumerate() {
            x[r * d + col] = v;
        }
    }
    x
}

/// y[tile rows] = tile weights · input prefix (no bias). Tiles cover each output row once.
#[inline(always)]
fn tile_product(layer: &PackedLayer, tile: usize, input: &[f32], rows: usize, y: &mut [f32]) {
    let t = &layer.tiles[tile];
    let dst = &mut y[t.cols.start * rows..t.cols.end * rows];
    if t.prefix == 0 {
        dst.fill(0.0);
        return;
    }
    matmul(
        dst,
        View::new(&t.w, t.cols.len(), t.prefix),
        View::new(&input[..t.prefix * rows], t.prefix, rows),
        false,
    );
}

/// y = act(y + bias) over output units `units` (feature-major rows); `None` is linear.
#[inline(always)]
fn bias_act(
    layer: &PackedLayer,
    act: Option<Activation>,
    units: std::ops::Range<usize>,
    rows: usize,
    y: &mut [f32],
) {
    let y = &mut y[units.start * rows..units.end * rows];
    for (row, &b) in y.chunks_exact_mut(rows).zip(&layer.bias[units]) {
        match act {
            None => row.iter_mut().for_each(|v| *v += b),
            Some(Activation::Relu) => row.iter_mut().for_each(|v| *v = (*v + b).max(0.0)),
            Some(a) => row.iter_mut().for_each(|v| *v = a.apply(*v + b)),
        }
    }
}

/// The whole masked layer: y = act(W·input + bias).
#[inline(always)]
fn layer_forward(
    layer: &PackedLayer,
    act: Option<Activation>,
    input: &[f32],
    rows: usize,
    y: &mut [f32],
) {
    // Bias and activation right after each tile, while its rows are still in cache.
    for (i, t) in layer.tiles.iter().enumerate() {
        tile_product(layer, i, input, rows, y);
        bias_act(layer, act, t.cols.clone(), rows, y);
    }
}

/// The one-pass transform of `rows` rows: returns the output (rows × D, column order) and
/// the per-row logdet.
pub fn parallel(plan: &Plan, dir: Direction, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
    simd_dispatch!(parallel_impl(plan: &Plan, dir: Direction, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>))
}

#[inline(always)]
fn parallel_impl(plan: &Plan, dir: Direction, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
    let d = plan.dim;
    let n = plan.layers.len();
    let xt = to_degree_major(plan, x, rows);
    let width = plan.layers.iter().map(|l| l.out_width).max().unwrap_or(0);
    let (mut a, mut b) = (Scratch::new(width * rows), Scratch::new(width * rows));
    for (l, layer) in plan.layers.iter().enumerate() {
        let act = (l + 1 < n).then_some(plan.act);
        let input: &[f32] = if l == 0 { &xt } else { &a };
        layer_forward(layer, act, input, rows, &mut b);
        std::mem::swap(&mut a, &mut b);
    }
    // `a` holds the MADE output: row 2k is b, row 2k + 1 raw s, of the input of degree k + 1.
    let mut yt = Scratch::new(d * rows);
    let mut s = Scratch::new(rows);
    let mut ld = vec![0.0f64; rows];
    for k in 0..d {
        let (g, o) = (
            &xt[k * rows..(k + 1) * rows],
            &a[2 * k * rows..(2 * k + 2) * rows],
        );
        let (bias, raw) = o.split_at(rows);
        let y = &mut yt[k * rows..(k + 1) * rows];
        transform(dir, plan.clamp, g, bias, raw, y, &mut s);
        add_logdet(dir, &s, &mut ld);
    }
    (
        to_row_major(plan, &yt, rows),
        ld.into_iter().map(|v| v as f32).collect(),
    )
}

/// Per-chunk parameter gradients: per layer, per tile (see `Tile::w`), and biases in degree
/// order (f64, summed over the chunk's rows).
pub struct ChunkGrads {
    pub tiles: Vec<Vec<Vec<f32>>>,
    pub bias: Vec<Vec<f64>>,
}

impl ChunkGrads {
    pub fn zeros(plan: &Plan) -> Self {
        ChunkGrads {
            tiles: plan.layers.iter().map(|l| l.zero_tile_grads()).collect(),
            bias: plan.layers.iter().map(|l| vec![0.0; l.out_width]).collect(),
        }
    }

    /// Adds another chunk's gradients (callers add chunks in row order).
    pub fn add(&mut self, other: &ChunkGrads) {
        for (a, b) in self
            .tiles
            .iter_mut()
            .flatten()
            .zip(other.tiles.iter().flatten())
        {
            a.iter_mut().zip(b).for_each(|(u, v)| *u += v);
        }
        for (a, b) in self.bias.iter_mut().zip(&other.bias) {
            a.iter_mut().zip(b).for_each(|(u, v)| *u += v);
        }
    }
}

/// Backward of `parallel` for one chunk: returns dL/dx (rows × D, column order) and the
/// chunk's parameter gradients.
pub fn parallel_backward(
    plan: &Plan,
    dir: Direction,
    x: &[f32],
    d_out: &[f32],
    d_logdet: &[f32],
    rows: usize,
) -> (Vec<f32>, ChunkGrads) {
    simd_dispatch!(parallel_backward_impl(
        plan: &Plan,
        dir: Direction,
        x: &[f32],
        d_out: &[f32],
        d_logdet: &[f32],
        rows: usize
    ) -> (Vec<f32>, ChunkGrads))
}

#[inline(always)]
fn parallel_backward_impl(
    plan: &Plan,
    dir: Direction,
    x: &[f32],
    d_out: &[f32],
    d_logdet: &[f32],
    rows: usize,
) -> (Vec<f32>, ChunkGrads) {
    let d = plan.dim;
    let n = plan.layers.len();
    let xt = to_degree_major(plan, x, rows);
    let go_t = to_degree_major(plan, d_out, rows);
    // Forward, keeping pre-activations and activations of the hidden layers.
    let mut pre: Vec<Scratch> = Vec::with_capacity(n - 1);
    let mut hidden: Vec<Scratch> = Vec::with_capacity(n - 1);
    let mut out = Scratch::new(2 * d * rows);
    for (l, layer) in plan.layers.iter().enumerate() {
        let input: &[f32] = if l == 0 { &xt } else { &hidden[l - 1] };
        if l + 1 == n {
            layer_forward(layer, None, input, rows, &mut out);
        } else {
            let mut p = Scratch::new(layer.out_width * rows);
            layer_forward(layer, None, input, rows, &mut p);
            let mut h = Scratch::new(layer.out_width * rows);
            activate(plan.act, &p, &mut h);
            pre.push(p);
            hidden.push(h);
        }
    }
    // dL/d MADE output (degree order) and the direct part of dL/dx.
    let mut delta = Scratch::new(2 * d * rows);
    let mut dxt = Scratch::new(d * rows);
    for k in 0..d {
        let row = k * rows..(k + 1) * rows;
        let (bias, raw) = out[2 * k * rows..(2 * k + 2) * rows].split_at(rows);
        let (db, draw) = delta[2 * k * rows..(2 * k + 2) * rows].split_at_mut(rows);
        transform_backward(
            dir,
            plan.clamp,
            &xt[row.clone()],
            bias,
            raw,
            &go_t[row.clone()],
            d_logdet,
            TransformGrads {
                dg: &mut dxt[row],
                db,
                draw,
            },
        );
    }
    let mut grads = ChunkGrads::zeros(plan);
    for l in (0..n).rev() {
        let layer = &plan.layers[l];
        let input: &[f32] = if l == 0 { &xt } else { &hidden[l - 1] };
        for (acc, row) in grads.bias[l].iter_mut().zip(delta.chunks_exact(rows)) {
            *acc = row.iter().map(|&v| v as f64).sum();
        }
        let mut d_in = Scratch::zeroed(layer.in_width * rows);
        for (t, gw) in layer.tiles.iter().zip(grads.tiles[l].iter_mut()) {
            if t.prefix == 0 {
                continue;
            }
            let m = t.cols.len();
            let delta_t = &delta[t.cols.start * rows..t.cols.end * rows];
            // dW_tile (m × prefix) = Δ_tile · inputᵀ over the prefix.
            matmul(
                gw,
                View::new(delta_t, m, rows),
                View::new(&input[..t.prefix * rows], t.prefix, rows).t(),
                false,
            );
            // d input prefix += W_tileᵀ · Δ_tile.
            matmul(
                &mut d_in[..t.prefix * rows],
                View::new(&t.w, m, t.prefix).t(),
                View::new(delta_t, m, rows),
                true,
            );
        }
        if l > 0 {
            mul_act_grad(plan.act, &pre[l - 1], &mut d_in);
            delta = d_in;
        } else {
            dxt.iter_mut().zip(d_in.iter()).for_each(|(a, b)| *a += b);
        }
    }
    (to_row_major(plan, &dxt, rows), grads)
}

#[inline(always)]
fn activate(act: Activation, pre: &[f32], out: &mut [f32]) {
    let it = out.iter_mut().zip(pre);
    match act {
        Activation::Relu => it.for_each(|(h, &p)| *h = p.max(0.0)),
        a => it.for_each(|(h, &p)| *h = a.apply(p)),
    }
}

/// d ← d ⊙ act'(pre).
#[inline(always)]
fn mul_act_grad(act: Activation, pre: &[f32], d: &mut [f32]) {
    let it = d.iter_mut().zip(pre);
    match act {
        Activation::Relu => it.for_each(|(g, &p)| *g = if p > 0.0 { *g } else { 0.0 }),
        a => it.for_each(|(g, &p)| *g *= a.grad(p)),
    }
}

/// The sequential transform of one chunk, with `plan` tiled by degree.
///
/// Derivation: a hidden unit of degree c (in any layer) depends only on inputs of degree <= c,
/// and an output of degree c only on inputs of degree < c. So at step k = 1..=D:
///   1. the outputs (b, raw s) of degree k read last-layer units of degree <= k − 1, all
///      finished in earlier steps;
///   2. they give the MADE input of degree k: u = g·e^s + b (forward) or (g − b)·e^−s
///      (inverse), where g is the given value of that coordinate;
///   3. with every input of degree <= k known, the layer-1 units of degree k are finished, then
///      the layer-2 units of degree k (they read layer-1 units of degree <= k), and so on.
///
/// Every unit is computed exactly once, from the prefix its tile reads, so the whole loop
/// costs one masked pass (plus D small GEMMs per layer instead of a few large ones), not D
/// full passes.
pub fn sequential(plan: &Plan, dir: Direction, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
    simd_dispatch!(sequential_impl(plan: &Plan, dir: Direction, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>))
}

#[inline(always)]
fn sequential_impl(plan: &Plan, dir: Direction, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
    let d = plan.dim;
    let n = plan.layers.len();
    let (hidden_layers, out_layer) = plan.layers.split_at(n - 1);
    let out_layer = &out_layer[0];
    let xt = to_degree_major(plan, x, rows);
    // The MADE input, feature-major in degree order, filled one degree at a time.
    let mut ut = Scratch::new(d * rows);
    let mut hidden: Vec<Scratch> = hidden_layers
        .iter()
        .map(|l| Scratch::new(l.out_width * rows))
        .collect();
    let mut o = Scratch::new(out_layer.out_width * rows);
    let mut s = Scratch::new(rows);
    let mut ld = vec![0.0f64; rows];
    for k in 1..=d {
        // 1. outputs of degree k.
        if let Some(ti) = out_layer.by_degree[k] {
            let src: &[f32] = hidden.last().map_or(&ut, |h| h);
            tile_product(out_layer, ti, src, rows, &mut o);
            bias_act(
                out_layer,
                None,
                out_layer.tiles[ti].cols.clone(),
                rows,
                &mut o,
            );
        }
        // 2. the input of degree k.
        let row = (k - 1) * rows..k * rows;
        let (bias, raw) = o[2 * (k - 1) * rows..2 * k * rows].split_at(rows);
        transform(
            dir,
            plan.clamp,
            &xt[row.clone()],
            bias,
            raw,
            &mut ut[row],
            &mut s,
        );
        add_logdet(dir, &s, &mut ld);
        // 3. hidden units of degree k, layer by layer.
        for (l, layer) in hidden_layers.iter().enumerate() {
            let Some(ti) = layer.by_degree[k] else {
                continue;
            };
            let (before, rest) = hidden.split_at_mut(l);
            let src: &[f32] = if l == 0 { &ut } else { &before[l - 1] };
            let dst = &mut rest[0];
            tile_product(layer, ti, src, rows, dst);
            bias_act(
                layer,
                Some(plan.act),
                layer.tiles[ti].cols.clone(),
                rows,
                dst,
            );
        }
    }
    (
        to_row_major(plan, &ut, rows),
        ld.into_iter().map(|v| v as f32).collect(),
    )
}
