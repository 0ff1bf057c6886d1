//! Parity of the fused coupling kernels (kernels/coupling.cu) with the CPU reference: forward and
//! inverse outputs and log-dets, the backward's input gradient and every parameter gradient, for
//! affine, additive and spline couplings, both halves, both directions, odd D, 1 to 4 layers,
//! relu and smooth activations, batches with partial tiles and several blocks, conditioners on
//! both sides of the resident / streamed weight switch (and of the 64 / 32 / 16-row tile
//! fallbacks), more tiles than persistent blocks, the bf16 tensor-core path, errors, and the
//! round trip inverse(forward(x)) = x on the grid.
//!
//! Which kernel plan a width picks is pinned by the unit tests of src/ops/coupling/cuda.rs; the
//! widths below are chosen from those plans (see `Widths`).

mod common;

use flowfuse::backend::grid::Precision;
use flowfuse::backend::{Cpu, Device};
use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::coupling::{CouplingKind, CouplingOps, CouplingSpec, Half};
use flowfuse::{Direction, Error, Rng, Shaped, Tensor};

use common::coupling::{SPLINE_BOUND, kinds, random_input, random_net};
use common::failures::Failures;

const HALVES: [Half; 2] = [Half::Lower, Half::Upper];
const DIRS: [Direction; 2] = [Direction::Forward, Direction::Inverse];
/// Hidden widths with known kernel plans (f32; pinned by the planner's unit tests in
/// src/ops/coupling/cuda.rs):
/// - `SMALL`: weights resident in shared memory, 64-row tiles, forward and backward;
/// - `MEDIUM`: resident forward; the backward (which also keeps W^T) streams its weights;
/// - `STREAMED`: padded to 256 and 256: weights streamed in k-slices, 32-row backward tiles;
/// - `DEEP`: three hidden layers of 256 (four linear layers), planned as `STREAMED`;
/// - `WIDE`: hidden 512 and 400: 32-row forward tiles, 16-row backward tiles.
struct Widths;
impl Widths {
    const SMALL: &'static [usize] = &[24, 17];
    const MEDIUM: &'static [usize] = &[128, 128];
    const STREAMED: &'static [usize] = &[200, 160];
    const DEEP: &'static [usize] = &[256, 256, 256];
    const WIDE: &'static [usize] = &[512, 400];
}

/// How many times the reference's own sensitivity a kernel value may deviate by.
const SLACK: f32 = 4.0;

/// `net` with every weight and bias scaled by 1 ± 2^-21 (random signs): rounding-sized noise.
fn perturbed(net: &Mlp<Tensor>, seed: u64) -> Mlp<Tensor> {
    let mut rng = Rng::new(seed);
    let eps = 2f32.powi(-21);
    net.try_map(|t| {
        let signs = Tensor::from_fn(t.rows(), t.cols(), |_, _| rng.rademacher());
        Ok(Tensor::from_fn(t.rows(), t.cols(), |i, j| {
            t.get(i, j) * (1.0 + eps * signs.get(i, j))
        }))
    })
    .unwrap()
}

/// SLACK·|perturbed − reference| per element.
fn slack(reference: &Tensor, perturbed: &Tensor) -> Tensor {
    Tensor::from_fn(reference.rows(), reference.cols(), |i, j| {
        SLACK * (perturbed.get(i, j) - reference.get(i, j)).abs()
    })
}

/// One layer configuration of the parity sweep.
struct Case {
    spec: CouplingSpec,
    hidden: &'static [usize],
    act: Activation,
    rows: usize,
}

/// f32 tolerances. Forward: the kernels and the CPU both multiply in f32 but sum in different
/// orders (and the GPU's fast-math exp/tanh/division differ by a few ulp), so outputs agree to
/// ~1e-6 relative; 2e-5 leaves margin for the spline's longer chains. Backward: parameter
/// gradients are sums over the batch in another order than the CPU's chunked sums.
const FWD_TOL: (f32, f32) = (2e-5, 2e-5);
const BWD_TOL: (f32, f32) = (1e-4, 1e-4);

