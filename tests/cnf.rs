//! Vector-field ops and the continuous flow: the exact divergence against the trace of an f64
//! Jacobian, Hutchinson's estimator (unbiased, reproducible probes), every piece of the VJP of
//! the augmented dynamics against central differences in f64, round trips, the density of a
//! trained 2-D CNF integrating to one, and typed errors.
//!
//! Test bodies are generic over the backend and run here on `Cpu`.

mod cnf_support;

use cnf_support::{Net64, assert_all_close, rows64};
use flowfuse::Error;
use flowfuse::backend::{Backend, Cpu};
use flowfuse::nn::{Activation, Mlp};
use flowfuse::ops::rk45::{DivCotangent, ParamGrads, ProbeKind, Rk45Ops, TraceMode, probes};
use flowfuse::rng::Rng;
use flowfuse::tensor::{Shaped, Tensor};
use flowfuse::testing::fd_gradient;

const SMOOTH: [Activation; 3] = [Activation::Tanh, Activation::Silu, Activation::Softplus];

/// A field D+1 → 9 → 7 → D with random (PyTorch-style) weights, scaled up a little so that the
/// activations work in their nonlinear range.
fn random_field(dim: usize, act: Activation, seed: u64) -> Mlp<Tensor> {
    let mut rng = Rng::new(seed);
    let mut net = Mlp::new(&[dim + 1, 9, 7, dim], act, &mut rng).unwrap();
    for t in net.tensors_mut() {
        *t = t.map(|v| 1.7 * v);
    }
    net
}

fn batch(rows: usize, dim: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let z = Tensor::randn(rows, dim, &mut rng);
    let t = Tensor::rand_uniform(rows, 1, 0.0, 1.0, &mut rng);
    (z, t)
}

fn upload_net<B: Backend>(b: &B, net: &Mlp<Tensor>) -> Mlp<B::Mat> {
    net.try_map(|t| b.upload(t)).unwrap()
}

// ------------------------------------------------------------------ field and divergence

fn check_field_matches_f64<B: Backend>(b: &B) {
    for act in SMOOTH {
        let net = random_field(3, act, 1);
        let (z, t) = batch(37, 3, 2);
        let f = b
            .download(
                &b.field(
                    &upload_net(b, &net),
                    &b.upload(&z).unwrap(),
                    &b.upload(&t).unwrap(),
                )
                .unwrap(),
            )
            .unwrap();
        let r = Net64::from_mlp(&net);
        let want: Vec<f64> = rows64(&z)
            .iter()
            .zip(t.data())
            .flat_map(|(zr, &tr)| r.f(zr, tr as f64))
            .collect();
        let got: Vec<f64> = f.data().iter().map(|&v| v as f64).collect();
        assert_all_close(&format!("{act:?} field"), &got, &want, 1e-5, 1e-5);
    }
}

#[test]
fn field_matches_f64_reference() {
    check_field_matches_f64(&Cpu);
}

fn check_exact_divergence<B: Backend>(b: &B) {
    for act in SMOOTH {
        for dim in [1, 2, 5] {
            let net = random_field(dim, act, 3 + dim as u64);
            let (z, t) = batch(300, dim, 4);
            let (f, div) = b
                .field_div(
                    &upload_net(b, &net),
                    &b.upload(&z).unwrap(),
                    &b.upload(&t).unwrap(),
                    TraceMode::Exact,
                )
                .unwrap();
            let (f, div) = (b.download(&f).unwrap(), b.download(&div).unwrap());
            assert_eq!(div.shape(), (300, 1));
            let r = Net64::from_mlp(&net);
            // The trace of a central-difference Jacobian of the f64 reference.
            let want: Vec<f64> = rows64(&z)
                .iter()
                .zip(t.data())
                .map(|(zr, &tr)| {
                    let jac = flowfuse::testing::fd_jacobian(|x| r.f(x, tr as f64), zr, 1e-6);
                    (0..dim).map(|i| jac[i][i]).sum()
                })
                .collect();
            let got: Vec<f64> = div.data().iter().map(|&v| v as f64).collect();
            assert_all_close(
                &format!("{act:?} D={dim} exact div"),
                &got,
                &want,
                2e-5,
                2e-5,
            );
            let plain = b
                .download(
                    &b.field(
                        &upload_net(b, &net),
                        &b.upload(&z).unwrap(),
                        &b.upload(&t).unwrap(),
                    )
                    .unwrap(),
                )
                .unwrap();
            assert_eq!(f, plain, "field_div's f equals field's");
        }
    }
}

#[test]
fn exact_divergence_is_the_trace_of_the_jacobian() {
    check_exact_divergence(&Cpu);
}

