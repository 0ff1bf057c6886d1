//! The three passes over one chunk of rows: the one-pass transform, its backward, and the
//! sequential transform. Buffers are feature-major (units × rows, degree order), so that a
//! tile's rows, the prefix it reads, and one coordinate across the chunk are all contiguous;
//! the chunk's input and output are row-major in the data's column order.
//!
//! Feature-major rows are `ld` = the chunk's row count rounded up to
//! [`PAD`](crate::backend::cpu::kernel::PAD) apart, so that a
//! tile's product is one call of the register-blocked kernel with the bias and activation
//! fused (`backend::cpu::kernel`: broadcast weights times vectors along the rows). The padding
//! lanes of the input are zero and every lane is independent, so they never reach a result.

use super::plan::{PackedLayer, Plan};
use crate::backend::cpu::gemm::{View, matmul};
use crate::backend::cpu::kernel::{self, Band, Init, Operands, PAD, Post, padded};
use crate::backend::cpu::scratch::Scratch;
use crate::backend::cpu::simd::simd_dispatch;
use crate::backend::cpu::transpose;
use crate::backend::cpu::vmath;
use crate::nn::mlp::Activation;
use crate::ops::Direction;

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
    let n = y.len();
    let mut f = Transform {
        dir,
        clamp,
        g: &g[..n],
        b: &b[..n],
        raw: &raw[..n],
        y,
        s_out: &mut s_out[..n],
    };
    vmath::blockwise(n, &mut f);
}

/// The arguments of `transform`, run a block at a time.
struct Transform<'a> {
    dir: Direction,
    clamp: f32,
    g: &'a [f32],
    b: &'a [f32],
    raw: &'a [f32],
    y: &'a mut [f32],
    s_out: &'a mut [f32],
}

