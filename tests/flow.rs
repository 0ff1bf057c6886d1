//! Whole flows: invertibility and log-dets through every family's full stack, the NLL
//! gradient against finite differences, ActNorm's data-dependent initialisation, checkpoints,
//! and training on two moons (the density integrates to one; the test NLL is good).

mod common;

use std::collections::BTreeMap;

use flowfuse::backend::{Backend, Cpu};
use flowfuse::flows::Flow;
use flowfuse::flows::actnorm::ActNorm;
use flowfuse::flows::presets::{Family, FlowSpec, build};
use flowfuse::ops::optim::AdamHyper;
use flowfuse::testing::{assert_close, fd_jacobian, log_abs_det};
use flowfuse::train::data::{Standardizer, moons, train_test_split};
use flowfuse::train::model::{load_flow, save_flow};
use flowfuse::train::trainer::{dataset_nll, train};
use flowfuse::{Error, Rng, Shaped, Tensor};

const FAMILIES: [Family; 5] = [
    Family::RealNvp,
    Family::Nice,
    Family::Spline,
    Family::Maf,
    Family::Iaf,
];

/// A flow whose layers are far from the identity: presets start as the identity, so every
/// parameter gets a random perturbation.
fn random_flow<B: Backend>(b: &B, family: Family, dim: usize, seed: u64) -> Flow<B> {
    let mut rng = Rng::new(seed);
    let mut spec = FlowSpec::new(family, dim);
    spec.layers = 3;
    spec.hidden = vec![16, 16];
    spec.act = flowfuse::nn::Activation::Tanh;
    let mut flow = build(b, &spec, &mut rng).unwrap();
    for p in flow.params_mut() {
        let t = b.download(p).unwrap();
        let noise = Tensor::randn(t.rows(), t.cols(), &mut rng);
        let scale = 0.4 / (t.rows() as f32).sqrt();
        *p = b
            .upload(&Tensor::from_fn(t.rows(), t.cols(), |i, j| {
                t.get(i, j) + scale * noise.get(i, j)
            }))
            .unwrap();
    }
    flow
}

fn check_roundtrip_and_logdet<B: Backend>(b: &B) {
    for family in FAMILIES {
        for dim in [2, 5] {
            let flow = random_flow(b, family, dim, 11);
            let mut rng = Rng::new(3);
            let x = Tensor::randn(7, dim, &mut rng);
            let (z, ld_inv) = flow.inverse(b, &b.upload(&x).unwrap()).unwrap();
            let (x2, ld_fwd) = flow.forward(b, &z).unwrap();
            let what = format!("{} D={dim}", family.name());
            assert_close(
                &format!("{what} forward(inverse(x))"),
                &b.download(&x2).unwrap(),
                &x,
                2e-4,
                2e-4,
            );
            let ld_sum = b
                .download(&b.axpby(1.0, &ld_inv, 1.0, &ld_fwd).unwrap())
                .unwrap();
            assert_close(
                &format!("{what} logdet inverse + forward"),
                &ld_sum,
                &Tensor::zeros(7, 1),
                2e-4,
                0.0,
            );
            // log|det ∂z/∂x| of the whole stack against a finite-difference Jacobian, row by row.
            let ld = b.download(&ld_inv).unwrap();
            for r in 0..3 {
                let f = |v: &[f64]| -> Vec<f64> {
                    let row =
                        Tensor::from_vec(1, dim, v.iter().map(|&a| a as f32).collect()).unwrap();
                    let (z, _) = flow.inverse(b, &b.upload(&row).unwrap()).unwrap();
                    b.download(&z)
                        .unwrap()
                        .data()
                        .iter()
                        .map(|&a| a as f64)
                        .collect()
                };
                let x_row: Vec<f64> = x.row(r).iter().map(|&a| a as f64).collect();
                let want = log_abs_det(&fd_jacobian(f, &x_row, 1e-3));
                let got = ld.get(r, 0) as f64;
                assert!(
                    (got - want).abs() < 5e-3 * (1.0 + want.abs()),
                    "{what} row {r}: logdet {got} vs FD {want}"
                );
            }
        }
    }
}

#[test]
fn roundtrip_and_logdet_cpu() {
    check_roundtrip_and_logdet(&Cpu);
}

on_grid_backends!(roundtrip_and_logdet, super::check_roundtrip_and_logdet);