/// Forward, inverse and both backwards of one case on `b`, against the CPU reference.
fn check_case<B: CouplingOps>(b: &B, case: &Case, seed: u64, fails: &mut Failures) {
    let spec = &case.spec;
    let net = random_net(spec, case.hidden, case.act, seed);
    let x = random_input(spec, case.rows, seed + 1);
    let netd = net.try_map(|t| b.upload(t)).unwrap();
    let xd = b.upload(&x).unwrap();
    let mut rng = Rng::new(seed + 2);
    let d_out = Tensor::randn(case.rows, spec.dim, &mut rng);
    let d_ld = Tensor::randn(case.rows, 1, &mut rng);
    let (d_outd, d_ldd) = (b.upload(&d_out).unwrap(), b.upload(&d_ld).unwrap());
    let get = |m: &B::Mat| b.download(m).unwrap();
    // The same reference with every weight moved by a few f32 ulps: where a value moves much
    // more than that (a spline inverse near a narrow bin, say), summation order alone can move
    // it as much, so the kernel is allowed SLACK times that change on top of atol/rtol.
    let net_p = perturbed(&net, seed + 3);
    for dir in DIRS {
        let what = format!(
            "{:?} {:?} D={} hidden {:?} {:?} rows {} {dir:?}",
            spec.kind, spec.copied, spec.dim, case.hidden, case.act, case.rows
        );
        let (y, ld) = b.coupling(spec, &netd, &xd, dir).unwrap();
        let (yr, ldr) = Cpu.coupling(spec, &net, &x, dir).unwrap();
        let (yp, ldp) = Cpu.coupling(spec, &net_p, &x, dir).unwrap();
        let y = get(&y);
        fails.check_slack(
            &format!("{what}: output"),
            &y,
            &yr,
            FWD_TOL.0,
            FWD_TOL.1,
            &slack(&yr, &yp),
        );
        fails.check_slack(
            &format!("{what}: log-det"),
            &get(&ld),
            &ldr,
            FWD_TOL.0,
            FWD_TOL.1,
            &slack(&ldr, &ldp),
        );
        // The copied half passes through bit for bit.
        for i in 0..case.rows {
            for c in spec.copied_cols() {
                assert_eq!(
                    y.get(i, c).to_bits(),
                    x.get(i, c).to_bits(),
                    "{what}: copied [{i}, {c}]"
                );
            }
        }
        let (dx, grads) = b
            .coupling_backward(spec, &netd, &xd, dir, &d_outd, &d_ldd)
            .unwrap();
        let (dxr, gradsr) = Cpu
            .coupling_backward(spec, &net, &x, dir, &d_out, &d_ld)
            .unwrap();
        let (dxp, _) = Cpu
            .coupling_backward(spec, &net_p, &x, dir, &d_out, &d_ld)
            .unwrap();
        fails.check_slack(
            &format!("{what}: d input"),
            &get(&dx),
            &dxr,
            BWD_TOL.0,
            BWD_TOL.1,
            &slack(&dxr, &dxp),
        );
        for ((name, g), gr) in grads
            .tensor_names()
            .iter()
            .zip(grads.tensors())
            .zip(gradsr.tensors())
        {
            // Sums over the batch: the tolerance grows with the gradient's scale.
            let scale = gr
                .data()
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()))
                .max(1.0);
            fails.check(
                &format!("{what}: d {name}"),
                &get(g),
                gr,
                BWD_TOL.0 * scale,
                BWD_TOL.1,
            );
        }
    }
}

/// Every kind x half x direction, odd D = 5 (halves of 2 and 3), two hidden layers that stay
/// resident in shared memory, 131 rows: three 64-row tiles, the last with 3 rows.
fn check_all_kinds<B: CouplingOps>(b: &B) {
    let mut fails = Failures::default();
    let mut seed = 10;
    for kind in kinds() {
        for copied in HALVES {
            let act = if matches!(kind, CouplingKind::Additive) {
                Activation::Relu
            } else {
                Activation::Tanh
            };
            let case = Case {
                spec: CouplingSpec {
                    dim: 5,
                    copied,
                    kind,
                },
                hidden: Widths::SMALL,
                act,
                rows: 131,
            };
            check_case(b, &case, seed, &mut fails);
            seed += 10;
        }
    }
    fails.assert_none();
}

