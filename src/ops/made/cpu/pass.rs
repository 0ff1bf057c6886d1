//! The three passes over one chunk of rows: the one-pass transform, its backward, and the
//! sequential transform. Buffers are feature-major (units × rows, degree order); the chunk's
//! input and output are row-major in the data's column order.

use super::plan::{PackedLayer, Plan, Tile};
use crate::backend::cpu::gemm::{View, matmul};
use crate::ops::Direction;

/// s = clamp·tanh(raw/clamp) (the soft clamp) and t = tanh(raw/clamp), so ds/draw = 1 − t².
#[inline]
fn soft_clamp(raw: f32, clamp: f32) -> (f32, f32) {
    let t = (raw / clamp).tanh();
    (clamp * t, t)
}

/// The affine step of one coordinate: x = g·e^s + b forward (eq. 18.19), z = (g − b)·e^−s
/// inverse (eq. 18.18), where g is the given value.
#[inline]
fn affine(dir: Direction, g: f32, b: f32, s: f32) -> f32 {
    match dir {
        Direction::Forward => g * s.exp() + b,
        Direction::Inverse => (g - b) * (-s).exp(),
    }
}

/// The logdet contribution of one coordinate: +s forward, −s inverse.
#[inline]
fn signed(dir: Direction, s: f32) -> f64 {
    match dir {
        Direction::Forward => s as f64,
        Direction::Inverse => -(s as f64),
    }
}

/// Backward of `affine` plus the logdet term: from dL/d out (`go`) and dL/d logdet (`gl`) to
/// (dL/dg through the affine step only, dL/db, dL/d raw).
#[inline]
#[allow(clippy::too_many_arguments)]
fn affine_backward(
    dir: Direction,
    g: f32,
    b: f32,
    s: f32,
    t: f32,
    go: f32,
    gl: f32,
) -> (f32, f32, f32) {
    let dsdraw = 1.0 - t * t;
    match dir {
        Direction::Forward => {
            let e = s.exp();
            (go * e, go, (go * g * e + gl) * dsdraw)
        }
        Direction::Inverse => {
            let e = (-s).exp();
            let out = (g - b) * e;
            (go * e, -go * e, (-go * out - gl) * dsdraw)
        }
    }
}

/// rows × D row-major in column order -> D × rows feature-major in degree order.
fn to_degree_major(plan: &Plan, x: &[f32], rows: usize) -> Vec<f32> {
    let d = plan.dim;
    let mut t = vec![0.0f32; d * rows];
    for (k, &col) in plan.order.iter().enumerate() {
        for (r, v) in t[k * rows..(k + 1) * rows].iter_mut().enumerate() {
            *v = x[r * d + col];
        }
    }
    t
}

/// y[tile rows] += tile weights · input prefix.
fn tile_forward(t: &Tile, input: &[f32], rows: usize, y: &mut [f32]) {
    if t.prefix == 0 {
        return;
    }
    matmul(
        &mut y[t.cols.start * rows..t.cols.end * rows],
        View::new(&t.w, t.cols.len(), t.prefix),
        View::new(&input[..t.prefix * rows], t.prefix, rows),
        true,
    );
}

fn fill_bias(layer: &PackedLayer, cols: std::ops::Range<usize>, rows: usize, y: &mut [f32]) {
    for c in cols {
        y[c * rows..(c + 1) * rows].fill(layer.bias[c]);
    }
}

/// What the one-pass forward keeps for the backward (feature-major, degree order).
struct Tape {
    /// Pre-activations of each hidden layer.
    pre: Vec<Vec<f32>>,
    /// Activations of each hidden layer.
    hidden: Vec<Vec<f32>>,
    /// MADE output, 2D × rows: row 2k is b, row 2k + 1 raw s, of the input of degree k + 1.
    out: Vec<f32>,
}

fn made_forward(plan: &Plan, xt: &[f32], rows: usize) -> Tape {
    let n = plan.layers.len();
    let mut tape = Tape {
        pre: Vec::with_capacity(n - 1),
        hidden: Vec::with_capacity(n - 1),
        out: Vec::new(),
    };
    for (l, layer) in plan.layers.iter().enumerate() {
        let input: &[f32] = if l == 0 { xt } else { &tape.hidden[l - 1] };
        let mut y = vec![0.0f32; layer.out_width * rows];
        fill_bias(layer, 0..layer.out_width, rows, &mut y);
        for t in &layer.tiles {
            tile_forward(t, input, rows, &mut y);
        }
        if l + 1 == n {
            tape.out = y;
        } else {
            let h = y.iter().map(|&v| plan.act.apply(v)).collect();
            tape.pre.push(y);
            tape.hidden.push(h);
        }
    }
    tape
}

