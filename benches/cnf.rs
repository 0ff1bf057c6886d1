//! Continuous flows on the CPU backend. `cargo bench --bench cnf [-- FILTER]`.
//!
//! - `cnf_logp_bar`: the quality-bar case, log-density of a 3→64→64→2 tanh field, B = 1024,
//!   rtol = atol = 1e-5, exact trace; for a freshly initialised field and for one trained by
//!   flow matching on two moons (the trained field bends more and needs more steps; its
//!   training runs once, when a case needs it), also with shared steps and one probe.
//! - `cnf_logp_B{1024,65536}`: RK45 on the same trained field, per-row vs shared steps, exact
//!   trace vs one Rademacher probe (65536 rows with the fewest samples criterion allows).
//! - `cnf_train_step`: one flow-matching step and one adjoint (maximum-likelihood) step.
//!
//! Each case's NFE (per-row max, and rows evaluated in total) is printed once before timing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use flowfuse::backend::Cpu;
use flowfuse::cnf::{Cnf, CnfConfig, Objective, Trace};
use flowfuse::nn::Activation;
use flowfuse::ode::SolveStats;
use flowfuse::ops::optim::AdamHyper;
use flowfuse::ops::rk45::ProbeKind;
use flowfuse::rng::Rng;
use flowfuse::tensor::Tensor;
use flowfuse::train::data::{moons, train_test_split};
use flowfuse::train::trainer::{TrainConfig, Trainable, train};

const RADEMACHER_1: Trace = Trace::Hutchinson {
    probes: 1,
    kind: ProbeKind::Rademacher,
    seed: 7,
};

fn cnf(hidden: &[usize], seed: u64) -> Cnf<Cpu> {
    let cfg = CnfConfig::new(2, hidden, Activation::Tanh);
    Cnf::new(&Cpu, cfg, &mut Rng::new(seed)).expect("a CNF")
}

/// Flow-matching steps of the trained field: enough for a field that bends like a good model
/// of the data (test NLL about 0.5); a barely trained field is nearly straight and cheap.
const TRAIN_STEPS: usize = 20_000;

/// A 3→64→64→2 tanh field trained by flow matching on two moons (batch 512).
fn trained_cnf() -> Cnf<Cpu> {
    let mut rng = Rng::new(1);
    let data = moons(20_000, &mut rng);
    let (tr, te) = train_test_split(&data, 0.2, &mut rng).expect("split");
    let mut model = cnf(&[64, 64], 2);
    let tc = TrainConfig {
        steps: TRAIN_STEPS,
        batch: 512,
        adam: AdamHyper {
            lr: 3e-3,
            ..Default::default()
        },
        eval_every: TRAIN_STEPS,
        eval_batch: 1024,
        progress: false,
        ..Default::default()
    };
    let started = Instant::now();
    let report =
        train(&mut model, &Cpu, &tr, &te.slice_rows(0, 1024), &tc, None).expect("training");
    eprintln!(
        "trained field: {TRAIN_STEPS} flow-matching steps in {:.1}s, test NLL (1024 rows) {:.3}",
        started.elapsed().as_secs_f64(),
        report.test_nll
    );
    model
}

fn describe(what: &str, s: &SolveStats) {
    eprintln!(
        "{what}: max NFE per row {}, mean {:.1}, closure calls {}, rows evaluated {}",
        s.max_nfe(),
        s.row_evaluations as f64 / s.nfe.len() as f64,
        s.closure_calls,
        s.row_evaluations
    );
}

fn data(rows: usize) -> Tensor {
    moons(rows, &mut Rng::new(3))
}

/// The bar and RK45 groups share one trained field, trained on first use (so a filter that
/// selects neither does not pay for it).
fn bench_logp(c: &mut Criterion) {
    let mut trained: Option<Cnf<Cpu>> = None;
    bench_bar(c, &mut trained);
    bench_rk45(c, &mut trained);
}

fn bench_bar(c: &mut Criterion, trained: &mut Option<Cnf<Cpu>>) {
    let x = data(1024);
    let mut group = c.benchmark_group("cnf_logp_bar");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    // Criterion calls each routine several times: build and describe once.
    let mut init: Option<Cnf<Cpu>> = None;
    group.bench_function("init", |b| {
        let model = init.get_or_insert_with(|| {
            let m = cnf(&[64, 64], 5);
            let (_, s) = m.log_prob_with(&Cpu, &x, Trace::Exact).expect("log p");
            describe("bar init B=1024 exact", &s);
            m
        });
        b.iter(|| {
            model
                .log_prob_with(&Cpu, black_box(&x), Trace::Exact)
                .unwrap()
        })
    });
    // The trained field (built once, when a case needs it) with per-row and shared steps, and
    // with one Rademacher probe instead of the exact trace.
    for (name, shared, trace) in [
        ("trained", false, Trace::Exact),
        ("trained_shared", true, Trace::Exact),
        ("trained_hutch1", false, RADEMACHER_1),
    ] {
        let mut shown = false;
        group.bench_function(name, |b| {
            let model = trained.get_or_insert_with(trained_cnf);
            model.solver.shared_steps = shared;
            if !shown {
                let (_, s) = model.log_prob_with(&Cpu, &x, trace).expect("log p");
                describe(&format!("bar {name} B=1024"), &s);
                shown = true;
            }
            b.iter(|| model.log_prob_with(&Cpu, black_box(&x), trace).unwrap())
        });
    }
    group.finish();
}

fn bench_rk45(c: &mut Criterion, trained: &mut Option<Cnf<Cpu>>) {
    for rows in [1024usize, 65536] {
        let x = data(rows);
        let mut group = c.benchmark_group(format!("cnf_logp_B{rows}"));
        group.sample_size(10).warm_up_time(Duration::from_secs(1));
        if rows > 4096 {
            group.measurement_time(Duration::from_secs(10));
        } else {
            group.measurement_time(Duration::from_secs(3));
        }
        for shared in [false, true] {
            for (tname, trace) in [("exact", Trace::Exact), ("hutch1", RADEMACHER_1)] {
                let name = format!("{}_{tname}", if shared { "shared" } else { "per_row" });
                let mut shown = false;
                group.bench_function(&name, |b| {
                    let model = trained.get_or_insert_with(trained_cnf);
                    model.solver.shared_steps = shared;
                    if !shown {
                        let (_, s) = model.log_prob_with(&Cpu, &x, trace).expect("log p");
                        describe(&format!("B={rows} {name}"), &s);
                        shown = true;
                    }
                    b.iter(|| model.log_prob_with(&Cpu, black_box(&x), trace).unwrap())
                });
            }
        }
        group.finish();
    }
}

fn bench_train_step(c: &mut Criterion) {
    let x = data(512);
    let mut group = c.benchmark_group("cnf_train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut fm = cnf(&[64, 64], 13);
    let mut rng = Rng::new(14);
    group.bench_function("flow_matching_B512", |b| {
        b.iter(|| fm.loss_and_grad(&Cpu, black_box(&x), &mut rng).unwrap())
    });
    let mut mle = cnf(&[64, 64], 15);
    mle.objective = Objective::Mle {
        trace: flowfuse::ops::rk45::TraceSpec::Hutchinson {
            probes: 1,
            probe: ProbeKind::Rademacher,
        },
    };
    group.bench_function("adjoint_hutch1_B512", |b| {
        b.iter(|| mle.loss_and_grad(&Cpu, black_box(&x), &mut rng).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_logp, bench_train_step);
criterion_main!(benches);
