//! The conditioner MLP on the host, a tile of rows at a time: forward (keeping the tile's
//! activations for the backward) and backward (dW += xᵀ·δ, db += Σ δ, dx = δ·Wᵀ ⊙ act'),
//! every product one call of the register-blocked [`kernel`] with bias and activation fused.
//!
//! Activations are row-major with their width padded to [`PAD`] columns (zero weights and
//! bias in the padding, so padded columns hold act(0) and are never read as inputs). A tile of
//! [`TILE_ROWS`] rows keeps each layer's activations in L1 (48 × 64 floats = 12 KiB); the
//! buffers come from the thread's scratch arena, taken once per chunk of tiles.

use super::cache::Footprint;
use super::kernel::{self, Init, Operands, PAD, Post, padded};
use super::scratch::Scratch;
use super::simd::Isa;
use super::transpose;
use crate::nn::mlp::{Activation, Mlp};
use crate::recycle;
use crate::tensor::{Shaped, Tensor};

/// Rows per tile: small enough that a tile's activations and a 64×64 weight fit in L1 together,
/// and a multiple of every block height of the kernel (6, 8, 12).
pub const TILE_ROWS: usize = 48;

/// One layer y = x·W + b with W (k × n) padded to `n_pad` columns, and, for the backward,
/// Wᵀ (n × k) padded to `k_pad` columns.
pub struct PackedLayer {
    pub k: usize,
    pub n: usize,
    pub k_pad: usize,
    pub n_pad: usize,
    w: Vec<f32>,
    b: Vec<f32>,
    wt: Vec<f32>,
}

/// The network's weights laid out for the kernel (a copy of the weights, shared by every
/// chunk of an op, and kept by the ops for as long as the weights do not change).
pub struct PackedMlp {
    pub act: Activation,
    pub layers: Vec<PackedLayer>,
    pub isa: Isa,
}

impl Footprint for PackedMlp {
    fn bytes(&self) -> usize {
        let floats: usize = self
            .layers
            .iter()
            .map(|l| l.w.len() + l.b.len() + l.wt.len())
            .sum();
        4 * floats + std::mem::size_of::<Self>()
    }
}

/// A tile's activations: what the forward leaves for the backward.
pub struct Tape {
    /// Activated hidden layers, [`TILE_ROWS`] × n_pad each.
    pub hidden: Vec<Scratch>,
    /// Hidden pre-activations; kept for the gradient of smooth activations only (a ReLU's
    /// gradient is gated by its output).
    pub pre: Vec<Scratch>,
    /// The network output, [`TILE_ROWS`] × `out_pad`.
    pub out: Scratch,
}

/// Per-chunk parameter gradients in the padded layout (summed over the chunk's rows).
pub struct Grads {
    w: Vec<Scratch>,
    b: Vec<Scratch>,
}

/// Buffers of the backward of one tile: two for δ of the hidden layers (alternating).
pub struct Deltas {
    cur: Scratch,
    next: Scratch,
}

impl PackedMlp {
    /// Packs `net` (already shape-checked): W for the forward, and Wᵀ, which the backward and
    /// [`PackedMlp::forward_tile_fm`] need (a packing is cached and serves both passes).
    pub fn new(net: &Mlp<Tensor>) -> Self {
        let isa = Isa::best();
        let layers = net
            .layers
            .iter()
            .map(|l| {
                let (k, n) = (l.w.rows(), l.w.cols());
                let (k_pad, n_pad) = (padded(k), padded(n));
                let mut w = Vec::with_capacity(k * n_pad);
                for row in l.w.data().chunks_exact(n) {
                    w.extend_from_slice(row);
                    w.resize(w.len() + n_pad - n, 0.0);
                }
                let mut b = l.b.data().to_vec();
                b.resize(n_pad, 0.0);
                // Wᵀ[j, i] = W[i, j], with zeros in columns k .. k_pad: W's columns as rows
                // (16 × 16 blocks at a time with AVX-512).
                let mut wt = vec![0.0; n * k_pad];
                let identity: Vec<usize> = (0..n).collect();
                transpose::gather_columns(isa, l.w.data(), n, k, &identity, &mut wt, k_pad);
                PackedLayer {
                    k,
                    n,
                    k_pad,
                    n_pad,
                    w,
                    b,
                    wt,
                }
            })
            .collect();
        PackedMlp {
            act: net.act,
            layers,
            isa,
        }
    }

