//! MADE, MAF and IAF: the autoregressive property, invertibility, log-determinants, every
//! backward against finite differences, and the typed errors. Test bodies are generic over
//! the backend and called with `Cpu` here.

mod common;

use flowfuse::backend::{Backend, Cpu};
use flowfuse::flows::autoregressive::AutoregressiveLayer;
use flowfuse::flows::{ArKind, FlowLayer, LayerConfig};
use flowfuse::nn::made::{HiddenDegrees, Order, layer_mask, made, made_with};
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::made::MadeSpec;
use flowfuse::testing::{assert_close, fd_jacobian, from_f64, log_abs_det, to_f64};
use flowfuse::{Direction, Error, Rng, Shaped, Tensor};

const CLAMP: f32 = 2.0;

/// A MADE with the degrees `made_with` chooses but random, non-zero weights everywhere,
/// dead ones included (the ops must ignore them) and the output layer (so that it is not the
/// identity).
fn random_made(
    dim: usize,
    hidden: &[usize],
    act: Activation,
    order: Order,
    rule: HiddenDegrees,
    seed: u64,
) -> (MadeSpec, Mlp<Tensor>) {
    let mut rng = Rng::new(seed);
    let (spec, _) = made_with(dim, hidden, act, order, rule, CLAMP, &mut rng).unwrap();
    let widths: Vec<usize> = spec.degrees.iter().map(Vec::len).collect();
    let net = Mlp::new(&widths, act, &mut rng).unwrap();
    (spec, net)
}

/// The network shapes and orders the structural tests sweep over.
fn cases() -> Vec<(usize, Vec<usize>, Order, HiddenDegrees)> {
    let mut v = Vec::new();
    for (i, d) in [2usize, 5, 8].into_iter().enumerate() {
        let w = d.max(3);
        v.push((d, vec![w + 4], Order::Natural, HiddenDegrees::Cycle));
        v.push((
            d,
            vec![w + 3, w + 1],
            Order::Random(7 + i as u64),
            HiddenDegrees::Cycle,
        ));
        v.push((
            d,
            vec![w + 2, w, w + 5],
            Order::Reversed,
            HiddenDegrees::Random(3),
        ));
        v.push((
            d,
            vec![w + 1, w + 2],
            Order::Random(11 + i as u64),
            HiddenDegrees::Random(5),
        ));
    }
    v
}

fn upload_net<B: Backend>(b: &B, net: &Mlp<Tensor>) -> Mlp<B::Mat> {
    net.try_map(|t| b.upload(t)).unwrap()
}

fn upload_degrees<B: Backend>(b: &B, spec: &MadeSpec) -> Vec<B::Idx> {
    spec.degrees
        .iter()
        .map(|d| b.upload_idx(d).unwrap())
        .collect()
}

/// The four transforms the ops offer.
#[derive(Clone, Copy, Debug)]
enum Pass {
    Parallel(Direction),
    Sequential(Direction),
}

const PASSES: [Pass; 4] = [
    Pass::Parallel(Direction::Forward),
    Pass::Parallel(Direction::Inverse),
    Pass::Sequential(Direction::Forward),
    Pass::Sequential(Direction::Inverse),
];

fn run<B: Backend>(
    b: &B,
    spec: &MadeSpec,
    net: &Mlp<Tensor>,
    pass: Pass,
    x: &Tensor,
) -> flowfuse::Result<(Tensor, Tensor)> {
    let (net, deg) = (upload_net(b, net), upload_degrees(b, spec));
    let xm = b.upload(x)?;
    let (y, ld) = match pass {
        Pass::Parallel(dir) => b.ar_parallel(spec, &net, &deg, &xm, dir)?,
        Pass::Sequential(dir) => b.ar_sequential(spec, &net, &deg, &xm, dir)?,
    };
    Ok((b.download(&y)?, b.download(&ld)?))
}

/// One row through `pass`, as an f64 map for finite differences.
fn row_map<B: Backend>(
    b: &B,
    spec: &MadeSpec,
    net: &Mlp<Tensor>,
    pass: Pass,
) -> impl Fn(&[f64]) -> Vec<f64> {
    move |x: &[f64]| {
        let (y, _) = run(b, spec, net, pass, &from_f64(1, x.len(), x)).unwrap();
        to_f64(&y)
    }
}

/// A row with entries of magnitude in [0.5, 1.5] and random signs (never near zero, so that
/// the log-scale can be read back as ln(y·e^s / y)).
fn away_from_zero(d: usize, rng: &mut Rng) -> Vec<f64> {
    (0..d)
        .map(|_| (0.5 + rng.uniform()) * if rng.uniform() < 0.5 { -1.0 } else { 1.0 })
        .collect()
}

