//! The RK45 kernels on CUDA (`cargo bench --bench gpu_rk45`; prints why it skips and exits 0
//! when there is no GPU). B = 65536 rows, the field 3→64→64→2 tanh:
//! - `rk45_field`: one evaluation of the vector field alone, and of the density system's
//!   right-hand side [f, −div] with the exact trace (two unit-vector tangents), one Rademacher
//!   probe generated on the device, and one uploaded probe;
//! - `rk45_step`: one step attempt of the density system [z, L] as `ode::device` runs it (six
//!   stage combinations and right-hand sides, the step end, the summary read back), with
//!   per-row and shared steps; and the step ops alone (six stages and the step end on stage
//!   derivatives computed beforehand, no field);
//! - `rk45_cnf_logp`: the log-density of 65536 rows by `Cnf::log_prob` (exact trace) with
//!   per-row and shared steps; the work (NFE, rows evaluated) is printed once per case.
//!
//! Reading the target "one RK45 step costs no more than its vector-field evaluations plus one
//! memory pass per stage": with t_f = `rk45_field/div_exact` (one right-hand side), t_ops =
//! `rk45_step/ops_only` and t_step = `rk45_step/per_row`, the target holds when
//! t_step <= 6·t_f + t_ops and t_ops is close to the bytes the step ops move divided by the
//! memory bandwidth (both printed once before timing): each stage kernel reads y and the stage
//! derivatives so far once and writes y_s once, the step end reads y, y_new and k_0..k_6 once
//! and writes y, k_0 and the state once.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowfuse::backend::cuda::{Cuda, availability};
use flowfuse::cnf::{Cnf, CnfConfig};
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ode::{Controller, IController};
use flowfuse::ops::prelude::*;
use flowfuse::ops::rk45::{
    OdeStepOps, OdeSystem, Phase, ProbeKind, STATE_COLS, ShareMode, StepControl, TraceMode, col,
    probes,
};
use flowfuse::{Device, Rng, Tensor};

const BATCH: usize = 65_536;
const DIM: usize = 2;
const HIDDEN: [usize; 2] = [64, 64];

type Mat = <Cuda as Device>::Mat;

fn open() -> Option<Cuda> {
    let avail = availability();
    if avail.devices == 0 {
        eprintln!("gpu_rk45: skipping, no CUDA device: {}", avail.reason);
        return None;
    }
    match Cuda::open(0) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("gpu_rk45: skipping, the CUDA backend is unavailable: {e}");
            None
        }
    }
}

fn field(g: &Cuda) -> Mlp<Mat> {
    let mut widths = vec![DIM + 1];
    widths.extend(HIDDEN);
    widths.push(DIM);
    let net = Mlp::new(&widths, Activation::Tanh, &mut Rng::new(1)).expect("MLP");
    net.try_map(|t| g.upload(t)).expect("upload")
}

/// A fresh copy of a device matrix (so that in-place ops in the timed routine do not copy).
fn copy(g: &Cuda, m: &Mat) -> Mat {
    g.axpby(1.0, m, 0.0, m).expect("copy")
}

