//! Coupling-layer benches on the CPU reference (criterion):
//! - one affine layer, forward + backward in the inverse (training) direction, batch 4096,
//!   D ∈ {2, 16, 64}, conditioner hidden [64, 64];
//! - a RealNVP-style log-density stand-in: 4 affine layers (alternating halves), D = 2,
//!   batch 4096 — inverse through the layers, log-dets summed, standard-normal base;
//! - a training-step stand-in: 8 affine layers, D = 64, batch 512 — inverse pass keeping each
//!   layer's input, backward through all 8 layers; once without and once with an Adam step.
//!
//! Conditioners use ReLU (the default activation) and random, non-zero output layers.
//! Run: `cargo bench --bench coupling -- --quick` (or `--measurement-time 3`).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowfuse::backend::Cpu;
use flowfuse::flows::FlowLayer;
use flowfuse::flows::coupling::CouplingLayer;
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::coupling::{CouplingKind, CouplingSpec, Half};
use flowfuse::ops::elementwise::ElementOps;
use flowfuse::ops::logdet::LogdetOps;
use flowfuse::ops::optim::{AdamHyper, OptimOps};
use flowfuse::{Rng, Shaped, Tensor};

const HIDDEN: [usize; 2] = [64, 64];

fn affine_layer(dim: usize, copied: Half, rng: &mut Rng) -> CouplingLayer<Cpu> {
    let spec = CouplingSpec {
        dim,
        copied,
        kind: CouplingKind::Affine { clamp: 3.0 },
    };
    let widths = [spec.net_in(), HIDDEN[0], HIDDEN[1], spec.net_out()];
    // Not the zero output layer of a fresh layer: the bench should see a real transform.
    let net = Mlp::new(&widths, Activation::Relu, rng).expect("valid widths");
    CouplingLayer { spec, net }
}

/// Alternating halves, as in Fig. 18.2.
fn affine_stack(dim: usize, layers: usize, rng: &mut Rng) -> Vec<CouplingLayer<Cpu>> {
    (0..layers)
        .map(|l| {
            let half = if l % 2 == 0 { Half::Lower } else { Half::Upper };
            affine_layer(dim, half, rng)
        })
        .collect()
}

fn single_layer(c: &mut Criterion) {
    let b = Cpu;
    let batch = 4096;
    let mut group = c.benchmark_group("coupling_affine_inverse_fwd_bwd");
    group.throughput(Throughput::Elements(batch as u64));
    for dim in [2usize, 16, 64] {
        let mut rng = Rng::new(dim as u64);
        let layer = affine_layer(dim, Half::Lower, &mut rng);
        let x = Tensor::randn(batch, dim, &mut rng);
        let d_z = Tensor::randn(batch, dim, &mut rng);
        let d_ld = Tensor::full(batch, 1, -1.0 / batch as f32);
        group.bench_function(BenchmarkId::from_parameter(format!("D{dim}")), |bench| {
            bench.iter(|| {
                let (z, ld) = layer.inverse(&b, black_box(&x)).unwrap();
                let grads = layer.inverse_backward(&b, &x, &d_z, &d_ld).unwrap();
                black_box((z, ld, grads))
            })
        });
    }
    group.finish();
}

/// log p(x) = log N(g(x); 0, I) + Σ log|det ∂z/∂x| (eq. 18.4, 18.7).
fn log_prob(b: &Cpu, layers: &[CouplingLayer<Cpu>], x: &Tensor) -> Tensor {
    let mut h = x.clone();
    let mut acc: Option<Tensor> = None;
    for layer in layers.iter().rev() {
        let (z, ld) = layer.inverse(b, &h).unwrap();
        acc = Some(match acc {
            None => ld,
            Some(a) => b.axpby(1.0, &a, 1.0, &ld).unwrap(),
        });
        h = z;
    }
    let base = b.gaussian_log_prob(&h).unwrap();
    b.axpby(1.0, &base, 1.0, &acc.expect("at least one layer"))
        .unwrap()
}

fn realnvp_log_prob(c: &mut Criterion) {
    let b = Cpu;
    let batch = 4096;
    let mut rng = Rng::new(7);
    let layers = affine_stack(2, 4, &mut rng);
    let x = Tensor::randn(batch, 2, &mut rng);
    let mut group = c.benchmark_group("realnvp_log_prob");
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("D2_4layers_b4096", |bench| {
        bench.iter(|| black_box(log_prob(&b, &layers, black_box(&x))))
    });
    group.finish();
}

/// Inverse pass keeping each layer's input, then backward through every layer for the loss
/// −mean log p (dL/dz = z/B at the base, dL/dlogdet = −1/B for every layer). Returns the
/// parameter gradients, layer by layer.
fn forward_backward(b: &Cpu, layers: &[CouplingLayer<Cpu>], x: &Tensor) -> Vec<Vec<Tensor>> {
    let rows = x.rows();
    let mut inputs = Vec::with_capacity(layers.len());
    let mut h = x.clone();
    for layer in layers.iter().rev() {
        let (z, _ld) = layer.inverse(b, &h).unwrap();
        inputs.push(h);
        h = z;
    }
    let inv_b = 1.0 / rows as f32;
    let mut d = h.map(|v| v * inv_b);
    let d_ld = Tensor::full(rows, 1, -inv_b);
    let mut grads = vec![Vec::new(); layers.len()];
    for (i, layer) in layers.iter().enumerate() {
        // layers[i] was applied last-but-i in the inverse pass, so its input is inputs[n-1-i].
        let input = &inputs[layers.len() - 1 - i];
        let (d_in, g) = layer.inverse_backward(b, input, &d, &d_ld).unwrap();
        grads[i] = g;
        d = d_in;
    }
    grads
}

fn train_step(c: &mut Criterion) {
    let b = Cpu;
    let (batch, dim) = (512, 64);
    let mut rng = Rng::new(9);
    let mut layers = affine_stack(dim, 8, &mut rng);
    let x = Tensor::randn(batch, dim, &mut rng);
    let mut group = c.benchmark_group("train_step_stand_in");
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("D64_8layers_b512_fwd_bwd", |bench| {
        bench.iter(|| black_box(forward_backward(&b, &layers, black_box(&x))))
    });
    let mut moments: Vec<(Tensor, Tensor)> = layers
        .iter()
        .flat_map(|l| l.params())
        .map(|p| {
            (
                Tensor::zeros(p.rows(), p.cols()),
                Tensor::zeros(p.rows(), p.cols()),
            )
        })
        .collect();
    let hyper = AdamHyper::default();
    let mut t = 0u32;
    group.bench_function("D64_8layers_b512_fwd_bwd_adam", |bench| {
        bench.iter(|| {
            let grads = forward_backward(&b, &layers, black_box(&x));
            t += 1;
            let params = layers.iter_mut().flat_map(|l| l.params_mut());
            for ((p, g), (m, v)) in params.zip(grads.iter().flatten()).zip(moments.iter_mut()) {
                b.adam_step(p, g, m, v, &hyper, t, 1.0).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, single_layer, realnvp_log_prob, train_step);
criterion_main!(benches);
