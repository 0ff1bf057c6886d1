//! `flowfuse bench`: times each op family on a device and reports throughput, FLOP rate and
//! bandwidth, with the fraction of the device's peak where the device knows its peaks. One JSON
//! object per line. It complements the criterion benches with numbers that need no harness
//! (the GPU check runs it on machines without cargo).

use std::time::Instant;

use serde_json::{Value, json};

use flowfuse::nn::made::{Order, made};
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::Direction;
use flowfuse::ops::coupling::{CouplingKind, CouplingSpec, Half};
use flowfuse::{Backend, Result, Rng, Shaped, Tensor};

/// Sizes of one run of the suite.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Rows of the big coupling / MADE batches.
    pub batch: usize,
    /// Seconds each case is timed for (after a warm-up call).
    pub seconds: f64,
}

impl Sizes {
    pub fn for_device(gpu: bool, quick: bool) -> Self {
        Sizes {
            batch: if gpu { 1 << 20 } else { 4096 },
            seconds: if quick { 0.2 } else { 1.0 },
        }
    }
}

/// The work of one call, for turning time into rates.
struct Work {
    rows: usize,
    flops: f64,
    bytes: f64,
}

/// Times `f` until `seconds` have passed (at least 3 calls) and returns seconds per call.
fn time<B: Backend>(b: &B, seconds: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    b.synchronize()?;
    let start = Instant::now();
    let mut calls = 0u32;
    while calls < 3 || start.elapsed().as_secs_f64() < seconds {
        f()?;
        calls += 1;
    }
    b.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / calls as f64)
}

fn report<B: Backend>(b: &B, name: &str, precision: &str, work: Work, secs: f64) -> Value {
    let gflops = work.flops / secs / 1e9;
    let gbs = work.bytes / secs / 1e9;
    let mut v = json!({
        "bench": name,
        "device": b.name(),
        "precision": precision,
        "rows": work.rows,
        "ms_per_call": secs * 1e3,
        "rows_per_second": work.rows as f64 / secs,
        "gflops": gflops,
        "gbs": gbs,
    });
    if let Some(p) = b.peaks() {
        let peak = if precision == "bf16" {
            p.bf16_tflops
        } else {
            p.fp32_tflops
        };
        v["frac_compute_peak"] = json!(gflops / 1e3 / peak);
        v["frac_memory_peak"] = json!(gbs / p.memory_gbs);
    }
    v
}

/// 2·in·out flops per row for each linear layer.
fn mlp_flops(widths: &[usize]) -> f64 {
    widths.windows(2).map(|w| 2.0 * (w[0] * w[1]) as f64).sum()
}

fn random_mlp(widths: &[usize], rng: &mut Rng) -> Result<Mlp<Tensor>> {
    // Non-zero last layer so the transform does real work.
    Mlp::new(widths, Activation::Relu, rng)
}

