//! Parity of kernels/rk45.cu with the CPU reference: the vector-field ops (field, divergence
//! exact and by Hutchinson with uploaded or device-generated probes, the VJP with and without
//! the divergence cotangent and every kind of parameter gradient), the right-hand sides of the
//! solver's systems, and every stage and step-control op. Batches cover one row, partial tiles,
//! several blocks and masked-off threads; fields cover 1 to 4 layers and every activation.

mod common;

use flowfuse::backend::{Backend, Cpu};
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ode::{Controller, IController, PiController};
use flowfuse::ops::prelude::*;
use flowfuse::ops::rk45::{
    Dense, DivCotangent, OdeStepOps, OdeSystem, ParamGrads, Phase, ProbeKind, RowStatus,
    STATE_COLS, ShareMode, StepControl, TraceMode, col, generated_probes, probes,
};
use flowfuse::testing::assert_close;
use flowfuse::{Error, Rng, Tensor};

/// Fields (hidden widths, activation) of 1 to 4 layers.
const FIELDS: [(&[usize], Activation); 5] = [
    (&[16, 16], Activation::Tanh),
    (&[24], Activation::Silu),
    (&[], Activation::Tanh),
    (&[8, 12, 8], Activation::Softplus),
    (&[20, 12], Activation::Relu),
];

/// Batch sizes: one row, a partial tile, several tiles and blocks.
const ROWS: [usize; 3] = [1, 37, 150];

fn field(dim: usize, hidden: &[usize], act: Activation, seed: u64) -> Mlp<Tensor> {
    let mut widths = vec![dim + 1];
    widths.extend_from_slice(hidden);
    widths.push(dim);
    // Non-trivial weights: PyTorch's initialisation scaled up so that the activations bend.
    let net = Mlp::new(&widths, act, &mut Rng::new(seed)).unwrap();
    let mut net = net.try_map(|t| Ok(t.map(|v| 2.0 * v))).unwrap();
    net.act = act;
    net
}

fn up<B: Backend>(b: &B, t: &Tensor) -> B::Mat {
    b.upload(t).unwrap()
}

fn down<B: Backend>(b: &B, m: &B::Mat) -> Tensor {
    b.download(m).unwrap()
}

fn up_net<B: Backend>(b: &B, net: &Mlp<Tensor>) -> Mlp<B::Mat> {
    net.try_map(|t| b.upload(t)).unwrap()
}

fn batch(rows: usize, dim: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let z = Tensor::randn(rows, dim, &mut rng);
    let t = Tensor::rand_uniform(rows, 1, 0.0, 1.0, &mut rng);
    (z, t)
}

/// Distinct caller rows (f32 integers) for a compacted working set.
fn row_ids(rows: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let perm = rng.permutation(3 * rows + 5);
    Tensor::from_fn(rows, 1, |r, _| perm[r] as f32)
}

fn assert_grads(what: &str, got: &Mlp<Tensor>, want: &Mlp<Tensor>, atol: f32, rtol: f32) {
    for ((g, w), name) in got
        .tensors()
        .iter()
        .zip(want.tensors())
        .zip(want.tensor_names())
    {
        assert_close(&format!("{what} {name}"), g, w, atol, rtol);
    }
}

fn check_field<B: Backend>(b: &B) {
    let cpu = Cpu;
    for (i, (hidden, act)) in FIELDS.iter().enumerate() {
        for (dim, rows) in [(2, ROWS[i % 3]), (3, 150), (5, 37)] {
            let net = field(dim, hidden, *act, 10 + i as u64);
            let (z, t) = batch(rows, dim, 20 + i as u64);
            let what = format!("field {hidden:?} {act:?} D={dim} B={rows}");
            let got = b.field(&up_net(b, &net), &up(b, &z), &up(b, &t)).unwrap();
            let want = cpu.field(&net, &z, &t).unwrap();
            assert_close(&what, &down(b, &got), &want, 1e-5, 1e-4);
        }
    }
}

