//! The adjoint method (eq. 18.24–18.26): gradients of losses of z(T) and of the log-density
//! with respect to the initial state and the field's parameters, against
//! - central finite differences of a full f64 reference solve (tight tolerances), and
//! - backpropagation through fixed Dormand–Prince steps written out here (the discrete
//!   reference), which must agree to about the solver tolerance.
//!
//! Also: maximum-likelihood training lowers the NLL, and bad inputs give typed errors.
//!
//! Test bodies are generic over the backend and run here on `Cpu`.

mod cnf_support;
mod common;

use cnf_support::{Net64, assert_all_close};
use flowfuse::Error;
use flowfuse::backend::{Backend, Cpu};
use flowfuse::cnf::adjoint::{DivAdjoint, adjoint, nll_and_grad};
use flowfuse::cnf::{Cnf, CnfConfig, Objective, SolverSettings, Trace, VectorField};
use flowfuse::nn::{Activation, Mlp};
use flowfuse::ode::tableau::{A, B5, C};
use flowfuse::ode::{OdeOptions, solve_batch};
use flowfuse::ops::rk45::{DivCotangent, ParamGrads, ProbeKind, TraceMode, probes};
use flowfuse::rng::Rng;
use flowfuse::tensor::{Shaped, Tensor};
use flowfuse::testing::fd_gradient;

const DIM: usize = 2;
const ROWS: usize = 3;

/// A 3 → 8 → 8 → 2 field with random weights, scaled so the dynamics are not nearly linear.
fn random_net(act: Activation, seed: u64) -> Mlp<Tensor> {
    let mut rng = Rng::new(seed);
    let mut net = Mlp::new(&[DIM + 1, 8, 8, DIM], act, &mut rng).unwrap();
    for t in net.tensors_mut() {
        *t = t.map(|v| 1.5 * v);
    }
    net
}

fn field<B: Backend>(b: &B, net: &Mlp<Tensor>) -> VectorField<B> {
    VectorField::from_mlp(b, net).unwrap()
}

fn tight(tol: f64) -> OdeOptions {
    OdeOptions::with_tolerances(tol, tol)
}

fn params_of<B: Backend>(b: &B, grads: &[B::Mat]) -> Vec<f64> {
    grads
        .iter()
        .flat_map(|m| b.download(m).unwrap().into_vec())
        .map(|v| v as f64)
        .collect()
}

// ------------------------------------------------------------------ f64 reference solves

/// z(1) of every row by the f64 reference field, solved to 1e-11.
fn ref_flow(net: &Net64, z0: &[f64]) -> Vec<f64> {
    solve_batch(
        |t, y, dy| {
            for (i, (yr, dr)) in y
                .chunks_exact(DIM)
                .zip(dy.chunks_exact_mut(DIM))
                .enumerate()
            {
                dr.copy_from_slice(&net.f(yr, t[i]));
            }
            Ok(())
        },
        z0,
        DIM,
        (0.0, 1.0),
        &tight(1e-11),
    )
    .unwrap()
    .y
}

/// Mean −log p(x) over the rows by the f64 reference: (z, L) from t = 1 to 0.
fn ref_nll(net: &Net64, x: &[f64], probes: Option<&Tensor>) -> f64 {
    let w = DIM + 1;
    let rows = x.len() / DIM;
    let y0: Vec<f64> = x
        .chunks_exact(DIM)
        .flat_map(|r| [r[0], r[1], 0.0])
        .collect();
    let sol = flowfuse::ode::solve_batch_rows(
        |idx, t, y, dy| {
            for (i, (yr, dr)) in y.chunks_exact(w).zip(dy.chunks_exact_mut(w)).enumerate() {
                let z = &yr[..DIM];
                dr[..DIM].copy_from_slice(&net.f(z, t[i]));
                dr[DIM] = -match probes {
                    None => net.div_exact(z, t[i]),
                    Some(p) => {
                        let pr: Vec<f64> = p.row(idx[i]).iter().map(|&v| v as f64).collect();
                        net.div_probes(z, t[i], &pr)
                    }
                };
            }
            Ok(())
        },
        &y0,
        w,
        (1.0, 0.0),
        &tight(1e-11),
    )
    .unwrap();
    let mut total = 0.0;
    for r in sol.y.chunks_exact(w) {
        let base =
            -0.5 * (r[0] * r[0] + r[1] * r[1]) - std::f64::consts::LN_2 - std::f64::consts::PI.ln();
        total += -(base - r[DIM]);
    }
    total / rows as f64
}