fn check_made_outputs_are_autoregressive<B: Backend>(b: &B) {
    let mut rng = Rng::new(1);
    for (case, (d, hidden, order, rule)) in cases().into_iter().enumerate() {
        let (spec, net) = random_made(d, &hidden, Activation::Tanh, order, rule, 100 + case as u64);
        // Two copies of the network that expose the MADE outputs through the forward
        // transform x = y·e^s + b: with the log-scale columns zeroed, x = y + b; with the shift
        // columns zeroed, x = y·e^s.
        let mut shift_only = net.clone();
        let mut scale_only = net.clone();
        let last = net.layers.len() - 1;
        for (copy, keep_low) in [(&mut shift_only, true), (&mut scale_only, false)] {
            let l = &mut copy.layers[last];
            let cols = l.w.cols();
            for (k, v) in l.w.data_mut().iter_mut().enumerate() {
                if (k % cols < d) != keep_low {
                    *v = 0.0;
                }
            }
            for (c, v) in l.b.data_mut().iter_mut().enumerate() {
                if (c < d) != keep_low {
                    *v = 0.0;
                }
            }
        }
        let fwd = Pass::Parallel(Direction::Forward);
        let (f_shift, f_scale) = (
            row_map(b, &spec, &shift_only, fwd),
            row_map(b, &spec, &scale_only, fwd),
        );
        let made_out = |y: &[f64]| -> Vec<f64> {
            // The op sees y rounded to f32: use the same values here.
            let y32: Vec<f64> = y.iter().map(|&v| v as f32 as f64).collect();
            let (a, s) = (f_shift(&y32), f_scale(&y32));
            let mut out: Vec<f64> = a.iter().zip(&y32).map(|(a, y)| a - y).collect();
            out.extend(s.iter().zip(&y32).map(|(s, y)| (s / y).ln()));
            out
        };
        let y = away_from_zero(d, &mut rng);
        let jac = fd_jacobian(made_out, &y, 1e-3);
        let deg = &spec.degrees[0];
        let mut live = 0;
        for (o, row) in jac.iter().enumerate() {
            let i = o % d;
            for (j, &v) in row.iter().enumerate() {
                let what = format!(
                    "case {case} ({d}, {hidden:?}, {order:?}, {rule:?}): d out{o} / d in{j} = {v}"
                );
                if deg[j] >= deg[i] {
                    if j == i {
                        // Only rounding of y + b and y·e^s remains on the diagonal.
                        assert!(v.abs() < 1e-3, "{what}, want 0");
                    } else {
                        assert_eq!(v, 0.0, "{what}, want exactly 0");
                    }
                } else {
                    live += 1;
                    // With cycled hidden degrees every earlier input reaches every output.
                    if rule == HiddenDegrees::Cycle {
                        assert!(v.abs() > 1e-6, "{what}, want a dependence");
                    }
                }
            }
        }
        assert!(
            live > 0 || d < 2,
            "case {case}: nothing depends on anything"
        );
    }
}

#[test]
fn made_outputs_are_autoregressive() {
    check_made_outputs_are_autoregressive(&Cpu);
}