fn check_field_div<B: Backend>(b: &B) {
    let cpu = Cpu;
    for (i, (hidden, act)) in FIELDS.iter().enumerate() {
        let (dim, rows) = [(2, 150), (3, 37), (4, 1), (2, 37), (3, 70)][i];
        let net = field(dim, hidden, *act, 30 + i as u64);
        let (z, t) = batch(rows, dim, 40 + i as u64);
        let (netd, zd, td) = (up_net(b, &net), up(b, &z), up(b, &t));
        let what = format!("{hidden:?} {act:?} D={dim} B={rows}");
        let compare = |label: &str, got: (B::Mat, B::Mat), want: (Tensor, Tensor)| {
            assert_close(
                &format!("{label} f {what}"),
                &down(b, &got.0),
                &want.0,
                1e-5,
                1e-4,
            );
            assert_close(
                &format!("{label} div {what}"),
                &down(b, &got.1),
                &want.1,
                1e-4,
                1e-4,
            );
        };
        compare(
            "exact",
            b.field_div(&netd, &zd, &td, TraceMode::Exact).unwrap(),
            cpu.field_div(&net, &z, &t, TraceMode::Exact).unwrap(),
        );
        for (kind, m) in [(ProbeKind::Rademacher, 1), (ProbeKind::Gaussian, 3)] {
            let p = probes(rows, dim, m, kind, 77).unwrap();
            compare(
                &format!("uploaded {kind:?}x{m}"),
                b.field_div(&netd, &zd, &td, TraceMode::Hutchinson(&up(b, &p)))
                    .unwrap(),
                cpu.field_div(&net, &z, &t, TraceMode::Hutchinson(&p))
                    .unwrap(),
            );
            let ids = row_ids(rows, 5);
            for with_ids in [false, true] {
                let rows_h = with_ids.then_some(&ids);
                let ids_d = up(b, &ids);
                let gen_d = TraceMode::Generated {
                    m,
                    kind,
                    seed: 91,
                    rows: with_ids.then_some(&ids_d),
                };
                let gen_h = TraceMode::Generated {
                    m,
                    kind,
                    seed: 91,
                    rows: rows_h,
                };
                compare(
                    &format!("generated {kind:?}x{m} ids={with_ids}"),
                    b.field_div(&netd, &zd, &td, gen_d).unwrap(),
                    cpu.field_div(&net, &z, &t, gen_h).unwrap(),
                );
            }
        }
    }
}