// ------------------------------------------------------------------ adjoint vs FD of the solve

/// loss = Σ_r c_r·z_r(1) + ½|z(1)|²: the adjoint's ∂loss/∂z(0) and ∂loss/∂w against central
/// differences of the f64 solve.
fn check_flow_adjoint_vs_fd<B: Backend>(b: &B, act: Activation) {
    let net = random_net(act, 31);
    let mut rng = Rng::new(32);
    let z0 = Tensor::randn(ROWS, DIM, &mut rng);
    let c = Tensor::randn(ROWS, DIM, &mut rng);
    let f = field(b, &net);
    let opts = tight(1e-9);
    let cnf_forward =
        flowfuse::cnf::integrate::solve_field(b, f.net(), &z0, (0.0, 1.0), &opts).unwrap();
    let z1 = cnf_support::rows64(
        &Tensor::from_vec(ROWS, DIM, cnf_forward.y.iter().map(|&v| v as f32).collect()).unwrap(),
    );
    let a1 = Tensor::from_fn(ROWS, DIM, |i, j| {
        c.get(i, j) + cnf_forward.y[i * DIM + j] as f32
    });
    let z1t = Tensor::from_fn(ROWS, DIM, |i, j| z1[i][j] as f32);
    let sens = adjoint(b, &f, (0.0, 1.0), &z1t, &a1, None, &opts, 1.0).unwrap();

    let r = Net64::from_mlp(&net);
    let loss = |net: &Net64, z0: &[f64]| -> f64 {
        let z1 = ref_flow(net, z0);
        z1.iter()
            .zip(c.data())
            .map(|(&z, &c)| c as f64 * z + 0.5 * z * z)
            .sum()
    };
    let z0v: Vec<f64> = z0.data().iter().map(|&v| v as f64).collect();
    let want_z = fd_gradient(|z| loss(&r, z), &z0v, 1e-4);
    let got_z: Vec<f64> = sens.a_start.data().iter().map(|&v| v as f64).collect();
    assert_all_close(&format!("{act:?} dloss/dz(0)"), &got_z, &want_z, 2e-5, 2e-4);
    let recomputed: Vec<f64> = sens.z_start.data().iter().map(|&v| v as f64).collect();
    assert_all_close("z(0) recomputed backward", &recomputed, &z0v, 1e-5, 1e-5);

    let want_w = fd_gradient(|p| loss(&r.with_params(p), &z0v), &r.params(), 1e-4);
    assert_all_close(
        &format!("{act:?} dloss/dw"),
        &params_of(b, &sens.params),
        &want_w,
        2e-5,
        2e-4,
    );
    assert!(sens.quadrature_rows > 0 && sens.stats.max_nfe() > 0);
}

#[test]
fn flow_adjoint_matches_finite_differences_of_the_solve() {
    check_flow_adjoint_vs_fd(&Cpu, Activation::Tanh);
    check_flow_adjoint_vs_fd(&Cpu, Activation::Silu);
}

