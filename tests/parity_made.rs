//! Parity of kernels/made.cu with host references: the masked GEMMs alone (against a plain
//! masked product in f64), the tile schedule (how much of a dense GEMM it executes), and the
//! MADE ops `ar_parallel`, `ar_parallel_backward` and `ar_sequential` against the CPU backend.
//! Every body runs on the emulated grid under three thread orders and on CUDA when present;
//! the `bf16` modules run the same bodies with `Precision::Bf16`.
//!
//! Sizes: batches of 1, 40 and 131 rows (two 128-row GEMM tiles, a partial one; five 32-row
//! sequential blocks, a partial one), widths that are not multiples of the 64-column tiles and
//! span several of them, D in {2, 5, 16}, one to three hidden layers, natural, reversed and
//! random orders.
//!
//! Tolerances. f32: the kernels and the references add the same products in other orders, so
//! results agree to a few f32 ulps of the sums; 1e-4 absolute + relative leaves room for the
//! hardware's approximate exp (ex2.approx, ~2 ulp) as well. bf16: operands are rounded to 8
//! significant bits (unit roundoff u = 2^-8) before the products, so one masked product is off
//! by at most 2u·Σ|x||w| (both factors rounded) plus f32 accumulation; the GEMM tests check
//! exactly this bound per element, and that the result matches a host product of the
//! bf16-rounded operands to f32 accuracy (which proves the bf16 path ran: the f32 kernel
//! would miss that reference by the rounding error). Through a whole MADE the rounding errors of
//! 2–4 layers add up and pass through exp(s) with |s| <= clamp = 2; the op-level bf16 checks
//! use 5e-2 absolute + relative, about 25u per layer, and separately require the bf16 result to
//! differ from the f32 one.

mod common;

use flowfuse::backend::Cpu;
use flowfuse::backend::grid::{Grid, GridDevice, Precision};
use flowfuse::nn::made::{HiddenDegrees, Order, degrees, layer_mask, made_with};
use flowfuse::nn::mlp::{Activation, Linear, Mlp};
use flowfuse::ops::made::MadeSpec;
use flowfuse::ops::made::cuda::MaskedLinear;
use flowfuse::ops::prelude::*;
use flowfuse::testing::assert_close;
use flowfuse::{Device, Direction, Error, Rng, Shaped, Tensor};

const CLAMP: f32 = 2.0;
const F32_TOL: f32 = 1e-4;
const BF16_OP_TOL: f32 = 5e-2;
/// bf16 unit roundoff.
const BF16_U: f64 = 1.0 / 256.0;

// ---------------------------------------------------------------------------------------------
// Host references.

