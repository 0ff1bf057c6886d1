//! Coupling layers (affine, additive, rational-quadratic spline): invertibility, log-dets against
//! finite-difference Jacobians, gradients against central differences, and error handling.
//!
//! Every check is generic over the backend and called with `Cpu` here, so that the same bodies
//! can run on the CUDA and emulated backends.

mod common;

use flowfuse::backend::{Backend, Cpu};
use flowfuse::flows::coupling::CouplingLayer;
use flowfuse::flows::{FlowLayer, LayerConfig, LayerState};
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::coupling::{CouplingKind, CouplingSpec, Half};
use flowfuse::testing::{assert_close, fd_jacobian, log_abs_det};
use flowfuse::{Direction, Error, Rng, Shaped, Tensor};

use common::coupling::kinds;
use common::failures::Failures;

const DIMS: [usize; 3] = [2, 3, 5];
const HALVES: [Half; 2] = [Half::Lower, Half::Upper];
const DIRS: [Direction; 2] = [Direction::Forward, Direction::Inverse];

/// Finite-difference step: a power of two, so that x ± EPS is exact in f32 for the quantised
/// test values below.
const EPS: f64 = 1.0 / 1024.0;

/// Step of the fourth-order differences used for gradients (also a power of two).
const FD_STEP: f32 = 1.0 / 128.0;

/// Every (kind, dim, half) combination.
fn specs() -> Vec<CouplingSpec> {
    let mut v = Vec::new();
    for kind in kinds() {
        for dim in DIMS {
            for copied in HALVES {
                v.push(CouplingSpec { dim, copied, kind });
            }
        }
    }
    v
}

/// Rounds to a multiple of 2^-12 so that finite-difference steps of EPS are exact in f32.
fn quantise(t: &Tensor) -> Tensor {
    t.map(|v| (v * 4096.0).round() / 4096.0)
}

/// The shared conditioner (hidden widths 8 and 7), quantised.
fn random_net(spec: &CouplingSpec, act: Activation, seed: u64) -> Mlp<Tensor> {
    common::coupling::random_net(spec, &[8, 7], act, seed)
        .try_map(|t| Ok(quantise(t)))
        .unwrap()
}

fn random_layer<B: Backend>(b: &B, spec: CouplingSpec, seed: u64) -> CouplingLayer<B> {
    let act = match spec.kind {
        CouplingKind::Additive => Activation::Silu,
        _ => Activation::Tanh,
    };
    let host = random_net(&spec, act, seed);
    CouplingLayer {
        spec,
        net: host.try_map(|t| b.upload(t)).unwrap(),
    }
}

/// The shared inputs, quantised. For splines they keep at least 0.1 (less the quantisation
/// step) from ±bound, so that no finite-difference stencil straddles ±bound.
fn random_input(spec: &CouplingSpec, rows: usize, seed: u64) -> Tensor {
    quantise(&common::coupling::random_input(spec, rows, seed))
}

/// For splines, the test must see both the spline and its identity tails.
fn assert_spline_coverage(spec: &CouplingSpec, x: &Tensor) {
    let CouplingKind::Spline { bound, .. } = spec.kind else {
        return;
    };
    let vals: Vec<f32> = (0..x.rows())
        .flat_map(|i| x.row(i)[spec.transformed_cols()].to_vec())
        .collect();
    let outside = vals.iter().filter(|v| v.abs() > bound).count();
    assert!(
        outside > 0 && outside < vals.len(),
        "{spec:?}: {outside} of {} inputs outside ±{bound}",
        vals.len()
    );
}

fn run<B: Backend>(
    b: &B,
    layer: &CouplingLayer<B>,
    x: &Tensor,
    dir: Direction,
) -> (Tensor, Tensor) {
    let xm = b.upload(x).unwrap();
    let (out, ld) = match dir {
        Direction::Forward => layer.forward(b, &xm),
        Direction::Inverse => layer.inverse(b, &xm),
    }
    .unwrap();
    (b.download(&out).unwrap(), b.download(&ld).unwrap())
}