/// The gradient of the mean NLL with respect to a sample of parameters of every tensor.
fn check_nll_gradient<B: Backend>(b: &B) {
    for family in FAMILIES {
        let mut flow = random_flow(b, family, 3, 5);
        let mut rng = Rng::new(9);
        let x = b.upload(&Tensor::randn(16, 3, &mut rng)).unwrap();
        let (_, grads) = flow.nll_and_grad(b, &x).unwrap();
        let grads: Vec<Tensor> = grads.iter().map(|g| b.download(g).unwrap()).collect();
        let n_tensors = grads.len();
        for k in 0..n_tensors {
            let len = grads[k].len();
            for &i in &[0, len / 2, len - 1] {
                let mut at = |delta: f32| -> f64 {
                    let mut ps = flow.params_mut();
                    let mut t = b.download(ps[k]).unwrap();
                    t.data_mut()[i] += delta;
                    *ps[k] = b.upload(&t).unwrap();
                    let nll = flow.nll(b, &x).unwrap();
                    let mut ps = flow.params_mut();
                    let mut t = b.download(ps[k]).unwrap();
                    t.data_mut()[i] -= delta;
                    *ps[k] = b.upload(&t).unwrap();
                    nll
                };
                let h = 2e-3f32;
                let fd = (at(h) - at(-h)) / (2.0 * h as f64);
                let an = grads[k].data()[i] as f64;
                assert!(
                    (fd - an).abs() < 2e-3 + 2e-2 * an.abs(),
                    "{} tensor {k}[{i}]: analytic {an} vs FD {fd}",
                    family.name()
                );
            }
        }
    }
}

#[test]
fn nll_gradient_matches_fd_cpu() {
    check_nll_gradient(&Cpu);
}

on_grid_backends!(nll_gradient, super::check_nll_gradient);

#[test]
fn actnorm_initialises_from_data() {
    let b = Cpu;
    let mut rng = Rng::new(4);
    let x = Tensor::from_fn(500, 3, |i, j| {
        3.0 + (j as f32 + 1.0) * ((i * 7 + j) as f32).sin()
    });
    let mut flow = Flow::new(3, vec![Box::new(ActNorm::new(&b, 3).unwrap())]).unwrap();
    flow.init_from_data(&b, &x).unwrap();
    let (z, _) = flow.inverse(&b, &x).unwrap();
    let (m, s) = flowfuse::ops::elementwise::ElementOps::col_moments(&b, &z).unwrap();
    assert_close("mean after init", &m, &Tensor::zeros(1, 3), 1e-4, 0.0);
    assert_close("std after init", &s, &Tensor::full(1, 3, 1.0), 1e-4, 0.0);
    let _ = &mut rng;
}

