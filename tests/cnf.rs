//! Vector-field ops and the continuous flow: the exact divergence against the trace of an f64
//! Jacobian, Hutchinson's estimator (unbiased, reproducible probes), every piece of the VJP of
//! the augmented dynamics against central differences in f64, round trips, the density of a
//! trained 2-D CNF integrating to one, and typed errors.
//!
//! Test bodies are generic over the backend and run here on `Cpu`.

mod cnf_support;
mod common;

use cnf_support::{Net64, assert_all_close, rows64};
use flowfuse::Error;
use flowfuse::backend::{Backend, Cpu};
use flowfuse::nn::{Activation, Mlp};
use flowfuse::ops::rk45::{DivCotangent, ParamGrads, ProbeKind, TraceMode, probes};
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

/// A field D+1 → hidden… → D with random weights scaled up by 1.7.
fn field_with(dim: usize, hidden: &[usize], act: Activation, seed: u64) -> Mlp<Tensor> {
    let mut rng = Rng::new(seed);
    let mut widths = vec![dim + 1];
    widths.extend(hidden);
    widths.push(dim);
    let mut net = Mlp::new(&widths, act, &mut rng).unwrap();
    for t in net.tensors_mut() {
        *t = t.map(|v| 1.7 * v);
    }
    net
}