fn copied_part(spec: &CouplingSpec, t: &Tensor) -> Tensor {
    let cols = spec.copied_cols();
    Tensor::from_fn(t.rows(), cols.len(), |i, j| t.get(i, cols.start + j))
}

// ---------------------------------------------------------------------------------------------
// Invertibility

fn check_roundtrip<B: Backend>(b: &B) {
    let mut fails = Failures::default();
    for (n, spec) in specs().into_iter().enumerate() {
        let layer = random_layer(b, spec, 100 + n as u64);
        let x = random_input(&spec, 64, 200 + n as u64);
        assert_spline_coverage(&spec, &x);
        for dir in DIRS {
            let (y, ld) = run(b, &layer, &x, dir);
            let (back, ld_back) = run(b, &layer, &y, dir.reversed());
            let what = format!("{spec:?} {dir:?}");
            fails.check(&format!("{what}: round trip"), &back, &x, 2e-5, 2e-5);
            // log|det| of a map and of its inverse at the image cancel.
            let sum = Tensor::from_fn(ld.rows(), 1, |i, _| ld.get(i, 0) + ld_back.get(i, 0));
            fails.check(
                &format!("{what}: logdet sum"),
                &sum,
                &Tensor::zeros(ld.rows(), 1),
                5e-5,
                0.0,
            );
            // The copied half is untouched, bit for bit.
            assert_eq!(
                copied_part(&spec, &y),
                copied_part(&spec, &x),
                "{what}: copied half"
            );
            // And the layer really does something (the test could fail).
            assert!(
                y.max_abs_diff(&x).unwrap() > 0.3,
                "{what}: close to the identity"
            );
            if !matches!(spec.kind, CouplingKind::Additive) {
                let spread = ld.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(spread > 0.3, "{what}: log-dets all near 0");
            }
        }
    }
    fails.assert_none();
}

#[test]
fn roundtrip_cpu() {
    check_roundtrip(&Cpu);
}

// ---------------------------------------------------------------------------------------------
// Log-determinant against the finite-difference Jacobian

fn check_logdet_matches_jacobian<B: Backend>(b: &B) {
    let mut fails = Failures::default();
    for (n, spec) in specs().into_iter().enumerate() {
        let layer = random_layer(b, spec, 300 + n as u64);
        let x = random_input(&spec, 12, 400 + n as u64);
        assert_spline_coverage(&spec, &x);
        for dir in DIRS {
            let (_, ld) = run(b, &layer, &x, dir);
            let mut fd = Tensor::zeros(x.rows(), 1);
            for i in 0..x.rows() {
                let row: Vec<f64> = x.row(i).iter().map(|&v| v as f64).collect();
                let f = |v: &[f64]| -> Vec<f64> {
                    let t = Tensor::from_vec(1, v.len(), v.iter().map(|&a| a as f32).collect())
                        .unwrap();
                    let (y, _) = run(b, &layer, &t, dir);
                    y.data().iter().map(|&a| a as f64).collect()
                };
                let jac = fd_jacobian(f, &row, EPS);
                fd.set(i, 0, log_abs_det(&jac) as f32);
            }
            fails.check(
                &format!("{spec:?} {dir:?}: logdet vs FD Jacobian"),
                &ld,
                &fd,
                1e-3,
                1e-3,
            );
        }
    }
    fails.assert_none();
}

#[test]
fn logdet_matches_fd_jacobian_cpu() {
    check_logdet_matches_jacobian(&Cpu);
}

// ---------------------------------------------------------------------------------------------
// Gradients against central differences

