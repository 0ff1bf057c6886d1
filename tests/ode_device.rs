//! The device-resident RK45 driver (`ode::device`).

mod common;

use flowfuse::backend::{Backend, Cpu};
use flowfuse::nn::mlp::{Activation, Linear, Mlp};
use flowfuse::ode::device::{DeviceOptions, DeviceSystem, solve_device};
use flowfuse::ode::{OdeOptions, solve_batch};
use flowfuse::tensor::{Shaped, Tensor};

/// The linear field f(z, t) = x·W for x = [z, t]: one layer, no hidden units.
fn linear_field(w: &[&[f32]], b: &[f32]) -> Mlp<Tensor> {
    let rows: Vec<Vec<f32>> = w.iter().map(|r| r.to_vec()).collect();
    Mlp {
        layers: vec![Linear {
            w: Tensor::from_rows(&rows).unwrap(),
            b: Tensor::from_vec(1, b.len(), b.to_vec()).unwrap(),
        }],
        act: Activation::Tanh,
    }
}

fn up<B: Backend>(b: &B, net: &Mlp<Tensor>) -> Mlp<B::Mat> {
    net.try_map(|t| b.upload(t)).unwrap()
}

#[test]
fn experiment() {
    // y0' = y1, y1' = -y0.
    let net = linear_field(&[&[0.0, -1.0], &[1.0, 0.0], &[0.0, 0.0]], &[0.0, 0.0]);
    let y0 = Tensor::from_vec(3, 2, vec![1.0, 0.0, 0.5, 0.5, -1.0, 0.2]).unwrap();
    let opts = OdeOptions::with_tolerances(1e-5, 1e-7);
    let b = Cpu;
    let sol = solve_device(&b, &up(&b, &net), &y0, (0.0, 10.0), DeviceSystem::Field, &DeviceOptions::from(opts.clone())).unwrap();
    let host = solve_batch(|_t, y, dy| { for (d, r) in dy.chunks_exact_mut(2).zip(y.chunks_exact(2)) { d[0] = r[1]; d[1] = -r[0]; } Ok(()) }, &y0.data().iter().map(|&v| v as f64).collect::<Vec<_>>(), 2, (0.0, 10.0), &opts).unwrap();
    println!("device {:?} {:?}", sol.y.data(), sol.stats);
    println!("host {:?} {:?}", host.y, host.stats);
}