fn check_hutchinson_matches_quadratic_form<B: Backend>(b: &B) {
    let dim = 4;
    for (kind, m) in [(ProbeKind::Rademacher, 3), (ProbeKind::Gaussian, 2)] {
        let net = random_field(dim, Activation::Silu, 7);
        let (z, t) = batch(290, dim, 8);
        let p = probes(290, dim, m, kind, 99).unwrap();
        let (_, div) = b
            .field_div(
                &upload_net(b, &net),
                &b.upload(&z).unwrap(),
                &b.upload(&t).unwrap(),
                TraceMode::Hutchinson(&b.upload(&p).unwrap()),
            )
            .unwrap();
        let div = b.download(&div).unwrap();
        let r = Net64::from_mlp(&net);
        let want: Vec<f64> = (0..290)
            .map(|i| {
                let zr: Vec<f64> = z.row(i).iter().map(|&v| v as f64).collect();
                let pr: Vec<f64> = p.row(i).iter().map(|&v| v as f64).collect();
                r.div_probes(&zr, t.get(i, 0) as f64, &pr)
            })
            .collect();
        let got: Vec<f64> = div.data().iter().map(|&v| v as f64).collect();
        assert_all_close(&format!("{kind:?} Hutchinson div"), &got, &want, 2e-5, 2e-5);
    }
}

#[test]
fn hutchinson_is_the_mean_quadratic_form_of_the_probes() {
    check_hutchinson_matches_quadratic_form(&Cpu);
}

/// Over many probes the estimate's mean is within a few standard errors of the exact trace.
fn check_hutchinson_unbiased<B: Backend>(b: &B) {
    let dim = 3;
    let net = random_field(dim, Activation::Tanh, 11);
    let (z, t) = batch(4, dim, 12);
    let (netd, zd, td) = (
        upload_net(b, &net),
        b.upload(&z).unwrap(),
        b.upload(&t).unwrap(),
    );
    let exact = b
        .download(&b.field_div(&netd, &zd, &td, TraceMode::Exact).unwrap().1)
        .unwrap();
    for kind in [ProbeKind::Rademacher, ProbeKind::Gaussian] {
        // One probe per estimate, 4000 estimates per row (one solve-sized batch each).
        let n = 4000;
        let mut sums = vec![(0.0f64, 0.0f64); 4];
        for seed in 0..n as u64 {
            let p = probes(4, dim, 1, kind, seed).unwrap();
            let d = b
                .download(
                    &b.field_div(
                        &netd,
                        &zd,
                        &td,
                        TraceMode::Hutchinson(&b.upload(&p).unwrap()),
                    )
                    .unwrap()
                    .1,
                )
                .unwrap();
            for (s, &v) in sums.iter_mut().zip(d.data()) {
                s.0 += v as f64;
                s.1 += (v as f64) * (v as f64);
            }
        }
        for (row, (s, s2)) in sums.iter().enumerate() {
            let mean = s / n as f64;
            let var = s2 / n as f64 - mean * mean;
            let se = (var / n as f64).sqrt();
            let want = exact.get(row, 0) as f64;
            assert!(
                (mean - want).abs() < 4.0 * se + 1e-6,
                "{kind:?} row {row}: mean {mean} vs exact {want} (se {se})"
            );
            assert!(var > 0.0, "{kind:?}: the estimator must actually vary");
        }
    }
}

#[test]
fn hutchinson_is_unbiased() {
    check_hutchinson_unbiased(&Cpu);
}

#[test]
fn probes_are_reproducible_and_well_distributed() {
    for kind in [ProbeKind::Rademacher, ProbeKind::Gaussian] {
        let a = probes(50, 3, 4, kind, 7).unwrap();
        assert_eq!(
            a,
            probes(50, 3, 4, kind, 7).unwrap(),
            "same seed, same probes"
        );
        assert_ne!(
            a,
            probes(50, 3, 4, kind, 8).unwrap(),
            "another seed, other probes"
        );
        // A row's probes do not depend on how many rows the batch has.
        assert_eq!(a.slice_rows(0, 10), probes(10, 3, 4, kind, 7).unwrap());
        let big = probes(2000, 5, 4, kind, 3).unwrap();
        let n = big.len() as f64;
        let mean = big.sum_f64() / n;
        let var = big
            .data()
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.02, "{kind:?} mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "{kind:?} variance {var}");
        if kind == ProbeKind::Rademacher {
            assert!(big.data().iter().all(|&v| v == 1.0 || v == -1.0));
        }
    }
    // The documented hash, spelled out once: counter 0 of seed 0.
    let v = flowfuse::ops::rk45::probe_value(ProbeKind::Rademacher, 0, 0);
    assert!(v == 1.0 || v == -1.0);
}

// ------------------------------------------------------------------ field_vjp against FD