    /// The same, on a given instruction set (tests compare the paths).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    pub fn in_dim(&self) -> usize {
        self.layers[0].k
    }

    pub fn in_pad(&self) -> usize {
        self.layers[0].k_pad
    }

    pub fn out_dim(&self) -> usize {
        self.layers[self.layers.len() - 1].n
    }

    /// The row stride of [`Tape::out`].
    pub fn out_pad(&self) -> usize {
        self.layers[self.layers.len() - 1].n_pad
    }

    fn hidden_layers(&self) -> &[PackedLayer] {
        &self.layers[..self.layers.len() - 1]
    }

    /// Buffers for the forward of one tile.
    pub fn tape(&self) -> Tape {
        let tile = |l: &PackedLayer| Scratch::new(TILE_ROWS * l.n_pad);
        let smooth = self.act != Activation::Relu;
        Tape {
            hidden: self.hidden_layers().iter().map(tile).collect(),
            pre: if smooth {
                self.hidden_layers().iter().map(tile).collect()
            } else {
                Vec::new()
            },
            out: Scratch::new(TILE_ROWS * self.out_pad()),
        }
    }

    /// Buffers for the backward of one tile.
    pub fn deltas(&self) -> Deltas {
        let width = self.layers.iter().map(|l| l.k_pad).max().unwrap_or(PAD);
        Deltas {
            cur: Scratch::new(TILE_ROWS * width),
            next: Scratch::new(TILE_ROWS * width),
        }
    }

    /// Zeroed gradient accumulators for one chunk.
    pub fn zero_grads(&self) -> Grads {
        Grads {
            w: self
                .layers
                .iter()
                .map(|l| Scratch::zeroed(l.k * l.n_pad))
                .collect(),
            b: self
                .layers
                .iter()
                .map(|l| Scratch::zeroed(l.n_pad))
                .collect(),
        }
    }

    /// Forward of `rows` (<= [`TILE_ROWS`]) rows; row r of the input is
    /// `x[r·ldx .. r·ldx + in_dim]`. The output lands in `tape.out` (row stride `out_pad`).
    pub fn forward_tile(&self, x: &[f32], ldx: usize, rows: usize, tape: &mut Tape) {
        debug_assert!(rows <= TILE_ROWS);
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (done, rest) = tape.hidden.split_at_mut(l.min(last));
            let (input, ld): (&[f32], usize) = if l == 0 {
                (x, ldx)
            } else {
                (&done[l - 1], self.layers[l - 1].n_pad)
            };
            let o = Operands {
                a: input,
                a_rs: ld,
                a_cs: 1,
                b: &layer.w,
                ldb: layer.n_pad,
                m: rows,
                k: layer.k,
                n: layer.n_pad,
            };
            let bias = Init::ColBias(&layer.b);
            let width = rows * layer.n_pad;
            if l == last {
                kernel::gemm(self.isa, &o, bias, Post::Linear, &mut tape.out, layer.n_pad);
            } else if self.act == Activation::Relu {
                kernel::gemm(self.isa, &o, bias, Post::Relu, &mut rest[0], layer.n_pad);
            } else {
                let pre = &mut tape.pre[l];
                kernel::gemm(self.isa, &o, bias, Post::Linear, pre, layer.n_pad);
                activate(self.act, &pre[..width], &mut rest[0][..width]);
            }
        }
    }

    /// The same forward, feature-major: input i of row r is `xt[i·TILE_ROWS + r]`, and the
    /// output lands in `tape.out` as output j of row r at `j·TILE_ROWS + r`; padding lanes
    /// (rows .. rows rounded up to [`PAD`]) are computed from whatever `xt` holds there.
    ///
    /// Each layer is Wᵀ (broadcast) times the activations (vectors along the rows), so a narrow
    /// layer costs in proportion to its width: the 2-unit output of a D = 2 coupling is two
    /// rows of the kernel rather than a 16-lane vector per row. Needs the transposed weights.
    pub fn forward_tile_fm(&self, xt: &[f32], rows: usize, tape: &mut Tape) {
        debug_assert!(rows <= TILE_ROWS);
        let lanes = padded(rows);
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (done, rest) = tape.hidden.split_at_mut(l.min(last));
            let input: &[f32] = if l == 0 { xt } else { &done[l - 1] };
            let o = Operands {
                a: &layer.wt,
                a_rs: layer.k_pad,
                a_cs: 1,
                b: input,
                ldb: TILE_ROWS,
                m: layer.n,
                k: layer.k,
                n: lanes,
            };
            let bias = Init::RowBias(&layer.b);
            let width = layer.n * TILE_ROWS;
            if l == last {
                kernel::gemm(self.isa, &o, bias, Post::Linear, &mut tape.out, TILE_ROWS);
            } else if self.act == Activation::Relu {
                kernel::gemm(self.isa, &o, bias, Post::Relu, &mut rest[0], TILE_ROWS);
            } else {
                let pre = &mut tape.pre[l];
                kernel::gemm(self.isa, &o, bias, Post::Linear, pre, TILE_ROWS);
                activate(self.act, &pre[..width], &mut rest[0][..width]);
            }
        }
    }

    /// Backward of the tile `forward_tile` left in `tape` (same `x`, `ldx`, `rows`), given
    /// dL/d output in `d_out` (row stride `out_pad`; padded columns zero): adds dL/dW and
    /// dL/db into `grads` and, when `dx` is given, writes dL/dx there (row stride `in_pad`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_tile(
        &self,
        x: &[f32],
        ldx: usize,
        rows: usize,
        tape: &Tape,
        d_out: &[f32],
        deltas: &mut Deltas,
        grads: &mut Grads,
        mut dx: Option<&mut [f32]>,
    ) {
        let Deltas { cur, next } = deltas;
        let (mut cur, mut next) = (cur, next);
        let mut from_out = true;
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let (input, ld_in): (&[f32], usize) = if l == 0 {
                (x, ldx)
            } else {
                (&tape.hidden[l - 1], self.layers[l - 1].n_pad)
            };
            let delta: &[f32] = if from_out { d_out } else { cur };
            // dW += inputᵀ·δ: row i of dW is input column i, read down the tile's rows.
            let dw = Operands {
                a: input,
                a_rs: 1,
                a_cs: ld_in,
                b: delta,
                ldb: layer.n_pad,
                m: layer.k,
                k: rows,
                n: layer.n_pad,
            };
            kernel::gemm(
                self.isa,
                &dw,
                Init::Accumulate,
                Post::Linear,
                &mut grads.w[l],
                layer.n_pad,
            );
            let gb = &mut grads.b[l][..layer.n];
            for d in delta.chunks_exact(layer.n_pad).take(rows) {
                gb.iter_mut().zip(d).for_each(|(g, &v)| *g += v);
            }
            if l == 0 && dx.is_none() {
                break;
            }
            // δ of the layer input: δ·Wᵀ, times act'(pre) below the first layer.
            let target: &mut [f32] = if l == 0 {
                dx.as_deref_mut().expect("checked above")
            } else {
                next
            };
            let o = Operands {
                a: delta,
                a_rs: layer.n_pad,
                a_cs: 1,
                b: &layer.wt,
                ldb: layer.k_pad,
                m: rows,
                k: layer.n,
                n: layer.k_pad,
            };
            if l > 0 && self.act == Activation::Relu {
                let gate = Post::ReluGrad {
                    gate: &tape.hidden[l - 1],
                    ld: layer.k_pad,
                };
                kernel::gemm(self.isa, &o, Init::Zero, gate, target, layer.k_pad);
            } else {
                kernel::gemm(self.isa, &o, Init::Zero, Post::Linear, target, layer.k_pad);
                if l > 0 {
                    let width = rows * layer.k_pad;
                    scale_by_grad(self.act, &mut target[..width], &tape.pre[l - 1][..width]);
                }
            }
            if l > 0 {
                std::mem::swap(&mut cur, &mut next);
                from_out = false;
            }
        }
    }
}