/// L = Σ g_out ⊙ out + Σ g_ld ⊙ logdet, accumulated in f64 from the op's f32 outputs.
fn loss<B: Backend>(
    b: &B,
    spec: &CouplingSpec,
    net: &Mlp<Tensor>,
    x: &Tensor,
    dir: Direction,
    g_out: &Tensor,
    g_ld: &Tensor,
) -> f64 {
    let netm = net.try_map(|t| b.upload(t)).unwrap();
    let (out, ld) = b.coupling(spec, &netm, &b.upload(x).unwrap(), dir).unwrap();
    let (out, ld) = (b.download(&out).unwrap(), b.download(&ld).unwrap());
    let dot = |a: &Tensor, c: &Tensor| -> f64 {
        a.data()
            .iter()
            .zip(c.data())
            .map(|(&p, &q)| p as f64 * q as f64)
            .sum()
    };
    dot(&out, g_out) + dot(&ld, g_ld)
}

/// Fourth-order central difference f'(0) ≈ [8(f(h) − f(−h)) − (f(2h) − f(−2h))] / 12h. Its
/// truncation error is O(h⁴), so h can be large enough that the f32 rounding of the op's
/// outputs (divided by h) stays small.
fn central4(f: &impl Fn(f32) -> f64, h: f32) -> f64 {
    (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h as f64)
}

/// The derivative at 0 where f is smooth there, or None where the estimates with steps h and h/2
/// disagree: the stencil then straddles a spline knot, where the map is only C¹. A wrong
/// analytic gradient cannot hide here, since both estimates are of the true derivative.
fn fd_derivative(f: impl Fn(f32) -> f64, has_knots: bool) -> Option<f32> {
    let coarse = central4(&f, FD_STEP);
    if !has_knots {
        return Some(coarse as f32);
    }
    let fine = central4(&f, FD_STEP / 2.0);
    ((coarse - fine).abs() <= FD_ATOL as f64 + FD_RTOL as f64 * coarse.abs())
        .then_some(coarse as f32)
}

/// Tolerance of the gradient checks.
const FD_ATOL: f32 = 1e-3;
const FD_RTOL: f32 = 1e-3;

/// Finite-difference gradient of `f` (coordinate k moved by h: `f(k, h)`), compared with
/// `analytic`. Entries at a kink (only splines have them) take the analytic value and are
/// counted in `skipped`.
fn fd_check(
    fails: &mut Failures,
    what: &str,
    analytic: &Tensor,
    f: impl Fn(usize, f32) -> f64,
    has_knots: bool,
    skipped: &mut usize,
) {
    let mut fd = analytic.clone();
    for k in 0..analytic.len() {
        match fd_derivative(|h| f(k, h), has_knots) {
            Some(v) => fd.data_mut()[k] = v,
            None => *skipped += 1,
        }
    }
    fails.check(what, analytic, &fd, FD_ATOL, FD_RTOL);
}