/// Which trace the divergence term of a VJP check uses.
#[derive(Clone, Copy, Debug)]
enum Div {
    None,
    Exact,
    Probes(ProbeKind, usize),
}

/// Φ(z, w) = Σ_r w_r·(a_r·f_r − c_r·div_r) in f64, and the op's g_z and parameter gradient
/// against its central differences.
fn check_vjp<B: Backend>(b: &B, act: Activation, dim: usize, div: Div, weighted: bool) {
    let rows = 5;
    let net = random_field(dim, act, 21 + dim as u64);
    let (z, t) = batch(rows, dim, 22);
    let mut rng = Rng::new(23);
    let a = Tensor::randn(rows, dim, &mut rng);
    let c = Tensor::randn(rows, 1, &mut rng);
    let w = Tensor::rand_uniform(rows, 1, 0.5, 2.0, &mut rng);
    let p = match div {
        Div::Probes(kind, m) => Some(probes(rows, dim, m, kind, 5).unwrap()),
        _ => None,
    };
    let (netd, zd, td, ad, cd, wd) = (
        upload_net(b, &net),
        b.upload(&z).unwrap(),
        b.upload(&t).unwrap(),
        b.upload(&a).unwrap(),
        b.upload(&c).unwrap(),
        b.upload(&w).unwrap(),
    );
    let pd = p.as_ref().map(|p| b.upload(p).unwrap());
    let trace = match &pd {
        Some(pd) => TraceMode::Hutchinson(pd),
        None => TraceMode::Exact,
    };
    let cot = (!matches!(div, Div::None)).then_some(DivCotangent { a_div: &cd, trace });
    let params = if weighted {
        ParamGrads::Weighted(&wd)
    } else {
        ParamGrads::Sum
    };
    let out = b.field_vjp(&netd, &zd, &td, &ad, cot, params).unwrap();
    let g_z = b.download(&out.g_z).unwrap();
    let g_w: Vec<f64> = out
        .g_params
        .unwrap()
        .tensors()
        .iter()
        .flat_map(|m| b.download(m).unwrap().into_vec())
        .map(|v| v as f64)
        .collect();

    let r = Net64::from_mlp(&net);
    let zr = rows64(&z);
    let row_phi = |net: &Net64, i: usize, zi: &[f64]| -> f64 {
        let ti = t.get(i, 0) as f64;
        let f = net.f(zi, ti);
        let mut phi: f64 = f.iter().zip(a.row(i)).map(|(f, &a)| f * a as f64).sum();
        let dv = match div {
            Div::None => 0.0,
            Div::Exact => net.div_exact(zi, ti),
            Div::Probes(..) => {
                let pr: Vec<f64> = p
                    .as_ref()
                    .unwrap()
                    .row(i)
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                net.div_probes(zi, ti, &pr)
            }
        };
        phi -= c.get(i, 0) as f64 * dv;
        phi
    };
    let label = format!("{act:?} D={dim} {div:?} weighted={weighted}");
    // g_z row by row (unweighted by contract).
    for i in 0..rows {
        let want = fd_gradient(|x| row_phi(&r, i, x), &zr[i], 1e-5);
        let got: Vec<f64> = g_z.row(i).iter().map(|&v| v as f64).collect();
        assert_all_close(&format!("{label}: g_z row {i}"), &got, &want, 3e-5, 3e-4);
    }
    // The parameter gradient of Σ_r w_r·Φ_r.
    let total = |pv: &[f64]| -> f64 {
        let net = r.with_params(pv);
        (0..rows)
            .map(|i| {
                let wi = if weighted { w.get(i, 0) as f64 } else { 1.0 };
                wi * row_phi(&net, i, &zr[i])
            })
            .sum()
    };
    let want = fd_gradient(total, &r.params(), 1e-5);
    assert_all_close(&format!("{label}: g_params"), &g_w, &want, 3e-5, 3e-4);
}

#[test]
fn vjp_without_divergence_matches_finite_differences() {
    for act in SMOOTH {
        check_vjp(&Cpu, act, 3, Div::None, false);
        check_vjp(&Cpu, act, 2, Div::None, true);
    }
    // ReLU needs no second derivative here (keep away from kinks: FD at a kink is undefined,
    // and random inputs hit one with probability zero).
    check_vjp(&Cpu, Activation::Relu, 3, Div::None, true);
}

#[test]
fn vjp_with_exact_divergence_matches_finite_differences() {
    for act in SMOOTH {
        check_vjp(&Cpu, act, 3, Div::Exact, false);
        check_vjp(&Cpu, act, 2, Div::Exact, true);
        check_vjp(&Cpu, act, 1, Div::Exact, true);
    }
}

