//! The MADE kernels on CUDA (`cargo bench --bench gpu_made`; prints why it skips and exits 0
//! when there is no GPU):
//! - the degree-masked GEMM against the same kernel with every weight live (a dense GEMM of the
//!   same shape and tiling), hidden -> hidden layers of a D = 64 MADE, f32 and bf16;
//! - MAF log-density: 5 layers with hidden [128, 128] at D = 16 and D = 64, batch 65536: per
//!   layer one `ar_parallel(Inverse)` (orders alternating natural/reversed), then the base
//!   log-density and the log-det sums;
//! - MAF sampling at D = 64: 5 × `ar_sequential(Forward)`, one launch per layer (plus the small
//!   weight-packing launch).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowfuse::backend::cuda::{Cuda, CudaGrid, availability};
use flowfuse::backend::grid::{GridIdx, GridMat, Precision};
use flowfuse::nn::made::{HiddenDegrees, Order, degrees, made_with};
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::made::MadeSpec;
use flowfuse::ops::made::cuda::MaskedLinear;
use flowfuse::ops::prelude::*;
use flowfuse::{Device, Direction, Rng, Tensor};

const BATCH: usize = 65_536;
const LAYERS: usize = 5;
const HIDDEN: [usize; 2] = [128, 128];

fn open() -> Option<Cuda> {
    let avail = availability();
    if avail.devices == 0 {
        eprintln!("gpu_made: skipping, no CUDA device: {}", avail.reason);
        return None;
    }
    match Cuda::open(0) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("gpu_made: skipping, the CUDA backend is unavailable: {e}");
            None
        }
    }
}

struct Layer {
    spec: MadeSpec,
    net: Mlp<GridMat<CudaGrid>>,
    deg: Vec<GridIdx<CudaGrid>>,
}

/// A MAF of random (non-identity) MADE layers, orders alternating natural / reversed.
fn maf(g: &Cuda, d: usize, seed: u64) -> Vec<Layer> {
    let mut rng = Rng::new(seed);
    (0..LAYERS)
        .map(|l| {
            let order = if l % 2 == 0 {
                Order::Natural
            } else {
                Order::Reversed
            };
            let (spec, _) = made_with(
                d,
                &HIDDEN,
                Activation::Relu,
                order,
                HiddenDegrees::Cycle,
                2.0,
                &mut rng,
            )
            .expect("MADE degrees");
            let widths: Vec<usize> = spec.degrees.iter().map(Vec::len).collect();
            let host = Mlp::new(&widths, Activation::Relu, &mut rng).expect("MLP");
            Layer {
                net: host.try_map(|t| g.upload(t)).expect("upload"),
                deg: spec
                    .degrees
                    .iter()
                    .map(|v| g.upload_idx(v).expect("upload"))
                    .collect(),
                spec,
            }
        })
        .collect()
}

/// log p(x) of the batch: z = g(x) layer by layer, log N(z) + Σ log-dets.
fn maf_log_prob(g: &Cuda, layers: &[Layer], x: &GridMat<CudaGrid>) -> GridMat<CudaGrid> {
    let mut h = x.clone();
    let mut total: Option<GridMat<CudaGrid>> = None;
    for l in layers.iter().rev() {
        let (z, ld) = g
            .ar_parallel(&l.spec, &l.net, &l.deg, &h, Direction::Inverse)
            .expect("ar_parallel");
        total = Some(match total {
            None => ld,
            Some(t) => g.axpby(1.0, &t, 1.0, &ld).expect("axpby"),
        });
        h = z;
    }
    let base = g.gaussian_log_prob(&h).expect("log N");
    g.axpby(1.0, &base, 1.0, &total.expect("layers"))
        .expect("axpby")
}

fn maf_sample(g: &Cuda, layers: &[Layer], z: &GridMat<CudaGrid>) -> GridMat<CudaGrid> {
    let mut h = z.clone();
    for l in layers {
        h = g
            .ar_sequential(&l.spec, &l.net, &l.deg, &h, Direction::Forward)
            .expect("ar_sequential")
            .0;
    }
    h
}

fn bench_matmul(c: &mut Criterion, g: &Cuda) {
    let precision = g.precision;
    let mut group = c.benchmark_group(format!("made_matmul_{precision:?}"));
    group.measurement_time(Duration::from_secs(3));
    let mut rng = Rng::new(1);
    for width in [256usize, 512] {
        let deg =
            degrees(64, &[width, width], Order::Natural, HiddenDegrees::Cycle).expect("degrees");
        let w = g
            .upload(&Tensor::randn(width, width, &mut rng))
            .expect("upload");
        let b = g
            .upload(&Tensor::randn(1, width, &mut rng))
            .expect("upload");
        let x = g
            .upload(&Tensor::randn(BATCH, width, &mut rng))
            .expect("upload");
        let (din, dout) = (
            g.upload_idx(&deg[1]).expect("idx"),
            g.upload_idx(&deg[2]).expect("idx"),
        );
        let ones = g.upload_idx(&vec![1u32; width]).expect("idx");
        let masked = MaskedLinear {
            w: &w,
            b: &b,
            deg_in: &din,
            deg_out: &dout,
            output: false,
        };
        let dense = MaskedLinear {
            w: &w,
            b: &b,
            deg_in: &ones,
            deg_out: &ones,
            output: false,
        };
        group.throughput(Throughput::Elements((BATCH * width * width) as u64));
        for (name, layer) in [("masked", masked), ("dense", dense)] {
            let counter = g.mac_counter().expect("counter");
            g.made_linear(layer, &x, None, None, Some(&counter))
                .expect("matmul");
            eprintln!(
                "made_matmul {width}x{width} B={BATCH} {precision:?} {name}: {} MACs executed",
                g.read_macs(&counter).expect("read")
            );
            group.bench_function(BenchmarkId::new(name, width), |bch| {
                bch.iter(|| {
                    let y = g.made_linear(layer, &x, None, None, None).expect("matmul");
                    g.synchronize().expect("sync");
                    black_box(y)
                })
            });
        }
    }
    group.finish();
}

fn bench_maf(c: &mut Criterion, g: &Cuda) {
    let precision = g.precision;
    let mut group = c.benchmark_group(format!("maf_{precision:?}"));
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(20);
    let mut rng = Rng::new(2);
    for d in [16usize, 64] {
        let layers = maf(g, d, 10 + d as u64);
        let x = g
            .upload(&Tensor::randn(BATCH, d, &mut rng))
            .expect("upload");
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(BenchmarkId::new("log_prob", d), |bch| {
            bch.iter(|| {
                let lp = maf_log_prob(g, &layers, &x);
                g.synchronize().expect("sync");
                black_box(lp)
            })
        });
        // Sampling runs the f32 sequential kernel whatever the precision: measure it once.
        if d == 64 && precision == Precision::F32 {
            group.bench_function(BenchmarkId::new("sample", d), |bch| {
                bch.iter(|| {
                    let s = maf_sample(g, &layers, &x);
                    g.synchronize().expect("sync");
                    black_box(s)
                })
            });
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let Some(cuda) = open() else { return };
    eprintln!("gpu_made on {}", cuda.name());
    drop(cuda);
    for precision in [Precision::F32, Precision::Bf16] {
        let g = Cuda::open(0)
            .expect("CUDA device")
            .with_precision(precision);
        bench_matmul(c, &g);
        bench_maf(c, &g);
    }
}

criterion_group!(gpu_made, benches);
criterion_main!(gpu_made);
