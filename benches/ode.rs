//! The batched Dormand–Prince solver on B = 1024 van der Pol oscillators whose stiffness
//! parameter μ varies across rows (most rows easy, a few hard): per-sample steps against one
//! step size shared by the whole batch. `cargo bench --bench ode`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use flowfuse::ode::{BatchSolution, OdeOptions, Stepping, solve_batch_rows};

const ROWS: usize = 1024;
const T1: f64 = 10.0;

/// μ from 0.2 up to 5.2, rising steeply near the end so that few rows are hard.
fn mu(row: usize) -> f64 {
    let u = row as f64 / (ROWS - 1) as f64;
    0.2 + 5.0 * u.powi(4)
}

fn initial_states() -> Vec<f64> {
    (0..ROWS)
        .flat_map(|r| {
            let phase = r as f64 * 0.37;
            [2.0 * phase.cos(), 2.0 * phase.sin()]
        })
        .collect()
}

fn solve(y0: &[f64], stepping: Stepping) -> BatchSolution {
    let opts = OdeOptions::with_tolerances(1e-6, 1e-6).stepping(stepping);
    solve_batch_rows(
        |rows, _t, y, dy| {
            for (i, &r) in rows.iter().enumerate() {
                let (x, v) = (y[2 * i], y[2 * i + 1]);
                dy[2 * i] = v;
                dy[2 * i + 1] = mu(r) * (1.0 - x * x) * v - x;
            }
            Ok(())
        },
        y0,
        2,
        (0.0, T1),
        &opts,
    )
    .expect("van der Pol batch solves")
}

fn bench_ode(c: &mut Criterion) {
    let y0 = initial_states();
    for (name, stepping) in [("per_row", Stepping::PerRow), ("shared", Stepping::Shared)] {
        let s = solve(&y0, stepping).stats;
        eprintln!(
            "vdp B={ROWS} {name}: closure calls {}, row evaluations {}, max nfe per row {}, min {}",
            s.closure_calls,
            s.row_evaluations,
            s.max_nfe(),
            s.nfe.iter().min().unwrap()
        );
    }
    let mut group = c.benchmark_group("ode_vdp_1024x2");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("per_row", |b| {
        b.iter(|| solve(black_box(&y0), Stepping::PerRow))
    });
    group.bench_function("shared", |b| {
        b.iter(|| solve(black_box(&y0), Stepping::Shared))
    });
    group.finish();
}

criterion_group!(benches, bench_ode);
criterion_main!(benches);