fn check_backward_matches_fd<B: Backend>(b: &B) {
    let mut fails = Failures::default();
    let (mut skipped, mut checked) = (0usize, 0usize);
    for (n, spec) in specs().into_iter().enumerate() {
        let layer = random_layer(b, spec, 500 + n as u64);
        let host_net = layer.net.try_map(|t| b.download(t)).unwrap();
        let rows = 6;
        let x = random_input(&spec, rows, 600 + n as u64);
        assert_spline_coverage(&spec, &x);
        let mut rng = Rng::new(700 + n as u64);
        let g_out = Tensor::randn(rows, spec.dim, &mut rng);
        let g_ld = Tensor::randn(rows, 1, &mut rng);
        for dir in DIRS {
            let what = format!("{spec:?} {dir:?}");
            let has_knots = matches!(spec.kind, CouplingKind::Spline { .. });
            let xm = b.upload(&x).unwrap();
            let (gom, gldm) = (b.upload(&g_out).unwrap(), b.upload(&g_ld).unwrap());
            let (d_x, d_params) = match dir {
                Direction::Forward => layer.forward_backward(b, &xm, &gom, &gldm),
                Direction::Inverse => layer.inverse_backward(b, &xm, &gom, &gldm),
            }
            .unwrap();
            let d_x = b.download(&d_x).unwrap();
            let l = |net: &Mlp<Tensor>, x: &Tensor| loss(b, &spec, net, x, dir, &g_out, &g_ld);

            fd_check(
                &mut fails,
                &format!("{what}: dL/dinput"),
                &d_x,
                |k, h| {
                    let mut xh = x.clone();
                    xh.data_mut()[k] += h;
                    l(&host_net, &xh)
                },
                has_knots,
                &mut skipped,
            );
            assert_eq!(
                d_params.len(),
                host_net.tensors().len(),
                "{what}: gradient count"
            );
            for (ti, g) in d_params.iter().enumerate() {
                let name = &host_net.tensor_names()[ti];
                fd_check(
                    &mut fails,
                    &format!("{what}: dL/d{name}"),
                    &b.download(g).unwrap(),
                    |k, h| {
                        let mut net = host_net.clone();
                        net.tensors_mut()[ti].data_mut()[k] += h;
                        l(&net, &x)
                    },
                    has_knots,
                    &mut skipped,
                );
                checked += g.len();
            }
            checked += x.len();
        }
    }
    // Kinks are rare: a handful of entries, not a systematic hole in the check.
    eprintln!("gradient check: {skipped} of {checked} entries at a knot, skipped");
    assert!(
        skipped * 50 <= checked,
        "{skipped} of {checked} gradient entries skipped"
    );
    fails.assert_none();
}

#[test]
fn backward_matches_fd_cpu() {
    check_backward_matches_fd(&Cpu);
}

// ---------------------------------------------------------------------------------------------
// Construction, state, batches larger than one chunk

fn check_new_layer_is_identity<B: Backend>(b: &B) {
    let mut rng = Rng::new(11);
    for spec in specs() {
        let layer = CouplingLayer::new(b, spec, &[16, 16], Activation::Relu, &mut rng).unwrap();
        assert_eq!(layer.dim(), spec.dim);
        assert_eq!(layer.params().len(), 6);
        let x = random_input(&spec, 32, 12);
        for dir in DIRS {
            let (y, ld) = run(b, &layer, &x, dir);
            let what = format!("{spec:?} {dir:?}: new layer");
            assert_close(&format!("{what} output"), &y, &x, 1e-6, 1e-6);
            assert_close(
                &format!("{what} logdet"),
                &ld,
                &Tensor::zeros(32, 1),
                1e-6,
                0.0,
            );
        }
    }
}

#[test]
fn new_layer_is_identity_cpu() {
    check_new_layer_is_identity(&Cpu);
}

fn check_state_roundtrip<B: Backend>(b: &B) {
    for (n, spec) in specs().into_iter().enumerate() {
        let layer = random_layer(b, spec, 800 + n as u64);
        let state = layer.state(b).unwrap();
        let names: Vec<&str> = state.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["w0", "b0", "w1", "b1", "w2", "b2"]);
        assert_eq!(
            state.config,
            LayerConfig::Coupling {
                spec,
                act: layer.net.act
            }
        );
        let again = CouplingLayer::from_state(b, &state).unwrap();
        let x = random_input(&spec, 8, 900 + n as u64);
        for dir in DIRS {
            let (y0, l0) = run(b, &layer, &x, dir);
            let (y1, l1) = run(b, &again, &x, dir);
            assert_eq!(
                (y0, l0),
                (y1, l1),
                "{spec:?} {dir:?}: reloaded layer differs"
            );
        }
    }
}

#[test]
fn state_roundtrip_cpu() {
    check_state_roundtrip(&Cpu);
}

