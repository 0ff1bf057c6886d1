//! The device-resident RK45 driver (`ode::device`):
//! - on the CPU backend against the host f64 solver, on problems written as small fields
//!   (linear fields with known solutions, a random tanh field against its f64 evaluation):
//!   NFE within a few percent, solutions within the tolerance;
//! - on the emulated grid against itself on the CPU backend;
//! - per-row steps: a hard row does not slow the easy ones, finished rows are not evaluated;
//! - failures are typed errors, not hangs;
//! - the continuous flow (log-density, sampling, trajectories, the adjoint gradient) on the
//!   emulated grid, where it runs through the driver, against the CPU backend (host solver).

mod cnf_support;
mod common;

use cnf_support::Net64;
use flowfuse::backend::emu::{Emu, ThreadOrder};
use flowfuse::backend::{Backend, Cpu};
use flowfuse::cnf::adjoint::nll_and_grad;
use flowfuse::cnf::integrate::{solve_adjoint, solve_field};
use flowfuse::cnf::{Cnf, CnfConfig, Trace, VectorField};
use flowfuse::error::OdeFailure;
use flowfuse::nn::mlp::{Activation, Linear, Mlp};
use flowfuse::ode::device::{DeviceOptions, DeviceSystem, DeviceTrace, solve_device};
use flowfuse::ode::{
    BatchSolution, Controller, OdeOptions, PiController, Span, Stepping, solve_batch,
    solve_batch_rows,
};
use flowfuse::ops::rk45::{ProbeKind, probes};
use flowfuse::testing::assert_close;
use flowfuse::{Device, Error, Rng, Shaped, Tensor};

fn emu() -> Emu {
    Emu::emulated(ThreadOrder::Shuffle(0x5eed))
}

/// The linear field f(z, t) = [z, t]·W + b: one layer, no hidden units.
fn linear_field(w: &[&[f32]], b: &[f32]) -> Mlp<Tensor> {
    let rows: Vec<Vec<f32>> = w.iter().map(|r| r.to_vec()).collect();
    Mlp {
        layers: vec![Linear {
            w: Tensor::from_rows(&rows).unwrap(),
            b: Tensor::from_vec(1, b.len(), b.to_vec()).unwrap(),
        }],
        act: Activation::Tanh,
    }
}

/// y0' = y1, y1' = −y0: rotation.
fn oscillator() -> Mlp<Tensor> {
    linear_field(&[&[0.0, -1.0], &[1.0, 0.0], &[0.0, 0.0]], &[0.0, 0.0])
}

/// y' = −y + t (each of two components).
fn forced_decay() -> Mlp<Tensor> {
    linear_field(&[&[-1.0, 0.0], &[0.0, -1.0], &[1.0, 1.0]], &[0.0, 0.0])
}

/// A random tanh field 3 → 16 → 16 → 2 whose weights bend the flow.
fn tanh_field(seed: u64) -> Mlp<Tensor> {
    scaled_tanh_field(seed, 1.5)
}

/// The same with PyTorch's initialisation scaled by `scale` (larger: a steeper flow that
/// takes more steps).
fn scaled_tanh_field(seed: u64, scale: f32) -> Mlp<Tensor> {
    let net = Mlp::new(&[3, 16, 16, 2], Activation::Tanh, &mut Rng::new(seed)).unwrap();
    let mut net = net.try_map(|t| Ok(t.map(|v| scale * v))).unwrap();
    net.act = Activation::Tanh;
    net
}