#[test]
fn checkpoint_roundtrip_every_family() {
    let b = Cpu;
    let dir = std::env::temp_dir().join(format!("flowfuse-flow-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for family in FAMILIES {
        let mut flow = random_flow(&b, family, 3, 21);
        flow.push(Box::new(
            ActNorm::standardization(&b, &[1.0, -2.0, 0.5], &[2.0, 0.5, 1.5]).unwrap(),
        ))
        .unwrap();
        let path = dir.join(format!("{}.safetensors", family.name()));
        save_flow(&path, &b, &flow, family.name(), BTreeMap::new()).unwrap();
        let (loaded, meta) = load_flow(&path, &b).unwrap();
        assert_eq!(meta.family, family.name());
        let x = Tensor::randn(9, 3, &mut Rng::new(1));
        assert_close(
            &format!("{} log_prob after reload", family.name()),
            &loaded.log_prob(&b, &x).unwrap(),
            &flow.log_prob(&b, &x).unwrap(),
            0.0,
            0.0,
        );
    }
    // A checkpoint whose tensors do not fit its config is refused with the path named.
    let path = dir.join("realnvp.safetensors");
    let (meta, mut tensors) = flowfuse::train::model::read_meta(&path).unwrap();
    tensors[0].1 = Tensor::zeros(1, 1);
    let mut md = BTreeMap::new();
    md.insert(
        "flowfuse".to_string(),
        serde_json::to_string(&meta).unwrap(),
    );
    let bad = dir.join("bad.safetensors");
    flowfuse::train::checkpoint::save(&bad, &md, &tensors).unwrap();
    match load_flow(&bad, &b) {
        Err(Error::Checkpoint { path, .. }) => assert_eq!(path, bad),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a checkpoint with a wrong shape loaded"),
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Trains a small flow on two moons, then checks the density integrates to one over a grid
/// and that the held-out NLL is good. Returns the test NLL.
fn train_moons(family: Family, steps: usize) -> f64 {
    let b = Cpu;
    let mut rng = Rng::new(0);
    let data = moons(6000, &mut rng);
    let (tr, te) = train_test_split(&data, 0.2, &mut rng).unwrap();
    let mut spec = FlowSpec::new(family, 2);
    if family == Family::Maf {
        spec.layers = 5;
    }
    let mut flow = build(&b, &spec, &mut rng).unwrap();
    let st = Standardizer::fit(&tr).unwrap();
    flow.push(Box::new(
        ActNorm::standardization(&b, &st.mean, &st.std).unwrap(),
    ))
    .unwrap();
    flow.init_from_data(&b, &tr.slice_rows(0, 2048)).unwrap();
    let cfg = common::train::quiet_training(steps, 256, 2e-3);
    let report = train(&mut flow, &b, &tr, &te, &cfg, None).unwrap();
    assert!((report.test_nll - dataset_nll(&flow, &b, &te, 4096).unwrap()).abs() < 1e-9);

    // ∫ p(x) dx over [-2.5, 3.5] x [-2, 2.5] by the midpoint rule: the moons and essentially all
    // of the flow's mass lie inside.
    let (x0, x1, y0, y1, n) = (-2.5f32, 3.5f32, -2.0f32, 2.5f32, 600usize);
    let (dx, dy) = ((x1 - x0) / n as f32, (y1 - y0) / n as f32);
    let grid = Tensor::from_fn(n * n, 2, |k, j| {
        if j == 0 {
            x0 + ((k % n) as f32 + 0.5) * dx
        } else {
            y0 + ((k / n) as f32 + 0.5) * dy
        }
    });
    let lp = flow.log_prob(&b, &grid).unwrap();
    let mass: f64 = lp.data().iter().map(|&v| (v as f64).exp()).sum::<f64>() * (dx * dy) as f64;
    assert!(
        (mass - 1.0).abs() < 0.03,
        "{}: density integrates to {mass}",
        family.name()
    );
    report.test_nll
}

#[test]
fn realnvp_learns_two_moons() {
    let nll = train_moons(Family::RealNvp, 1200);
    assert!(nll < 0.55, "RealNVP test NLL {nll}");
}

#[test]
fn maf_learns_two_moons() {
    let nll = train_moons(Family::Maf, 1200);
    assert!(nll < 0.75, "MAF test NLL {nll}");
}

/// A few training steps on a backend give the same parameters as on the CPU reference: the
/// whole training path (gathers, fused layers, reductions, Adam) agrees, not just single ops.
fn check_training_matches_cpu<B: Backend>(b: &B) {
    for family in [Family::RealNvp, Family::Maf] {
        let cpu_flow = |seed| random_flow(&Cpu, family, 2, seed);
        let mut on_cpu = cpu_flow(31);
        let mut on_b = {
            let host = random_flow(&Cpu, family, 2, 31);
            let layers = host
                .states(&Cpu)
                .unwrap()
                .iter()
                .map(|s| flowfuse::flows::layer_from_state(b, s).unwrap())
                .collect();
            Flow::new(2, layers).unwrap()
        };
        let mut rng = Rng::new(5);
        let data = moons(600, &mut rng);
        let (tr, te) = train_test_split(&data, 0.25, &mut rng).unwrap();
        let cfg = common::train::quiet_training(15, 96, AdamHyper::default().lr);
        let r_cpu = train(&mut on_cpu, &Cpu, &tr, &te, &cfg, None).unwrap();
        let r_b = train(&mut on_b, b, &tr, &te, &cfg, None).unwrap();
        assert!(
            (r_cpu.test_nll - r_b.test_nll).abs() < 1e-3,
            "{}: test NLL {} on the CPU, {} on {}",
            family.name(),
            r_cpu.test_nll,
            r_b.test_nll,
            b.name()
        );
        for (k, (p, q)) in on_cpu.params().iter().zip(on_b.params()).enumerate() {
            assert_close(
                &format!("{} parameter {k} after training", family.name()),
                &b.download(q).unwrap(),
                p,
                1e-3,
                1e-3,
            );
        }
    }
}

on_grid_backends!(training_matches_cpu, super::check_training_matches_cpu);