/// Rows must not influence each other, and chunked gradients must sum to the whole batch's.
fn check_batch_split<B: Backend>(b: &B) {
    for (n, spec) in specs().into_iter().enumerate() {
        let layer = random_layer(b, spec, 1000 + n as u64);
        // More rows than one CPU chunk, and not a multiple of it.
        let rows = 601;
        let x = random_input(&spec, rows, 1100 + n as u64);
        let mut rng = Rng::new(1200 + n as u64);
        let g_out = Tensor::randn(rows, spec.dim, &mut rng);
        let g_ld = Tensor::randn(rows, 1, &mut rng);
        let up = |t: &Tensor| b.upload(t).unwrap();
        for dir in DIRS {
            let what = format!("{spec:?} {dir:?}");
            let (y, ld) = run(b, &layer, &x, dir);
            let backward = |x: &Tensor, g_out: &Tensor, g_ld: &Tensor| {
                let (dx, gp) = match dir {
                    Direction::Forward => layer.forward_backward(b, &up(x), &up(g_out), &up(g_ld)),
                    Direction::Inverse => layer.inverse_backward(b, &up(x), &up(g_out), &up(g_ld)),
                }
                .unwrap();
                let gp: Vec<Tensor> = gp.iter().map(|g| b.download(g).unwrap()).collect();
                (b.download(&dx).unwrap(), gp)
            };
            let (dx, gp) = backward(&x, &g_out, &g_ld);
            // Same call twice: bit-identical (fixed reduction order).
            assert_eq!(
                backward(&x, &g_out, &g_ld),
                (dx.clone(), gp.clone()),
                "{what}: not deterministic"
            );
            // Pieces of the batch give the same rows, and their gradients add up.
            let mut sum: Vec<Tensor> = gp
                .iter()
                .map(|g| Tensor::zeros(g.rows(), g.cols()))
                .collect();
            for (lo, hi) in [(0, 1), (1, 300), (300, rows)] {
                let part = |t: &Tensor| t.slice_rows(lo, hi);
                let (yp, ldp) = run(b, &layer, &part(&x), dir);
                assert_close(
                    &format!("{what}: rows {lo}..{hi} output"),
                    &yp,
                    &part(&y),
                    1e-5,
                    1e-5,
                );
                assert_close(
                    &format!("{what}: rows {lo}..{hi} logdet"),
                    &ldp,
                    &part(&ld),
                    1e-5,
                    1e-5,
                );
                let (dxp, gpp) = backward(&part(&x), &part(&g_out), &part(&g_ld));
                assert_close(
                    &format!("{what}: rows {lo}..{hi} d_input"),
                    &dxp,
                    &part(&dx),
                    1e-5,
                    1e-5,
                );
                for (s, g) in sum.iter_mut().zip(&gpp) {
                    for (a, v) in s.data_mut().iter_mut().zip(g.data()) {
                        *a += v;
                    }
                }
            }
            for (i, (s, g)) in sum.iter().zip(&gp).enumerate() {
                assert_close(&format!("{what}: summed gradient {i}"), s, g, 1e-3, 1e-4);
            }
        }
    }
}

#[test]
fn batch_split_cpu() {
    check_batch_split(&Cpu);
}

// ---------------------------------------------------------------------------------------------
// Errors

#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: flowfuse::Result<T>, want: fn(&Error) -> bool, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(e) => assert!(want(&e), "{what}: wrong error {e:?}"),
    }
}

fn is_shape(e: &Error) -> bool {
    matches!(e, Error::Shape { .. })
}
fn is_invalid(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument(_))
}
fn is_non_finite(e: &Error) -> bool {
    matches!(e, Error::NonFinite { .. })
}
fn is_empty(e: &Error) -> bool {
    matches!(e, Error::Empty(_))
}

