//! MADE / MAF throughput on the CPU reference backend.
//!
//! - `maf_flow_d{2,16,64}`: a 5-layer MAF (MADE hidden [128, 128], ReLU, orders alternating
//!   natural / reversed), batch 4096: `log_prob` (5 × ar_parallel Inverse + log-det sums + base
//!   density) and `sample` (5 × ar_sequential Forward). D = 16 is the quality-bar case.
//! - `ar_parallel`: one layer's parallel pass and its backward at batch 4096 for D in
//!   {2, 16, 64}.
//!
//! Run briefly: `cargo bench --bench made -- --quick` (or `--measurement-time 2`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowfuse::backend::Cpu;
use flowfuse::flows::autoregressive::AutoregressiveLayer;
use flowfuse::flows::{ArKind, FlowLayer};
use flowfuse::nn::made::{Order, made};
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::elementwise::ElementOps;
use flowfuse::ops::logdet::LogdetOps;
use flowfuse::ops::made::MadeOps;
use flowfuse::{Direction, Rng, Tensor};

const BATCH: usize = 4096;
const HIDDEN: [usize; 2] = [128, 128];

/// A MAF layer with random weights everywhere (a trained layer, not the identity start).
fn random_layer(b: &Cpu, dim: usize, order: Order, rng: &mut Rng) -> AutoregressiveLayer<Cpu> {
    let (spec, net) = made(dim, &HIDDEN, Activation::Relu, order, 2.0, rng).unwrap();
    let net = Mlp::new(&net.widths(), Activation::Relu, rng).unwrap();
    AutoregressiveLayer::from_host(b, ArKind::Maf, spec, &net).unwrap()
}

fn maf_flow(c: &mut Criterion) {
    for d in [2, 16, 64] {
        maf_flow_dim(c, d);
    }
}

fn maf_flow_dim(c: &mut Criterion, d: usize) {
    let b = Cpu::new();
    let mut rng = Rng::new(1);
    let layers: Vec<_> = (0..5)
        .map(|i| {
            let order = if i % 2 == 0 {
                Order::Natural
            } else {
                Order::Reversed
            };
            random_layer(&b, d, order, &mut rng)
        })
        .collect();
    let x = Tensor::randn(BATCH, d, &mut rng);
    let mut g = c.benchmark_group(format!("maf_flow_d{d}_h128x2"));
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("log_prob", |bench| {
        bench.iter(|| {
            // Density: x -> z through the layers in reverse, summing the log-dets.
            let (mut h, mut ld_sum) = layers[4].inverse(&b, &x).unwrap();
            for layer in layers[..4].iter().rev() {
                let (z, ld) = layer.inverse(&b, &h).unwrap();
                ld_sum = b.axpby(1.0, &ld_sum, 1.0, &ld).unwrap();
                h = z;
            }
            let base = b.gaussian_log_prob(&h).unwrap();
            black_box(b.axpby(1.0, &base, 1.0, &ld_sum).unwrap())
        })
    });
    g.bench_function("sample", |bench| {
        bench.iter(|| {
            let mut h = layers[0].forward(&b, &x).unwrap().0;
            for layer in &layers[1..] {
                h = layer.forward(&b, &h).unwrap().0;
            }
            black_box(h)
        })
    });
    g.finish();
}

fn ar_parallel(c: &mut Criterion) {
    let b = Cpu::new();
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("ar_parallel_h128x2_b4096");
    g.throughput(Throughput::Elements(BATCH as u64));
    for d in [2usize, 16, 64] {
        let layer = random_layer(&b, d, Order::Random(d as u64), &mut rng);
        let x = Tensor::randn(BATCH, d, &mut rng);
        let go = Tensor::randn(BATCH, d, &mut rng);
        let gl = Tensor::randn(BATCH, 1, &mut rng);
        let deg = &layer.degrees;
        g.bench_with_input(BenchmarkId::new("forward", d), &d, |bench, _| {
            bench.iter(|| {
                black_box(
                    b.ar_parallel(&layer.spec, &layer.net, deg, &x, Direction::Inverse)
                        .unwrap(),
                )
            })
        });
        g.bench_with_input(BenchmarkId::new("backward", d), &d, |bench, _| {
            bench.iter(|| {
                black_box(
                    b.ar_parallel_backward(
                        &layer.spec,
                        &layer.net,
                        deg,
                        &x,
                        Direction::Inverse,
                        &go,
                        &gl,
                    )
                    .unwrap(),
                )
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = maf_flow, ar_parallel
}
criterion_main!(benches);