/// The NLL's gradient with respect to x and w (exact trace and fixed Hutchinson probes)
/// against central differences of the f64 density solve.
fn check_nll_adjoint_vs_fd<B: Backend>(b: &B, trace: Trace) {
    let net = random_net(Activation::Tanh, 41);
    let mut rng = Rng::new(42);
    let x = Tensor::randn(ROWS, DIM, &mut rng);
    let f = field(b, &net);
    let opts = tight(1e-9);
    let p = trace.probes(ROWS, DIM).unwrap();
    let (nll, grads, stats) = nll_and_grad(b, &f, &x, &opts, trace).unwrap();
    assert!(stats.forward.max_nfe() > 0 && stats.backward.max_nfe() > 0);

    let r = Net64::from_mlp(&net);
    let xv: Vec<f64> = x.data().iter().map(|&v| v as f64).collect();
    let want_nll = ref_nll(&r, &xv, p.as_ref());
    assert!(
        (nll - want_nll).abs() < 1e-5,
        "{trace:?} nll {nll} vs reference {want_nll}"
    );
    let want_w = fd_gradient(
        |pv| ref_nll(&r.with_params(pv), &xv, p.as_ref()),
        &r.params(),
        1e-4,
    );
    assert_all_close(
        &format!("{trace:?} dNLL/dw"),
        &params_of(b, &grads),
        &want_w,
        2e-5,
        2e-4,
    );

    // ∂NLL/∂x through the same backward solve (per-row adjoints, mean over rows).
    let d = flowfuse::cnf::density::density(b, &f, &x, &opts, p.as_ref()).unwrap();
    let ones = Tensor::full(ROWS, 1, 1.0);
    let sens = adjoint(
        b,
        &f,
        (1.0, 0.0),
        &d.z,
        &d.z,
        Some(DivAdjoint {
            a_div: &ones,
            probes: p.as_ref(),
        }),
        &opts,
        1.0 / ROWS as f64,
    )
    .unwrap();
    let got_x: Vec<f64> = sens
        .a_start
        .data()
        .iter()
        .map(|&v| v as f64 / ROWS as f64)
        .collect();
    let want_x = fd_gradient(|xv| ref_nll(&r, xv, p.as_ref()), &xv, 1e-4);
    assert_all_close(&format!("{trace:?} dNLL/dx"), &got_x, &want_x, 2e-5, 2e-4);
}

#[test]
fn nll_adjoint_matches_finite_differences_exact_trace() {
    check_nll_adjoint_vs_fd(&Cpu, Trace::Exact);
}

#[test]
fn nll_adjoint_matches_finite_differences_hutchinson() {
    check_nll_adjoint_vs_fd(
        &Cpu,
        Trace::Hutchinson {
            probes: 2,
            kind: ProbeKind::Gaussian,
            seed: 3,
        },
    );
}

// ------------------------------------------------------------------ adjoint vs discrete backprop