fn check_errors<B: Backend>(b: &B) {
    for spec in specs() {
        let layer = random_layer(b, spec, 1300);
        let net = &layer.net;
        let x = random_input(&spec, 4, 1301);
        let up = |t: &Tensor| b.upload(t).unwrap();
        let fwd = |spec: &CouplingSpec, net: &Mlp<B::Mat>, x: &Tensor| {
            b.coupling(spec, net, &up(x), Direction::Forward)
        };
        let what = format!("{spec:?}");

        // Wrong input width, either way.
        for cols in [spec.dim - 1, spec.dim + 1] {
            let bad = Tensor::zeros(4, cols);
            expect_err(
                fwd(&spec, net, &bad),
                is_shape,
                &format!("{what}: {cols} columns"),
            );
            expect_err(
                layer.inverse(b, &up(&bad)),
                is_shape,
                &format!("{what}: inverse {cols} columns"),
            );
        }
        // A conditioner built for another layer.
        let other = CouplingSpec {
            dim: spec.dim + 2,
            ..spec
        };
        let wrong_net = random_layer(b, other, 1302).net;
        expect_err(
            fwd(&spec, &wrong_net, &x),
            is_shape,
            &format!("{what}: conditioner shape"),
        );
        // Hidden layers that do not chain.
        let mut broken = net.clone();
        broken.layers.swap(0, 1);
        expect_err(
            fwd(&spec, &broken, &x),
            is_shape,
            &format!("{what}: broken conditioner"),
        );
        // NaN and infinity in the input and the parameters.
        for v in [f32::NAN, f32::INFINITY] {
            let mut bad = x.clone();
            bad.set(2, spec.dim - 1, v);
            expect_err(
                fwd(&spec, net, &bad),
                is_non_finite,
                &format!("{what}: {v} input"),
            );
            let mut bad_net = net.try_map(|t| b.download(t)).unwrap();
            bad_net.layers[1].w.set(0, 0, v);
            let bad_net = bad_net.try_map(|t| b.upload(t)).unwrap();
            expect_err(
                fwd(&spec, &bad_net, &x),
                is_non_finite,
                &format!("{what}: {v} weight"),
            );
        }
        // An empty batch.
        expect_err(
            fwd(&spec, net, &Tensor::zeros(0, spec.dim)),
            is_empty,
            &format!("{what}: empty"),
        );

        // Backward: upstream gradients of the wrong shape or not finite.
        let ok_out = Tensor::zeros(4, spec.dim);
        let ok_ld = Tensor::zeros(4, 1);
        let bwd = |d_out: &Tensor, d_ld: &Tensor| {
            b.coupling_backward(
                &spec,
                net,
                &up(&x),
                Direction::Inverse,
                &up(d_out),
                &up(d_ld),
            )
        };
        expect_err(
            bwd(&Tensor::zeros(4, spec.dim + 1), &ok_ld),
            is_shape,
            &format!("{what}: d_out cols"),
        );
        expect_err(
            bwd(&Tensor::zeros(3, spec.dim), &ok_ld),
            is_shape,
            &format!("{what}: d_out rows"),
        );
        expect_err(
            bwd(&ok_out, &Tensor::zeros(4, 2)),
            is_shape,
            &format!("{what}: d_logdet cols"),
        );
        expect_err(
            bwd(&ok_out, &Tensor::zeros(5, 1)),
            is_shape,
            &format!("{what}: d_logdet rows"),
        );
        let mut nan_ld = ok_ld.clone();
        nan_ld.set(1, 0, f32::NAN);
        expect_err(
            bwd(&ok_out, &nan_ld),
            is_non_finite,
            &format!("{what}: NaN d_logdet"),
        );
        let mut nan_out = ok_out.clone();
        nan_out.set(0, 0, f32::NAN);
        expect_err(
            bwd(&nan_out, &ok_ld),
            is_non_finite,
            &format!("{what}: NaN d_out"),
        );
        assert!(bwd(&ok_out, &ok_ld).is_ok(), "{what}: valid backward call");
    }

    // Bad specs: checked by the op and by the constructor.
    let mut rng = Rng::new(1400);
    let bad_kinds = [
        CouplingKind::Affine { clamp: 0.0 },
        CouplingKind::Affine { clamp: -1.0 },
        CouplingKind::Affine { clamp: f32::NAN },
        CouplingKind::Affine {
            clamp: f32::INFINITY,
        },
        CouplingKind::Spline {
            bins: 1,
            bound: 2.0,
        },
        CouplingKind::Spline {
            bins: 0,
            bound: 2.0,
        },
        CouplingKind::Spline {
            bins: 1000,
            bound: 2.0,
        },
        CouplingKind::Spline {
            bins: 4,
            bound: 0.0,
        },
        CouplingKind::Spline {
            bins: 4,
            bound: f32::NAN,
        },
    ];
    for kind in bad_kinds {
        let spec = CouplingSpec {
            dim: 4,
            copied: Half::Lower,
            kind,
        };
        expect_err(
            CouplingLayer::new(b, spec, &[8], Activation::Tanh, &mut rng),
            is_invalid,
            &format!("new {kind:?}"),
        );
        // The op itself, with a conditioner of matching shape.
        let net = Mlp::new(
            &[spec.net_in(), 8, spec.net_out().max(1)],
            Activation::Tanh,
            &mut rng,
        )
        .unwrap()
        .try_map(|t| b.upload(t))
        .unwrap();
        let x = b.upload(&Tensor::zeros(3, 4)).unwrap();
        expect_err(
            b.coupling(&spec, &net, &x, Direction::Forward),
            is_invalid,
            &format!("op {kind:?}"),
        );
    }
    let one_dim = CouplingSpec {
        dim: 1,
        copied: Half::Upper,
        kind: CouplingKind::Additive,
    };
    expect_err(
        CouplingLayer::new(b, one_dim, &[8], Activation::Tanh, &mut rng),
        is_invalid,
        "dim 1",
    );
    let spec = specs()[0];
    expect_err(
        CouplingLayer::new(b, spec, &[8, 0], Activation::Tanh, &mut rng),
        is_invalid,
        "zero hidden width",
    );
}