impl vmath::Blockwise for Transform<'_> {
    #[inline(always)]
    fn block<const W: usize>(&mut self, at: usize) {
        let (clamp, inv) = (self.clamp, 1.0 / self.clamp);
        let (g, b) = (vmath::arr::<W>(self.g, at), vmath::arr::<W>(self.b, at));
        let raw = vmath::arr::<W>(self.raw, at);
        let mut s: [f32; W] = std::array::from_fn(|i| raw[i] * inv);
        vmath::tanh_block(&mut s);
        s.iter_mut().for_each(|s| *s *= clamp);
        let mut e = match self.dir {
            Direction::Forward => s,
            Direction::Inverse => s.map(|s| -s),
        };
        vmath::exp_block(&mut e);
        // Whole arrays out: stores into `self.y` between loads from the other slices would
        // have to stay in order (the compiler cannot tell that they do not overlap), and be
        // made one value at a time.
        *vmath::arr_mut::<W>(self.y, at) = match self.dir {
            Direction::Forward => std::array::from_fn(|i| g[i] * e[i] + b[i]),
            Direction::Inverse => std::array::from_fn(|i| (g[i] - b[i]) * e[i]),
        };
        *vmath::arr_mut::<W>(self.s_out, at) = s;
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

/// The distance between feature-major rows of `lanes` (padded) lanes in the one-pass forward:
/// `lanes`, plus one vector when that is an even number of cache lines. The kernel walks a
/// block of 64 lanes down every row of its input; at 512 lanes the rows are 2 KiB apart and
/// all map to the same few sets of L1, so the block (32 KiB for 128 units, which would fit)
/// keeps being evicted. An odd number of lines apart, they spread over every set. The lanes
/// past `lanes` are never computed or read.
fn lane_stride(lanes: usize) -> usize {
    if (lanes / PAD).is_multiple_of(2) {
        lanes + PAD
    } else {
        lanes
    }
}

/// rows × D row-major in column order -> D × ld in degree order (padding lanes zero).
#[inline(always)]
fn to_degree_major(plan: &Plan, x: &[f32], rows: usize, ld: usize) -> Scratch {
    let d = plan.dim;
    let mut t = Scratch::new(d * ld);
    transpose::gather_columns(plan.isa, x, d, rows, &plan.order, &mut t, ld);
    t
}

/// D × ld in degree order -> rows × D row-major in column order, into `x`.
#[inline(always)]
fn to_row_major(plan: &Plan, t: &[f32], rows: usize, ld: usize, x: &mut [f32]) {
    transpose::scatter_columns(plan.isa, t, ld, rows, &plan.order, x, plan.dim);
}

/// y[tile units] = act(tile weights · input prefix + bias), for all `ld` lanes; `None` is
/// linear. Tiles cover each output unit once.
#[inline(always)]
fn tile_forward(
    plan: &Plan,
    layer: &PackedLayer,
    tile: usize,
    act: Option<Activation>,
    input: &[f32],
    ld: usize,
    y: &mut [f32],
) {
    let t = &layer.tiles[tile];
    let dst = &mut y[t.cols.start * ld..t.cols.end * ld];
    let o = Operands {
        a: &t.w,
        a_rs: t.a_rs,
        a_cs: t.a_cs,
        b: &input[..t.prefix * ld],
        ldb: ld,
        m: t.cols.len(),
        k: t.prefix,
        n: ld,
    };
    let bias = Init::RowBias(&layer.bias[t.cols.clone()]);
    match act {
        None => kernel::gemm(plan.isa, &o, bias, Post::Linear, dst, ld),
        Some(Activation::Relu) => kernel::gemm(plan.isa, &o, bias, Post::Relu, dst, ld),
        Some(a) => {
            kernel::gemm(plan.isa, &o, bias, Post::Linear, dst, ld);
            dst.iter_mut().for_each(|v| *v = a.apply(*v));
        }
    }
}

/// The whole masked layer: y = act(W·input + bias) on lanes `..n` of rows `ld` apart, every
/// tile in one call (the kernel walks the lanes in blocks and runs every tile on a block while
/// it is in L1).
#[inline(always)]
fn layer_forward(
    plan: &Plan,
    layer: &PackedLayer,
    act: Option<Activation>,
    input: &[f32],
    (n, ld): (usize, usize),
    y: &mut [f32],
) {
    let bands: Vec<Band> = layer
        .tiles
        .iter()
        .map(|t| Band {
            a: &t.w,
            a_rs: t.a_rs,
            a_cs: t.a_cs,
            k: t.prefix,
            rows: t.cols.clone(),
            bias: &layer.bias[t.cols.clone()],
        })
        .collect();
    let y = &mut y[..layer.out_width * ld];
    match act {
        None => kernel::gemm_bands(plan.isa, &bands, input, ld, n, Post::Linear, y, ld),
        Some(Activation::Relu) => {
            kernel::gemm_bands(plan.isa, &bands, input, ld, n, Post::Relu, y, ld)
        }
        Some(a) => {
            kernel::gemm_bands(plan.isa, &bands, input, ld, n, Post::Linear, y, ld);
            y.iter_mut().for_each(|v| *v = a.apply(*v));
        }
    }
}

/// The one-pass transform of `rows` rows `x`: writes the output (rows × D, column order) into
/// `y` and the per-row logdet into `logdet`.
pub fn parallel(plan: &Plan, dir: Direction, x: &[f32], y: &mut [f32], logdet: &mut [f32]) {
    simd_dispatch!(parallel_impl(plan: &Plan, dir: Direction, x: &[f32], y: &mut [f32], logdet: &mut [f32]) -> ())
}

#[inline(always)]
fn parallel_impl(plan: &Plan, dir: Direction, x: &[f32], y: &mut [f32], logdet: &mut [f32]) {
    let d = plan.dim;
    let n = plan.layers.len();
    let rows = logdet.len();
    let lanes = padded(rows);
    let ld = lane_stride(lanes);
    let xt = to_degree_major(plan, x, rows, ld);
    let width = plan.layers.iter().map(|l| l.out_width).max().unwrap_or(0);
    let (mut a, mut b) = (Scratch::new(width * ld), Scratch::new(width * ld));
    for (l, layer) in plan.layers.iter().enumerate() {
        let act = (l + 1 < n).then_some(plan.act);
        let input: &[f32] = if l == 0 { &xt } else { &a };
        layer_forward(plan, layer, act, input, (lanes, ld), &mut b);
        std::mem::swap(&mut a, &mut b);
    }
    // `a` holds the MADE output: row 2k is b, row 2k + 1 raw s, of the input of degree k + 1.
    let mut yt = Scratch::new(d * ld);
    let mut s = Scratch::new(rows);
    let mut ld_sum = vec![0.0f64; rows];
    for k in 0..d {
        let (g, o) = (&xt[k * ld..k * ld + rows], &a[2 * k * ld..(2 * k + 2) * ld]);
        let (bias, raw) = o.split_at(ld);
        let y = &mut yt[k * ld..k * ld + rows];
        transform(dir, plan.clamp, g, &bias[..rows], &raw[..rows], y, &mut s);
        add_logdet(dir, &s, &mut ld_sum);
    }
    to_row_major(plan, &yt, rows, ld, y);
    logdet
        .iter_mut()
        .zip(ld_sum)
        .for_each(|(o, v)| *o = v as f32);
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

/// Backward of `parallel` for one chunk of `rows` = `d_logdet.len()` rows: writes dL/dx
/// (rows × D, column order) into `dx` and returns the chunk's parameter gradients.
pub fn parallel_backward(
    plan: &Plan,
    dir: Direction,
    x: &[f32],
    d_out: &[f32],
    d_logdet: &[f32],
    dx: &mut [f32],
) -> ChunkGrads {
    simd_dispatch!(parallel_backward_impl(
        plan: &Plan,
        dir: Direction,
        x: &[f32],
        d_out: &[f32],
        d_logdet: &[f32],
        dx: &mut [f32],
    ) -> ChunkGrads)
}

#[inline(always)]
fn parallel_backward_impl(
    plan: &Plan,
    dir: Direction,
    x: &[f32],
    d_out: &[f32],
    d_logdet: &[f32],
    dx: &mut [f32],
) -> ChunkGrads {
    let d = plan.dim;
    let n = plan.layers.len();
    let rows = d_logdet.len();
    let ld = padded(rows);
    let xt = to_degree_major(plan, x, rows, ld);
    let go_t = to_degree_major(plan, d_out, rows, ld);
    // Forward, keeping pre-activations and activations of the hidden layers.
    let mut pre: Vec<Scratch> = Vec::with_capacity(n - 1);
    let mut hidden: Vec<Scratch> = Vec::with_capacity(n - 1);
    let mut out = Scratch::new(2 * d * ld);
    for (l, layer) in plan.layers.iter().enumerate() {
        let input: &[f32] = if l == 0 { &xt } else { &hidden[l - 1] };
        if l + 1 == n {
            layer_forward(plan, layer, None, input, (ld, ld), &mut out);
        } else {
            let mut p = Scratch::new(layer.out_width * ld);
            layer_forward(plan, layer, None, input, (ld, ld), &mut p);
            let mut h = Scratch::new(layer.out_width * ld);
            activate(plan.act, &p, &mut h);
            pre.push(p);
            hidden.push(h);
        }
    }
    // dL/d MADE output (degree order) and the direct part of dL/dx. The padding lanes of
    // delta stay zero, so they add exact zeros to the weight gradients below.
    let mut delta = Scratch::zeroed(2 * d * ld);
    let mut dxt = Scratch::new(d * ld);
    for k in 0..d {
        let row = k * ld..k * ld + rows;
        let (bias, raw) = out[2 * k * ld..(2 * k + 2) * ld].split_at(ld);
        let (db, draw) = delta[2 * k * ld..(2 * k + 2) * ld].split_at_mut(ld);
        transform_backward(
            dir,
            plan.clamp,
            &xt[row.clone()],
            &bias[..rows],
            &raw[..rows],
            &go_t[row.clone()],
            d_logdet,
            TransformGrads {
                dg: &mut dxt[row],
                db: &mut db[..rows],
                draw: &mut draw[..rows],
            },
        );
    }
    let mut grads = ChunkGrads::zeros(plan);
    for l in (0..n).rev() {
        let layer = &plan.layers[l];
        let input: &[f32] = if l == 0 { &xt } else { &hidden[l - 1] };
        for (acc, row) in grads.bias[l].iter_mut().zip(delta.chunks_exact(ld)) {
            *acc = row[..rows].iter().map(|&v| v as f64).sum();
        }
        let mut d_in = Scratch::zeroed(layer.in_width * ld);
        for (t, gw) in layer.tiles.iter().zip(grads.tiles[l].iter_mut()) {
            if t.prefix == 0 {
                continue;
            }
            let m = t.cols.len();
            let delta_t = &delta[t.cols.start * ld..t.cols.end * ld];
            // dW_tile (m × prefix) = Δ_tile · inputᵀ over the prefix (a reduction along the
            // rows, left to the general GEMM).
            matmul(
                gw,
                View::new(delta_t, m, ld),
                View::new(&input[..t.prefix * ld], t.prefix, ld).t(),
                false,
            );
            // d input prefix += W_tileᵀ · Δ_tile.
            let o = Operands {
                a: &t.w,
                a_rs: t.a_cs,
                a_cs: t.a_rs,
                b: delta_t,
                ldb: ld,
                m: t.prefix,
                k: m,
                n: ld,
            };
            let d_prefix = &mut d_in[..t.prefix * ld];
            kernel::gemm(plan.isa, &o, Init::Accumulate, Post::Linear, d_prefix, ld);
        }
        if l > 0 {
            mul_act_grad(plan.act, &pre[l - 1], &mut d_in);
            delta = d_in;
        } else {
            dxt.iter_mut().zip(d_in.iter()).for_each(|(a, b)| *a += b);
        }
    }
    to_row_major(plan, &dxt, rows, ld, dx);
    grads
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
pub fn sequential(plan: &Plan, dir: Direction, x: &[f32], y: &mut [f32], logdet: &mut [f32]) {
    simd_dispatch!(sequential_impl(plan: &Plan, dir: Direction, x: &[f32], y: &mut [f32], logdet: &mut [f32]) -> ())
}

#[inline(always)]
fn sequential_impl(plan: &Plan, dir: Direction, x: &[f32], y: &mut [f32], logdet: &mut [f32]) {
    let d = plan.dim;
    let n = plan.layers.len();
    let rows = logdet.len();
    let ld = padded(rows);
    let (hidden_layers, out_layer) = plan.layers.split_at(n - 1);
    let out_layer = &out_layer[0];
    let xt = to_degree_major(plan, x, rows, ld);
    // The MADE input, feature-major in degree order, filled one degree at a time.
    let mut ut = Scratch::new(d * ld);
    let mut hidden: Vec<Scratch> = hidden_layers
        .iter()
        .map(|l| Scratch::new(l.out_width * ld))
        .collect();
    let mut o = Scratch::new(out_layer.out_width * ld);
    let mut s = Scratch::new(ld);
    let mut ld_sum = vec![0.0f64; rows];
    for k in 1..=d {
        // 1. outputs of degree k.
        if let Some(ti) = out_layer.by_degree[k] {
            let src: &[f32] = hidden.last().map_or(&ut, |h| h);
            tile_forward(plan, out_layer, ti, None, src, ld, &mut o);
        }
        // 2. the input of degree k, in every lane (the padding lanes stay finite).
        let row = (k - 1) * ld..k * ld;
        let (bias, raw) = o[2 * (k - 1) * ld..2 * k * ld].split_at(ld);
        transform(
            dir,
            plan.clamp,
            &xt[row.clone()],
            bias,
            raw,
            &mut ut[row],
            &mut s,
        );
        add_logdet(dir, &s[..rows], &mut ld_sum);
        // 3. hidden units of degree k, layer by layer.
        for (l, layer) in hidden_layers.iter().enumerate() {
            let Some(ti) = layer.by_degree[k] else {
                continue;
            };
            let (before, rest) = hidden.split_at_mut(l);
            let src: &[f32] = if l == 0 { &ut } else { &before[l - 1] };
            tile_forward(plan, layer, ti, Some(plan.act), src, ld, &mut rest[0]);
        }
    }
    to_row_major(plan, &ut, rows, ld, y);
    logdet
        .iter_mut()
        .zip(ld_sum)
        .for_each(|(o, v)| *o = v as f32);
}

#[cfg(test)]
mod tests {
    use super::super::plan::Tiling;
    use super::*;
    use crate::backend::cpu::simd::Isa;
    use crate::nn::made::{Order, made};
    use crate::nn::mlp::Mlp;
    use crate::rng::Rng;

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// The dispatched passes against the same code compiled for baseline x86-64 with its tile
    /// products on the portable kernel (the scalar reference), bit for bit: both directions,
    /// each activation the passes fuse or apply, row counts that are not multiples of the
    /// padding, and a random output layer (a zero one would make the flow the identity).
    #[test]
    fn dispatched_passes_match_the_baseline_exactly() {
        let mut rng = Rng::new(21);
        // 37 rows: 3 vectors of lanes; 60 rows: 4, so rows of the forward are a vector apart
        // more than their lanes (`lane_stride`).
        let d = 5;
        for (rows, act) in [
            (37, Activation::Relu),
            (37, Activation::Tanh),
            (60, Activation::Relu),
        ] {
            let (spec, net) = made(d, &[24, 19], act, Order::Reversed, 2.0, &mut rng).unwrap();
            let net = Mlp::new(&net.widths(), act, &mut rng).unwrap();
            let plan = |tiling| {
                let fast = Plan::new(&spec, &net, tiling).unwrap();
                let mut reference = Plan::new(&spec, &net, tiling).unwrap();
                reference.isa = Isa::Portable;
                (fast, reference)
            };
            let x = random(rows * d, &mut rng);
            let d_out = random(rows * d, &mut rng);
            let d_ld = random(rows, &mut rng);
            for dir in [Direction::Forward, Direction::Inverse] {
                let (fast, reference) = plan(Tiling::Fixed(6));
                let (mut y0, mut y1) = (vec![0.0; rows * d], vec![0.0; rows * d]);
                let (mut ld0, mut ld1) = (vec![0.0; rows], vec![0.0; rows]);
                parallel_impl(&reference, dir, &x, &mut y0, &mut ld0);
                parallel(&fast, dir, &x, &mut y1, &mut ld1);
                assert!(
                    same_bits(&y0, &y1) && same_bits(&ld0, &ld1),
                    "{act:?} parallel"
                );

                let (fast, reference) = plan(Tiling::Degree);
                sequential_impl(&reference, dir, &x, &mut y0, &mut ld0);
                sequential(&fast, dir, &x, &mut y1, &mut ld1);
                assert!(
                    same_bits(&y0, &y1) && same_bits(&ld0, &ld1),
                    "{act:?} sequential"
                );

                let (fast, reference) = plan(Tiling::MinWidth(16));
                let g0 = parallel_backward_impl(&reference, dir, &x, &d_out, &d_ld, &mut y0);
                let g1 = parallel_backward(&fast, dir, &x, &d_out, &d_ld, &mut y1);
                assert!(same_bits(&y0, &y1), "{act:?} backward dx");
                let tiles = |g: &ChunkGrads| g.tiles.concat().concat();
                assert!(
                    same_bits(&tiles(&g0), &tiles(&g1)),
                    "{act:?} backward tiles"
                );
                let bias = |g: &ChunkGrads| -> Vec<u64> {
                    g.bias.concat().iter().map(|b| b.to_bits()).collect()
                };
                assert_eq!(bias(&g0), bias(&g1), "{act:?} backward bias");
            }
        }
    }
}