fn bf16_round(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn live(a: u32, c: u32, output: bool) -> bool {
    if output { c > a } else { c >= a }
}

/// A host masked layer: weights, bias and degrees.
struct HostLayer {
    w: Tensor,
    b: Tensor,
    deg_in: Vec<u32>,
    deg_out: Vec<u32>,
    output: bool,
}

impl HostLayer {
    fn random(deg_in: Vec<u32>, deg_out: Vec<u32>, output: bool, rng: &mut Rng) -> Self {
        let (k, n) = (deg_in.len(), deg_out.len());
        HostLayer {
            w: Tensor::randn(k, n, rng).map(|v| v * 0.4),
            b: Tensor::randn(1, n, rng),
            deg_in,
            deg_out,
            output,
        }
    }

    fn live(&self, a: usize, c: usize) -> bool {
        live(self.deg_in[a], self.deg_out[c], self.output)
    }
}

/// The operand rounding a precision applies when the kernel stages it.
fn staged(p: Precision, v: f32) -> f32 {
    match p {
        Precision::F32 => v,
        Precision::Bf16 => bf16_round(v),
    }
}

/// (Σ_k x[r][k]·w[k][n] over live weights, Σ|x||w| over the same terms), with the operands as
/// the kernel stages them, accumulated in f64.
fn masked_product(
    x: &Tensor,
    layer: &HostLayer,
    act: Option<Activation>,
    p: Precision,
) -> (Vec<f64>, Vec<f64>) {
    let (rows, k) = x.shape();
    let n = layer.w.cols();
    let mut sum = vec![0.0f64; rows * n];
    let mut mag = vec![0.0f64; rows * n];
    for r in 0..rows {
        for a in 0..k {
            let xv = act.map_or(x.get(r, a), |f| f.apply(x.get(r, a)));
            let xv = staged(p, xv) as f64;
            for c in 0..n {
                if layer.live(a, c) {
                    let t = xv * staged(p, layer.w.get(a, c)) as f64;
                    sum[r * n + c] += t;
                    mag[r * n + c] += t.abs();
                }
            }
        }
    }
    (sum, mag)
}

fn to_tensor(rows: usize, cols: usize, v: &[f64]) -> Tensor {
    Tensor::from_vec(rows, cols, v.iter().map(|&x| x as f32).collect()).unwrap()
}

/// |got − want| <= bound + 1e-5·(1 + |want|) element-wise.
#[track_caller]
fn assert_within(what: &str, got: &Tensor, want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = Vec::new();
    for (i, ((&g, &w), &b)) in got.data().iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w).abs();
        if err.is_nan() || err > b + 1e-5 * (1.0 + w.abs()) {
            bad.push(format!(
                "  [{i}] got {g:e} want {w:e} |diff| {err:.3e} bound {b:.3e}"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} outside the bound; first:\n{}",
        bad.len(),
        want.len(),
        bad.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Compares a kernel result with the masked reference: f32 to F32_TOL; bf16 within the
/// rounding bound of the f32 reference, and tightly against the bf16-rounded reference when
/// the staged operands are exactly reproducible on the host (`exact_bf16`).
#[track_caller]
fn check_product(
    what: &str,
    p: Precision,
    got: &Tensor,
    f32_ref: &[f64],
    bf16_ref: Option<&[f64]>,
    mag: &[f64],
) {
    let (rows, cols) = got.shape();
    match p {
        Precision::F32 => {
            assert_close(what, got, &to_tensor(rows, cols, f32_ref), F32_TOL, F32_TOL)
        }
        Precision::Bf16 => {
            let bound: Vec<f64> = mag.iter().map(|m| 2.0 * BF16_U * m).collect();
            assert_within(&format!("{what} (bf16 bound)"), got, f32_ref, &bound);
            if let Some(r) = bf16_ref {
                let tight: Vec<f64> = mag.iter().map(|m| 1e-6 * m).collect();
                assert_within(&format!("{what} (bf16-rounded reference)"), got, r, &tight);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The masked GEMMs alone.

/// (name, rows, layer degrees, output layer?): hidden -> hidden with sorted degrees and
/// several column tiles, random-order inputs -> hidden, hidden -> random-order outputs
/// (strict), a tiny natural-order layer, and a layer with no live weight for some units.
fn gemm_cases(rng: &mut Rng) -> Vec<(&'static str, usize, HostLayer)> {
    let d16 = degrees(16, &[70, 130], Order::Natural, HiddenDegrees::Cycle).unwrap();
    let d5 = degrees(5, &[37], Order::Random(3), HiddenDegrees::Random(4)).unwrap();
    let d16r = degrees(16, &[45], Order::Random(8), HiddenDegrees::Cycle).unwrap();
    let d2 = degrees(2, &[3], Order::Natural, HiddenDegrees::Cycle).unwrap();
    vec![
        (
            "hidden->hidden",
            131,
            HostLayer::random(d16[1].clone(), d16[2].clone(), false, rng),
        ),
        (
            "input->hidden",
            40,
            HostLayer::random(d5[0].clone(), d5[1].clone(), false, rng),
        ),
        (
            "hidden->output",
            129,
            HostLayer::random(d16r[1].clone(), d16r[2].clone(), true, rng),
        ),
        (
            "tiny",
            1,
            HostLayer::random(d2[0].clone(), d2[1].clone(), false, rng),
        ),
        // Outputs of degree 1 in a strict layer see nothing: y = b there.
        (
            "input->output",
            67,
            HostLayer::random(d5[0].clone(), d5[2].clone(), true, rng),
        ),
    ]
}

struct DevLayer<G: GridDevice> {
    w: flowfuse::backend::grid::GridMat<G>,
    b: flowfuse::backend::grid::GridMat<G>,
    deg_in: flowfuse::backend::grid::GridIdx<G>,
    deg_out: flowfuse::backend::grid::GridIdx<G>,
    output: bool,
}

impl<G: GridDevice> DevLayer<G> {
    fn upload(g: &Grid<G>, h: &HostLayer) -> Self {
        DevLayer {
            w: g.upload(&h.w).unwrap(),
            b: g.upload(&h.b).unwrap(),
            deg_in: g.upload_idx(&h.deg_in).unwrap(),
            deg_out: g.upload_idx(&h.deg_out).unwrap(),
            output: h.output,
        }
    }

    fn layer(&self) -> MaskedLinear<'_, G> {
        MaskedLinear {
            w: &self.w,
            b: &self.b,
            deg_in: &self.deg_in,
            deg_out: &self.deg_out,
            output: self.output,
        }
    }
}

fn check_gemm_forward<G: GridDevice>(g: &Grid<G>) {
    let p = g.precision;
    let mut rng = Rng::new(11);
    for (name, rows, h) in gemm_cases(&mut rng) {
        let dev = DevLayer::upload(g, &h);
        let x = Tensor::randn(rows, h.w.rows(), &mut rng);
        let xd = g.upload(&x).unwrap();
        for (in_act, out_act) in [
            (None, None),
            (Some(Activation::Tanh), None),
            (None, Some(Activation::Relu)),
            (Some(Activation::Silu), Some(Activation::Softplus)),
        ] {
            let what = format!("made_linear {name} {p:?} act {in_act:?}/{out_act:?}");
            let y = g
                .download(
                    &g.made_linear(dev.layer(), &xd, in_act, out_act, None)
                        .unwrap(),
                )
                .unwrap();
            let n = h.w.cols();
            let finish = |s: &[f64]| -> Vec<f64> {
                s.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let z = v + h.b.data()[i % n] as f64;
                        out_act.map_or(z, |f| f.apply(z as f32) as f64)
                    })
                    .collect()
            };
            let (s32, mag) = masked_product(&x, &h, in_act, Precision::F32);
            let (s16, _) = masked_product(&x, &h, in_act, Precision::Bf16);
            // The output activation is 1-Lipschitz for all four, so the bound carries over.
            let exact = in_act.is_none();
            check_product(
                &what,
                p,
                &y,
                &finish(&s32),
                exact.then(|| finish(&s16)).as_deref(),
                &mag,
            );
        }
    }
}

fn check_gemm_backward<G: GridDevice>(g: &Grid<G>) {
    let p = g.precision;
    let mut rng = Rng::new(12);
    for (name, rows, h) in gemm_cases(&mut rng) {
        let dev = DevLayer::upload(g, &h);
        let (k, n) = h.w.shape();
        let x = Tensor::randn(rows, k, &mut rng);
        let dy = Tensor::randn(rows, n, &mut rng);
        let pre = Tensor::randn(rows, k, &mut rng);
        let base = Tensor::randn(rows, k, &mut rng);
        let (xd, dyd, pred) = (
            g.upload(&x).unwrap(),
            g.upload(&dy).unwrap(),
            g.upload(&pre).unwrap(),
        );

        // dX = (dY·(W⊙M)ᵀ)·act'(pre) + base.
        let act = Activation::Tanh;
        let got = g
            .download(
                &g.made_linear_dx(
                    dev.layer(),
                    &dyd,
                    Some((&pred, act)),
                    Some(g.upload(&base).unwrap()),
                    None,
                )
                .unwrap(),
            )
            .unwrap();
        let mut want = vec![0.0f64; rows * k];
        let mut want16 = vec![0.0f64; rows * k];
        let mut mag = vec![0.0f64; rows * k];
        for r in 0..rows {
            for a in 0..k {
                let (mut s, mut s16, mut m) = (0.0f64, 0.0f64, 0.0f64);
                for c in 0..n {
                    if h.live(a, c) {
                        let t = dy.get(r, c) as f64 * h.w.get(a, c) as f64;
                        s += t;
                        m += t.abs();
                        s16 += bf16_round(dy.get(r, c)) as f64 * bf16_round(h.w.get(a, c)) as f64;
                    }
                }
                let gr = act.grad(pre.get(r, a)) as f64;
                want[r * k + a] = s * gr + base.get(r, a) as f64;
                want16[r * k + a] = s16 * gr + base.get(r, a) as f64;
                mag[r * k + a] = m * gr.abs();
            }
        }
        check_product(
            &format!("made_linear_dx {name} {p:?}"),
            p,
            &got,
            &want,
            Some(&want16),
            &mag,
        );

        // Without pre-activation or accumulation (the path of a first layer without `into`).
        let plain = g
            .download(
                &g.made_linear_dx(dev.layer(), &dyd, None, None, None)
                    .unwrap(),
            )
            .unwrap();
        let mut want = vec![0.0f64; rows * k];
        for r in 0..rows {
            for a in 0..k {
                want[r * k + a] = (0..n)
                    .filter(|&c| h.live(a, c))
                    .map(|c| dy.get(r, c) as f64 * h.w.get(a, c) as f64)
                    .sum();
            }
        }
        if p == Precision::F32 {
            assert_close(
                &format!("made_linear_dx plain {name}"),
                &plain,
                &to_tensor(rows, k, &want),
                F32_TOL,
                F32_TOL,
            );
        }

        // dW (masked) and db, with the input activation applied.
        let in_act = Activation::Softplus;
        let (dw, db) = g
            .made_linear_dw(dev.layer(), &xd, Some(in_act), &dyd, None)
            .unwrap();
        let (dw, db) = (g.download(&dw).unwrap(), g.download(&db).unwrap());
        let mut want_w = vec![0.0f64; k * n];
        let mut mag_w = vec![0.0f64; k * n];
        let mut want_b = vec![0.0f64; n];
        let mut mag_b = vec![0.0f64; n];
        for r in 0..rows {
            for c in 0..n {
                want_b[c] += dy.get(r, c) as f64;
                mag_b[c] += dy.get(r, c).abs() as f64;
            }
            for a in 0..k {
                let xv = in_act.apply(x.get(r, a)) as f64;
                for c in 0..n {
                    if h.live(a, c) {
                        let t = xv * dy.get(r, c) as f64;
                        want_w[a * n + c] += t;
                        mag_w[a * n + c] += t.abs();
                    }
                }
            }
        }
        check_product(
            &format!("made_linear_dw {name} {p:?}"),
            p,
            &dw,
            &want_w,
            None,
            &mag_w,
        );
        // The bias gradient is summed from the f32 values in both precisions.
        assert_within(
            &format!("made_linear_dw db {name} {p:?}"),
            &db,
            &want_b,
            &mag_b.iter().map(|m| 1e-6 * m).collect::<Vec<_>>(),
        );
        for a in 0..k {
            for c in 0..n {
                if !h.live(a, c) {
                    assert_eq!(
                        dw.get(a, c).to_bits(),
                        0,
                        "{name}: dead weight ({a}, {c}) has gradient {}",
                        dw.get(a, c)
                    );
                }
            }
        }
    }
}

on_grid_backends!(gemm_forward_f32, super::check_gemm_forward);
on_grid_backends_bf16!(gemm_forward_bf16, super::check_gemm_forward);
on_grid_backends!(gemm_backward_f32, super::check_gemm_backward);
on_grid_backends_bf16!(gemm_backward_bf16, super::check_gemm_backward);

/// The tile schedule: a typical MADE hidden->hidden layer (D = 16, 256 -> 256 units, degrees
/// cycled over 1..15) executes about half of the multiply-adds of a dense GEMM of the same
/// shape, where "dense" is the same kernel with every weight live; the dense count is exactly
/// the full tile grid. The backward GEMMs skip as much.
fn check_tile_skipping<G: GridDevice>(g: &Grid<G>) {
    let p = g.precision;
    let mut rng = Rng::new(13);
    let deg = degrees(16, &[256, 256], Order::Natural, HiddenDegrees::Cycle).unwrap();
    let rows = 256;
    let masked = HostLayer::random(deg[1].clone(), deg[2].clone(), false, &mut rng);
    let mut dense = HostLayer::random(vec![1; 256], vec![1; 256], false, &mut rng);
    dense.w = masked.w.clone();
    let (md, dd) = (DevLayer::upload(g, &masked), DevLayer::upload(g, &dense));
    let x = g.upload(&Tensor::randn(rows, 256, &mut rng)).unwrap();
    let dy = g.upload(&Tensor::randn(rows, 256, &mut rng)).unwrap();
    let count = |what: &str, l: MaskedLinear<'_, G>| {
        let c = g.mac_counter().unwrap();
        match what {
            "forward" => drop(g.made_linear(l, &x, None, None, Some(&c)).unwrap()),
            "dx" => drop(g.made_linear_dx(l, &dy, None, None, Some(&c)).unwrap()),
            _ => drop(g.made_linear_dw(l, &x, None, &dy, Some(&c)).unwrap()),
        }
        g.read_macs(&c).unwrap()
    };
    let full = (rows * 256 * 256) as u64;
    for what in ["forward", "dx", "dw"] {
        let (m, d) = (count(what, md.layer()), count(what, dd.layer()));
        let ratio = m as f64 / d as f64;
        println!("{what} {p:?}: masked {m} MACs, dense {d} ({ratio:.3} of dense)");
        assert_eq!(
            d, full,
            "{what}: the all-live layer runs the whole tile grid"
        );
        // The exact live fraction of this mask is 0.533 (c >= a over 15 degree groups).
        let lim = if what == "dw" { 0.70 } else { 0.62 };
        assert!(
            ratio > 0.5 && ratio < lim,
            "{what} {p:?}: the masked GEMM ran {ratio:.3} of the dense multiply-adds"
        );
    }
}

on_grid_backends!(tile_skipping_f32, super::check_tile_skipping);
on_grid_backends_bf16!(tile_skipping_bf16, super::check_tile_skipping);

// ---------------------------------------------------------------------------------------------
// The MADE ops against the CPU backend.

/// (D, hidden widths, order, hidden degree rule, activation, batch rows).
type Case = (usize, Vec<usize>, Order, HiddenDegrees, Activation, usize);

fn op_cases() -> Vec<Case> {
    vec![
        (
            2,
            vec![5],
            Order::Natural,
            HiddenDegrees::Cycle,
            Activation::Relu,
            40,
        ),
        (
            5,
            vec![13, 9],
            Order::Random(3),
            HiddenDegrees::Cycle,
            Activation::Tanh,
            131,
        ),
        (
            5,
            vec![70],
            Order::Reversed,
            HiddenDegrees::Random(2),
            Activation::Softplus,
            1,
        ),
        (
            16,
            vec![70, 130, 33],
            Order::Reversed,
            HiddenDegrees::Random(5),
            Activation::Silu,
            131,
        ),
        (
            16,
            vec![150],
            Order::Random(9),
            HiddenDegrees::Cycle,
            Activation::Tanh,
            40,
        ),
        (
            16,
            vec![40, 40],
            Order::Natural,
            HiddenDegrees::Cycle,
            Activation::Relu,
            67,
        ),
    ]
}

/// A MADE with random weights everywhere (dead ones included: the ops must ignore them; a
/// non-zero output layer, so that the transform is not the identity).
fn random_made(case: &Case, seed: u64) -> (MadeSpec, Mlp<Tensor>) {
    let (d, hidden, order, rule, act, _) = case;
    let mut rng = Rng::new(seed);
    let (spec, _) = made_with(*d, hidden, *act, *order, *rule, CLAMP, &mut rng).unwrap();
    let widths: Vec<usize> = spec.degrees.iter().map(Vec::len).collect();
    let net = Mlp::new(&widths, *act, &mut rng).unwrap();
    (spec, net)
}

struct OnDevice<G: GridDevice> {
    net: Mlp<flowfuse::backend::grid::GridMat<G>>,
    deg: Vec<flowfuse::backend::grid::GridIdx<G>>,
}

fn on_device<G: GridDevice>(g: &Grid<G>, spec: &MadeSpec, net: &Mlp<Tensor>) -> OnDevice<G> {
    OnDevice {
        net: net.try_map(|t| g.upload(t)).unwrap(),
        deg: spec
            .degrees
            .iter()
            .map(|d| g.upload_idx(d).unwrap())
            .collect(),
    }
}

fn op_tol(p: Precision) -> f32 {
    match p {
        Precision::F32 => F32_TOL,
        Precision::Bf16 => BF16_OP_TOL,
    }
}

fn check_parallel<G: GridDevice>(g: &Grid<G>) {
    let p = g.precision;
    let cpu = Cpu;
    let mut rng = Rng::new(21);
    let mut max_bf16_shift = 0.0f32;
    for (i, case) in op_cases().iter().enumerate() {
        let (spec, net) = random_made(case, 100 + i as u64);
        let dev = on_device(g, &spec, &net);
        let x = Tensor::randn(case.5, case.0, &mut rng);
        let xd = g.upload(&x).unwrap();
        for dir in [Direction::Forward, Direction::Inverse] {
            let (y, ld) = g.ar_parallel(&spec, &dev.net, &dev.deg, &xd, dir).unwrap();
            let (y, ld) = (g.download(&y).unwrap(), g.download(&ld).unwrap());
            let (yr, ldr) = cpu
                .ar_parallel(&spec, &net, &spec.degrees, &x, dir)
                .unwrap();
            let what = format!("ar_parallel case {i} {dir:?} {p:?}");
            assert_close(&format!("{what} output"), &y, &yr, op_tol(p), op_tol(p));
            assert_close(&format!("{what} logdet"), &ld, &ldr, op_tol(p), op_tol(p));
            max_bf16_shift = max_bf16_shift.max(y.max_abs_diff(&yr).unwrap());
        }
    }
    if p == Precision::Bf16 {
        // bf16 operands move the results by far more than f32 rounding would.
        assert!(
            max_bf16_shift > 1e-3,
            "bf16 results match f32 to {max_bf16_shift:e}: was bf16 used?"
        );
    }
}

fn check_parallel_backward<G: GridDevice>(g: &Grid<G>) {
    let p = g.precision;
    let cpu = Cpu;
    let mut rng = Rng::new(22);
    for (i, case) in op_cases().iter().enumerate() {
        let (spec, net) = random_made(case, 200 + i as u64);
        let dev = on_device(g, &spec, &net);
        let rows = case.5;
        let x = Tensor::randn(rows, case.0, &mut rng);
        let go = Tensor::randn(rows, case.0, &mut rng);
        let gl = Tensor::randn(rows, 1, &mut rng);
        let (xd, god, gld) = (
            g.upload(&x).unwrap(),
            g.upload(&go).unwrap(),
            g.upload(&gl).unwrap(),
        );
        for dir in [Direction::Forward, Direction::Inverse] {
            let (dx, grads) = g
                .ar_parallel_backward(&spec, &dev.net, &dev.deg, &xd, dir, &god, &gld)
                .unwrap();
            let (dxr, gr) = cpu
                .ar_parallel_backward(&spec, &net, &spec.degrees, &x, dir, &go, &gl)
                .unwrap();
            let what = format!("ar_parallel_backward case {i} {dir:?} {p:?}");
            // Parameter gradients are sums over the batch: scale the absolute tolerance.
            let tol = op_tol(p);
            assert_close(
                &format!("{what} d_input"),
                &g.download(&dx).unwrap(),
                &dxr,
                tol,
                tol,
            );
            for (l, (Linear { w, b }, Linear { w: wr, b: br })) in
                grads.layers.iter().zip(&gr.layers).enumerate()
            {
                let (w, b) = (g.download(w).unwrap(), g.download(b).unwrap());
                let scale = (rows as f32).sqrt();
                assert_close(&format!("{what} dW{l}"), &w, wr, tol * scale, tol);
                assert_close(&format!("{what} db{l}"), &b, br, tol * scale, tol);
                let mask = layer_mask(&spec, l).unwrap();
                for (k, (&v, &m)) in w.data().iter().zip(mask.data()).enumerate() {
                    if m == 0.0 {
                        assert_eq!(
                            v.to_bits(),
                            0,
                            "{what}: dead weight {k} of layer {l} has gradient {v}"
                        );
                    }
                }
            }
        }
    }
}

fn check_sequential<G: GridDevice>(g: &Grid<G>) {
    let cpu = Cpu;
    let mut rng = Rng::new(23);
    for (i, case) in op_cases().iter().enumerate() {
        let (spec, net) = random_made(case, 300 + i as u64);
        let dev = on_device(g, &spec, &net);
        let x = Tensor::randn(case.5, case.0, &mut rng);
        let xd = g.upload(&x).unwrap();
        for dir in [Direction::Forward, Direction::Inverse] {
            let (y, ld) = g
                .ar_sequential(&spec, &dev.net, &dev.deg, &xd, dir)
                .unwrap();
            let (yr, ldr) = cpu
                .ar_sequential(&spec, &net, &spec.degrees, &x, dir)
                .unwrap();
            let what = format!("ar_sequential case {i} {dir:?}");
            let (y, ld) = (g.download(&y).unwrap(), g.download(&ld).unwrap());
            assert_close(&format!("{what} output"), &y, &yr, F32_TOL, F32_TOL);
            assert_close(&format!("{what} logdet"), &ld, &ldr, F32_TOL, F32_TOL);
            // The sequential direction inverts the parallel one (MAF: sampling undoes density;
            // IAF: density undoes sampling), and the log-dets cancel.
            let yd = g.upload(&y).unwrap();
            let (back, ld_back) = g
                .ar_parallel(&spec, &dev.net, &dev.deg, &yd, dir.reversed())
                .unwrap();
            assert_close(
                &format!("{what} inverted by ar_parallel"),
                &g.download(&back).unwrap(),
                &x,
                1e-3,
                1e-3,
            );
            let sum = g
                .download(&ld_back)
                .unwrap()
                .data()
                .iter()
                .zip(ld.data())
                .map(|(a, b)| (a + b).abs())
                .fold(0.0f32, f32::max);
            assert!(sum < 1e-3, "{what}: log-dets do not cancel ({sum:e})");
        }
    }
}

/// Layers wide enough that the sequential kernel keeps fewer rows per block (16, then 8) in
/// shared memory, and one too wide for any block (a typed error).
fn check_sequential_wide<G: GridDevice>(g: &Grid<G>) {
    let cpu = Cpu;
    let mut rng = Rng::new(25);
    let cases: [Case; 2] = [
        (
            5,
            vec![900, 900],
            Order::Random(4),
            HiddenDegrees::Cycle,
            Activation::Relu,
            37,
        ),
        (
            3,
            vec![1200, 1200, 1200],
            Order::Reversed,
            HiddenDegrees::Random(6),
            Activation::Tanh,
            19,
        ),
    ];
    for (i, case) in cases.iter().enumerate() {
        let (spec, net) = random_made(case, 400 + i as u64);
        let dev = on_device(g, &spec, &net);
        let x = Tensor::randn(case.5, case.0, &mut rng);
        let xd = g.upload(&x).unwrap();
        for dir in [Direction::Forward, Direction::Inverse] {
            let (y, ld) = g
                .ar_sequential(&spec, &dev.net, &dev.deg, &xd, dir)
                .unwrap();
            let (yr, ldr) = cpu
                .ar_sequential(&spec, &net, &spec.degrees, &x, dir)
                .unwrap();
            let what = format!("ar_sequential wide case {i} {dir:?}");
            assert_close(
                &format!("{what} output"),
                &g.download(&y).unwrap(),
                &yr,
                F32_TOL,
                F32_TOL,
            );
            assert_close(
                &format!("{what} logdet"),
                &g.download(&ld).unwrap(),
                &ldr,
                F32_TOL,
                F32_TOL,
            );
        }
    }
    let too_wide: Case = (
        2,
        vec![60_000],
        Order::Natural,
        HiddenDegrees::Cycle,
        Activation::Relu,
        3,
    );
    let (spec, net) = random_made(&too_wide, 7);
    let dev = on_device(g, &spec, &net);
    let xd = g.upload(&Tensor::randn(3, 2, &mut rng)).unwrap();
    assert!(matches!(
        g.ar_sequential(&spec, &dev.net, &dev.deg, &xd, Direction::Forward),
        Err(Error::Unsupported { .. })
    ));
}

on_grid_backends!(parallel_f32, super::check_parallel);
on_grid_backends_bf16!(parallel_bf16, super::check_parallel);
on_grid_backends!(parallel_backward_f32, super::check_parallel_backward);
on_grid_backends_bf16!(parallel_backward_bf16, super::check_parallel_backward);
on_grid_backends!(sequential, super::check_sequential);
on_grid_backends!(sequential_wide, super::check_sequential_wide);

/// Typed errors: bad shapes, an empty batch, missing degree vectors, and networks too deep for
/// the sequential kernel (which the parallel pass still handles).
fn check_errors<G: GridDevice>(g: &Grid<G>) {
    let case: Case = (
        5,
        vec![8, 8, 8, 8],
        Order::Natural,
        HiddenDegrees::Cycle,
        Activation::Tanh,
        9,
    );
    let (spec, net) = random_made(&case, 7);
    let dev = on_device(g, &spec, &net);
    let mut rng = Rng::new(24);
    let x = Tensor::randn(9, 5, &mut rng);
    let xd = g.upload(&x).unwrap();
    let fwd = Direction::Forward;
    assert!(matches!(
        g.ar_sequential(&spec, &dev.net, &dev.deg, &xd, fwd),
        Err(Error::Unsupported { .. })
    ));
    let (y, _) = g.ar_parallel(&spec, &dev.net, &dev.deg, &xd, fwd).unwrap();
    let (yr, _) = Cpu
        .ar_parallel(&spec, &net, &spec.degrees, &x, fwd)
        .unwrap();
    assert_close(
        "ar_parallel, four hidden layers",
        &g.download(&y).unwrap(),
        &yr,
        F32_TOL,
        F32_TOL,
    );

    let wrong = g.upload(&Tensor::randn(9, 4, &mut rng)).unwrap();
    assert!(matches!(
        g.ar_parallel(&spec, &dev.net, &dev.deg, &wrong, fwd),
        Err(Error::Shape { .. })
    ));
    let empty = g.upload(&Tensor::zeros(0, 5)).unwrap();
    assert!(matches!(
        g.ar_sequential(&spec, &dev.net, &dev.deg, &empty, fwd),
        Err(Error::Empty(_))
    ));
    assert!(matches!(
        g.ar_parallel(&spec, &dev.net, &dev.deg[..3], &xd, fwd),
        Err(Error::Shape { .. })
    ));
    let gl = g.upload(&Tensor::zeros(9, 2)).unwrap();
    assert!(matches!(
        g.ar_parallel_backward(&spec, &dev.net, &dev.deg, &xd, fwd, &xd, &gl),
        Err(Error::Shape { .. })
    ));
}

on_grid_backends!(errors, super::check_errors);