fn check_transform_jacobians_are_triangular<B: Backend>(b: &B) {
    let mut rng = Rng::new(2);
    for (case, (d, hidden, order, rule)) in cases().into_iter().enumerate() {
        let (spec, net) = random_made(d, &hidden, Activation::Tanh, order, rule, 200 + case as u64);
        let deg = &spec.degrees[0];
        for pass in PASSES {
            let x = to_f64(&Tensor::randn(1, d, &mut rng));
            let jac = fd_jacobian(row_map(b, &spec, &net, pass), &x, 1e-3);
            for (i, row) in jac.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let what = format!("case {case} {pass:?}: d out{i} / d in{j} = {v}");
                    if deg[j] > deg[i] {
                        assert_eq!(v, 0.0, "{what}, want exactly 0 (later in the order)");
                    } else if i == j {
                        // exp(±s) with |s| <= clamp.
                        assert!(
                            v > (-CLAMP as f64).exp() * 0.99 && v < (CLAMP as f64).exp() * 1.01,
                            "{what}, want exp(±s)"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn transform_jacobians_are_triangular_in_the_input_order() {
    check_transform_jacobians_are_triangular(&Cpu);
}

fn check_sequential_inverts_parallel<B: Backend>(b: &B) {
    let mut rng = Rng::new(3);
    // 1100 rows: several chunks of the CPU backend, the last one partial.
    let rows = 1100;
    for (case, (d, hidden, order, rule)) in cases().into_iter().enumerate() {
        let (spec, net) = random_made(d, &hidden, Activation::Relu, order, rule, 300 + case as u64);
        let u = Tensor::randn(rows, d, &mut rng);
        for dir in [Direction::Forward, Direction::Inverse] {
            // MAF: sample with the sequential pass, evaluate with the parallel one (dir =
            // Forward); IAF: the other way round (dir = Inverse).
            let (y, ld_seq) = run(b, &spec, &net, Pass::Sequential(dir), &u).unwrap();
            let (back, ld_par) = run(b, &spec, &net, Pass::Parallel(dir.reversed()), &y).unwrap();
            let what = format!("case {case} sequential {dir:?} then parallel");
            assert_close(&what, &back, &u, 1e-4, 1e-4);
            let neg = ld_par.map(|v| -v);
            assert_close(&format!("{what}: logdet"), &ld_seq, &neg, 1e-4, 1e-4);

            let (y, ld_par) = run(b, &spec, &net, Pass::Parallel(dir), &u).unwrap();
            let (back, ld_seq) = run(b, &spec, &net, Pass::Sequential(dir.reversed()), &y).unwrap();
            let what = format!("case {case} parallel {dir:?} then sequential");
            assert_close(&what, &back, &u, 1e-4, 1e-4);
            let neg = ld_seq.map(|v| -v);
            assert_close(&format!("{what}: logdet"), &ld_par, &neg, 1e-4, 1e-4);
        }
    }
}

#[test]
fn sequential_pass_inverts_parallel_pass() {
    check_sequential_inverts_parallel(&Cpu);
}

fn check_logdet_matches_jacobian<B: Backend>(b: &B) {
    let mut rng = Rng::new(4);
    for (case, (d, hidden, order, rule)) in cases().into_iter().enumerate() {
        let (spec, net) = random_made(d, &hidden, Activation::Silu, order, rule, 400 + case as u64);
        for pass in PASSES {
            let x = Tensor::randn(1, d, &mut rng);
            let (_, ld) = run(b, &spec, &net, pass, &x).unwrap();
            let jac = fd_jacobian(row_map(b, &spec, &net, pass), &to_f64(&x), 1e-3);
            let want = log_abs_det(&jac);
            let got = ld.get(0, 0) as f64;
            assert!(
                (got - want).abs() < 2e-3,
                "case {case} {pass:?}: logdet {got} vs log|det J| {want}"
            );
        }
    }
}

#[test]
fn logdet_equals_log_abs_det_of_the_jacobian() {
    check_logdet_matches_jacobian(&Cpu);
}

/// L = Σ c ⊙ out + Σ c_ld ⊙ logdet through one direction of a layer.
fn layer_loss<B: Backend>(
    b: &B,
    layer: &AutoregressiveLayer<B>,
    forward: bool,
    x: &Tensor,
    c: &Tensor,
    c_ld: &Tensor,
) -> f64 {
    let xm = b.upload(x).unwrap();
    let (y, ld) = if forward {
        layer.forward(b, &xm).unwrap()
    } else {
        layer.inverse(b, &xm).unwrap()
    };
    let (y, ld) = (b.download(&y).unwrap(), b.download(&ld).unwrap());
    let dot = |a: &Tensor, w: &Tensor| -> f64 {
        a.data()
            .iter()
            .zip(w.data())
            .map(|(&u, &v)| u as f64 * v as f64)
            .sum()
    };
    dot(&y, c) + dot(&ld, c_ld)
}

/// Central difference of `loss` in entry `i` of `t`, using the step actually representable in
/// f32.
fn central_difference(t: &Tensor, i: usize, eps: f32, loss: impl Fn(&Tensor) -> f64) -> f64 {
    let (mut plus, mut minus) = (t.clone(), t.clone());
    plus.data_mut()[i] += eps;
    minus.data_mut()[i] -= eps;
    let h = plus.data()[i] as f64 - minus.data()[i] as f64;
    (loss(&plus) - loss(&minus)) / h
}

fn assert_grad(what: &str, analytic: f64, fd: f64) {
    let tol = 2e-4 + 5e-3 * fd.abs();
    assert!(
        (analytic - fd).abs() <= tol,
        "{what}: analytic {analytic:.6e} vs finite difference {fd:.6e}"
    );
}

fn check_backward_matches_finite_differences<B: Backend>(b: &B) {
    let mut rng = Rng::new(5);
    let eps = 1e-2f32;
    let shapes: [(usize, Vec<usize>, Order, HiddenDegrees); 3] = [
        (5, vec![8, 6], Order::Random(9), HiddenDegrees::Cycle),
        (2, vec![5], Order::Reversed, HiddenDegrees::Cycle),
        (4, vec![6, 5], Order::Natural, HiddenDegrees::Random(2)),
    ];
    for (case, (d, hidden, order, rule)) in shapes.into_iter().enumerate() {
        let (spec, host) =
            random_made(d, &hidden, Activation::Tanh, order, rule, 500 + case as u64);
        let rows = 3;
        let x = Tensor::randn(rows, d, &mut rng);
        let c = Tensor::randn(rows, d, &mut rng);
        let c_ld = Tensor::randn(rows, 1, &mut rng);
        let (cm, cldm) = (b.upload(&c).unwrap(), b.upload(&c_ld).unwrap());
        for kind in [ArKind::Maf, ArKind::Iaf] {
            let layer = AutoregressiveLayer::from_host(b, kind, spec.clone(), &host).unwrap();
            for forward in [true, false] {
                let what = format!(
                    "case {case} {kind:?} {}",
                    if forward { "forward" } else { "inverse" }
                );
                let xm = b.upload(&x).unwrap();
                let (dx, grads) = if forward {
                    layer.forward_backward(b, &xm, &cm, &cldm).unwrap()
                } else {
                    layer.inverse_backward(b, &xm, &cm, &cldm).unwrap()
                };
                let dx = b.download(&dx).unwrap();
                for i in 0..x.len() {
                    let fd = central_difference(&x, i, eps, |xp| {
                        layer_loss(b, &layer, forward, xp, &c, &c_ld)
                    });
                    assert_grad(&format!("{what}: d input[{i}]"), dx.data()[i] as f64, fd);
                }
                let names = host.tensor_names();
                assert_eq!(
                    grads.len(),
                    names.len(),
                    "{what}: one gradient per parameter"
                );
                for (ti, g) in grads.iter().enumerate() {
                    let g = b.download(g).unwrap();
                    let p = host.tensors()[ti];
                    assert_eq!(
                        g.shape(),
                        p.shape(),
                        "{what}: gradient shape of {}",
                        names[ti]
                    );
                    // Weights carry a mask; biases are always live.
                    let mask = (ti % 2 == 0).then(|| layer_mask(&spec, ti / 2).unwrap());
                    for i in 0..g.len() {
                        let an = g.data()[i] as f64;
                        let fd = central_difference(p, i, eps, |pp| {
                            let mut net = host.clone();
                            *net.tensors_mut()[ti] = pp.clone();
                            let l = AutoregressiveLayer::from_host(b, kind, spec.clone(), &net)
                                .unwrap();
                            layer_loss(b, &l, forward, &x, &c, &c_ld)
                        });
                        let what = format!("{what}: d {}[{i}]", names[ti]);
                        if mask.as_ref().is_some_and(|m| m.data()[i] == 0.0) {
                            assert_eq!(an, 0.0, "{what}: a dead weight needs exactly 0");
                            assert_eq!(fd, 0.0, "{what}: the loss must not see a dead weight");
                        } else {
                            assert_grad(&what, an, fd);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_backward_matches_finite_differences() {
    check_backward_matches_finite_differences(&Cpu);
}

/// The batch gradient is the sum of per-row gradients however the rows are chunked.
fn check_backward_sums_over_rows<B: Backend>(b: &B) {
    let mut rng = Rng::new(6);
    let (spec, host) = random_made(
        6,
        &[20, 20],
        Activation::Silu,
        Order::Random(1),
        HiddenDegrees::Cycle,
        600,
    );
    let (net, deg) = (upload_net(b, &host), upload_degrees(b, &spec));
    let rows = 600;
    let x = Tensor::randn(rows, 6, &mut rng);
    let go = Tensor::randn(rows, 6, &mut rng);
    let gl = Tensor::randn(rows, 1, &mut rng);
    for dir in [Direction::Forward, Direction::Inverse] {
        let up = |t: &Tensor| b.upload(t).unwrap();
        let (dx, g) = b
            .ar_parallel_backward(&spec, &net, &deg, &up(&x), dir, &up(&go), &up(&gl))
            .unwrap();
        let mut dx_parts = Vec::new();
        let mut g_sum: Option<Vec<Tensor>> = None;
        for (s, e) in [(0, 1), (1, 257), (257, 600)] {
            let (dxp, gp) = b
                .ar_parallel_backward(
                    &spec,
                    &net,
                    &deg,
                    &up(&x.slice_rows(s, e)),
                    dir,
                    &up(&go.slice_rows(s, e)),
                    &up(&gl.slice_rows(s, e)),
                )
                .unwrap();
            dx_parts.push(b.download(&dxp).unwrap());
            let gp: Vec<Tensor> = gp
                .tensors()
                .iter()
                .map(|t| b.download(t).unwrap())
                .collect();
            g_sum = Some(match g_sum {
                None => gp,
                Some(acc) => acc
                    .iter()
                    .zip(&gp)
                    .map(|(a, p)| {
                        Tensor::from_fn(a.rows(), a.cols(), |i, j| a.get(i, j) + p.get(i, j))
                    })
                    .collect(),
            });
        }
        let parts: Vec<&Tensor> = dx_parts.iter().collect();
        assert_close(
            "d input",
            &b.download(&dx).unwrap(),
            &Tensor::vstack(&parts).unwrap(),
            1e-5,
            1e-5,
        );
        for (t, want) in g.tensors().iter().zip(g_sum.unwrap()) {
            assert_close(
                "parameter gradient",
                &b.download(t).unwrap(),
                &want,
                1e-3,
                1e-4,
            );
        }
    }
}

#[test]
fn backward_is_the_sum_over_rows() {
    check_backward_sums_over_rows(&Cpu);
}

fn check_narrow_hidden_layers<B: Backend>(b: &B) {
    // Hidden widths below D − 1 leave some inputs disconnected: legal MADE, still invertible.
    let mut rng = Rng::new(7);
    let (spec, net) = random_made(
        8,
        &[3, 2],
        Activation::Tanh,
        Order::Random(4),
        HiddenDegrees::Cycle,
        700,
    );
    let z = Tensor::randn(50, 8, &mut rng);
    let (x, ld) = run(b, &spec, &net, Pass::Sequential(Direction::Forward), &z).unwrap();
    let (back, ld_back) = run(b, &spec, &net, Pass::Parallel(Direction::Inverse), &x).unwrap();
    assert_close("narrow MADE round trip", &back, &z, 1e-4, 1e-4);
    assert_close("narrow MADE logdet", &ld, &ld_back.map(|v| -v), 1e-4, 1e-4);
}

#[test]
fn narrow_hidden_layers_are_legal() {
    check_narrow_hidden_layers(&Cpu);
}

fn check_new_layer_is_identity<B: Backend>(b: &B) {
    let mut rng = Rng::new(8);
    let z = Tensor::randn(10, 5, &mut rng);
    for kind in [ArKind::Maf, ArKind::Iaf] {
        let layer = AutoregressiveLayer::new(
            b,
            kind,
            5,
            &[16, 16],
            Activation::Relu,
            Order::Reversed,
            CLAMP,
            &mut rng,
        )
        .unwrap();
        let zm = b.upload(&z).unwrap();
        for (y, ld) in [
            layer.forward(b, &zm).unwrap(),
            layer.inverse(b, &zm).unwrap(),
        ] {
            assert_eq!(
                b.download(&y).unwrap(),
                z,
                "{kind:?}: a new layer is the identity"
            );
            assert!(b.download(&ld).unwrap().data().iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn a_new_layer_starts_as_the_identity() {
    check_new_layer_is_identity(&Cpu);
}

#[test]
fn made_chooses_valid_degrees() {
    let mut rng = Rng::new(9);
    for d in [2usize, 3, 7] {
        for order in [Order::Natural, Order::Reversed, Order::Random(3)] {
            for rule in [HiddenDegrees::Cycle, HiddenDegrees::Random(4)] {
                let (spec, net) = made_with(
                    d,
                    &[10, 4, 9],
                    Activation::Tanh,
                    order,
                    rule,
                    CLAMP,
                    &mut rng,
                )
                .unwrap();
                let mut input = spec.degrees[0].clone();
                input.sort_unstable();
                assert_eq!(input, (1..=d as u32).collect::<Vec<_>>(), "a permutation");
                for hidden in &spec.degrees[1..spec.degrees.len() - 1] {
                    assert!(hidden.is_sorted());
                    assert!(hidden.iter().all(|&k| k >= 1 && (k as usize) < d));
                }
                assert_eq!(net.widths(), vec![d, 10, 4, 9, 2 * d]);
                let last = net.layers.last().unwrap();
                assert!(last.w.data().iter().chain(last.b.data()).all(|&v| v == 0.0));
            }
        }
    }
    let (spec, _) = made(4, &[6], Activation::Relu, Order::Natural, CLAMP, &mut rng).unwrap();
    assert_eq!(spec.degrees[0], vec![1, 2, 3, 4]);
    assert_eq!(spec.degrees[1], vec![1, 1, 2, 2, 3, 3]);
    assert_eq!(spec.degrees[2], vec![1, 2, 3, 4, 1, 2, 3, 4]);
    let (spec, _) = made(4, &[6], Activation::Relu, Order::Reversed, CLAMP, &mut rng).unwrap();
    assert_eq!(spec.degrees[0], vec![4, 3, 2, 1]);
}

fn check_state_round_trip<B: Backend>(b: &B) {
    let mut rng = Rng::new(10);
    let (spec, host) = random_made(
        5,
        &[9, 7],
        Activation::Silu,
        Order::Random(2),
        HiddenDegrees::Cycle,
        1000,
    );
    let x = b.upload(&Tensor::randn(4, 5, &mut rng)).unwrap();
    for kind in [ArKind::Maf, ArKind::Iaf] {
        let layer = AutoregressiveLayer::from_host(b, kind, spec.clone(), &host).unwrap();
        let state = layer.state(b).unwrap();
        assert!(matches!(&state.config, LayerConfig::Autoregressive { kind: k, .. } if *k == kind));
        let names: Vec<&str> = state.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["w0", "b0", "w1", "b1", "w2", "b2"]);
        let again = AutoregressiveLayer::from_state(b, &state).unwrap();
        let pairs = [
            (layer.forward(b, &x).unwrap(), again.forward(b, &x).unwrap()),
            (layer.inverse(b, &x).unwrap(), again.inverse(b, &x).unwrap()),
        ];
        for (a, c) in pairs {
            assert_eq!(b.download(&a.0).unwrap(), b.download(&c.0).unwrap());
            assert_eq!(b.download(&a.1).unwrap(), b.download(&c.1).unwrap());
        }
        // A wrong name, a missing tensor, a wrong shape, another layer's config.
        let mut bad = state.clone();
        bad.tensors[2].0 = "w9".into();
        assert!(matches!(
            AutoregressiveLayer::<B>::from_state(b, &bad),
            Err(Error::InvalidArgument(_))
        ));
        let mut bad = state.clone();
        bad.tensors.pop();
        assert!(matches!(
            AutoregressiveLayer::<B>::from_state(b, &bad),
            Err(Error::InvalidArgument(_))
        ));
        let mut bad = state.clone();
        bad.tensors[1].1 = Tensor::zeros(1, 3);
        assert!(matches!(
            AutoregressiveLayer::<B>::from_state(b, &bad),
            Err(Error::Shape { .. })
        ));
        let mut bad = state.clone();
        bad.tensors[0].1.data_mut()[0] = f32::NAN;
        assert!(matches!(
            AutoregressiveLayer::<B>::from_state(b, &bad),
            Err(Error::NonFinite { .. })
        ));
        let mut bad = state.clone();
        bad.config = LayerConfig::ActNorm {
            dim: 5,
            trainable: true,
        };
        assert!(matches!(
            AutoregressiveLayer::<B>::from_state(b, &bad),
            Err(Error::InvalidArgument(_))
        ));
    }
}

#[test]
fn state_round_trips_and_bad_states_are_rejected() {
    check_state_round_trip(&Cpu);
}

fn check_errors<B: Backend>(b: &B) {
    let mut rng = Rng::new(11);
    let (spec, host) = random_made(
        4,
        &[6, 5],
        Activation::Tanh,
        Order::Natural,
        HiddenDegrees::Cycle,
        1100,
    );
    let x = Tensor::randn(3, 4, &mut rng);
    let invalid =
        |r: flowfuse::Result<(Tensor, Tensor)>| matches!(r, Err(Error::InvalidArgument(_)));
    for pass in PASSES {
        assert!(run(b, &spec, &host, pass, &x).is_ok());

        // Degrees: not a permutation, hidden out of range, unsorted hidden, outputs that do not
        // repeat the inputs, dim < 2.
        let mut bad = spec.clone();
        bad.degrees[0] = vec![1, 2, 2, 4];
        assert!(
            invalid(run(b, &bad, &host, pass, &x)),
            "{pass:?}: repeated input degree"
        );
        let mut bad = spec.clone();
        bad.degrees[1][0] = 0;
        assert!(
            invalid(run(b, &bad, &host, pass, &x)),
            "{pass:?}: hidden degree 0"
        );
        let mut bad = spec.clone();
        *bad.degrees[2].last_mut().unwrap() = 4;
        assert!(
            invalid(run(b, &bad, &host, pass, &x)),
            "{pass:?}: hidden degree D"
        );
        let mut bad = spec.clone();
        bad.degrees[1].reverse();
        assert!(
            invalid(run(b, &bad, &host, pass, &x)),
            "{pass:?}: unsorted hidden degrees"
        );
        let mut bad = spec.clone();
        bad.degrees[3].swap(0, 1);
        assert!(
            invalid(run(b, &bad, &host, pass, &x)),
            "{pass:?}: output degrees"
        );
        let mut bad = spec.clone();
        bad.clamp = 0.0;
        assert!(invalid(run(b, &bad, &host, pass, &x)), "{pass:?}: clamp 0");
        let mut bad = spec.clone();
        bad.dim = 1;
        assert!(invalid(run(b, &bad, &host, pass, &x)), "{pass:?}: dim 1");

        // Widths: a degree vector of the wrong length, a net of the wrong width, a batch of the
        // wrong width.
        let mut bad = spec.clone();
        bad.degrees[1].push(3);
        assert!(matches!(
            run(b, &bad, &host, pass, &x),
            Err(Error::Shape { .. })
        ));
        let (_, wide) = random_made(
            4,
            &[7, 5],
            Activation::Tanh,
            Order::Natural,
            HiddenDegrees::Cycle,
            1,
        );
        assert!(matches!(
            run(b, &spec, &wide, pass, &x),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            run(b, &spec, &host, pass, &Tensor::zeros(3, 5)),
            Err(Error::Shape { .. })
        ));

        // Values: NaN and infinite input, NaN weight, empty batch.
        let mut nan = x.clone();
        nan.set(1, 2, f32::NAN);
        assert!(matches!(
            run(b, &spec, &host, pass, &nan),
            Err(Error::NonFinite { row: 1, col: 2, .. })
        ));
        // Deep inside a long batch too (not only in a short tail).
        let mut big = Tensor::randn(300, 4, &mut Rng::new(13));
        big.set(250, 1, f32::NAN);
        assert!(matches!(
            run(b, &spec, &host, pass, &big),
            Err(Error::NonFinite {
                row: 250,
                col: 1,
                ..
            })
        ));
        big.set(250, 1, f32::NEG_INFINITY);
        assert!(matches!(
            run(b, &spec, &host, pass, &big),
            Err(Error::NonFinite {
                row: 250,
                col: 1,
                ..
            })
        ));
        let mut inf = x.clone();
        inf.set(0, 0, f32::INFINITY);
        assert!(matches!(
            run(b, &spec, &host, pass, &inf),
            Err(Error::NonFinite { .. })
        ));
        let mut nan_net = host.clone();
        nan_net.layers[1].w.data_mut()[3] = f32::NAN;
        assert!(matches!(
            run(b, &spec, &nan_net, pass, &x),
            Err(Error::NonFinite { .. })
        ));
        assert!(matches!(
            run(b, &spec, &host, pass, &Tensor::zeros(0, 4)),
            Err(Error::Empty(_))
        ));
    }

    // A result that overflows is an error, not a silent infinity: a wide clamp lets s reach
    // ~120, and e^120 does not fit in f32.
    let mut wide = spec.clone();
    wide.clamp = 200.0;
    let mut big_s = host.clone();
    let last = big_s.layers.len() - 1;
    big_s.layers[last].b.data_mut()[4..].fill(150.0);
    for pass in [
        Pass::Parallel(Direction::Forward),
        Pass::Sequential(Direction::Forward),
    ] {
        assert!(
            matches!(
                run(b, &wide, &big_s, pass, &x),
                Err(Error::NonFinite { .. })
            ),
            "{pass:?}: overflow"
        );
    }

    // Uploaded degrees that disagree with the spec.
    let net = upload_net(b, &host);
    let mut other = spec.clone();
    other.degrees[0] = vec![2, 1, 3, 4];
    other.degrees[3] = vec![2, 1, 3, 4, 2, 1, 3, 4];
    let deg = upload_degrees(b, &other);
    let xm = b.upload(&x).unwrap();
    assert!(matches!(
        b.ar_parallel(&spec, &net, &deg, &xm, Direction::Forward),
        Err(Error::InvalidArgument(_))
    ));

    // Backward: gradients of the wrong shape or not finite.
    let deg = upload_degrees(b, &spec);
    let up = |t: &Tensor| b.upload(t).unwrap();
    let gl = Tensor::zeros(3, 1);
    let r = b.ar_parallel_backward(
        &spec,
        &net,
        &deg,
        &xm,
        Direction::Inverse,
        &up(&Tensor::zeros(3, 3)),
        &up(&gl),
    );
    assert!(matches!(r, Err(Error::Shape { .. })));
    let r = b.ar_parallel_backward(
        &spec,
        &net,
        &deg,
        &xm,
        Direction::Inverse,
        &up(&x),
        &up(&Tensor::zeros(2, 1)),
    );
    assert!(matches!(r, Err(Error::Shape { .. })));
    let mut nan_go = x.clone();
    nan_go.set(2, 3, f32::NAN);
    let r = b.ar_parallel_backward(
        &spec,
        &net,
        &deg,
        &xm,
        Direction::Inverse,
        &up(&nan_go),
        &up(&gl),
    );
    assert!(matches!(r, Err(Error::NonFinite { .. })));

    // Construction: dim < 2, no or zero-width hidden layers, bad clamp.
    let mut rng = Rng::new(12);
    let act = Activation::Relu;
    assert!(matches!(
        made(1, &[4], act, Order::Natural, CLAMP, &mut rng),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        made(0, &[4], act, Order::Natural, CLAMP, &mut rng),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        made(3, &[], act, Order::Natural, CLAMP, &mut rng),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        made(3, &[4, 0], act, Order::Natural, CLAMP, &mut rng),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        made(3, &[4], act, Order::Natural, f32::NAN, &mut rng),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        made(3, &[4], act, Order::Natural, -1.0, &mut rng),
        Err(Error::InvalidArgument(_))
    ));
    let r = AutoregressiveLayer::new(
        b,
        ArKind::Maf,
        1,
        &[4],
        act,
        Order::Natural,
        CLAMP,
        &mut rng,
    );
    assert!(matches!(r, Err(Error::InvalidArgument(_))));

    // The layer's backward checks its gradients' shapes too.
    for kind in [ArKind::Maf, ArKind::Iaf] {
        let layer = AutoregressiveLayer::from_host(b, kind, spec.clone(), &host).unwrap();
        let bad_go = up(&Tensor::zeros(3, 2));
        assert!(layer.forward_backward(b, &xm, &bad_go, &up(&gl)).is_err());
        assert!(layer.inverse_backward(b, &xm, &bad_go, &up(&gl)).is_err());
    }
}

#[test]
fn bad_inputs_give_typed_errors() {
    check_errors(&Cpu);
}

// The same bodies on the emulated grid (three thread orders) and on CUDA when present.
on_grid_backends!(
    grid_made_outputs_are_autoregressive,
    super::check_made_outputs_are_autoregressive
);
on_grid_backends!(
    grid_transform_jacobians_are_triangular,
    super::check_transform_jacobians_are_triangular
);
on_grid_backends!(
    grid_sequential_inverts_parallel,
    super::check_sequential_inverts_parallel
);
on_grid_backends!(
    grid_logdet_matches_jacobian,
    super::check_logdet_matches_jacobian
);
on_grid_backends!(
    grid_backward_matches_finite_differences,
    super::check_backward_matches_finite_differences
);
on_grid_backends!(grid_narrow_hidden_layers, super::check_narrow_hidden_layers);
on_grid_backends!(
    grid_new_layer_is_identity,
    super::check_new_layer_is_identity
);

/// The CPU ops keep each network's packed plan while its weights are unchanged. After a write
/// to the weights in place, every pass gives what new copies of the written weights give, not
/// what the old plan would; and freeing the caches changes no result.
#[test]
fn plans_follow_every_write() {
    let b = Cpu;
    let (spec, mut net) = random_made(
        5,
        &[16, 16],
        Activation::Relu,
        Order::Natural,
        HiddenDegrees::Cycle,
        7,
    );
    let x = Tensor::randn(300, 5, &mut Rng::new(8));
    let passes = |net: &Mlp<Tensor>| -> Vec<(Tensor, Tensor)> {
        PASSES
            .iter()
            .map(|&p| run(&b, &spec, net, p, &x).unwrap())
            .collect()
    };
    let before = passes(&net);
    assert_eq!(before, passes(&net), "unchanged weights, same results");
    for t in net.tensors_mut() {
        t.data_mut().iter_mut().for_each(|v| *v *= 0.5);
    }
    let after = passes(&net);
    assert_ne!(before[0], after[0], "the written weights are used");
    let copies = net
        .tensors()
        .into_iter()
        .map(|t| Tensor::from_vec(t.rows(), t.cols(), t.data().to_vec()).unwrap());
    let fresh = Mlp::from_tensors(net.act, copies.collect()).unwrap();
    assert_eq!(after, passes(&fresh));
    flowfuse::backend::cpu::clear_caches();
    assert_eq!(after, passes(&net));
}