#[test]
fn errors_cpu() {
    check_errors(&Cpu);
}

fn check_from_state_errors<B: Backend>(b: &B) {
    let spec = CouplingSpec {
        dim: 5,
        copied: Half::Upper,
        kind: CouplingKind::Affine { clamp: 2.0 },
    };
    let good = random_layer(b, spec, 1500).state(b).unwrap();
    let edit = |f: &dyn Fn(&mut LayerState)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    type Case = (&'static str, LayerState, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (
            "not a coupling layer",
            edit(&|s| {
                s.config = LayerConfig::ActNorm {
                    dim: 5,
                    trainable: true,
                }
            }),
            is_invalid,
        ),
        ("no tensors", edit(&|s| s.tensors.clear()), is_invalid),
        (
            "odd tensor count",
            edit(&|s| {
                s.tensors.pop();
            }),
            is_invalid,
        ),
        (
            "wrong name",
            edit(&|s| s.tensors[2].0 = "w9".into()),
            is_invalid,
        ),
        ("swapped order", edit(&|s| s.tensors.swap(0, 1)), is_invalid),
        (
            "weight of the wrong height",
            edit(&|s| s.tensors[2].1 = Tensor::zeros(9, 7)),
            is_shape,
        ),
        (
            "bias of the wrong width",
            edit(&|s| s.tensors[1].1 = Tensor::zeros(1, 9)),
            is_shape,
        ),
        (
            "bias with two rows",
            edit(&|s| s.tensors[5].1 = Tensor::zeros(2, spec.net_out())),
            is_shape,
        ),
        (
            "output width does not fit the spec",
            edit(&|s| {
                s.tensors[4].1 = Tensor::zeros(7, 3);
                s.tensors[5].1 = Tensor::zeros(1, 3);
            }),
            is_shape,
        ),
        (
            "spec for another dimension",
            edit(&|s| {
                s.config = LayerConfig::Coupling {
                    spec: CouplingSpec { dim: 7, ..spec },
                    act: Activation::Tanh,
                }
            }),
            is_shape,
        ),
        (
            "bad clamp",
            edit(&|s| {
                s.config = LayerConfig::Coupling {
                    spec: CouplingSpec {
                        kind: CouplingKind::Affine { clamp: -1.0 },
                        ..spec
                    },
                    act: Activation::Tanh,
                }
            }),
            is_invalid,
        ),
        (
            "NaN weight",
            edit(&|s| s.tensors[2].1.set(0, 0, f32::NAN)),
            is_non_finite,
        ),
    ];
    for (what, state, want) in cases {
        expect_err(CouplingLayer::from_state(b, &state), want, what);
    }
    assert!(CouplingLayer::from_state(b, &good).is_ok());
}