#[test]
fn vjp_with_hutchinson_divergence_matches_finite_differences() {
    for act in SMOOTH {
        check_vjp(&Cpu, act, 3, Div::Probes(ProbeKind::Rademacher, 2), true);
        check_vjp(&Cpu, act, 4, Div::Probes(ProbeKind::Gaussian, 3), false);
    }
}

/// A field without hidden layers (f = [z, t]·W + b) goes through the same code paths.
#[test]
fn linear_field_divergence_is_the_trace_of_w() {
    let b = Cpu;
    let mut rng = Rng::new(5);
    let net = Mlp::new(&[4, 3], Activation::Tanh, &mut rng).unwrap();
    let (z, t) = batch(6, 3, 6);
    let (_, div) = b.field_div(&net, &z, &t, TraceMode::Exact).unwrap();
    let tr: f32 = (0..3).map(|i| net.layers[0].w.get(i, i)).sum();
    for i in 0..6 {
        assert!((div.get(i, 0) - tr).abs() < 1e-6);
    }
    check_vjp(&b, Activation::Tanh, 2, Div::None, false);
}

// ------------------------------------------------------------------ op errors

fn check_op_errors<B: Backend>(b: &B) {
    let net = upload_net(b, &random_field(2, Activation::Tanh, 1));
    let (z, t) = batch(4, 2, 1);
    let (zd, td) = (b.upload(&z).unwrap(), b.upload(&t).unwrap());
    let bad_z = b.upload(&Tensor::zeros(4, 3)).unwrap();
    assert!(matches!(
        b.field(&net, &bad_z, &td),
        Err(Error::Shape { .. })
    ));
    let bad_t = b.upload(&Tensor::zeros(3, 1)).unwrap();
    assert!(matches!(
        b.field(&net, &zd, &bad_t),
        Err(Error::Shape { .. })
    ));
    let empty = b.upload(&Tensor::zeros(0, 2)).unwrap();
    let empty_t = b.upload(&Tensor::zeros(0, 1)).unwrap();
    assert!(matches!(
        b.field(&net, &empty, &empty_t),
        Err(Error::Empty(_))
    ));
    let mut zn = z.clone();
    zn.set(2, 1, f32::NAN);
    assert!(matches!(
        b.field_div(&net, &b.upload(&zn).unwrap(), &td, TraceMode::Exact),
        Err(Error::NonFinite { row: 2, col: 1, .. })
    ));
    let mut tn = t.clone();
    tn.set(0, 0, f32::INFINITY);
    assert!(matches!(
        b.field(&net, &zd, &b.upload(&tn).unwrap()),
        Err(Error::NonFinite { .. })
    ));
    // Probes must be B×(M·D).
    let p = b.upload(&Tensor::zeros(4, 3)).unwrap();
    assert!(matches!(
        b.field_div(&net, &zd, &td, TraceMode::Hutchinson(&p)),
        Err(Error::Shape { .. })
    ));
    // A vjp cotangent of the wrong shape, and non-finite weights.
    let a = b.upload(&Tensor::zeros(4, 2)).unwrap();
    let bad_a = b.upload(&Tensor::zeros(4, 1)).unwrap();
    assert!(matches!(
        b.field_vjp(&net, &zd, &td, &bad_a, None, ParamGrads::Skip),
        Err(Error::Shape { .. })
    ));
    let w = b.upload(&Tensor::full(4, 1, f32::NAN)).unwrap();
    assert!(matches!(
        b.field_vjp(&net, &zd, &td, &a, None, ParamGrads::Weighted(&w)),
        Err(Error::NonFinite { .. })
    ));
    // A field whose output width is not D.
    let mut rng = Rng::new(1);
    let wrong = upload_net(
        b,
        &Mlp::new(&[3, 4, 3], Activation::Tanh, &mut rng).unwrap(),
    );
    assert!(matches!(
        b.field(&wrong, &zd, &td),
        Err(Error::Shape { .. })
    ));
    // ReLU has no second derivative: the gradient of a divergence is refused.
    let relu = upload_net(b, &random_field(2, Activation::Relu, 1));
    let c = b.upload(&Tensor::zeros(4, 1)).unwrap();
    let cot = DivCotangent {
        a_div: &c,
        trace: TraceMode::Exact,
    };
    assert!(matches!(
        b.field_vjp(&relu, &zd, &td, &a, Some(cot), ParamGrads::Sum),
        Err(Error::InvalidArgument(_))
    ));
    assert!(b.field_div(&relu, &zd, &td, TraceMode::Exact).is_ok());
    assert!(matches!(
        probes(0, 2, 1, ProbeKind::Gaussian, 0),
        Err(Error::Empty(_))
    ));
    assert!(matches!(
        probes(3, 2, 0, ProbeKind::Gaussian, 0),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn op_errors_are_typed() {
    check_op_errors(&Cpu);
}