/// 1 to 4 linear layers with each activation, D = 7 and D = 2 (one column per half: the
/// transform's lane groups of one), spline bins up to 8.
fn check_depths<B: CouplingOps>(b: &B) {
    let mut fails = Failures::default();
    let hidden: [&'static [usize]; 4] = [&[], &[20], &[33, 9], &[16, 40, 24]];
    let acts = [
        Activation::Relu,
        Activation::Silu,
        Activation::Softplus,
        Activation::Tanh,
    ];
    for (n, (&h, act)) in hidden.iter().zip(acts).enumerate() {
        let kind = kinds()[n % 3];
        for (dim, rows) in [(7, 77), (2, 45)] {
            let kind = match kind {
                CouplingKind::Spline { bound, .. } => CouplingKind::Spline { bins: 8, bound },
                k => k,
            };
            let case = Case {
                spec: CouplingSpec {
                    dim,
                    copied: HALVES[n % 2],
                    kind,
                },
                hidden: h,
                act,
                rows,
            };
            check_case(b, &case, 100 + 10 * n as u64 + dim as u64, &mut fails);
        }
    }
    fails.assert_none();
}

/// Conditioners whose weights do not fit in shared memory: streamed weights, and the 32- and
/// 16-row tile fallbacks of the forward and backward. Batches leave partial tiles of each size.
fn check_streamed<B: CouplingOps>(b: &B) {
    let mut fails = Failures::default();
    let cases = [
        (Widths::MEDIUM, CouplingKind::Additive, 6, 150),
        (Widths::STREAMED, CouplingKind::Affine { clamp: 2.0 }, 9, 70),
        (
            Widths::STREAMED,
            CouplingKind::Spline {
                bins: 4,
                bound: SPLINE_BOUND,
            },
            6,
            37,
        ),
        (Widths::DEEP, CouplingKind::Additive, 5, 50),
        (Widths::WIDE, CouplingKind::Affine { clamp: 1.5 }, 4, 40),
    ];
    for (n, (hidden, kind, dim, rows)) in cases.into_iter().enumerate() {
        let case = Case {
            spec: CouplingSpec {
                dim,
                copied: HALVES[n % 2],
                kind,
            },
            hidden,
            act: if n % 2 == 0 {
                Activation::Relu
            } else {
                Activation::Silu
            },
            rows,
        };
        check_case(b, &case, 300 + 10 * n as u64, &mut fails);
    }
    fails.assert_none();
}

/// More row tiles than persistent blocks (each block loops over several tiles and accumulates
/// several tiles into its gradient partial); a backward run twice gives identical gradients.
fn check_many_tiles<B: CouplingOps>(b: &B) {
    let mut fails = Failures::default();
    // A small conditioner: 8 blocks per SM x 132 SMs = 1056 persistent blocks of 64 rows.
    let case = Case {
        spec: CouplingSpec {
            dim: 3,
            copied: Half::Lower,
            kind: CouplingKind::Affine { clamp: 2.0 },
        },
        hidden: &[8],
        act: Activation::Tanh,
        rows: 1056 * 64 + 37,
    };
    check_case(b, &case, 500, &mut fails);
    fails.assert_none();

    let spec = case.spec;
    let net = random_net(&spec, case.hidden, case.act, 501)
        .try_map(|t| b.upload(t))
        .unwrap();
    let x = b.upload(&random_input(&spec, case.rows, 502)).unwrap();
    let mut rng = Rng::new(503);
    let d_out = b
        .upload(&Tensor::randn(case.rows, spec.dim, &mut rng))
        .unwrap();
    let d_ld = b.upload(&Tensor::randn(case.rows, 1, &mut rng)).unwrap();
    let run = || {
        let (_, g) = b
            .coupling_backward(&spec, &net, &x, Direction::Inverse, &d_out, &d_ld)
            .unwrap();
        g.tensors()
            .iter()
            .map(|t| b.download(t).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run(), "gradients differ between two runs");
}

/// inverse(forward(x)) = x, log-dets cancel, for every kind and half, on the grid alone.
fn check_roundtrip<B: CouplingOps>(b: &B) {
    let mut fails = Failures::default();
    for (n, kind) in kinds().into_iter().enumerate() {
        for copied in HALVES {
            let spec = CouplingSpec {
                dim: 6,
                copied,
                kind,
            };
            let net = random_net(&spec, &[32, 32], Activation::Silu, 600 + n as u64)
                .try_map(|t| b.upload(t))
                .unwrap();
            let x = random_input(&spec, 100, 610 + n as u64);
            for dir in DIRS {
                let what = format!("{kind:?} {copied:?} {dir:?}");
                let (y, ld) = b
                    .coupling(&spec, &net, &b.upload(&x).unwrap(), dir)
                    .unwrap();
                let (back, ld_back) = b.coupling(&spec, &net, &y, dir.reversed()).unwrap();
                fails.check(
                    &format!("{what}: round trip"),
                    &b.download(&back).unwrap(),
                    &x,
                    2e-5,
                    2e-5,
                );
                let (ld, ld_back) = (b.download(&ld).unwrap(), b.download(&ld_back).unwrap());
                let sum = Tensor::from_fn(ld.rows(), 1, |i, _| ld.get(i, 0) + ld_back.get(i, 0));
                fails.check(
                    &format!("{what}: log-det sum"),
                    &sum,
                    &Tensor::zeros(ld.rows(), 1),
                    5e-5,
                    0.0,
                );
                let y = b.download(&y).unwrap();
                assert!(
                    y.max_abs_diff(&x).unwrap() > 0.3,
                    "{what}: close to the identity"
                );
            }
        }
    }
    fails.assert_none();
}

fn same_error(got: &Error, want: &Error) -> bool {
    match (got, want) {
        (
            Error::NonFinite { what, row, col },
            Error::NonFinite {
                what: w,
                row: r,
                col: c,
            },
        ) => what == w && row == r && col == c,
        (Error::Shape { .. }, Error::Shape { .. })
        | (Error::Empty(_), Error::Empty(_))
        | (Error::InvalidArgument(_), Error::InvalidArgument(_)) => true,
        _ => false,
    }
}

/// Bad inputs give the CPU reference's error (non-finite values with the same position),
/// never a panic or a silent NaN; too deep a conditioner is `Unsupported`.
fn check_errors<B: CouplingOps>(b: &B) {
    let spec = CouplingSpec {
        dim: 5,
        copied: Half::Upper,
        kind: CouplingKind::Spline {
            bins: 4,
            bound: SPLINE_BOUND,
        },
    };
    let net = random_net(&spec, &[12], Activation::Tanh, 700);
    let x = random_input(&spec, 70, 701);
    let netd = net.try_map(|t| b.upload(t)).unwrap();
    let up = |t: &Tensor| b.upload(t).unwrap();
    let expect = |got: flowfuse::Result<()>, want: flowfuse::Result<()>, what: &str| {
        let (got, want) = (got.unwrap_err(), want.unwrap_err());
        assert!(
            same_error(&got, &want),
            "{what}: got {got:?}, CPU reference {want:?}"
        );
    };
    let fwd_b = |net: &Mlp<B::Mat>, x: &Tensor| {
        b.coupling(&spec, net, &up(x), Direction::Forward)
            .map(|_| ())
    };
    let fwd_c =
        |net: &Mlp<Tensor>, x: &Tensor| Cpu.coupling(&spec, net, x, Direction::Forward).map(|_| ());
    // Non-finite inputs in either half, and in the second tile.
    for (r, c, v) in [(3, 4, f32::NAN), (66, 0, f32::INFINITY), (69, 2, f32::NAN)] {
        let mut bad = x.clone();
        bad.set(r, c, v);
        expect(
            fwd_b(&netd, &bad),
            fwd_c(&net, &bad),
            &format!("input [{r},{c}]"),
        );
    }
    // Non-finite weights and biases.
    for (layer, bias, k, v) in [(0, false, 5, f32::NAN), (1, true, 3, f32::NEG_INFINITY)] {
        let mut bad = net.clone();
        let t = if bias {
            &mut bad.layers[layer].b
        } else {
            &mut bad.layers[layer].w
        };
        let cols = t.cols();
        t.set(k / cols, k % cols, v);
        let badd = bad.try_map(|t| b.upload(t)).unwrap();
        expect(
            fwd_b(&badd, &x),
            fwd_c(&bad, &x),
            &format!("layer {layer} bias {bias}"),
        );
    }
    // A result that overflows: a huge input through the affine scale.
    let aspec = CouplingSpec {
        kind: CouplingKind::Affine { clamp: 2.0 },
        ..spec
    };
    let anet = random_net(&aspec, &[12], Activation::Tanh, 702);
    let mut big = random_input(&aspec, 10, 703);
    big.set(7, 1, 3.0e38);
    let got = b
        .coupling(
            &aspec,
            &anet.try_map(|t| b.upload(t)).unwrap(),
            &up(&big),
            Direction::Forward,
        )
        .map(|_| ());
    let want = Cpu
        .coupling(&aspec, &anet, &big, Direction::Forward)
        .map(|_| ());
    expect(got, want, "overflowing output");
    // Empty batch and wrong widths.
    expect(
        fwd_b(&netd, &Tensor::zeros(0, 5)),
        fwd_c(&net, &Tensor::zeros(0, 5)),
        "empty",
    );
    expect(
        fwd_b(&netd, &Tensor::zeros(4, 6)),
        fwd_c(&net, &Tensor::zeros(4, 6)),
        "width",
    );
    // Backward: non-finite upstream gradients, wrong shapes.
    let mut rng = Rng::new(704);
    let d_out = Tensor::randn(70, 5, &mut rng);
    let d_ld = Tensor::randn(70, 1, &mut rng);
    let bwd_b = |d_out: &Tensor, d_ld: &Tensor| {
        b.coupling_backward(
            &spec,
            &netd,
            &up(&x),
            Direction::Inverse,
            &up(d_out),
            &up(d_ld),
        )
        .map(|_| ())
    };
    let bwd_c = |d_out: &Tensor, d_ld: &Tensor| {
        Cpu.coupling_backward(&spec, &net, &x, Direction::Inverse, d_out, d_ld)
            .map(|_| ())
    };
    for (r, c) in [(0, 0), (68, 3)] {
        let mut bad = d_out.clone();
        bad.set(r, c, f32::NAN);
        expect(
            bwd_b(&bad, &d_ld),
            bwd_c(&bad, &d_ld),
            &format!("d_out [{r},{c}]"),
        );
    }
    let mut bad_ld = d_ld.clone();
    bad_ld.set(65, 0, f32::INFINITY);
    expect(bwd_b(&d_out, &bad_ld), bwd_c(&d_out, &bad_ld), "d_logdet");
    expect(
        bwd_b(&Tensor::zeros(70, 4), &d_ld),
        bwd_c(&Tensor::zeros(70, 4), &d_ld),
        "d_out shape",
    );
    expect(
        bwd_b(&d_out, &Tensor::zeros(69, 1)),
        bwd_c(&d_out, &Tensor::zeros(69, 1)),
        "d_logdet shape",
    );
    assert!(bwd_b(&d_out, &d_ld).is_ok());
    // Five linear layers: the CPU takes them, the grid kernels do not.
    let deep = random_net(&spec, &[8, 8, 8, 8], Activation::Relu, 705);
    assert!(Cpu.coupling(&spec, &deep, &x, Direction::Forward).is_ok());
    let deepd = deep.try_map(|t| b.upload(t)).unwrap();
    match b.coupling(&spec, &deepd, &up(&x), Direction::Forward) {
        Err(Error::Unsupported { .. }) => {}
        other => panic!("five layers: expected Unsupported, got {other:?}"),
    }
}

on_grid_backends!(all_kinds, super::check_all_kinds);
on_grid_backends!(depths, super::check_depths);
on_grid_backends!(streamed, super::check_streamed);
on_grid_backends!(many_tiles, super::check_many_tiles);
on_grid_backends!(roundtrip, super::check_roundtrip);
on_grid_backends!(errors, super::check_errors);

// ---------------------------------------------------------------------------------------------
// bf16 tensor cores.

/// bf16 tolerance. bf16 keeps 8 significant bits: every operand of every product is rounded with
/// relative error up to 2^-9 ≈ 2e-3, and the activations are rounded again between layers, so a
/// hidden-64 conditioner's outputs (O(1), sums of 64 products) carry errors of a few 1e-3; the
/// output layer's gain of 3 and the affine map x·e^s + b (|x|·e^s up to ~20) scale them up,
/// hence atol = rtol = 3e-2 against a reference that uses the same bf16 weights and inputs
/// (atol times the gradient's size for gradients summed over the batch). Where the map is much
/// more sensitive than that (spline log-dets and slopes near a narrow bin, which move by up to
/// 0.1 when only the weights are rounded), each element may also deviate by three times the
/// change that rounding the weights alone causes in the f32 reference: the kernels round the
/// activations and, in the backward, the gradients too, perturbations of the same kind and a few
/// times as many.
///
/// The bf16 cases use smooth activations: with ReLU, a pre-activation within bf16 rounding of 0
/// flips its gate between the kernel and any reference, which changes the gradient of that unit
/// by O(1) (whole columns of dW); the f32 parity tests cover ReLU.
const BF16_TOL: (f32, f32) = (3e-2, 3e-2);

/// |got − ref16| <= atol·scale + rtol·|ref16| + 3·|ref16 − ref32| everywhere (see BF16_TOL;
/// `scale` is the size of a gradient summed over the batch, 1 otherwise).
fn check_bf16_close(
    fails: &mut Failures,
    what: &str,
    got: &Tensor,
    ref16: &Tensor,
    ref32: &Tensor,
    scale: f32,
) {
    let (atol, rtol) = BF16_TOL;
    let mut bad = Vec::new();
    let mut margin = 0.0f32;
    for (k, ((&g, &r), &r32)) in got
        .data()
        .iter()
        .zip(ref16.data())
        .zip(ref32.data())
        .enumerate()
    {
        let allowed = atol * scale + rtol * r.abs() + 3.0 * (r - r32).abs();
        margin = margin.max((g - r).abs() / allowed);
        // Written so that a NaN fails.
        let ok = (g - r).abs() <= allowed;
        if !ok && bad.len() < 8 {
            bad.push(format!(
                "  [{}] got {g:e} want {r:e} (allowed {allowed:e})",
                k
            ));
        }
    }
    if std::env::var_os("FLOWFUSE_TEST_MARGINS").is_some() {
        eprintln!("margin {margin:8.3} of tolerance: {what}");
    }
    if !bad.is_empty() {
        fails.push(format!("{what}:\n{}", bad.join("\n")));
    }
}

/// The bf16 forward and backward agree with the CPU reference to bf16 accuracy, and are really
/// bf16: their error against the f32 reference is far above what the f32 kernels show (< 2e-5
/// forward, < 1e-4 backward). Resident (hidden 64) and streamed (hidden 256) weights; 64-row
/// backward tiles for hidden 64, 32-row ones for hidden 256.
fn check_bf16<B: CouplingOps>(b: &B) {
    let mut fails = Failures::default();
    let (mut worst_fwd, mut worst_bwd) = (0.0f32, 0.0f32);
    let cases: [(&[usize], CouplingKind, usize); 4] = [
        (&[64, 64], CouplingKind::Affine { clamp: 2.0 }, 5),
        (&[64, 64], CouplingKind::Additive, 2),
        (
            &[64],
            CouplingKind::Spline {
                bins: 6,
                bound: SPLINE_BOUND,
            },
            6,
        ),
        (&[256, 256], CouplingKind::Affine { clamp: 2.0 }, 9),
    ];
    for (n, (hidden, kind, dim)) in cases.into_iter().enumerate() {
        let spec = CouplingSpec {
            dim,
            copied: HALVES[n % 2],
            kind,
        };
        let rows = 100;
        let act = [Activation::Silu, Activation::Tanh][n % 2];
        let mut net = random_net(&spec, hidden, act, 800 + n as u64);
        if matches!(kind, CouplingKind::Spline { .. }) {
            // Output gain 1 instead of 2: bins still uneven (logits ~ ±0.5), but no bin so
            // narrow that its slope is beyond bf16's resolution.
            let last = net.layers.last_mut().unwrap();
            last.w = last.w.map(|v| 0.5 * v);
            last.b = last.b.map(|v| 0.5 * v);
        }
        let x = random_input(&spec, rows, 810 + n as u64);
        let mut rng = Rng::new(820 + n as u64);
        let d_out = Tensor::randn(rows, dim, &mut rng);
        let d_ld = Tensor::randn(rows, 1, &mut rng);
        let netd = net.try_map(|t| b.upload(t)).unwrap();
        let (xd, d_outd, d_ldd) = (
            b.upload(&x).unwrap(),
            b.upload(&d_out).unwrap(),
            b.upload(&d_ld).unwrap(),
        );
        // The reference sees the same bf16 weights and conditioner inputs as the tensor cores,
        // so what is left is the rounding of the activations and gradients inside the products.
        let net16 = net.try_map(|t| Ok(t.map(bf16))).unwrap();
        let mut x16 = x.clone();
        for i in 0..rows {
            for c in spec.copied_cols() {
                x16.set(i, c, bf16(x.get(i, c)));
            }
        }
        for dir in DIRS {
            let what = format!("bf16 {kind:?} hidden {hidden:?} D={dim} {dir:?}");
            let (y, ld) = b.coupling(&spec, &netd, &xd, dir).unwrap();
            let (y, ld) = (b.download(&y).unwrap(), b.download(&ld).unwrap());
            let (y16, ld16) = Cpu.coupling(&spec, &net16, &x16, dir).unwrap();
            let (y32, ld32) = Cpu.coupling(&spec, &net, &x, dir).unwrap();
            worst_fwd = worst_fwd.max(y.max_abs_diff(&y32).unwrap());
            // The kernel returns the copied half exactly; the bf16 reference has it rounded.
            let mut y_cmp = y.clone();
            for i in 0..rows {
                for c in spec.copied_cols() {
                    y_cmp.set(i, c, bf16(y.get(i, c)));
                }
            }
            check_bf16_close(
                &mut fails,
                &format!("{what}: output"),
                &y_cmp,
                &y16,
                &y32,
                1.0,
            );
            check_bf16_close(
                &mut fails,
                &format!("{what}: log-det"),
                &ld,
                &ld16,
                &ld32,
                1.0,
            );

            let (dx, grads) = b
                .coupling_backward(&spec, &netd, &xd, dir, &d_outd, &d_ldd)
                .unwrap();
            let (dx16, g16) = Cpu
                .coupling_backward(&spec, &net16, &x16, dir, &d_out, &d_ld)
                .unwrap();
            let (dx32, g32) = Cpu
                .coupling_backward(&spec, &net, &x, dir, &d_out, &d_ld)
                .unwrap();
            let dx = b.download(&dx).unwrap();
            check_bf16_close(
                &mut fails,
                &format!("{what}: d input"),
                &dx,
                &dx16,
                &dx32,
                1.0,
            );
            for (((name, g), r16), r32) in grads
                .tensor_names()
                .iter()
                .zip(grads.tensors())
                .zip(g16.tensors())
                .zip(g32.tensors())
            {
                let g = b.download(g).unwrap();
                // Sums over the batch: absolute errors scale with the gradient's size.
                let scale = r32
                    .data()
                    .iter()
                    .fold(0.0f32, |m, v| m.max(v.abs()))
                    .max(1.0);
                worst_bwd = worst_bwd.max(g.max_abs_diff(r32).unwrap() / scale);
                check_bf16_close(
                    &mut fails,
                    &format!("{what}: d {name}"),
                    &g,
                    r16,
                    r32,
                    scale,
                );
            }
        }
    }
    fails.assert_none();
    assert!(
        worst_fwd > 1e-3,
        "bf16 outputs within {worst_fwd:e} of the f32 reference: the tensor-core path was not used"
    );
    assert!(
        worst_bwd > 1e-4,
        "bf16 gradients within {worst_bwd:e} (relative) of the f32 reference: no tensor cores"
    );
}

on_grid_backends_bf16!(bf16, super::check_bf16);

/// Rounds to the nearest bf16 (as the kernels' conversions do).
fn bf16(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// The f32 grid backend really is f32 (the bf16 check above is not vacuous).
#[test]
fn f32_grid_is_not_bf16() {
    use flowfuse::backend::emu::{Emu, ThreadOrder};
    let b = Emu::emulated(ThreadOrder::Forward);
    assert_eq!(b.precision, Precision::F32);
    let spec = CouplingSpec {
        dim: 5,
        copied: Half::Lower,
        kind: CouplingKind::Affine { clamp: 2.0 },
    };
    let net = random_net(&spec, &[64, 64], Activation::Relu, 800);
    let x = random_input(&spec, 100, 810);
    let (y, _) = b
        .coupling(
            &spec,
            &net.try_map(|t| b.upload(t)).unwrap(),
            &b.upload(&x).unwrap(),
            Direction::Forward,
        )
        .unwrap();
    let (yr, _) = Cpu.coupling(&spec, &net, &x, Direction::Forward).unwrap();
    assert!(b.download(&y).unwrap().max_abs_diff(&yr).unwrap() < 1e-4);
}