/// Runs every case on `b`; `precision` labels the matmul precision the backend was set to.
pub fn run_suite<B: Backend>(b: &B, precision: &str, sizes: Sizes) -> Result<Vec<Value>> {
    let mut rng = Rng::new(7);
    let mut out = Vec::new();

    // Coupling layer: D = 64, hidden 256 (the GPU target's shape) and D = 2, hidden 64.
    for (d, h) in [(64usize, 256usize), (2, 64)] {
        let rows = if d == 2 {
            sizes.batch.clamp(4096, 1 << 16)
        } else {
            sizes.batch
        };
        let spec = CouplingSpec {
            dim: d,
            copied: Half::Lower,
            kind: CouplingKind::Affine { clamp: 3.0 },
        };
        let widths = [spec.net_in(), h, h, spec.net_out()];
        let net = random_mlp(&widths, &mut rng)?.try_map(|t| b.upload(t))?;
        let x = b.upload(&Tensor::randn(rows, d, &mut rng))?;
        let fwd = mlp_flops(&widths) * rows as f64;
        let io = (2 * rows * d + rows) as f64 * 4.0;
        let secs = time(b, sizes.seconds, || {
            b.coupling(&spec, &net, &x, Direction::Forward).map(|_| ())
        })?;
        out.push(report(
            b,
            &format!("coupling_fwd_D{d}_h{h}"),
            precision,
            Work {
                rows,
                flops: fwd,
                bytes: io,
            },
            secs,
        ));
        let g = b.upload(&Tensor::randn(rows, d, &mut rng))?;
        let gl = b.upload(&Tensor::randn(rows, 1, &mut rng))?;
        let secs = time(b, sizes.seconds, || {
            b.coupling_backward(&spec, &net, &x, Direction::Inverse, &g, &gl)
                .map(|_| ())
        })?;
        // Recomputed forward + two products per layer backward.
        out.push(report(
            b,
            &format!("coupling_bwd_D{d}_h{h}"),
            precision,
            Work {
                rows,
                flops: 3.0 * fwd,
                bytes: 2.0 * io,
            },
            secs,
        ));
    }

    // MAF: 5 MADE layers, hidden [128, 128], D = 16 (density) and D = 64 (sampling).
    for d in [16usize, 64] {
        let rows = sizes.batch.min(1 << 18);
        let mut layers = Vec::new();
        for l in 0..5 {
            let order = if l % 2 == 0 {
                Order::Natural
            } else {
                Order::Reversed
            };
            let (spec, mut net) = made(d, &[128, 128], Activation::Relu, order, 3.0, &mut rng)?;
            // made() zeroes the output layer; give it weights (dead ones stay masked by the op).
            let last = net.layers.len() - 1;
            net.layers[last].w =
                Tensor::randn(net.layers[last].w.rows(), 2 * d, &mut rng).map(|v| 0.05 * v);
            let degrees = spec
                .degrees
                .iter()
                .map(|v| b.upload_idx(v))
                .collect::<Result<Vec<_>>>()?;
            layers.push((spec, net.try_map(|t| b.upload(t))?, degrees));
        }
        let live: f64 = layers.iter().map(|(s, _, _)| live_macs(s)).sum();
        let x = b.upload(&Tensor::randn(rows, d, &mut rng))?;
        let bytes = (2 * rows * d) as f64 * 4.0 * 5.0;
        if d == 16 {
            let secs = time(b, sizes.seconds, || {
                let mut z = x.clone();
                for (spec, net, deg) in &layers {
                    z = b.ar_parallel(spec, net, deg, &z, Direction::Inverse)?.0;
                }
                Ok(())
            })?;
            out.push(report(
                b,
                "maf_log_prob_D16_5x[128,128]",
                precision,
                Work {
                    rows,
                    flops: 2.0 * live * rows as f64,
                    bytes,
                },
                secs,
            ));
        }
        let rows_s = if b.peaks().is_some() {
            rows
        } else {
            rows.min(4096)
        };
        let z = b.upload(&Tensor::randn(rows_s, d, &mut rng))?;
        let secs = time(b, sizes.seconds, || {
            let mut x = z.clone();
            for (spec, net, deg) in layers.iter().rev() {
                x = b.ar_sequential(spec, net, deg, &x, Direction::Forward)?.0;
            }
            Ok(())
        })?;
        out.push(report(
            b,
            &format!("maf_sample_D{d}_5x[128,128]"),
            precision,
            Work {
                rows: rows_s,
                flops: 2.0 * live * rows_s as f64,
                bytes,
            },
            secs,
        ));
    }

    // A memory-bound element-wise op: 3 floats moved per element.
    let n = sizes.batch * 16;
    let x = b.upload(&Tensor::randn(n / 16, 16, &mut rng))?;
    let y = b.upload(&Tensor::randn(n / 16, 16, &mut rng))?;
    let secs = time(b, sizes.seconds, || b.axpby(1.5, &x, -0.5, &y).map(|_| ()))?;
    out.push(report(
        b,
        "axpby",
        "f32",
        Work {
            rows: n / 16,
            flops: 3.0 * n as f64,
            bytes: 12.0 * n as f64,
        },
        secs,
    ));
    Ok(out)
}

/// Multiply-adds per row of one MADE pass counting only live (unmasked) weights.
fn live_macs(spec: &flowfuse::ops::made::MadeSpec) -> f64 {
    let mut total = 0.0;
    for l in 0..spec.degrees.len() - 1 {
        for &a in &spec.degrees[l] {
            total += spec.degrees[l + 1]
                .iter()
                .filter(|&&c| spec.connected(l, a, c))
                .count() as f64;
        }
    }
    total
}