/// Every depth: the closed forms of shallow fields (0, 1, 2 hidden layers) and the tangent
/// passes of deeper ones.
fn check_exact_divergence<B: Backend>(b: &B) {
    let depths: [&[usize]; 4] = [&[], &[9], &[9, 7], &[9, 7, 5]];
    for act in SMOOTH {
        for dim in [1, 2, 5] {
            for hidden in depths {
                let net = field_with(dim, hidden, act, 3 + dim as u64);
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
                let label = format!("{act:?} D={dim} hidden {hidden:?} exact div");
                assert_all_close(&label, &got, &want, 3e-5, 3e-5);
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
        let mut sums = [(0.0f64, 0.0f64); 4];
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
    for (i, zi) in zr.iter().enumerate() {
        let want = fd_gradient(|x| row_phi(&r, i, x), zi, 1e-5);
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

/// A field without hidden layers (f = [z, t]·W + b): its divergence is the trace of W's z part.
fn check_linear_field<B: Backend>(b: &B) {
    let mut rng = Rng::new(5);
    let net = Mlp::new(&[4, 3], Activation::Tanh, &mut rng).unwrap();
    let (z, t) = batch(6, 3, 6);
    let (_, div) = b
        .field_div(
            &upload_net(b, &net),
            &b.upload(&z).unwrap(),
            &b.upload(&t).unwrap(),
            TraceMode::Exact,
        )
        .unwrap();
    let div = b.download(&div).unwrap();
    let tr: f32 = (0..3).map(|i| net.layers[0].w.get(i, i)).sum();
    for i in 0..6 {
        assert!((div.get(i, 0) - tr).abs() < 1e-6);
    }
}

#[test]
fn linear_field_divergence_is_the_trace_of_w() {
    check_linear_field(&Cpu);
    check_vjp(&Cpu, Activation::Tanh, 2, Div::None, false);
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

// ------------------------------------------------------------------ the continuous flow

use flowfuse::cnf::{Cnf, CnfConfig, SolverSettings, Trace, VectorField};

fn random_cnf<B: Backend>(b: &B, act: Activation, seed: u64) -> Cnf<B> {
    let net = random_field(2, act, seed);
    let mut cfg = CnfConfig::new(2, &[9, 7], act);
    cfg.solver = SolverSettings {
        rtol: 1e-7,
        atol: 1e-7,
        ..SolverSettings::default()
    };
    Cnf::with_field(VectorField::from_mlp(b, &net).unwrap(), &cfg).unwrap()
}

fn check_roundtrip<B: Backend>(b: &B) {
    let cnf = random_cnf(b, Activation::Tanh, 71);
    let z = Tensor::randn(200, 2, &mut Rng::new(72));
    let (x, stats) = cnf.forward(b, &b.upload(&z).unwrap()).unwrap();
    assert!(stats.max_nfe() > 10);
    let moved = b.download(&x).unwrap().max_abs_diff(&z).unwrap();
    assert!(
        moved > 0.1,
        "the flow must actually move the points ({moved})"
    );
    let (back, _) = cnf.inverse(b, &x).unwrap();
    let err = b.download(&back).unwrap().max_abs_diff(&z).unwrap();
    assert!(
        err < 2e-5,
        "forward then inverse returns to the start: max error {err}"
    );
}

#[test]
fn forward_then_inverse_returns_to_the_start() {
    check_roundtrip(&Cpu);
}

/// log p from the CNF (exact trace and Hutchinson) against the f64 reference's density solve,
/// and the change of variables log p(x) = log N(z) − ∫ div with z = inverse(x).
fn check_log_prob<B: Backend>(b: &B) {
    let cnf = random_cnf(b, Activation::Silu, 73);
    let x = Tensor::randn(64, 2, &mut Rng::new(74));
    let xd = b.upload(&x).unwrap();
    let (lp, stats) = cnf.log_prob(b, &xd).unwrap();
    assert_eq!(stats.nfe.len(), 64);
    let lp = b.download(&lp).unwrap();
    let r = Net64::from_mlp(&b.download_net(cnf.field()));
    for (i, row) in rows64(&x).iter().enumerate() {
        let sol = flowfuse::ode::solve_ivp(
            |t, y, dy| {
                let (f, jac) = r.f_and_jac(&y[..2], t);
                dy[..2].copy_from_slice(&f);
                dy[2] = -(jac[0][0] + jac[1][1]);
                Ok(())
            },
            1.0,
            0.0,
            &[row[0], row[1], 0.0],
            &flowfuse::ode::OdeOptions::with_tolerances(1e-10, 1e-10),
        )
        .unwrap();
        let y = &sol.y;
        let want = -0.5 * (y[0] * y[0] + y[1] * y[1]) - (2.0 * std::f64::consts::PI).ln() - y[2];
        assert!(
            (lp.get(i, 0) as f64 - want).abs() < 2e-5,
            "row {i}: {} vs {want}",
            lp.get(i, 0)
        );
    }
    // Hutchinson with many probes is close to the exact value; with one probe it is not equal.
    let many = Trace::Hutchinson {
        probes: 64,
        kind: ProbeKind::Gaussian,
        seed: 1,
    };
    let (lh, _) = cnf.log_prob_with(b, &xd, many).unwrap();
    let lh = b.download(&lh).unwrap();
    let mean_diff = (0..64)
        .map(|i| (lh.get(i, 0) - lp.get(i, 0)) as f64)
        .sum::<f64>()
        / 64.0;
    assert!(
        mean_diff.abs() < 0.05,
        "Hutchinson mean difference {mean_diff}"
    );
    let (l1, _) = cnf
        .log_prob_with(
            b,
            &xd,
            Trace::Hutchinson {
                probes: 1,
                kind: ProbeKind::Rademacher,
                seed: 2,
            },
        )
        .unwrap();
    let (l1b, _) = cnf
        .log_prob_with(
            b,
            &xd,
            Trace::Hutchinson {
                probes: 1,
                kind: ProbeKind::Rademacher,
                seed: 2,
            },
        )
        .unwrap();
    assert_eq!(
        b.download(&l1).unwrap(),
        b.download(&l1b).unwrap(),
        "same seed, same estimate"
    );
}

trait DownloadNet<B: Backend> {
    fn download_net(&self, f: &VectorField<B>) -> Mlp<Tensor>;
}

impl<B: Backend> DownloadNet<B> for B {
    fn download_net(&self, f: &VectorField<B>) -> Mlp<Tensor> {
        f.to_host(self).unwrap()
    }
}

#[test]
fn log_prob_matches_the_f64_density_solve() {
    check_log_prob(&Cpu);
}

fn check_shared_steps_agree<B: Backend>(b: &B) {
    let mut cnf = random_cnf(b, Activation::Tanh, 75);
    cnf.solver.rtol = 1e-6;
    cnf.solver.atol = 1e-6;
    let x = b.upload(&Tensor::randn(100, 2, &mut Rng::new(76))).unwrap();
    let (per_row, s1) = cnf.log_prob(b, &x).unwrap();
    cnf.solver.shared_steps = true;
    let (shared, s2) = cnf.log_prob(b, &x).unwrap();
    let diff = b
        .download(&per_row)
        .unwrap()
        .max_abs_diff(&b.download(&shared).unwrap())
        .unwrap();
    assert!(diff < 1e-4, "per-row and shared steps disagree by {diff}");
    // Shared steps give every row the same number of evaluations.
    assert!(s2.nfe.iter().all(|&n| n == s2.nfe[0]));
    assert!(s1.row_evaluations <= s2.row_evaluations);
}

#[test]
fn shared_and_per_row_steps_agree() {
    check_shared_steps_agree(&Cpu);
}

fn check_state_roundtrip<B: Backend>(b: &B) {
    let cnf = random_cnf(b, Activation::Softplus, 77);
    let state = cnf.state(b).unwrap();
    assert_eq!(state.tensors[0].0, "w0");
    let back = Cnf::from_state(b, &state).unwrap();
    assert_eq!(back.config(), cnf.config());
    let x = b.upload(&Tensor::randn(10, 2, &mut Rng::new(78))).unwrap();
    assert_eq!(
        b.download(&cnf.log_prob(b, &x).unwrap().0).unwrap(),
        b.download(&back.log_prob(b, &x).unwrap().0).unwrap()
    );
    let mut bad = state.clone();
    bad.tensors.pop();
    assert!(matches!(
        Cnf::<B>::from_state(b, &bad),
        Err(Error::InvalidArgument(_))
    ));
    let mut wrong = state.clone();
    wrong.tensors[0].1 = Tensor::zeros(2, 9);
    assert!(matches!(
        Cnf::<B>::from_state(b, &wrong),
        Err(Error::Shape { .. })
    ));
    let mut nan = state;
    nan.tensors[1].1.set(0, 0, f32::NAN);
    assert!(matches!(
        Cnf::<B>::from_state(b, &nan),
        Err(Error::NonFinite { .. })
    ));
}

#[test]
fn state_roundtrip_keeps_the_model() {
    check_state_roundtrip(&Cpu);
}

fn check_trajectories<B: Backend>(b: &B) {
    let cnf = random_cnf(b, Activation::Tanh, 79);
    let times = [0.0, 0.25, 0.5, 1.0];
    let (states, _) = cnf
        .sample_with_trajectories(b, 50, &times, &mut Rng::new(80))
        .unwrap();
    assert_eq!(states.len(), 4);
    assert_eq!(
        states[0],
        Tensor::randn(50, 2, &mut Rng::new(80)),
        "t = 0 is the base draw"
    );
    let end = cnf.sample(b, 50, &mut Rng::new(80)).unwrap();
    let diff = states[3].max_abs_diff(&b.download(&end).unwrap()).unwrap();
    assert!(
        diff < 1e-6,
        "the last trajectory time is the sample ({diff})"
    );
    // A middle point integrates on to the end.
    let mut half = cnf.config();
    half.solver.rtol = 1e-8;
    half.solver.atol = 1e-8;
    let sol = flowfuse::cnf::integrate::solve_field(
        b,
        cnf.field().net(),
        &states[2],
        (0.5, 1.0),
        &half.solver.options(),
    )
    .unwrap();
    let ends = Tensor::from_vec(50, 2, sol.y.iter().map(|&v| v as f32).collect()).unwrap();
    assert!(ends.max_abs_diff(&states[3]).unwrap() < 1e-5);
    assert!(matches!(
        cnf.sample_with_trajectories(b, 5, &[0.0, 1.5], &mut Rng::new(1)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        cnf.sample_with_trajectories(b, 5, &[0.5, 0.2], &mut Rng::new(1)),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn trajectories_follow_the_flow() {
    check_trajectories(&Cpu);
}

/// A short flow-matching run on two moons: the loss falls, and the density integrates to about
/// one over a grid that holds the data.
fn check_trained_density_integrates_to_one<B: Backend>(b: &B) {
    let mut rng = Rng::new(81);
    let data = flowfuse::train::data::moons(4000, &mut rng);
    let (train, test) = flowfuse::train::data::train_test_split(&data, 0.2, &mut rng).unwrap();
    let mut cfg = CnfConfig::new(2, &[32, 32], Activation::Tanh);
    cfg.solver.rtol = 1e-5;
    cfg.solver.atol = 1e-5;
    let mut cnf = Cnf::new(b, cfg, &mut rng).unwrap();
    let tc = common::train::quiet_training(400, 256, 5e-3);
    let before = cnf.nll(b, &b.upload(&test).unwrap()).unwrap();
    let report = flowfuse::train::trainer::train(&mut cnf, b, &train, &test, &tc, None).unwrap();
    assert!(
        report.test_nll < before - 0.5,
        "NLL {before} -> {}",
        report.test_nll
    );
    // Riemann sum of p over [-2.5, 3.5] × [-2, 2.5].
    let (nx, ny, h) = (120, 90, 0.05f32);
    let grid = Tensor::from_fn(nx * ny, 2, |k, j| {
        if j == 0 {
            -2.5 + h * ((k % nx) as f32 + 0.5)
        } else {
            -2.0 + h * ((k / nx) as f32 + 0.5)
        }
    });
    let (lp, _) = cnf.log_prob(b, &b.upload(&grid).unwrap()).unwrap();
    let mass: f64 = b
        .download(&lp)
        .unwrap()
        .data()
        .iter()
        .map(|&l| (l as f64).exp() * (h as f64) * (h as f64))
        .sum();
    eprintln!(
        "flow matching, 400 steps: test NLL {before:.3} -> {:.3}; grid mass {mass:.4}",
        report.test_nll
    );
    assert!(
        (mass - 1.0).abs() < 0.05,
        "the density integrates to {mass}"
    );
}

#[test]
fn trained_density_integrates_to_one() {
    check_trained_density_integrates_to_one(&Cpu);
}

/// The quality run of the report (slow: `cargo test --release --test cnf -- --ignored
/// --nocapture`): flow matching on two moons (noise 0.05), 3→64→64→2 silu, 30 000 steps of
/// 512, then the exact-trace test NLL, which a good discrete flow brings to about 0.3–0.45.
fn check_flow_matching_quality<B: Backend>(b: &B) {
    let mut rng = Rng::new(1);
    let data = flowfuse::train::data::moons(20_000, &mut rng);
    let (train, test) = flowfuse::train::data::train_test_split(&data, 0.2, &mut rng).unwrap();
    let mut cnf = Cnf::new(
        b,
        CnfConfig::new(2, &[64, 64], Activation::Silu),
        &mut Rng::new(2),
    )
    .unwrap();
    let tc = flowfuse::train::trainer::TrainConfig {
        eval_batch: 4000,
        ..common::train::quiet_training(30_000, 512, 3e-3)
    };
    let report = flowfuse::train::trainer::train(&mut cnf, b, &train, &test, &tc, None).unwrap();
    let started = std::time::Instant::now();
    let (_, stats) = cnf.log_prob(b, &b.upload(&test).unwrap()).unwrap();
    eprintln!(
        "flow matching on two moons: {} steps in {:.1}s; test NLL {:.3} (train {:.3}); \
         exact log-density of {} test rows in {:.2}s, NFE max {} mean {:.1}",
        report.steps,
        report.seconds,
        report.test_nll,
        report.train_nll,
        test.rows(),
        started.elapsed().as_secs_f64(),
        stats.max_nfe(),
        stats.row_evaluations as f64 / test.rows() as f64
    );
    assert!(report.test_nll < 0.6, "test NLL {}", report.test_nll);
}

#[test]
#[ignore = "slow (tens of seconds in release): the flow-matching quality run"]
fn flow_matching_on_two_moons_reaches_a_good_nll() {
    check_flow_matching_quality(&Cpu);
}

fn check_model_errors<B: Backend>(b: &B) {
    let cnf = random_cnf(b, Activation::Tanh, 83);
    let mut x = Tensor::randn(5, 2, &mut Rng::new(1));
    x.set(3, 1, f32::NAN);
    assert!(matches!(
        cnf.log_prob(b, &b.upload(&x).unwrap()),
        Err(Error::NonFinite { row: 3, col: 1, .. })
    ));
    assert!(matches!(
        cnf.forward(b, &b.upload(&Tensor::zeros(4, 3)).unwrap()),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        cnf.inverse(b, &b.upload(&Tensor::zeros(0, 2)).unwrap()),
        Err(Error::Empty(_))
    ));
    let zero_probes = Trace::Hutchinson {
        probes: 0,
        kind: ProbeKind::Rademacher,
        seed: 0,
    };
    assert!(matches!(
        cnf.log_prob_with(b, &b.upload(&Tensor::zeros(2, 2)).unwrap(), zero_probes),
        Err(Error::InvalidArgument(_))
    ));
    let mut cfg = CnfConfig::new(2, &[8], Activation::Tanh);
    cfg.objective = flowfuse::cnf::Objective::FlowMatching { sigma_min: 1.5 };
    assert!(matches!(
        Cnf::new(b, cfg, &mut Rng::new(1)),
        Err(Error::InvalidArgument(_))
    ));
    let cfg = CnfConfig::new(0, &[8], Activation::Tanh);
    assert!(matches!(
        Cnf::new(b, cfg, &mut Rng::new(1)),
        Err(Error::InvalidArgument(_))
    ));
    let mut bad_tol = random_cnf(b, Activation::Tanh, 84);
    bad_tol.solver.rtol = f64::NAN;
    assert!(matches!(
        bad_tol.log_prob(b, &b.upload(&Tensor::zeros(2, 2)).unwrap()),
        Err(Error::InvalidArgument(_))
    ));
    // A step budget too small for the solve is an ODE error, not a hang.
    let mut starved = random_cnf(b, Activation::Tanh, 85);
    starved.solver.max_steps = 2;
    assert!(matches!(
        starved.log_prob(
            b,
            &b.upload(&Tensor::randn(3, 2, &mut Rng::new(2))).unwrap()
        ),
        Err(Error::Ode(_))
    ));
}

#[test]
fn model_errors_are_typed() {
    check_model_errors(&Cpu);
}

// The same bodies on the emulated grid (three thread orders) and on CUDA when present: the
// kernels of kernels/rk45.cu, and the device-resident solver for the flow.
on_grid_backends!(grid_field_matches_f64, super::check_field_matches_f64);
on_grid_backends!(grid_exact_divergence, super::check_exact_divergence);
on_grid_backends!(
    grid_hutchinson_matches_quadratic_form,
    super::check_hutchinson_matches_quadratic_form
);
on_grid_backends!(grid_linear_field, super::check_linear_field);
on_grid_backends!(grid_op_errors, super::check_op_errors);
on_grid_backends!(grid_roundtrip, super::check_roundtrip);
on_grid_backends!(grid_log_prob, super::check_log_prob);
on_grid_backends!(grid_shared_steps_agree, super::check_shared_steps_agree);
on_grid_backends!(grid_state_roundtrip, super::check_state_roundtrip);
on_grid_backends!(grid_trajectories, super::check_trajectories);