/// The device's probe generator is the host's counter hash, bit for bit.
fn check_generated_probes<B: Backend>(b: &B) {
    for (rows, dim, m) in [(1, 1, 1), (37, 2, 3), (300, 5, 2)] {
        for kind in [ProbeKind::Rademacher, ProbeKind::Gaussian] {
            let got = down(
                b,
                &b.generate_probes(rows, dim, m, kind, 1234, None).unwrap(),
            );
            let want = probes(rows, dim, m, kind, 1234).unwrap();
            assert_eq!(
                got.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{kind:?} {rows}x{dim}x{m}"
            );
            let ids = row_ids(rows, 9);
            let got = down(
                b,
                &b.generate_probes(rows, dim, m, kind, 99, Some(&up(b, &ids)))
                    .unwrap(),
            );
            let want = generated_probes(rows, dim, m, kind, 99, Some(&ids)).unwrap();
            assert_eq!(got, want, "{kind:?} with row ids");
            // Row ids pick rows of the full matrix.
            let full = probes(3 * rows + 5, dim, m, kind, 99).unwrap();
            let picked: Vec<usize> = ids.data().iter().map(|&v| v as usize).collect();
            assert_eq!(got, full.gather_rows(&picked).unwrap());
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Div {
    None,
    Exact,
    Uploaded(ProbeKind, usize),
    Generated(ProbeKind, usize),
}

fn check_field_vjp<B: Backend>(b: &B) {
    let cpu = Cpu;
    let cases = [
        (0, 2, 150, Div::None, 0),
        (0, 3, 37, Div::Exact, 1),
        (1, 2, 150, Div::Exact, 2),
        (3, 2, 37, Div::Uploaded(ProbeKind::Rademacher, 2), 2),
        (0, 4, 70, Div::Generated(ProbeKind::Gaussian, 1), 1),
        (2, 3, 1, Div::Exact, 2),
        (4, 3, 37, Div::None, 2),
        (1, 3, 70, Div::Uploaded(ProbeKind::Gaussian, 3), 0),
    ];
    for (case, &(fi, dim, rows, div, params)) in cases.iter().enumerate() {
        let (hidden, act) = FIELDS[fi];
        let net = field(dim, hidden, act, 50 + case as u64);
        let (z, t) = batch(rows, dim, 60 + case as u64);
        let mut rng = Rng::new(70 + case as u64);
        let a = Tensor::randn(rows, dim, &mut rng);
        let c = Tensor::randn(rows, 1, &mut rng);
        let w = Tensor::rand_uniform(rows, 1, -1.0, 1.0, &mut rng);
        let p = match div {
            Div::Uploaded(kind, m) => Some(probes(rows, dim, m, kind, 3).unwrap()),
            _ => None,
        };
        let (netd, zd, td, ad, cd, wd) = (
            up_net(b, &net),
            up(b, &z),
            up(b, &t),
            up(b, &a),
            up(b, &c),
            up(b, &w),
        );
        let pd = p.as_ref().map(|p| up(b, p));
        let trace_d = match (div, &pd) {
            (Div::Uploaded(..), Some(pd)) => TraceMode::Hutchinson(pd),
            (Div::Generated(kind, m), _) => TraceMode::Generated {
                m,
                kind,
                seed: 8,
                rows: None,
            },
            _ => TraceMode::Exact,
        };
        let trace_h = match (div, &p) {
            (Div::Uploaded(..), Some(p)) => TraceMode::Hutchinson(p),
            (Div::Generated(kind, m), _) => TraceMode::Generated {
                m,
                kind,
                seed: 8,
                rows: None,
            },
            _ => TraceMode::Exact,
        };
        let with_div = !matches!(div, Div::None);
        let div_d = with_div.then_some(DivCotangent {
            a_div: &cd,
            trace: trace_d,
        });
        let div_h = with_div.then_some(DivCotangent {
            a_div: &c,
            trace: trace_h,
        });
        let (pg_d, pg_h) = match params {
            0 => (ParamGrads::Skip, ParamGrads::Skip),
            1 => (ParamGrads::Sum, ParamGrads::Sum),
            _ => (ParamGrads::Weighted(&wd), ParamGrads::Weighted(&w)),
        };
        let got = b.field_vjp(&netd, &zd, &td, &ad, div_d, pg_d).unwrap();
        let want = cpu.field_vjp(&net, &z, &t, &a, div_h, pg_h).unwrap();
        let what = format!("vjp {hidden:?} {act:?} D={dim} B={rows} {div:?} params={params}");
        assert_close(&format!("{what} f"), &down(b, &got.f), &want.f, 1e-5, 1e-4);
        assert_close(
            &format!("{what} g_z"),
            &down(b, &got.g_z),
            &want.g_z,
            1e-4,
            1e-3,
        );
        match (&got.g_params, &want.g_params) {
            (Some(g), Some(wg)) => {
                let g = g.try_map(|m| b.download(m)).unwrap();
                assert_grads(&what, &g, wg, 2e-4 * (rows as f32).sqrt(), 1e-3);
            }
            (None, None) => {}
            _ => panic!("{what}: parameter gradients on one side only"),
        }
    }
}

fn check_rhs<B: Backend>(b: &B) {
    let cpu = Cpu;
    let (dim, rows) = (2, 150);
    let net = field(dim, &[16, 16], Activation::Tanh, 80);
    let mut rng = Rng::new(81);
    let t = Tensor::rand_uniform(rows, 1, 0.0, 1.0, &mut rng);
    let ids = row_ids(rows, 82);
    let c = Tensor::randn(rows, 1, &mut rng);
    let p = probes(rows, dim, 2, ProbeKind::Rademacher, 4).unwrap();
    let (netd, td, idsd, cd, pd) = (
        up_net(b, &net),
        up(b, &t),
        up(b, &ids),
        up(b, &c),
        up(b, &p),
    );
    fn generated<M>(ids: &M) -> TraceMode<'_, M> {
        TraceMode::Generated {
            m: 1,
            kind: ProbeKind::Gaussian,
            seed: 6,
            rows: Some(ids),
        }
    }
    let cases: [(&str, usize); 6] = [
        ("field", dim),
        ("div exact", dim + 1),
        ("div probes", dim + 1),
        ("div generated", dim + 1),
        ("adjoint", 2 * dim),
        ("adjoint div generated", 2 * dim),
    ];
    for (i, (what, width)) in cases.into_iter().enumerate() {
        let y = Tensor::randn(rows, width, &mut rng);
        let yd = up(b, &y);
        let (sd, sh): (OdeSystem<'_, B::Mat>, OdeSystem<'_, Tensor>) = match i {
            0 => (OdeSystem::Field, OdeSystem::Field),
            1 => (
                OdeSystem::FieldDiv(TraceMode::Exact),
                OdeSystem::FieldDiv(TraceMode::Exact),
            ),
            2 => (
                OdeSystem::FieldDiv(TraceMode::Hutchinson(&pd)),
                OdeSystem::FieldDiv(TraceMode::Hutchinson(&p)),
            ),
            3 => (
                OdeSystem::FieldDiv(generated(&idsd)),
                OdeSystem::FieldDiv(generated(&ids)),
            ),
            4 => (OdeSystem::Adjoint(None), OdeSystem::Adjoint(None)),
            _ => (
                OdeSystem::Adjoint(Some(DivCotangent {
                    a_div: &cd,
                    trace: generated(&idsd),
                })),
                OdeSystem::Adjoint(Some(DivCotangent {
                    a_div: &c,
                    trace: generated(&ids),
                })),
            ),
        };
        let got = b.ode_rhs(&netd, &yd, &td, sd).unwrap();
        let want = cpu.ode_rhs(&net, &y, &t, sh).unwrap();
        assert_close(
            &format!("ode_rhs {what}"),
            &down(b, &got),
            &want,
            1e-4,
            1e-3,
        );
    }
}

/// A state with varied rows: both directions, an empty span, rows that already finished or
/// failed, step sizes from tiny to large, step counts near the budget, dense-output cursors.
fn mixed_state(rows: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let mut s = Tensor::zeros(rows, STATE_COLS);
    for r in 0..rows {
        let row = s.row_mut(r);
        let forward = r % 5 != 1;
        let (t0, t1) = if forward { (0.0, 1.0) } else { (1.0, 0.0) };
        let dir = if forward { 1.0 } else { -1.0 };
        let t = t0 + dir * rng.uniform_f32() * 0.9;
        let h = 10f32.powf(-3.0 + 2.5 * rng.uniform_f32());
        let t_new = if r % 7 == 3 {
            t1
        } else {
            t + dir * h.min((t1 - t).abs())
        };
        row[col::T] = t;
        row[col::T_END] = t1;
        row[col::DIR] = dir;
        row[col::H_ABS] = h;
        row[col::H] = t_new - t;
        row[col::T_NEW] = t_new;
        row[col::ACCEPTED] = (r % 4) as f32;
        row[col::REJECTED] = (r % 3) as f32;
        row[col::LAST_REJECTED] = (r % 6 == 0) as u8 as f32;
        row[col::PREV_ERR] = 0.01 + rng.uniform_f32();
        row[col::ERR] = 0.3 + 1.5 * rng.uniform_f32();
        row[col::VERDICT] = (r % 2) as f32;
        row[col::STATUS] = match r % 11 {
            4 => RowStatus::Done.code(),
            8 => RowStatus::Underflow.code(),
            _ => RowStatus::Active.code(),
        };
        if r % 13 == 5 {
            // An empty span.
            row[col::T] = t1;
            row[col::T_END] = t1;
            row[col::DIR] = 0.0;
            row[col::STATUS] = RowStatus::Done.code();
        }
    }
    s
}

fn controls() -> Vec<StepControl> {
    let base = StepControl {
        rtol: 1e-3,
        atol: 1e-4,
        h_min: 0.0,
        h_max: f64::INFINITY,
        max_steps: 5,
        controller: Controller::Integral(IController::default()),
    };
    vec![
        base,
        StepControl {
            h_min: 2e-3,
            h_max: 0.05,
            max_steps: 1000,
            controller: Controller::ProportionalIntegral(PiController::default()),
            ..base
        },
    ]
}

fn assert_state(what: &str, got: &Tensor, want: &Tensor) {
    assert_close(what, got, want, 1e-7, 1e-6);
}

fn check_step_end<B: Backend>(b: &B) {
    let cpu = Cpu;
    for (rows, width) in [(1, 3), (37, 2), (150, 5), (40, 33)] {
        for (ci, ctl) in controls().into_iter().enumerate() {
            let mut rng = Rng::new(100 + rows as u64 + ci as u64);
            let state = mixed_state(rows, rows as u64 + ci as u64);
            let y = Tensor::randn(rows, width, &mut rng);
            let mut ks: Vec<Tensor> = (0..7)
                .map(|_| Tensor::randn(rows, width, &mut rng))
                .collect();
            if rows > 20 {
                ks[3].set(17, width - 1, f32::NAN);
                ks[6].set(19, 0, f32::INFINITY);
            }
            let y_new = Tensor::from_fn(rows, width, |r, j| y.get(r, j) + 0.05 * ks[0].get(r, j));
            let t_eval = Tensor::from_vec(1, 4, vec![0.1, 0.45, 0.5, 1.0]).unwrap();
            let ids = row_ids(rows, 7);
            let total = 3 * rows + 5;
            for phases in [
                vec![Phase::ALL],
                vec![Phase::ERROR, Phase::DECIDE | Phase::UPDATE],
                vec![Phase::ERROR | Phase::DECIDE, Phase::UPDATE],
            ] {
                let (mut yh, mut k0h, mut sh) = (y.clone(), ks[0].clone(), state.clone());
                let mut yeh = Tensor::zeros(4 * total, width);
                let (mut yd, mut k0d, mut sd) = (up(b, &y), up(b, &ks[0]), up(b, &state));
                let mut yed = up(b, &yeh);
                let ksd: Vec<B::Mat> = ks.iter().map(|k| up(b, k)).collect();
                let (ynd, ted, idsd) = (up(b, &y_new), up(b, &t_eval), up(b, &ids));
                for (pi, &phase) in phases.iter().enumerate() {
                    let dense = phase.has(Phase::UPDATE) || pi > 0;
                    cpu.ode_step_end(
                        phase,
                        &mut yh,
                        &mut k0h,
                        std::array::from_fn(|i| &ks[i + 1]),
                        &y_new,
                        &mut sh,
                        &ctl,
                        dense.then_some(Dense {
                            t_eval: &t_eval,
                            y_eval: &mut yeh,
                            ids: &ids,
                            rows_total: total,
                        }),
                    )
                    .unwrap();
                    b.ode_step_end(
                        phase,
                        &mut yd,
                        &mut k0d,
                        std::array::from_fn(|i| &ksd[i + 1]),
                        &ynd,
                        &mut sd,
                        &ctl,
                        dense.then_some(Dense {
                            t_eval: &ted,
                            y_eval: &mut yed,
                            ids: &idsd,
                            rows_total: total,
                        }),
                    )
                    .unwrap();
                    if phase == Phase::ERROR {
                        cpu.ode_share(&mut sh, col::ERR, ShareMode::Max).unwrap();
                        b.ode_share(&mut sd, col::ERR, ShareMode::Max).unwrap();
                    }
                }
                let what = format!("step_end {rows}x{width} ctl {ci} {phases:?}");
                assert_state(&format!("{what} state"), &down(b, &sd), &sh);
                assert_close(&format!("{what} y"), &down(b, &yd), &yh, 0.0, 0.0);
                assert_close(&format!("{what} k0"), &down(b, &k0d), &k0h, 0.0, 0.0);
                assert_close(&format!("{what} y_eval"), &down(b, &yed), &yeh, 1e-6, 1e-6);
                let statuses: Vec<f32> = (0..rows).map(|r| sh.get(r, col::STATUS)).collect();
                if rows > 20 {
                    // The reference itself went through every outcome.
                    for code in [0.0, 1.0, 2.0, 3.0] {
                        assert!(
                            statuses.contains(&code),
                            "{what}: no row with status {code}"
                        );
                    }
                }
            }
        }
    }
}

fn check_stages<B: Backend>(b: &B) {
    let cpu = Cpu;
    for (rows, width) in [(1, 2), (37, 3), (300, 7)] {
        let mut rng = Rng::new(200 + rows as u64);
        let state = mixed_state(rows, 5);
        let y = Tensor::randn(rows, width, &mut rng);
        let ks: Vec<Tensor> = (0..6)
            .map(|_| Tensor::randn(rows, width, &mut rng))
            .collect();
        let (yd, sd) = (up(b, &y), up(b, &state));
        let ksd: Vec<B::Mat> = ks.iter().map(|k| up(b, k)).collect();
        for s in 0..7 {
            let kh: Vec<&Tensor> = ks[..s].iter().collect();
            let kd: Vec<&B::Mat> = ksd[..s].iter().collect();
            let (ys, ts) = cpu.ode_stage(&y, &kh, &state, s).unwrap();
            let (ysd, tsd) = b.ode_stage(&yd, &kd, &sd, s).unwrap();
            assert_close(
                &format!("stage {s} y {rows}x{width}"),
                &down(b, &ysd),
                &ys,
                0.0,
                0.0,
            );
            assert_close(
                &format!("stage {s} t {rows}x{width}"),
                &down(b, &tsd),
                &ts,
                0.0,
                0.0,
            );
        }
        assert!(matches!(
            b.ode_stage(&yd, &[&ksd[0]], &sd, 3),
            Err(Error::InvalidArgument(_))
        ));
    }
}

fn check_start_ops<B: Backend>(b: &B) {
    let cpu = Cpu;
    for (rows, width) in [(1, 2), (37, 3), (150, 40)] {
        for ctl in controls() {
            let mut rng = Rng::new(300 + rows as u64);
            let t0 = Tensor::from_fn(rows, 1, |r, _| if r % 5 == 1 { 1.0 } else { 0.0 });
            let t1 = Tensor::from_fn(rows, 1, |r, _| match r % 5 {
                1 => 0.0,
                3 => 0.0,
                _ => 2.0,
            });
            let h0 = (rows == 37).then_some(0.01);
            let s = cpu.ode_init_state(&t0, &t1, h0).unwrap();
            let mut sd = b.ode_init_state(&up(b, &t0), &up(b, &t1), h0).unwrap();
            assert_state("init_state", &down(b, &sd), &s);
            let y = Tensor::randn(rows, width, &mut rng);
            let mut f0 = Tensor::randn(rows, width, &mut rng);
            let mut f1 = Tensor::from_fn(rows, width, |r, j| f0.get(r, j) + 0.1 * y.get(r, j));
            if rows > 20 {
                f0.set(7, 1, f32::NAN);
                f1.set(12, 0, f32::NAN);
            }
            let (yd, f0d, f1d) = (up(b, &y), up(b, &f0), up(b, &f1));
            let mut sh = s.clone();
            let (yp, tp) = cpu.ode_initial_probe(&y, &f0, &mut sh, &ctl).unwrap();
            let (ypd, tpd) = b.ode_initial_probe(&yd, &f0d, &mut sd, &ctl).unwrap();
            assert_state("initial_probe state", &down(b, &sd), &sh);
            assert_close("initial_probe y", &down(b, &ypd), &yp, 1e-6, 1e-6);
            assert_close("initial_probe t", &down(b, &tpd), &tp, 1e-7, 1e-6);
            cpu.ode_initial_refine(&y, &f0, &f1, &mut sh, &ctl).unwrap();
            b.ode_initial_refine(&yd, &f0d, &f1d, &mut sd, &ctl)
                .unwrap();
            assert_state("initial_refine state", &down(b, &sd), &sh);
            for mode in [ShareMode::Min, ShareMode::Max] {
                let (mut a, mut ad) = (sh.clone(), up(b, &sh));
                cpu.ode_share(&mut a, col::H_ABS, mode).unwrap();
                b.ode_share(&mut ad, col::H_ABS, mode).unwrap();
                assert_state(&format!("share {mode:?}"), &down(b, &ad), &a);
            }
            cpu.ode_propose(&mut sh, &ctl).unwrap();
            b.ode_propose(&mut sd, &ctl).unwrap();
            assert_state("propose", &down(b, &sd), &sh);
        }
    }
    // NaN is the largest error of a shared step.
    let mut s = mixed_state(50, 3);
    s.set(9, col::ERR, f32::NAN);
    s.set(9, col::STATUS, 0.0);
    let mut sd = up(b, &s);
    b.ode_share(&mut sd, col::ERR, ShareMode::Max).unwrap();
    let got = down(b, &sd);
    assert!((0..50).all(|r| got.get(r, col::STATUS) != 0.0 || got.get(r, col::ERR).is_nan()));
}

fn check_bookkeeping<B: Backend>(b: &B) {
    let cpu = Cpu;
    for (rows, width) in [(1, 2), (37, 3), (2100, 2)] {
        let mut rng = Rng::new(400 + rows as u64);
        let state = mixed_state(rows, 11);
        let sd = up(b, &state);
        let sum = cpu.ode_summary(&state).unwrap();
        assert_eq!(b.ode_summary(&sd).unwrap(), sum, "summary {rows}");
        let idx = cpu.ode_active_rows(&state, sum.active).unwrap();
        let idx_d = b.ode_active_rows(&sd, sum.active).unwrap();
        // Gathering with the device's indices picks the same rows.
        let y = Tensor::randn(rows, width, &mut rng);
        let yd = up(b, &y);
        assert_close(
            &format!("active rows {rows}"),
            &down(b, &b.gather_rows(&yd, &idx_d).unwrap()),
            &cpu.gather_rows(&y, &idx).unwrap(),
            0.0,
            0.0,
        );
        let ids = row_ids(rows, 12);
        let total = 3 * rows + 5;
        let mut oy = Tensor::full(total, width, -7.0);
        let mut os = Tensor::zeros(total, STATE_COLS);
        let (mut oyd, mut osd) = (up(b, &oy), up(b, &os));
        cpu.ode_retire(&y, &state, &ids, &mut oy, &mut os).unwrap();
        b.ode_retire(&yd, &sd, &up(b, &ids), &mut oyd, &mut osd)
            .unwrap();
        assert_close("retire y", &down(b, &oyd), &oy, 0.0, 0.0);
        assert_close("retire state", &down(b, &osd), &os, 0.0, 0.0);
        // Dense output at the start.
        let t_eval = Tensor::from_vec(1, 3, vec![0.0, 0.3, 1.0]).unwrap();
        let mut ye = Tensor::zeros(3 * total, width);
        let mut yed = up(b, &ye);
        let mut s2 = state.clone();
        let mut s2d = up(b, &state);
        let idsd = up(b, &ids);
        let ted = up(b, &t_eval);
        cpu.ode_dense_start(
            &y,
            &mut s2,
            Dense {
                t_eval: &t_eval,
                y_eval: &mut ye,
                ids: &ids,
                rows_total: total,
            },
        )
        .unwrap();
        b.ode_dense_start(
            &yd,
            &mut s2d,
            Dense {
                t_eval: &ted,
                y_eval: &mut yed,
                ids: &idsd,
                rows_total: total,
            },
        )
        .unwrap();
        assert_close("dense start y_eval", &down(b, &yed), &ye, 0.0, 0.0);
        assert_close("dense start state", &down(b, &s2d), &s2, 0.0, 0.0);
    }
}

fn check_quadrature<B: Backend>(b: &B) {
    let cpu = Cpu;
    for (fi, dim, rows, div) in [(0, 2, 150, true), (1, 3, 37, false), (3, 2, 70, true)] {
        let (hidden, act) = FIELDS[fi];
        let net = field(dim, hidden, act, 500 + fi as u64);
        let netd = up_net(b, &net);
        let mut rng = Rng::new(501);
        let mut state = mixed_state(rows, 13);
        for r in 0..rows {
            state.set(r, col::VERDICT, (r % 3 != 0) as u8 as f32);
        }
        let c = Tensor::randn(rows, 1, &mut rng);
        let ids = row_ids(rows, 14);
        let (sd, cd, idsd) = (up(b, &state), up(b, &c), up(b, &ids));
        let mut acc_h = cpu.ode_quad_new(&net).unwrap();
        let mut acc_d = b.ode_quad_new(&netd).unwrap();
        for s in 0..3 {
            let mut y = Tensor::randn(rows, 2 * dim, &mut rng);
            // A non-finite row whose weight is zero adds nothing.
            y.set(3, 0, f32::NAN);
            let t = Tensor::rand_uniform(rows, 1, 0.0, 1.0, &mut rng);
            fn generated<M>(ids: &M) -> TraceMode<'_, M> {
                TraceMode::Generated {
                    m: 2,
                    kind: ProbeKind::Rademacher,
                    seed: 15,
                    rows: Some(ids),
                }
            }
            let factor = -0.3 * (s + 1) as f64;
            cpu.ode_quad_add(
                &mut acc_h,
                &net,
                &y,
                &t,
                &state,
                factor,
                div.then(|| DivCotangent {
                    a_div: &c,
                    trace: generated(&ids),
                }),
            )
            .unwrap();
            b.ode_quad_add(
                &mut acc_d,
                &netd,
                &up(b, &y),
                &up(b, &t),
                &sd,
                factor,
                div.then(|| DivCotangent {
                    a_div: &cd,
                    trace: generated(&idsd),
                }),
            )
            .unwrap();
        }
        let got = b.ode_quad_finish(acc_d, &netd).unwrap();
        let got = got.try_map(|m| b.download(m)).unwrap();
        let want = cpu.ode_quad_finish(acc_h, &net).unwrap();
        assert_grads(
            &format!("quadrature {hidden:?} D={dim} B={rows} div={div}"),
            &got,
            &want,
            1e-3,
            1e-3,
        );
    }
}

/// The public ops name the first non-finite input, as the reference does.
fn check_non_finite_inputs<B: Backend>(b: &B) {
    let net = field(2, &[8], Activation::Tanh, 600);
    let netd = up_net(b, &net);
    let (mut z, t) = batch(70, 2, 601);
    z.set(41, 1, f32::NAN);
    let err = b.field(&netd, &up(b, &z), &up(b, &t)).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { row: 41, col: 1, what } if what.contains('z')),
        "{err}"
    );
    let (z, mut t) = batch(70, 2, 602);
    t.set(65, 0, f32::INFINITY);
    let err = b
        .field_div(&netd, &up(b, &z), &up(b, &t), TraceMode::Exact)
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::NonFinite {
                row: 65,
                col: 0,
                ..
            }
        ),
        "{err}"
    );
    let t = Tensor::zeros(70, 1);
    let mut p = probes(70, 2, 2, ProbeKind::Gaussian, 1).unwrap();
    p.set(30, 3, f32::NAN);
    let err = b
        .field_div(
            &netd,
            &up(b, &z),
            &up(b, &t),
            TraceMode::Hutchinson(&up(b, &p)),
        )
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::NonFinite {
                row: 30,
                col: 3,
                ..
            }
        ),
        "{err}"
    );
    let mut a = Tensor::zeros(70, 2);
    a.set(5, 0, f32::NAN);
    let err = b
        .field_vjp(
            &netd,
            &up(b, &z),
            &up(b, &t),
            &up(b, &a),
            None,
            ParamGrads::Sum,
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { row: 5, col: 0, .. }),
        "{err}"
    );
}

on_grid_backends!(field_op, super::check_field);
on_grid_backends!(field_div_op, super::check_field_div);
on_grid_backends!(generated_probes_bit_for_bit, super::check_generated_probes);
on_grid_backends!(field_vjp_op, super::check_field_vjp);
on_grid_backends!(rhs, super::check_rhs);
on_grid_backends!(step_end, super::check_step_end);
on_grid_backends!(stages, super::check_stages);
on_grid_backends!(start_ops, super::check_start_ops);
on_grid_backends!(bookkeeping, super::check_bookkeeping);
on_grid_backends!(quadrature, super::check_quadrature);
on_grid_backends!(non_finite_inputs, super::check_non_finite_inputs);