fn bench_field(c: &mut Criterion, g: &Cuda, net: &Mlp<Mat>) {
    let mut group = c.benchmark_group("rk45_field");
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut rng = Rng::new(2);
    let z = g
        .upload(&Tensor::randn(BATCH, DIM, &mut rng))
        .expect("upload");
    let y = g
        .upload(&Tensor::randn(BATCH, DIM + 1, &mut rng))
        .expect("upload");
    let t = g.upload(&Tensor::full(BATCH, 1, 0.5)).expect("upload");
    let p = g
        .upload(&probes(BATCH, DIM, 1, ProbeKind::Rademacher, 3).expect("probes"))
        .expect("upload");
    group.bench_function("field", |b| {
        b.iter(|| {
            let k = g.ode_rhs(net, &z, &t, OdeSystem::Field).expect("rhs");
            g.synchronize().expect("sync");
            black_box(k)
        })
    });
    let traces: [(&str, TraceMode<'_, Mat>); 3] = [
        ("div_exact", TraceMode::Exact),
        (
            "div_hutchinson_generated",
            TraceMode::Generated {
                m: 1,
                kind: ProbeKind::Rademacher,
                seed: 3,
                rows: None,
            },
        ),
        ("div_hutchinson_uploaded", TraceMode::Hutchinson(&p)),
    ];
    for (name, trace) in traces {
        group.bench_function(name, |b| {
            b.iter(|| {
                let k = g
                    .ode_rhs(net, &y, &t, OdeSystem::FieldDiv(trace))
                    .expect("rhs");
                g.synchronize().expect("sync");
                black_box(k)
            })
        });
    }
    group.finish();
}

/// The state of a density solve from t = 1 to 0 with a step of 0.01 proposed.
fn density_start(g: &Cuda, ctl: &StepControl) -> (Mat, Mat) {
    let mut rng = Rng::new(4);
    let x = Tensor::randn(BATCH, DIM, &mut rng);
    let y0 = Tensor::from_fn(
        BATCH,
        DIM + 1,
        |r, c| if c < DIM { x.get(r, c) } else { 0.0 },
    );
    let t0 = g.fill(BATCH, 1, 1.0).expect("fill");
    let t1 = g.fill(BATCH, 1, 0.0).expect("fill");
    let mut state = g.ode_init_state(&t0, &t1, Some(0.01)).expect("state");
    g.ode_propose(&mut state, ctl).expect("propose");
    (g.upload(&y0).expect("upload"), state)
}

/// One step attempt as the driver runs it; `rhs` None reuses `fixed` stage derivatives.
#[allow(clippy::too_many_arguments)]
fn attempt(
    g: &Cuda,
    net: &Mlp<Mat>,
    ctl: &StepControl,
    shared: bool,
    y: &mut Mat,
    k0: &mut Mat,
    state: &mut Mat,
    fixed: Option<&[Mat]>,
) {
    let mut ks: Vec<Mat> = Vec::with_capacity(6);
    let mut y_new = None;
    for s in 1..7 {
        let (ys, ts) = {
            let mut refs: Vec<&Mat> = vec![k0];
            refs.extend(ks.iter());
            g.ode_stage(y, &refs, state, s).expect("stage")
        };
        let k = match fixed {
            Some(f) => f[s - 1].clone(),
            None => g
                .ode_rhs(net, &ys, &ts, OdeSystem::FieldDiv(TraceMode::Exact))
                .expect("rhs"),
        };
        ks.push(k);
        if s == 6 {
            y_new = Some(ys);
        }
    }
    let y_new = y_new.expect("stage 6");
    let k: [&Mat; 6] = std::array::from_fn(|i| &ks[i]);
    if shared {
        g.ode_step_end(Phase::ERROR, y, k0, k, &y_new, state, ctl, None)
            .expect("error");
        g.ode_share(state, col::ERR, ShareMode::Max).expect("share");
        g.ode_step_end(
            Phase::DECIDE | Phase::UPDATE,
            y,
            k0,
            k,
            &y_new,
            state,
            ctl,
            None,
        )
        .expect("update");
    } else {
        g.ode_step_end(Phase::ALL, y, k0, k, &y_new, state, ctl, None)
            .expect("step end");
    }
    black_box(g.ode_summary(state).expect("summary"));
}

fn bench_step(c: &mut Criterion, g: &Cuda, net: &Mlp<Mat>) {
    let ctl = StepControl {
        rtol: 1e-5,
        atol: 1e-5,
        h_min: 0.0,
        h_max: f64::INFINITY,
        max_steps: 10_000,
        controller: Controller::Integral(IController::default()),
    };
    let (y0, state0) = density_start(g, &ctl);
    let t = g.fill(BATCH, 1, 1.0).expect("fill");
    let k00 = g
        .ode_rhs(net, &y0, &t, OdeSystem::FieldDiv(TraceMode::Exact))
        .expect("rhs");
    let mut rng = Rng::new(5);
    let fixed: Vec<Mat> = (0..6)
        .map(|_| {
            g.upload(&Tensor::randn(BATCH, DIM + 1, &mut rng).map(|v| 1e-3 * v))
                .expect("upload")
        })
        .collect();
    let w = DIM + 1;
    let stage_bytes: usize = (1..7).map(|s| (s + 2) * w * 4 + 4 + STATE_COLS * 4).sum();
    let end_bytes = (9 + 2) * w * 4 + 2 * STATE_COLS * 4;
    let bytes = BATCH * (stage_bytes + end_bytes + STATE_COLS * 4);
    match g.peaks() {
        Some(p) => eprintln!(
            "rk45_step: the step ops move ~{:.1} MB per attempt: {:.1} µs at the peak {:.0} GB/s",
            bytes as f64 / 1e6,
            bytes as f64 / (p.memory_gbs * 1e9) * 1e6,
            p.memory_gbs
        ),
        None => eprintln!(
            "rk45_step: the step ops move ~{:.1} MB per attempt",
            bytes as f64 / 1e6
        ),
    }
    let mut group = c.benchmark_group("rk45_step");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(20);
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, shared, ops_only) in [
        ("per_row", false, false),
        ("shared", true, false),
        ("ops_only", false, true),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || (copy(g, &y0), copy(g, &k00), copy(g, &state0)),
                |(mut y, mut k0, mut state)| {
                    attempt(
                        g,
                        net,
                        &ctl,
                        shared,
                        &mut y,
                        &mut k0,
                        &mut state,
                        ops_only.then_some(&fixed[..]),
                    );
                    (y, k0, state)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn bench_cnf(c: &mut Criterion, g: &Cuda) {
    let mut group = c.benchmark_group("rk45_cnf_logp");
    group.measurement_time(Duration::from_secs(10));
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    let x = g
        .upload(&Tensor::randn(BATCH, DIM, &mut Rng::new(6)))
        .expect("upload");
    for shared in [false, true] {
        let mut cfg = CnfConfig::new(DIM, &HIDDEN, Activation::Tanh);
        cfg.solver.shared_steps = shared;
        let cnf = Cnf::new(g, cfg, &mut Rng::new(7)).expect("CNF");
        let (_, stats) = cnf.log_prob(g, &x).expect("log_prob");
        let name = if shared { "shared" } else { "per_row" };
        eprintln!(
            "rk45_cnf_logp/{name}: max NFE {}, rows evaluated {} ({:.1} per row), {} evaluations",
            stats.max_nfe(),
            stats.row_evaluations,
            stats.row_evaluations as f64 / BATCH as f64,
            stats.closure_calls
        );
        group.bench_function(BenchmarkId::new("exact", name), |b| {
            b.iter(|| {
                let lp = cnf.log_prob(g, &x).expect("log_prob");
                black_box(lp)
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let Some(g) = open() else { return };
    eprintln!("gpu_rk45 on {}", g.name());
    let net = field(&g);
    bench_field(c, &g, &net);
    bench_step(c, &g, &net);
    bench_cnf(c, &g);
}

criterion_group!(gpu_rk45, benches);
criterion_main!(gpu_rk45);