fn up_net<B: Backend>(b: &B, net: &Mlp<Tensor>) -> Mlp<B::Mat> {
    net.try_map(|t| b.upload(t)).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

/// The host f64 solver on the f64 evaluation of `net` (the accuracy reference).
fn host_solve(
    net: &Mlp<Tensor>,
    y0: &Tensor,
    span: impl Into<Span>,
    opts: &OdeOptions,
) -> BatchSolution {
    let n64 = Net64::from_mlp(net);
    let d = y0.cols();
    solve_batch(
        |t, y, dy| {
            for ((row, out), &tr) in y.chunks_exact(d).zip(dy.chunks_exact_mut(d)).zip(t) {
                out.copy_from_slice(&n64.f(row, tr));
            }
            Ok(())
        },
        &f64s(y0),
        d,
        span,
        opts,
    )
    .unwrap()
}

fn device_solve<B: Backend>(
    b: &B,
    net: &Mlp<Tensor>,
    y0: &Tensor,
    span: impl Into<Span>,
    opts: &DeviceOptions,
) -> (Tensor, Option<Tensor>, flowfuse::ode::SolveStats) {
    let sol = solve_device(
        b,
        &up_net(b, net),
        &b.upload(y0).unwrap(),
        span,
        DeviceSystem::Field,
        opts,
    )
    .unwrap();
    let y_eval = sol.y_eval.as_ref().map(|m| b.download(m).unwrap());
    (b.download(&sol.y).unwrap(), y_eval, sol.stats)
}

fn total(v: &[usize]) -> usize {
    v.iter().sum()
}

/// |a − b| <= frac·b (NFE counts).
fn assert_within(what: &str, a: usize, b: usize, frac: f64) {
    assert!(
        (a as f64 - b as f64).abs() <= frac * b as f64,
        "{what}: {a} vs {b} (more than {:.0}% apart)",
        100.0 * frac
    );
}

fn batch(rows: usize, seed: u64) -> Tensor {
    Tensor::randn(rows, 2, &mut Rng::new(seed))
}

// ------------------------------------------------------------- against the host f64 solver

#[test]
fn oscillator_matches_the_exact_solution_and_the_host_solver() {
    let net = oscillator();
    let y0 = batch(12, 1);
    let (rtol, atol) = (1e-5, 1e-7);
    let opts = OdeOptions::with_tolerances(rtol, atol);
    let (y, _, stats) = device_solve(&Cpu, &net, &y0, (0.0, 10.0), &opts.clone().into());
    let host = host_solve(&net, &y0, (0.0, 10.0), &opts);
    let (s, c) = 10f64.sin_cos();
    let exact = Tensor::from_fn(12, 2, |r, j| {
        let (a, b) = (y0.get(r, 0) as f64, y0.get(r, 1) as f64);
        (if j == 0 {
            a * c + b * s
        } else {
            -a * s + b * c
        }) as f32
    });
    // Global error of a 5th-order method at this tolerance over ten time units.
    assert_close("device vs exact", &y, &exact, 1e-4, 2e-4);
    assert_close(
        "device vs host",
        &y,
        &Tensor::from_vec(12, 2, host.y.iter().map(|&v| v as f32).collect()).unwrap(),
        1e-4,
        2e-4,
    );
    assert_within("NFE", total(&stats.nfe), total(&host.stats.nfe), 0.05);
    for r in 0..12 {
        assert_within(
            &format!("row {r} NFE"),
            stats.nfe[r],
            host.stats.nfe[r],
            0.1,
        );
    }
}

#[test]
fn forced_decay_backward_with_dense_output_matches_the_host_solver() {
    let net = forced_decay();
    let y0 = batch(9, 2);
    let t_eval = vec![2.0, 1.7, 1.0, 0.25, 0.0];
    let opts = OdeOptions::with_tolerances(1e-5, 1e-6).t_eval(t_eval.clone());
    let (y, ye, stats) = device_solve(&Cpu, &net, &y0, (2.0, 0.0), &opts.clone().into());
    let host = host_solve(&net, &y0, (2.0, 0.0), &opts);
    let to32 =
        |v: &[f64], rows| Tensor::from_vec(rows, 2, v.iter().map(|&x| x as f32).collect()).unwrap();
    assert_close("final state", &y, &to32(&host.y, 9), 2e-5, 1e-4);
    assert_close(
        "dense output",
        &ye.unwrap(),
        &to32(&host.y_eval, 45),
        2e-5,
        1e-4,
    );
    // Exact solution of y' = −y + t from t = 2: y(t) = t − 1 + (y(2) − 1)·e^{2 − t}.
    let exact = Tensor::from_fn(9, 2, |r, j| {
        ((y0.get(r, j) as f64 - 1.0) * 2f64.exp() - 1.0) as f32
    });
    assert_close("vs exact", &y, &exact, 1e-4, 1e-4);
    assert_within("NFE", total(&stats.nfe), total(&host.stats.nfe), 0.05);
}

#[test]
fn tanh_field_matches_the_f64_host_solve_in_every_mode() {
    // Steep enough for a few dozen steps per row, so that NFE compares at the percent level
    // (the f32 field moves a step sequence by a step here and there).
    let net = scaled_tanh_field(3, 3.0);
    let y0 = batch(20, 4);
    let pi = Controller::ProportionalIntegral(PiController::default());
    for (what, opts) in [
        ("per-row", OdeOptions::with_tolerances(1e-5, 1e-6)),
        (
            "shared",
            OdeOptions::with_tolerances(1e-5, 1e-6).stepping(Stepping::Shared),
        ),
        ("PI", OdeOptions::with_tolerances(1e-4, 1e-6).controller(pi)),
        ("fixed h0", OdeOptions::with_tolerances(1e-5, 1e-6).h0(1e-3)),
        (
            "t_eval",
            OdeOptions::with_tolerances(1e-5, 1e-6).t_eval(vec![0.0, 0.3, 1.1, 4.0]),
        ),
    ] {
        let (y, ye, stats) = device_solve(&Cpu, &net, &y0, (0.0, 4.0), &opts.clone().into());
        let host = host_solve(&net, &y0, (0.0, 4.0), &opts);
        // The host solver on the same f32 field takes (nearly) the driver's steps.
        let host32 = solve_field(&Cpu, &net, &y0, (0.0, 4.0), &opts).unwrap();
        assert_within(
            &format!("{what}: NFE vs f32 field"),
            total(&stats.nfe),
            total(&host32.stats.nfe),
            0.02,
        );
        let to32 = |v: &[f64]| {
            Tensor::from_vec(v.len() / 2, 2, v.iter().map(|&x| x as f32).collect()).unwrap()
        };
        assert_close(
            &format!("{what}: final state"),
            &y,
            &to32(&host.y),
            1e-4,
            1e-4,
        );
        if let Some(ye) = ye {
            assert_close(
                &format!("{what}: dense output"),
                &ye,
                &to32(&host.y_eval),
                1e-4,
                1e-4,
            );
        }
        assert_within(
            &format!("{what}: NFE"),
            total(&stats.nfe),
            total(&host.stats.nfe),
            0.05,
        );
        assert_eq!(
            stats.closure_calls,
            stats.nfe.iter().max().copied().unwrap(),
            "{what}: one evaluation per stage for the whole batch"
        );
    }
}

#[test]
fn per_row_spans_in_both_directions() {
    let net = tanh_field(5);
    let y0 = batch(6, 6);
    let span = Span::per_row(
        vec![0.0, 1.0, 0.5, 2.0, 0.0, 1.0],
        vec![1.0, 0.0, 0.5, -1.0, 3.0, 1.5],
    );
    let opts = OdeOptions::with_tolerances(1e-5, 1e-6);
    let (y, _, stats) = device_solve(&Cpu, &net, &y0, span.clone(), &opts.clone().into());
    let host = host_solve(&net, &y0, span, &opts);
    let host_y = Tensor::from_vec(6, 2, host.y.iter().map(|&v| v as f32).collect()).unwrap();
    assert_close("per-row spans", &y, &host_y, 1e-4, 1e-4);
    // The empty span is never evaluated and keeps its state.
    assert_eq!(stats.nfe[2], 0);
    assert_eq!(y.row(2), y0.row(2));
}

// ------------------------------------------------------------- the grid against the CPU

#[test]
fn emulated_grid_agrees_with_the_cpu_backend() {
    let net = tanh_field(7);
    let y0 = batch(150, 8);
    for opts in [
        OdeOptions::with_tolerances(1e-5, 1e-6).t_eval(vec![0.0, 0.5, 1.5]),
        OdeOptions::with_tolerances(1e-4, 1e-6).stepping(Stepping::Shared),
    ] {
        let opts = DeviceOptions::from(opts);
        let (yc, ec, sc) = device_solve(&Cpu, &net, &y0, (0.0, 1.5), &opts);
        let (yg, eg, sg) = device_solve(&emu(), &net, &y0, (0.0, 1.5), &opts);
        assert_close("final state", &yg, &yc, 1e-5, 1e-4);
        if let (Some(ec), Some(eg)) = (ec, eg) {
            assert_close("dense output", &eg, &ec, 1e-5, 1e-4);
        }
        assert_within("NFE", total(&sg.nfe), total(&sc.nfe), 0.02);
    }
}

#[test]
fn density_and_adjoint_solves_on_the_grid_agree_with_the_cpu_backend() {
    let net = tanh_field(9);
    let (rows, dim) = (40, 2);
    let x = batch(rows, 10);
    let opts = DeviceOptions::from(OdeOptions::with_tolerances(1e-5, 1e-6));
    let p = probes(rows, dim, 2, ProbeKind::Rademacher, 3).unwrap();
    let y0 = Tensor::from_fn(
        rows,
        dim + 1,
        |r, c| if c < dim { x.get(r, c) } else { 0.0 },
    );
    for trace in ["exact", "probes", "generated"] {
        let run = |on_grid: bool| -> Tensor {
            if on_grid {
                let g = emu();
                let pd = g.upload(&p).unwrap();
                let t = match trace {
                    "exact" => DeviceTrace::Exact,
                    "probes" => DeviceTrace::Probes(&pd),
                    _ => DeviceTrace::Generated {
                        m: 2,
                        kind: ProbeKind::Rademacher,
                        seed: 3,
                    },
                };
                let sol = solve_device(
                    &g,
                    &up_net(&g, &net),
                    &g.upload(&y0).unwrap(),
                    (1.0, 0.0),
                    DeviceSystem::FieldDiv(t),
                    &opts,
                )
                .unwrap();
                g.download(&sol.y).unwrap()
            } else {
                let t = match trace {
                    "exact" => DeviceTrace::Exact,
                    "probes" => DeviceTrace::Probes(&p),
                    _ => DeviceTrace::Generated {
                        m: 2,
                        kind: ProbeKind::Rademacher,
                        seed: 3,
                    },
                };
                let sol = solve_device(
                    &Cpu,
                    &net,
                    &y0,
                    (1.0, 0.0),
                    DeviceSystem::FieldDiv(t),
                    &opts,
                )
                .unwrap();
                sol.y
            }
        };
        assert_close(
            &format!("density ({trace})"),
            &run(true),
            &run(false),
            1e-5,
            1e-4,
        );
    }
    // Generated probes are the uploaded ones: the same solve to the last bit.
    let generated = solve_device(
        &Cpu,
        &net,
        &y0,
        (1.0, 0.0),
        DeviceSystem::FieldDiv(DeviceTrace::Generated {
            m: 2,
            kind: ProbeKind::Rademacher,
            seed: 3,
        }),
        &opts,
    )
    .unwrap();
    let upl = solve_device(
        &Cpu,
        &net,
        &y0,
        (1.0, 0.0),
        DeviceSystem::FieldDiv(DeviceTrace::Probes(&p)),
        &opts,
    )
    .unwrap();
    assert_eq!(generated.y, upl.y);
    assert_eq!(generated.stats, upl.stats);

    // The adjoint of the density solve with its parameter quadrature: the driver on the CPU
    // backend, on the grid, and the host solver's observer quadrature.
    let z = generated.y.clone();
    let z0 = Tensor::from_fn(rows, dim, |r, c| z.get(r, c));
    let a_end = z0.clone();
    let ones = Tensor::full(rows, 1, 1.0);
    let ya = Tensor::from_fn(rows, 2 * dim, |r, c| {
        if c < dim {
            z0.get(r, c)
        } else {
            a_end.get(r, c - dim)
        }
    });
    let scale = 1.0 / rows as f64;
    let cpu = solve_device(
        &Cpu,
        &net,
        &ya,
        (0.0, 1.0),
        DeviceSystem::Adjoint {
            a_div: Some(&ones),
            trace: DeviceTrace::Probes(&p),
            quadrature: Some(-scale),
        },
        &opts,
    )
    .unwrap();
    let g = emu();
    let od = g.upload(&ones).unwrap();
    let grid = solve_device(
        &g,
        &up_net(&g, &net),
        &g.upload(&ya).unwrap(),
        (0.0, 1.0),
        DeviceSystem::Adjoint {
            a_div: Some(&od),
            trace: DeviceTrace::Generated {
                m: 2,
                kind: ProbeKind::Rademacher,
                seed: 3,
            },
            quadrature: Some(-scale),
        },
        &opts,
    )
    .unwrap();
    assert_close(
        "adjoint state",
        &g.download(&grid.y).unwrap(),
        &cpu.y,
        1e-4,
        1e-4,
    );
    let host = solve_adjoint(
        &Cpu,
        &net,
        &z0,
        &a_end,
        Some(&ones),
        (1.0, 0.0),
        &opts.ode,
        Some(&p),
        scale,
    )
    .unwrap();
    let cg = cpu.params.unwrap();
    let gg = grid.params.unwrap().try_map(|m| g.download(m)).unwrap();
    for ((a, b), (c, name)) in cg
        .tensors()
        .iter()
        .zip(gg.tensors())
        .zip(host.grads.tensors().iter().zip(net.tensor_names()))
    {
        assert_close(
            &format!("quadrature {name}: grid vs cpu driver"),
            b,
            a,
            1e-4,
            1e-3,
        );
        assert_close(
            &format!("quadrature {name}: cpu driver vs host"),
            a,
            c,
            2e-4,
            2e-3,
        );
    }
    let host_a = Tensor::from_fn(rows, 2 * dim, |r, c| {
        if c < dim {
            host.z.get(r, c)
        } else {
            host.a.get(r, c - dim)
        }
    });
    assert_close("adjoint state vs host", &cpu.y, &host_a, 1e-4, 1e-3);
}

// ------------------------------------------------------------- per-row steps

/// Rows 0..4 integrate over one time unit, row 4 over thirty: the hard row.
fn spans() -> Span {
    Span::per_row(vec![0.0; 5], vec![1.0, 1.0, 1.0, 1.0, 30.0])
}

fn check_hard_row_does_not_slow_easy_rows<B: Backend>(b: &B) {
    let net = oscillator();
    let y0 = batch(5, 11);
    let opts = DeviceOptions {
        ode: OdeOptions::with_tolerances(1e-5, 1e-7),
        compact_below: 1.0,
    };
    let (y, _, stats) = device_solve(b, &net, &y0, spans(), &opts);
    for r in 0..4 {
        let alone = Tensor::from_vec(1, 2, y0.row(r).to_vec()).unwrap();
        let (ya, _, sa) = device_solve(b, &net, &alone, (0.0, 1.0), &opts);
        assert_eq!(stats.accepted[r], sa.accepted[0], "row {r}: accepted steps");
        assert_eq!(stats.rejected[r], sa.rejected[0], "row {r}: rejected steps");
        assert_close(
            &format!("row {r}"),
            &Tensor::from_vec(1, 2, y.row(r).to_vec()).unwrap(),
            &ya,
            1e-6,
            1e-6,
        );
        assert!(
            5 * stats.nfe[r] < stats.nfe[4],
            "row {r}: {} vs the hard row's {}",
            stats.nfe[r],
            stats.nfe[4]
        );
    }
    // Compacting after every step that finishes a row: finished rows are never evaluated.
    assert_eq!(stats.row_evaluations, total(&stats.nfe));
    // With the default threshold they may ride along until a quarter of the set is done.
    let (_, _, lazy) = device_solve(
        b,
        &net,
        &y0,
        spans(),
        &DeviceOptions::from(opts.ode.clone()),
    );
    assert!(lazy.row_evaluations <= 2 * total(&lazy.nfe), "{lazy:?}");
    // Shared steps make every row pay for the hard one.
    let shared =
        DeviceOptions::from(OdeOptions::with_tolerances(1e-5, 1e-7).stepping(Stepping::Shared));
    let long = Tensor::from_fn(5, 2, |r, c| y0.get(r, c));
    let (_, _, sh) = device_solve(b, &net, &long, (0.0, 30.0), &shared);
    assert!(sh.nfe.iter().all(|&n| n == sh.nfe[0]));
    assert!(
        stats.row_evaluations * 3 < sh.row_evaluations,
        "{} vs {}",
        stats.row_evaluations,
        sh.row_evaluations
    );
}

#[test]
fn a_hard_row_does_not_slow_the_easy_rows_on_the_cpu() {
    check_hard_row_does_not_slow_easy_rows(&Cpu);
}

on_grid_backends!(hard_row, super::check_hard_row_does_not_slow_easy_rows);

#[test]
fn the_host_solver_takes_the_same_per_row_steps() {
    // The f64 host solver on the same problem agrees with the driver's per-row work.
    let net = oscillator();
    let y0 = batch(5, 11);
    let opts = OdeOptions::with_tolerances(1e-5, 1e-7);
    let (_, _, stats) = device_solve(&Cpu, &net, &y0, spans(), &opts.clone().into());
    let n64 = Net64::from_mlp(&net);
    let host = solve_batch_rows(
        |_rows, t, y, dy| {
            for ((row, out), &tr) in y.chunks_exact(2).zip(dy.chunks_exact_mut(2)).zip(t) {
                out.copy_from_slice(&n64.f(row, tr));
            }
            Ok(())
        },
        &f64s(&y0),
        2,
        spans(),
        &opts,
    )
    .unwrap();
    for r in 0..5 {
        assert_within(&format!("row {r}"), stats.nfe[r], host.stats.nfe[r], 0.05);
    }
}

// ------------------------------------------------------------- failures

fn check_failures_are_typed<B: Backend>(b: &B) {
    let y0 = batch(30, 12);
    // A field that overflows: y' = 1e30·y.
    let blow_up = linear_field(&[&[1e30, 0.0], &[0.0, 1e30], &[0.0, 0.0]], &[0.0, 0.0]);
    let opts = DeviceOptions::from(OdeOptions::with_tolerances(1e-5, 1e-6).h0(0.1));
    let err = solve_device(
        b,
        &up_net(b, &blow_up),
        &b.upload(&y0).unwrap(),
        (0.0, 1.0),
        DeviceSystem::Field,
        &opts,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Ode(OdeFailure::NonFinite { .. })),
        "{err}"
    );
    // Too few steps.
    let opts = DeviceOptions::from(OdeOptions::with_tolerances(1e-8, 1e-10).max_steps(5));
    let err = solve_device(
        b,
        &up_net(b, &oscillator()),
        &b.upload(&y0).unwrap(),
        (0.0, 10.0),
        DeviceSystem::Field,
        &opts,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Ode(OdeFailure::MaxSteps { max_steps: 5, .. })),
        "{err}"
    );
    // A floor on the step that the tolerance cannot live with.
    let mut o = OdeOptions::with_tolerances(1e-9, 1e-12);
    o.h_min = 0.5;
    let err = solve_device(
        b,
        &up_net(b, &oscillator()),
        &b.upload(&y0).unwrap(),
        (0.0, 10.0),
        DeviceSystem::Field,
        &DeviceOptions::from(o),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Ode(OdeFailure::StepUnderflow { .. })),
        "{err}"
    );
    // One bad row names itself.
    let mut y_bad = y0.clone();
    y_bad.set(17, 1, f32::NAN);
    let err = solve_device(
        b,
        &up_net(b, &oscillator()),
        &b.upload(&y_bad).unwrap(),
        (0.0, 1.0),
        DeviceSystem::Field,
        &DeviceOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Ode(OdeFailure::NonFinite { row: 17, .. })),
        "{err}"
    );
    // Bad arguments.
    let net = up_net(b, &oscillator());
    let wrong = b.upload(&Tensor::zeros(4, 3)).unwrap();
    assert!(matches!(
        solve_device(
            b,
            &net,
            &wrong,
            (0.0, 1.0),
            DeviceSystem::Field,
            &DeviceOptions::default()
        ),
        Err(Error::Shape { .. })
    ));
    let ok = b.upload(&y0).unwrap();
    let bad_opts = DeviceOptions {
        compact_below: 2.0,
        ..DeviceOptions::default()
    };
    assert!(matches!(
        solve_device(b, &net, &ok, (0.0, 1.0), DeviceSystem::Field, &bad_opts),
        Err(Error::InvalidArgument(_))
    ));
    let nan_span = solve_device(
        b,
        &net,
        &ok,
        (0.0, f64::NAN),
        DeviceSystem::Field,
        &DeviceOptions::default(),
    );
    assert!(matches!(nan_span, Err(Error::InvalidArgument(_))));
    let relu = Mlp {
        act: Activation::Relu,
        ..tanh_field(1)
    };
    let ya = b.upload(&Tensor::zeros(30, 4)).unwrap();
    let c = b.upload(&Tensor::zeros(30, 1)).unwrap();
    let err = solve_device(
        b,
        &up_net(b, &relu),
        &ya,
        (0.0, 1.0),
        DeviceSystem::Adjoint {
            a_div: Some(&c),
            trace: DeviceTrace::Exact,
            quadrature: None,
        },
        &DeviceOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn failures_are_typed_errors_on_the_cpu() {
    check_failures_are_typed(&Cpu);
}

on_grid_backends!(failures, super::check_failures_are_typed);

// ------------------------------------------------------------- the continuous flow

fn cnf_pair(seed: u64, trace: Trace) -> (Cnf<Cpu>, Cnf<Emu>, Emu) {
    let g = emu();
    let net = tanh_field(seed);
    let mut cfg = CnfConfig::new(2, &[16, 16], Activation::Tanh);
    cfg.solver.rtol = 1e-5;
    cfg.solver.atol = 1e-5;
    if let Trace::Hutchinson { probes, kind, seed } = trace {
        cfg.eval_trace = flowfuse::ops::rk45::TraceSpec::Hutchinson {
            probes,
            probe: kind,
        };
        cfg.eval_seed = seed;
    }
    let c = Cnf::with_field(VectorField::from_mlp(&Cpu, &net).unwrap(), &cfg).unwrap();
    let e = Cnf::with_field(VectorField::from_mlp(&g, &net).unwrap(), &cfg).unwrap();
    (c, e, g)
}

#[test]
fn cnf_log_prob_and_sampling_on_the_grid_agree_with_the_cpu() {
    let x = batch(48, 13);
    for trace in [
        Trace::Exact,
        Trace::Hutchinson {
            probes: 1,
            kind: ProbeKind::Gaussian,
            seed: 4,
        },
    ] {
        let (c, e, g) = cnf_pair(14, trace);
        let (lc, sc) = c.log_prob(&Cpu, &x).unwrap();
        let (le, se) = e.log_prob(&g, &g.upload(&x).unwrap()).unwrap();
        assert_close(
            &format!("log_prob {trace:?}"),
            &g.download(&le).unwrap(),
            &lc,
            1e-4,
            1e-4,
        );
        assert_within("log_prob NFE", total(&se.nfe), total(&sc.nfe), 0.05);
    }
    let (c, e, g) = cnf_pair(15, Trace::Exact);
    let xs_c = c.sample(&Cpu, 32, &mut Rng::new(16)).unwrap();
    let xs_e = e.sample(&g, 32, &mut Rng::new(16)).unwrap();
    assert_close("samples", &g.download(&xs_e).unwrap(), &xs_c, 1e-4, 1e-4);
    let (back, _) = e.inverse(&g, &xs_e).unwrap();
    let z = Tensor::randn(32, 2, &mut Rng::new(16));
    assert_close(
        "inverse of the samples",
        &g.download(&back).unwrap(),
        &z,
        1e-3,
        1e-3,
    );
    let times = [0.0, 0.4, 1.0];
    let (tc, _) = c
        .sample_with_trajectories(&Cpu, 16, &times, &mut Rng::new(17))
        .unwrap();
    let (te, _) = e
        .sample_with_trajectories(&g, 16, &times, &mut Rng::new(17))
        .unwrap();
    for (k, (a, b)) in te.iter().zip(&tc).enumerate() {
        assert_close(&format!("trajectory at t = {}", times[k]), a, b, 1e-4, 1e-4);
    }
}

#[test]
fn cnf_adjoint_gradient_on_the_grid_agrees_with_the_cpu() {
    let x = batch(32, 18);
    for trace in [
        Trace::Exact,
        Trace::Hutchinson {
            probes: 2,
            kind: ProbeKind::Rademacher,
            seed: 5,
        },
    ] {
        let (c, e, g) = cnf_pair(19, Trace::Exact);
        let opts = c.solver.options();
        let (nc, gc, _) = nll_and_grad(&Cpu, c.field(), &x, &opts, trace).unwrap();
        let (ne, ge, se) = nll_and_grad(&g, e.field(), &x, &opts, trace).unwrap();
        assert!(
            (nc - ne).abs() < 1e-4 * (1.0 + nc.abs()),
            "{trace:?}: nll {ne} vs {nc}"
        );
        for ((a, b), name) in ge.iter().zip(&gc).zip(tanh_field(19).tensor_names()) {
            assert_close(
                &format!("{trace:?} gradient {name}"),
                &g.download(a).unwrap(),
                b,
                2e-4,
                2e-3,
            );
        }
        assert!(se.quadrature_rows > 0);
    }
}