/// The one-pass transform of `rows` rows: returns the output (rows × D, column order) and
/// the per-row logdet.
pub fn parallel(plan: &Plan, dir: Direction, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
    let d = plan.dim;
    let xt = to_degree_major(plan, x, rows);
    let tape = made_forward(plan, &xt, rows);
    let mut y = vec![0.0f32; rows * d];
    let mut ld = vec![0.0f64; rows];
    for (k, &col) in plan.order.iter().enumerate() {
        let b = &tape.out[2 * k * rows..(2 * k + 1) * rows];
        let raw = &tape.out[(2 * k + 1) * rows..(2 * k + 2) * rows];
        for r in 0..rows {
            let (s, _) = soft_clamp(raw[r], plan.clamp);
            y[r * d + col] = affine(dir, x[r * d + col], b[r], s);
            ld[r] += signed(dir, s);
        }
    }
    (y, ld.into_iter().map(|v| v as f32).collect())
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
    let d = plan.dim;
    let xt = to_degree_major(plan, x, rows);
    let tape = made_forward(plan, &xt, rows);
    let mut grads = ChunkGrads::zeros(plan);
    let mut dx = vec![0.0f32; rows * d];
    // dL/d MADE output, feature-major, degree order.
    let mut delta = vec![0.0f32; 2 * d * rows];
    for (k, &col) in plan.order.iter().enumerate() {
        for r in 0..rows {
            let b = tape.out[2 * k * rows + r];
            let (s, t) = soft_clamp(tape.out[(2 * k + 1) * rows + r], plan.clamp);
            let i = r * d + col;
            let (dg, db, draw) = affine_backward(dir, x[i], b, s, t, d_out[i], d_logdet[r]);
            dx[i] = dg;
            delta[2 * k * rows + r] = db;
            delta[(2 * k + 1) * rows + r] = draw;
        }
    }
    for l in (0..plan.layers.len()).rev() {
        let layer = &plan.layers[l];
        let input: &[f32] = if l == 0 { &xt } else { &tape.hidden[l - 1] };
        for (c, acc) in grads.bias[l].iter_mut().enumerate() {
            *acc = delta[c * rows..(c + 1) * rows]
                .iter()
                .map(|&v| v as f64)
                .sum();
        }
        let mut d_in = vec![0.0f32; layer.in_width * rows];
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
                true,
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
            for (g, &z) in d_in.iter_mut().zip(&tape.pre[l - 1]) {
                *g *= plan.act.grad(z);
            }
            delta = d_in;
        } else {
            for (k, &col) in plan.order.iter().enumerate() {
                for r in 0..rows {
                    dx[r * d + col] += d_in[k * rows + r];
                }
            }
        }
    }
    (dx, grads)
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
    let d = plan.dim;
    let n = plan.layers.len();
    let (hidden_layers, out_layer) = plan.layers.split_at(n - 1);
    let out_layer = &out_layer[0];
    // The MADE input, feature-major in degree order, filled one degree at a time.
    let mut ut = vec![0.0f32; d * rows];
    let mut hidden: Vec<Vec<f32>> = hidden_layers
        .iter()
        .map(|l| vec![0.0f32; l.out_width * rows])
        .collect();
    let mut o = vec![0.0f32; out_layer.out_width * rows];
    let mut y = vec![0.0f32; rows * d];
    let mut ld = vec![0.0f64; rows];
    for k in 1..=d {
        // 1. outputs of degree k.
        if let Some(ti) = out_layer.by_degree[k] {
            let t = &out_layer.tiles[ti];
            fill_bias(out_layer, t.cols.clone(), rows, &mut o);
            let src: &[f32] = hidden.last().unwrap_or(&ut);
            tile_forward(t, src, rows, &mut o);
        }
        // 2. the input of degree k.
        let col = plan.order[k - 1];
        let (pos_b, pos_s) = (2 * (k - 1), 2 * (k - 1) + 1);
        for r in 0..rows {
            let b = o[pos_b * rows + r];
            let (s, _) = soft_clamp(o[pos_s * rows + r], plan.clamp);
            let u = affine(dir, x[r * d + col], b, s);
            ut[(k - 1) * rows + r] = u;
            y[r * d + col] = u;
            ld[r] += signed(dir, s);
        }
        // 3. hidden units of degree k, layer by layer.
        for (l, layer) in hidden_layers.iter().enumerate() {
            let Some(ti) = layer.by_degree[k] else {
                continue;
            };
            let t = &layer.tiles[ti];
            let (before, rest) = hidden.split_at_mut(l);
            let src: &[f32] = if l == 0 { &ut } else { &before[l - 1] };
            let dst = &mut rest[0];
            fill_bias(layer, t.cols.clone(), rows, dst);
            tile_forward(t, src, rows, dst);
            for v in &mut dst[t.cols.start * rows..t.cols.end * rows] {
                *v = plan.act.apply(*v);
            }
        }
    }
    (y, ld.into_iter().map(|v| v as f32).collect())
}