/// Fixed-step Dormand–Prince (5th-order weights) on the augmented state (z, L), L' = −div when
/// `with_div`, recording every stage input; then backprop through the recorded steps with the
/// ops' VJPs. Returns (z(T), L(T), ∂loss/∂z(0), ∂loss/∂w) for a loss with ∂loss/∂z(T) = a_z(z(T))
/// and ∂loss/∂L(T) = a_l.
struct Discrete {
    z_end: Tensor,
    l_end: Vec<f64>,
    grad_z0: Tensor,
    grad_w: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn discrete_backprop<B: Backend>(
    b: &B,
    net: &Mlp<B::Mat>,
    z0: &Tensor,
    span: (f64, f64),
    steps: usize,
    trace: Option<&Tensor>,
    a_z: impl Fn(&Tensor) -> Tensor,
    a_l: f32,
) -> Discrete {
    let (rows, d) = z0.shape();
    let h = (span.1 - span.0) / steps as f64;
    let pm = trace.map(|p| b.upload(p).unwrap());
    let mode = || match &pm {
        Some(p) => TraceMode::Hutchinson(p),
        None => TraceMode::Exact,
    };
    let times = |t: f64| b.upload(&Tensor::full(rows, 1, t as f32)).unwrap();
    let with_div = trace.is_some() || a_l != 0.0;
    // Forward, recording the stage inputs u_s of every step.
    let mut z = z0.clone();
    let mut l = vec![0.0f64; rows];
    let mut tape: Vec<Vec<(Tensor, f64)>> = Vec::with_capacity(steps);
    for n in 0..steps {
        let t = span.0 + n as f64 * h;
        let mut ks: Vec<(Tensor, Tensor)> = Vec::with_capacity(6);
        let mut stage_inputs = Vec::with_capacity(6);
        for s in 0..6 {
            let u = Tensor::from_fn(rows, d, |i, j| {
                let mut acc = 0.0f64;
                for (q, (kz, _)) in ks.iter().enumerate() {
                    acc += A[s][q] * kz.get(i, j) as f64;
                }
                (z.get(i, j) as f64 + h * acc) as f32
            });
            let ts = t + C[s] * h;
            let (f, div) = b
                .field_div(net, &b.upload(&u).unwrap(), &times(ts), mode())
                .unwrap();
            ks.push((b.download(&f).unwrap(), b.download(&div).unwrap()));
            stage_inputs.push((u, ts));
        }
        z = Tensor::from_fn(rows, d, |i, j| {
            let acc: f64 = (0..6).map(|s| B5[s] * ks[s].0.get(i, j) as f64).sum();
            (z.get(i, j) as f64 + h * acc) as f32
        });
        for (i, li) in l.iter_mut().enumerate() {
            let acc: f64 = (0..6).map(|s| B5[s] * ks[s].1.get(i, 0) as f64).sum();
            *li -= h * acc;
        }
        tape.push(stage_inputs);
    }
    // Backward through the recorded steps.
    let mut ybar = a_z(&z);
    let mut grad_w: Vec<f64> = Vec::new();
    for stage_inputs in tape.iter().rev() {
        // k̄_s = h·B5[s]·ȳ_new (z part); the L part of every k̄_s is h·B5[s]·a_l, entering the
        // VJP as the weight of −div.
        let mut kbar: Vec<Tensor> = (0..6)
            .map(|s| ybar.map(|v| (h * B5[s]) as f32 * v))
            .collect();
        let mut ynew_bar = ybar.clone();
        for s in (0..6).rev() {
            let (u, ts) = &stage_inputs[s];
            let c_s = b
                .upload(&Tensor::full(rows, 1, (h * B5[s]) as f32 * a_l))
                .unwrap();
            let div = with_div.then(|| DivCotangent {
                a_div: &c_s,
                trace: mode(),
            });
            let out = b
                .field_vjp(
                    net,
                    &b.upload(u).unwrap(),
                    &times(*ts),
                    &b.upload(&kbar[s]).unwrap(),
                    div,
                    ParamGrads::Sum,
                )
                .unwrap();
            let ubar = b.download(&out.g_z).unwrap();
            let gw: Vec<f64> = out
                .g_params
                .unwrap()
                .tensors()
                .iter()
                .flat_map(|m| b.download(m).unwrap().into_vec())
                .map(|v| v as f64)
                .collect();
            if grad_w.is_empty() {
                grad_w = vec![0.0; gw.len()];
            }
            grad_w.iter_mut().zip(&gw).for_each(|(a, g)| *a += g);
            ynew_bar = Tensor::from_fn(rows, d, |i, j| ynew_bar.get(i, j) + ubar.get(i, j));
            for (q, kq) in kbar.iter_mut().enumerate().take(s) {
                let w = (h * A[s][q]) as f32;
                *kq = Tensor::from_fn(rows, d, |i, j| kq.get(i, j) + w * ubar.get(i, j));
            }
        }
        ybar = ynew_bar;
    }
    Discrete {
        z_end: z,
        l_end: l,
        grad_z0: ybar,
        grad_w,
    }
}

fn check_adjoint_vs_discrete<B: Backend>(b: &B, with_div: bool, hutchinson: bool) {
    let net = random_net(Activation::Silu, 51);
    let f = field(b, &net);
    let mut rng = Rng::new(52);
    let z0 = Tensor::randn(4, DIM, &mut rng);
    let c = Tensor::randn(4, DIM, &mut rng);
    let p = hutchinson.then(|| probes(4, DIM, 2, ProbeKind::Rademacher, 9).unwrap());
    let a_l = if with_div { 0.7f32 } else { 0.0 };
    // loss = Σ c·z(T) + a_l·Σ L(T)
    let disc = discrete_backprop(
        b,
        f.net(),
        &z0,
        (0.0, 1.0),
        40,
        p.as_ref(),
        |_| c.clone(),
        a_l,
    );
    let opts = tight(1e-7);
    let ones = Tensor::full(4, 1, a_l);
    let div = with_div.then_some(DivAdjoint {
        a_div: &ones,
        probes: p.as_ref(),
    });
    let sens = adjoint(b, &f, (0.0, 1.0), &disc.z_end, &c, div, &opts, 1.0).unwrap();
    let label = format!("div {with_div} hutchinson {hutchinson}");
    let got_z: Vec<f64> = sens.a_start.data().iter().map(|&v| v as f64).collect();
    let want_z: Vec<f64> = disc.grad_z0.data().iter().map(|&v| v as f64).collect();
    assert_all_close(&format!("{label}: dz0"), &got_z, &want_z, 1e-5, 1e-4);
    assert_all_close(
        &format!("{label}: dw"),
        &params_of(b, &sens.params),
        &disc.grad_w,
        1e-5,
        1e-4,
    );
    // The adaptive forward solve lands where the fixed steps did.
    let sol =
        flowfuse::cnf::integrate::solve_field_div(b, f.net(), &z0, (0.0, 1.0), &opts, p.as_ref())
            .unwrap();
    for i in 0..4 {
        for j in 0..DIM {
            assert!((sol.y[i * 3 + j] - disc.z_end.get(i, j) as f64).abs() < 1e-5);
        }
        assert!((sol.y[i * 3 + 2] - disc.l_end[i]).abs() < 1e-5);
    }
}

#[test]
fn adjoint_agrees_with_backprop_through_fixed_steps() {
    check_adjoint_vs_discrete(&Cpu, false, false);
    check_adjoint_vs_discrete(&Cpu, true, false);
    check_adjoint_vs_discrete(&Cpu, true, true);
}

// ------------------------------------------------------------------ the solver's step observer

/// The accepted-step observer the parameter quadrature is built on: stages rebuilt from the
/// reported K_s and weighted by h·B5[s] integrate ∫ y dt along y' = cos t (y = sin t), per row
/// with per-row spans and directions, to the solver's accuracy; rejected steps are not seen.
#[test]
fn accepted_steps_support_a_stage_quadrature() {
    use flowfuse::ode::{AcceptedSteps, Span, StepObserver, solve_batch_rows_observed};
    struct Integral {
        sums: Vec<f64>,
        steps: Vec<usize>,
    }
    impl StepObserver for Integral {
        fn accepted(&mut self, s: &AcceptedSteps<'_>) -> flowfuse::Result<()> {
            for (i, &row) in s.rows.iter().enumerate() {
                let h = s.h[i];
                let mut acc = 0.0;
                for st in 0..7 {
                    let mut y = s.y[i];
                    for (q, &a) in A[st][..st].iter().enumerate() {
                        y += h * a * s.k[q][i];
                    }
                    acc += B5[st] * y;
                }
                self.sums[row] += h * acc;
                self.steps[row] += 1;
            }
            Ok(())
        }
    }
    let (t0, t1) = (vec![0.0, 0.5, 2.0], vec![2.0, 3.0, 0.0]);
    let y0: Vec<f64> = t0.iter().map(|t: &f64| t.sin()).collect();
    let mut obs = Integral {
        sums: vec![0.0; 3],
        steps: vec![0; 3],
    };
    let sol = solve_batch_rows_observed(
        |_rows, t, _y, dy| {
            for (d, &ti) in dy.iter_mut().zip(t) {
                *d = ti.cos();
            }
            Ok(())
        },
        &mut obs,
        &y0,
        1,
        Span::per_row(t0.clone(), t1.clone()),
        &tight(1e-10),
    )
    .unwrap();
    for r in 0..3 {
        // ∫ sin t dt from t0 to t1 (signed).
        let want = t0[r].cos() - t1[r].cos();
        assert!(
            (obs.sums[r] - want).abs() < 1e-8,
            "row {r}: quadrature {} vs {want}",
            obs.sums[r]
        );
        assert_eq!(obs.steps[r], sol.stats.accepted[r]);
    }
}

// ------------------------------------------------------------------ training and errors

fn check_mle_training_lowers_nll<B: Backend>(b: &B) {
    let mut rng = Rng::new(61);
    let data = flowfuse::train::data::moons(512, &mut rng);
    let (train, test) = flowfuse::train::data::train_test_split(&data, 0.25, &mut rng).unwrap();
    let mut cfg = CnfConfig::new(2, &[16, 16], Activation::Tanh);
    cfg.objective = Objective::Mle {
        trace: flowfuse::ops::rk45::TraceSpec::Hutchinson {
            probes: 1,
            probe: ProbeKind::Rademacher,
        },
    };
    cfg.solver = SolverSettings {
        rtol: 1e-4,
        atol: 1e-4,
        ..SolverSettings::default()
    };
    let mut cnf = Cnf::new(b, cfg, &mut rng).unwrap();
    let test_d = b.upload(&test).unwrap();
    let before = cnf.nll(b, &test_d).unwrap();
    let tc = common::train::quiet_training(40, 128, 1e-2);
    let report = flowfuse::train::trainer::train(&mut cnf, b, &train, &test, &tc, None).unwrap();
    assert!(
        report.test_nll < before - 0.1,
        "MLE training should lower the test NLL: {before} -> {}",
        report.test_nll
    );
}

#[test]
fn maximum_likelihood_training_lowers_the_nll() {
    check_mle_training_lowers_nll(&Cpu);
}

fn check_adjoint_errors<B: Backend>(b: &B) {
    let f = field(b, &random_net(Activation::Tanh, 1));
    let z = Tensor::zeros(3, DIM);
    let opts = tight(1e-6);
    let bad_a = Tensor::zeros(2, DIM);
    assert!(matches!(
        adjoint(b, &f, (0.0, 1.0), &z, &bad_a, None, &opts, 1.0),
        Err(Error::Shape { .. })
    ));
    let mut nan_a = Tensor::zeros(3, DIM);
    nan_a.set(1, 0, f32::NAN);
    assert!(matches!(
        adjoint(b, &f, (0.0, 1.0), &z, &nan_a, None, &opts, 1.0),
        Err(Error::NonFinite { .. })
    ));
    let bad_c = Tensor::zeros(3, 2);
    assert!(matches!(
        adjoint(
            b,
            &f,
            (0.0, 1.0),
            &z,
            &z,
            Some(DivAdjoint {
                a_div: &bad_c,
                probes: None
            }),
            &opts,
            1.0
        ),
        Err(Error::Shape { .. })
    ));
    let relu = field(b, &random_net(Activation::Relu, 1));
    let ones = Tensor::full(3, 1, 1.0);
    assert!(matches!(
        adjoint(
            b,
            &relu,
            (0.0, 1.0),
            &z,
            &z,
            Some(DivAdjoint {
                a_div: &ones,
                probes: None
            }),
            &opts,
            1.0
        ),
        Err(Error::InvalidArgument(_))
    ));
    let empty = Tensor::zeros(0, DIM);
    assert!(matches!(
        nll_and_grad(b, &f, &empty, &opts, Trace::Exact),
        Err(Error::Empty(_))
    ));
    // ReLU cannot be trained by maximum likelihood (the gradient of the trace needs σ'').
    let mut cfg = CnfConfig::new(2, &[8], Activation::Relu);
    cfg.objective = Objective::Mle {
        trace: flowfuse::ops::rk45::TraceSpec::Exact,
    };
    assert!(matches!(
        Cnf::new(b, cfg, &mut Rng::new(1)),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn adjoint_errors_are_typed() {
    check_adjoint_errors(&Cpu);
}

// On the emulated grid (three thread orders) and on CUDA when present, through the
// device-resident solver. The finite-difference bodies above solve at rtol 1e-9, which the
// device solver's f32 state cannot meet; they stay on the host f64 solver.
on_grid_backends!(
    grid_mle_training_lowers_nll,
    super::check_mle_training_lowers_nll
);
on_grid_backends!(grid_adjoint_errors, super::check_adjoint_errors);