impl Grads {
    /// The sum of chunks' gradients, in chunk order ((g₀ + g₁) + g₂ ...), unpadded, as a
    /// network of the packed one's shape. One pass: each output row is summed while in L1.
    pub fn sum(parts: &[Grads], mlp: &PackedMlp) -> Mlp<Tensor> {
        let mut tensors = Vec::with_capacity(2 * mlp.layers.len());
        for (l, layer) in mlp.layers.iter().enumerate() {
            let (n, n_pad) = (layer.n, layer.n_pad);
            let w = sum_rows(parts.len(), layer.k, n, |p, r| {
                &parts[p].w[l][r * n_pad..r * n_pad + n]
            });
            tensors.push(w);
            tensors.push(sum_rows(parts.len(), 1, n, |p, _| &parts[p].b[l][..n]));
        }
        Mlp::from_tensors(mlp.act, tensors).expect("two tensors per layer")
    }
}

/// A `rows × n` tensor whose row r is the sum over parts p, in order, of `row(p, r)`.
fn sum_rows<'a>(
    parts: usize,
    rows: usize,
    n: usize,
    row: impl Fn(usize, usize) -> &'a [f32],
) -> Tensor {
    let mut data = recycle::take(rows * n);
    for r in 0..rows {
        let start = data.len();
        data.extend_from_slice(row(0, r));
        for p in 1..parts {
            let sum = &mut data[start..];
            sum.iter_mut().zip(row(p, r)).for_each(|(a, &v)| *a += v);
        }
    }
    Tensor::from_vec(rows, n, data).expect("rows · n values")
}

