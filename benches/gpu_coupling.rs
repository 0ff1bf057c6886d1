//! The fused coupling kernels on CUDA: forward and backward of an affine (RealNVP) coupling
//! layer, f32 and bf16 matrix products. `cargo bench --bench gpu_coupling`. Without a GPU it
//! prints why and exits successfully.
//!
//! FLOPs per row (multiply-adds count 2; the transform, the log-det and the bias adds are
//! O(D) and left out), with widths w_0 .. w_L of the conditioner:
//!   forward  = 2 · Σ_l w_l · w_{l+1}
//!   backward ≈ 3 × forward (recompute, dW, dH)
//! - D = 64, hidden 256 x 2, affine: widths 32, 256, 256, 64:
//!   forward = 2 · (32·256 + 256·256 + 256·64) = 180 224 FLOP/row, backward ≈ 540 672.
//!   At batch 2^20 a forward is 189 GFLOP: rows/s × 180 224 = FLOP/s. The targets are at
//!   least 50% of the H200's FP32 peak (≈ 33 TFLOP/s, ≈ 186 M rows/s) for f32 and three
//!   times that (≈ 100 TFLOP/s, ≈ 555 M rows/s) for bf16.
//! - D = 2, hidden 64 x 2, affine: widths 1, 64, 64, 2:
//!   forward = 2 · (1·64 + 64·64 + 64·2) = 8 576 FLOP/row; at batch 4096 this measures launch
//!   and transfer overheads more than arithmetic.
//!
//! Each call includes the weight packing launch and the read-back of the status slots (one
//! synchronisation), as a layer sees it in training.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowfuse::backend::Device;
use flowfuse::backend::cuda::{Cuda, availability};
use flowfuse::backend::grid::Precision;
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::coupling::{CouplingKind, CouplingOps, CouplingSpec, Half};
use flowfuse::{Direction, Rng, Tensor};

/// (label, batch rows, D, hidden widths)
const SHAPES: [(&str, usize, usize, &[usize]); 2] = [
    ("b1M_d64_h256", 1 << 20, 64, &[256, 256]),
    ("b4096_d2_h64", 4096, 2, &[64, 64]),
];

fn open() -> Option<Cuda> {
    let avail = availability();
    if avail.devices == 0 {
        eprintln!("gpu_coupling: skipping, no GPU: {}", avail.reason);
        return None;
    }
    match Cuda::open(0) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("gpu_coupling: skipping, the CUDA backend does not open: {e}");
            None
        }
    }
}

fn bench_coupling(c: &mut Criterion) {
    for precision in [Precision::F32, Precision::Bf16] {
        let Some(b) = open() else { return };
        let b = b.with_precision(precision);
        let tag = match precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        };
        for (label, rows, dim, hidden) in SHAPES {
            let spec = CouplingSpec {
                dim,
                copied: Half::Lower,
                kind: CouplingKind::Affine { clamp: 2.0 },
            };
            let mut rng = Rng::new(7);
            let mut widths = vec![spec.net_in()];
            widths.extend_from_slice(hidden);
            widths.push(spec.net_out());
            let net = Mlp::new(&widths, Activation::Relu, &mut rng)
                .expect("valid widths")
                .try_map(|t| b.upload(t))
                .expect("upload");
            let x = b
                .upload(&Tensor::randn(rows, dim, &mut rng))
                .expect("upload");
            let d_out = b
                .upload(&Tensor::randn(rows, dim, &mut rng))
                .expect("upload");
            let d_ld = b.upload(&Tensor::randn(rows, 1, &mut rng)).expect("upload");

            let mut group = c.benchmark_group(format!("coupling_{label}_{tag}"));
            group.throughput(Throughput::Elements(rows as u64));
            group.sample_size(20);
            group.measurement_time(Duration::from_secs(5));
            group.bench_function("forward", |bench| {
                bench.iter(|| {
                    let out = b
                        .coupling(&spec, &net, &x, Direction::Forward)
                        .expect("forward");
                    black_box(out)
                })
            });
            group.bench_function("backward", |bench| {
                bench.iter(|| {
                    let out = b
                        .coupling_backward(&spec, &net, &x, Direction::Inverse, &d_out, &d_ld)
                        .expect("backward");
                    black_box(out)
                })
            });
            group.finish();
        }
    }
}

criterion_group!(benches, bench_coupling);
criterion_main!(benches);