#[test]
fn from_state_errors_cpu() {
    check_from_state_errors(&Cpu);
}

// The same bodies on the emulated grid (three thread orders) and on CUDA when present. The
// finite-difference backward check stays on the CPU (thousands of launches on the emulator);
// tests/parity_coupling.rs compares every kernel gradient with the CPU reference instead.
on_grid_backends!(grid_roundtrip, super::check_roundtrip);
on_grid_backends!(
    grid_logdet_matches_jacobian,
    super::check_logdet_matches_jacobian
);
on_grid_backends!(
    grid_new_layer_is_identity,
    super::check_new_layer_is_identity
);
on_grid_backends!(grid_state_roundtrip, super::check_state_roundtrip);

/// An op's outputs carry "checked finite" (so the next op skips its scan), and any mutable
/// access clears it: a NaN written into an op's output afterwards is still caught.
#[test]
fn a_checked_output_changed_afterwards_is_checked_again() {
    let b = Cpu;
    let spec = specs()[0];
    let layer = random_layer(&b, spec, 3);
    let x = random_input(&spec, 37, 4);
    assert!(!x.known_finite());
    let (mut z, ld) = layer.inverse(&b, &x).unwrap();
    assert!(z.known_finite() && ld.known_finite());
    assert!(z.clone().known_finite());
    assert!(layer.inverse(&b, &z).is_ok());
    z.data_mut()[5] = f32::NAN;
    assert!(!z.known_finite());
    match layer.inverse(&b, &z) {
        Err(Error::NonFinite { row, .. }) => assert_eq!(row, 5 / spec.dim),
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    let (mut y, _) = layer.forward(&b, &x).unwrap();
    y.set(0, 0, f32::INFINITY);
    assert!(!y.known_finite() && y.check_finite("y").is_err());
}

/// The CPU ops keep packed weights while the weights are unchanged. After a write to the
/// weights in place, the layer computes what a layer built from new copies of the written
/// weights computes (forward, and backward), not what the old packing would give; and
/// freeing the caches changes no result.
#[test]
fn packed_weights_follow_every_write() {
    let b = Cpu;
    let spec = specs()[0];
    let mut layer = random_layer(&b, spec, 3);
    let x = random_input(&spec, 300, 4);
    let d_z = random_input(&spec, 300, 5);
    let d_ld = Tensor::full(300, 1, 0.5);
    let pass = |l: &CouplingLayer<Cpu>| {
        let (z, ld) = l.inverse(&b, &x).unwrap();
        let (d_x, grads) = l.inverse_backward(&b, &x, &d_z, &d_ld).unwrap();
        (z, ld, d_x, grads)
    };
    let before = pass(&layer);
    assert_eq!(before, pass(&layer), "unchanged weights, same results");
    for p in layer.params_mut() {
        p.data_mut().iter_mut().for_each(|v| *v *= 0.5);
    }
    let after = pass(&layer);
    assert_ne!(before.0, after.0, "the written weights are used");
    let mut state = layer.state(&b).unwrap();
    for (_, t) in &mut state.tensors {
        *t = Tensor::from_vec(t.rows(), t.cols(), t.data().to_vec()).unwrap();
    }
    let fresh = CouplingLayer::from_state(&b, &state).unwrap();
    assert_eq!(after, pass(&fresh));
    flowfuse::backend::cpu::clear_caches();
    assert_eq!(after, pass(&layer));
}