/// out = act(pre), element-wise (the match outside the loop, so each arm is a plain loop).
fn activate(act: Activation, pre: &[f32], out: &mut [f32]) {
    fn each(pre: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
        out.iter_mut().zip(pre).for_each(|(y, &x)| *y = f(x));
    }
    match act {
        Activation::Relu => each(pre, out, |x| Activation::Relu.apply(x)),
        Activation::Tanh => each(pre, out, |x| Activation::Tanh.apply(x)),
        Activation::Silu => each(pre, out, |x| Activation::Silu.apply(x)),
        Activation::Softplus => each(pre, out, |x| Activation::Softplus.apply(x)),
    }
}

/// delta ⊙= act'(pre), with the match outside the loop.
fn scale_by_grad(act: Activation, delta: &mut [f32], pre: &[f32]) {
    fn each(d: &mut [f32], pre: &[f32], f: impl Fn(f32) -> f32) {
        d.iter_mut().zip(pre).for_each(|(x, &z)| *x *= f(z));
    }
    match act {
        Activation::Relu => each(delta, pre, |z| Activation::Relu.grad(z)),
        Activation::Tanh => each(delta, pre, |z| Activation::Tanh.grad(z)),
        Activation::Silu => each(delta, pre, |z| Activation::Silu.grad(z)),
        Activation::Softplus => each(delta, pre, |z| Activation::Softplus.grad(z)),
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The network output and, for loss = Σ c ⊙ output, dL/dx and the parameter gradients,
    /// on `isa`, over `rows` rows in tiles.
    fn run(
        net: &Mlp<Tensor>,
        isa: Isa,
        x: &Tensor,
        c: &Tensor,
    ) -> (Vec<f32>, Vec<f32>, Mlp<Tensor>) {
        let p = PackedMlp::new(net).with_isa(isa);
        let (rows, k) = x.shape();
        let (n, n_pad, k_pad) = (p.out_dim(), p.out_pad(), p.in_pad());
        let mut tape = p.tape();
        let mut deltas = p.deltas();
        let mut grads = p.zero_grads();
        let mut d_out = Scratch::zeroed(TILE_ROWS * n_pad);
        let mut dx_tile = Scratch::zeroed(TILE_ROWS * k_pad);
        let (mut out, mut dx) = (Vec::new(), Vec::new());
        for r0 in (0..rows).step_by(TILE_ROWS) {
            let m = (rows - r0).min(TILE_ROWS);
            let xt = &x.data()[r0 * k..];
            p.forward_tile(xt, k, m, &mut tape);
            for r in 0..m {
                out.extend_from_slice(&tape.out[r * n_pad..r * n_pad + n]);
                d_out[r * n_pad..r * n_pad + n].copy_from_slice(c.row(r0 + r));
            }
            p.backward_tile(
                xt,
                k,
                m,
                &tape,
                &d_out,
                &mut deltas,
                &mut grads,
                Some(&mut dx_tile),
            );
            for r in 0..m {
                dx.extend_from_slice(&dx_tile[r * k_pad..r * k_pad + k]);
            }
        }
        (out, dx, Grads::sum(&[grads], &p))
    }

    /// Forward in f64 keeping every layer's pre-activation and output.
    fn forward64(net: &Mlp<Tensor>, x: &[f32], rows: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let mut outs = vec![x.iter().map(|&v| v as f64).collect::<Vec<f64>>()];
        let mut pres = Vec::new();
        for (l, layer) in net.layers.iter().enumerate() {
            let (k, n) = (layer.w.rows(), layer.w.cols());
            let h = &outs[l];
            let mut pre = vec![0.0f64; rows * n];
            for r in 0..rows {
                for j in 0..n {
                    let mut s = layer.b.data()[j] as f64;
                    for i in 0..k {
                        s += h[r * k + i] * layer.w.data()[i * n + j] as f64;
                    }
                    pre[r * n + j] = s;
                }
            }
            let last = l + 1 == net.layers.len();
            let y = pre
                .iter()
                .map(|&s| {
                    if last {
                        s
                    } else {
                        net.act.apply(s as f32) as f64
                    }
                })
                .collect();
            pres.push(pre);
            outs.push(y);
        }
        (pres, outs)
    }

    /// Backward of Σ c ⊙ mlp(x) in f64: (dx, [dW0, db0, dW1, ...]).
    fn backward64(
        net: &Mlp<Tensor>,
        x: &[f32],
        c: &[f32],
        rows: usize,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let (pres, outs) = forward64(net, x, rows);
        let mut delta: Vec<f64> = c.iter().map(|&v| v as f64).collect();
        let mut grads = vec![Vec::new(); 2 * net.layers.len()];
        for (l, layer) in net.layers.iter().enumerate().rev() {
            let (k, n) = (layer.w.rows(), layer.w.cols());
            let (mut dw, mut db) = (vec![0.0f64; k * n], vec![0.0f64; n]);
            let mut d_in = vec![0.0f64; rows * k];
            for r in 0..rows {
                for j in 0..n {
                    let dj = delta[r * n + j];
                    db[j] += dj;
                    for i in 0..k {
                        dw[i * n + j] += outs[l][r * k + i] * dj;
                        d_in[r * k + i] += layer.w.data()[i * n + j] as f64 * dj;
                    }
                }
            }
            if l > 0 {
                for (g, &p) in d_in.iter_mut().zip(&pres[l - 1]) {
                    *g *= net.act.grad(p as f32) as f64;
                }
            }
            grads[2 * l] = dw;
            grads[2 * l + 1] = db;
            delta = d_in;
        }
        (delta, grads)
    }

    /// Loss = Σ c ⊙ mlp(x) over more than one tile: the output, dx and every parameter
    /// gradient against the f64 forward and backprop for every activation, and against central
    /// differences for the smooth ones (a ReLU kink can sit inside the difference step).
    #[test]
    fn backward_matches_f64_and_finite_differences() {
        for act in [
            Activation::Relu,
            Activation::Tanh,
            Activation::Silu,
            Activation::Softplus,
        ] {
            let mut rng = Rng::new(3);
            let net = Mlp::new(&[3, 5, 20, 2], act, &mut rng).unwrap();
            let rows = TILE_ROWS + 5;
            let x = Tensor::randn(rows, 3, &mut rng);
            let c = Tensor::randn(rows, 2, &mut rng);
            let (out, dx, grads) = run(&net, Isa::best(), &x, &c);
            let (_, outs) = forward64(&net, x.data(), rows);
            for (got, want) in out.iter().zip(&outs[net.layers.len()]) {
                assert!((*got as f64 - want).abs() < 1e-5, "{act:?} output");
            }
            let (dx64, grads64) = backward64(&net, x.data(), c.data(), rows);
            for (got, want) in dx.iter().zip(&dx64) {
                assert!(
                    (*got as f64 - want).abs() < 1e-5,
                    "{act:?} dx: {got} vs {want}"
                );
            }
            for (g, want) in grads.tensors().iter().zip(&grads64) {
                for (got, want) in g.data().iter().zip(want) {
                    let tol = 1e-5 * (1.0 + want.abs());
                    assert!(
                        (*got as f64 - want).abs() < tol,
                        "{act:?} grad: {got} vs {want}"
                    );
                }
            }
            if act == Activation::Relu {
                continue;
            }
            let loss = |net: &Mlp<Tensor>, x: &[f32]| -> f64 {
                let (_, outs) = forward64(net, x, rows);
                outs[net.layers.len()]
                    .iter()
                    .zip(c.data())
                    .map(|(a, &b)| a * b as f64)
                    .sum()
            };
            let eps = 1e-3f32;
            for i in 0..x.len() {
                let mut xp = x.clone();
                xp.data_mut()[i] += eps;
                let mut xm = x.clone();
                xm.data_mut()[i] -= eps;
                let fd = (loss(&net, xp.data()) - loss(&net, xm.data())) / (2.0 * eps as f64);
                assert!(
                    (fd - dx[i] as f64).abs() < 2e-3,
                    "{act:?} dx[{i}]: fd {fd} vs {}",
                    dx[i]
                );
            }
            for (ti, g) in grads.tensors().iter().enumerate() {
                for i in 0..g.len() {
                    let mut p = net.clone();
                    p.tensors_mut()[ti].data_mut()[i] += eps;
                    let mut m = net.clone();
                    m.tensors_mut()[ti].data_mut()[i] -= eps;
                    let fd = (loss(&p, x.data()) - loss(&m, x.data())) / (2.0 * eps as f64);
                    let an = g.data()[i] as f64;
                    assert!(
                        (fd - an).abs() < 2e-3 * (1.0 + fd.abs()),
                        "{act:?} param {ti}[{i}]: fd {fd} vs {an}"
                    );
                }
            }
        }
    }

    /// The instruction sets agree bit for bit on a whole forward and backward.
    #[test]
    fn instruction_sets_agree_exactly() {
        let mut rng = Rng::new(5);
        for act in [Activation::Relu, Activation::Tanh] {
            let net = Mlp::new(&[4, 64, 64, 2], act, &mut rng).unwrap();
            let x = Tensor::randn(100, 4, &mut rng);
            let c = Tensor::randn(100, 2, &mut rng);
            let (o0, dx0, g0) = run(&net, Isa::Portable, &x, &c);
            for isa in Isa::available() {
                let (o, dx, g) = run(&net, isa, &x, &c);
                assert_eq!(o, o0, "{isa:?} output");
                assert_eq!(dx, dx0, "{isa:?} dx");
                for (a, b) in g.tensors().iter().zip(g0.tensors()) {
                    assert_eq!(a.data(), b.data(), "{isa:?} gradients");
                }
            }
        }
    }
}
