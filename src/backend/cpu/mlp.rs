//! The conditioner MLP on the host: forward with a tape of activations, and its backward.
//! Every CPU reference op that contains an MLP (coupling, MADE, vector fields) uses these.

use std::borrow::Cow;

use super::gemm::{View, matmul};
use crate::nn::mlp::{Activation, Mlp};
use crate::tensor::{Shaped, Tensor};

/// What a forward pass over `rows` rows keeps for the backward pass.
pub struct MlpTape {
    pub rows: usize,
    /// Pre-activations of each hidden layer (rows × width), in layer order.
    pub pre: Vec<Vec<f32>>,
    /// Inputs of layers 1.. (the activated hidden layers), in layer order.
    pub hidden: Vec<Vec<f32>>,
    /// The network output (rows × out), linear.
    pub out: Vec<f32>,
}

/// y = act(... act(x·W0 + b0) ...)·W_last + b_last for `rows` rows of `x`.
pub fn forward(net: &Mlp<Tensor>, x: &[f32], rows: usize) -> MlpTape {
    let n = net.layers.len();
    let mut pre = Vec::with_capacity(n.saturating_sub(1));
    let mut hidden: Vec<Vec<f32>> = Vec::with_capacity(n.saturating_sub(1));
    let mut out = Vec::new();
    for (l, layer) in net.layers.iter().enumerate() {
        let (k, m) = (layer.w.rows(), layer.w.cols());
        let input: &[f32] = if l == 0 { x } else { &hidden[l - 1] };
        let mut y = vec![0.0f32; rows * m];
        matmul(
            &mut y,
            View::new(input, rows, k),
            View::new(layer.w.data(), k, m),
            false,
        );
        add_bias(&mut y, layer.b.data());
        if l + 1 == n {
            out = y;
        } else {
            let h = activate(net.act, &y);
            pre.push(y);
            hidden.push(h);
        }
    }
    MlpTape {
        rows,
        pre,
        hidden,
        out,
    }
}

/// act(pre) as a new vector, in one pass (match outside the loop, see [`activate_in_place`]).
pub fn activate(act: Activation, pre: &[f32]) -> Vec<f32> {
    fn each(pre: &[f32], f: impl Fn(f32) -> f32) -> Vec<f32> {
        pre.iter().map(|&x| f(x)).collect()
    }
    match act {
        Activation::Relu => each(pre, |x| Activation::Relu.apply(x)),
        Activation::Tanh => each(pre, |x| Activation::Tanh.apply(x)),
        Activation::Silu => each(pre, |x| Activation::Silu.apply(x)),
        Activation::Softplus => each(pre, |x| Activation::Softplus.apply(x)),
    }
}

/// Applies `act` element-wise in place. The match sits outside the loop so that each arm is a
/// plain loop the compiler can vectorise (a per-element match costs more than the GEMMs for
/// small layers).
pub fn activate_in_place(act: Activation, v: &mut [f32]) {
    fn each(v: &mut [f32], f: impl Fn(f32) -> f32) {
        for x in v {
            *x = f(*x);
        }
    }
    match act {
        Activation::Relu => each(v, |x| Activation::Relu.apply(x)),
        Activation::Tanh => each(v, |x| Activation::Tanh.apply(x)),
        Activation::Silu => each(v, |x| Activation::Silu.apply(x)),
        Activation::Softplus => each(v, |x| Activation::Softplus.apply(x)),
    }
}

/// y[r, :] += b for every row: one vectorised loop rather than a copy call per row.
fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (v, &c) in row.iter_mut().zip(b) {
            *v += c;
        }
    }
}

/// y[r, :] = act(y[r, :] + b) in one pass (match outside the loop, see [`activate_in_place`]).
fn bias_activate(act: Activation, y: &mut [f32], b: &[f32]) {
    fn each(y: &mut [f32], b: &[f32], f: impl Fn(f32) -> f32) {
        for row in y.chunks_exact_mut(b.len()) {
            for (v, &c) in row.iter_mut().zip(b) {
                *v = f(*v + c);
            }
        }
    }
    match act {
        Activation::Relu => each(y, b, |x| Activation::Relu.apply(x)),
        Activation::Tanh => each(y, b, |x| Activation::Tanh.apply(x)),
        Activation::Silu => each(y, b, |x| Activation::Silu.apply(x)),
        Activation::Softplus => each(y, b, |x| Activation::Softplus.apply(x)),
    }
}

/// delta ⊙= act'(pre), with the match outside the loop (see [`activate_in_place`]).
fn scale_by_grad(act: Activation, delta: &mut [f32], pre: &[f32]) {
    fn each(d: &mut [f32], pre: &[f32], f: impl Fn(f32) -> f32) {
        for (x, &z) in d.iter_mut().zip(pre) {
            *x *= f(z);
        }
    }
    match act {
        Activation::Relu => each(delta, pre, |z| Activation::Relu.grad(z)),
        Activation::Tanh => each(delta, pre, |z| Activation::Tanh.grad(z)),
        Activation::Silu => each(delta, pre, |z| Activation::Silu.grad(z)),
        Activation::Softplus => each(delta, pre, |z| Activation::Softplus.grad(z)),
    }
}

/// The network output alone, for callers that need no backward pass: no tape, bias and
/// activation applied in one pass in place, so a pass allocates one buffer per layer and keeps
/// none.
pub fn forward_output(net: &Mlp<Tensor>, x: &[f32], rows: usize) -> Vec<f32> {
    let n = net.layers.len();
    let mut prev: Vec<f32> = Vec::new();
    for (l, layer) in net.layers.iter().enumerate() {
        let (k, m) = (layer.w.rows(), layer.w.cols());
        let mut y = vec![0.0f32; rows * m];
        let input: &[f32] = if l == 0 { x } else { &prev };
        matmul(
            &mut y,
            View::new(input, rows, k),
            View::new(layer.w.data(), k, m),
            false,
        );
        if l + 1 < n {
            bias_activate(net.act, &mut y, layer.b.data());
        } else {
            add_bias(&mut y, layer.b.data());
        }
        prev = y;
    }
    prev
}

/// Backward through the MLP for the rows of one forward pass.
///
/// Adds dL/dW and dL/db into `grads` (same structure as `net`) and returns dL/dx when
/// `want_dx` is set.
pub fn backward(
    net: &Mlp<Tensor>,
    x: &[f32],
    tape: &MlpTape,
    d_out: &[f32],
    grads: &mut Mlp<Tensor>,
    want_dx: bool,
) -> Option<Vec<f32>> {
    let rows = tape.rows;
    let n = net.layers.len();
    // Borrowed until the first layer's product replaces it (no copy of d_out).
    let mut delta: Cow<[f32]> = Cow::Borrowed(d_out);
    for l in (0..n).rev() {
        let layer = &net.layers[l];
        let (k, m) = (layer.w.rows(), layer.w.cols());
        let input: &[f32] = if l == 0 { x } else { &tape.hidden[l - 1] };
        let g = &mut grads.layers[l];
        matmul(
            g.w.data_mut(),
            View::new(input, rows, k).t(),
            View::new(&delta, rows, m),
            true,
        );
        let gb = g.b.data_mut();
        for r in 0..rows {
            for (acc, d) in gb.iter_mut().zip(&delta[r * m..(r + 1) * m]) {
                *acc += d;
            }
        }
        if l == 0 && !want_dx {
            return None;
        }
        let mut prev = vec![0.0f32; rows * k];
        matmul(
            &mut prev,
            View::new(&delta, rows, m),
            View::new(layer.w.data(), k, m).t(),
            false,
        );
        if l > 0 {
            scale_by_grad(net.act, &mut prev, &tape.pre[l - 1]);
        }
        delta = Cow::Owned(prev);
    }
    Some(delta.into_owned())
}

/// Adds `src` into `dst` tensor by tensor (summing per-chunk gradients in a fixed order).
pub fn add_into(dst: &mut Mlp<Tensor>, src: &Mlp<Tensor>) {
    for (d, s) in dst.tensors_mut().into_iter().zip(src.tensors()) {
        for (a, b) in d.data_mut().iter_mut().zip(s.data()) {
            *a += b;
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Loss = Σ c ⊙ mlp(x); checks dx and every parameter gradient by central differences.
    #[test]
    fn backward_matches_finite_differences() {
        for act in [Activation::Tanh, Activation::Silu, Activation::Softplus] {
            let mut rng = Rng::new(3);
            let net = Mlp::new(&[3, 5, 4, 2], act, &mut rng).unwrap();
            let rows = 4;
            let x = Tensor::randn(rows, 3, &mut rng);
            let c = Tensor::randn(rows, 2, &mut rng);
            let loss = |net: &Mlp<Tensor>, x: &[f32]| -> f64 {
                let t = forward(net, x, rows);
                t.out
                    .iter()
                    .zip(c.data())
                    .map(|(a, b)| (a * b) as f64)
                    .sum()
            };
            let tape = forward(&net, x.data(), rows);
            let mut grads = net.zeros_like();
            let dx = backward(&net, x.data(), &tape, c.data(), &mut grads, true).unwrap();
            let eps = 1e-3f32;
            for i in 0..x.len() {
                let mut xp = x.clone();
                xp.data_mut()[i] += eps;
                let mut xm = x.clone();
                xm.data_mut()[i] -= eps;
                let fd = (loss(&net, xp.data()) - loss(&net, xm.data())) / (2.0 * eps as f64);
                assert!(
                    (fd - dx[i] as f64).abs() < 2e-3,
                    "{act:?} dx[{i}]: fd {fd} vs {}",
                    dx[i]
                );
            }
            for (ti, g) in grads.tensors().iter().enumerate() {
                for i in 0..g.len() {
                    let mut p = net.clone();
                    p.tensors_mut()[ti].data_mut()[i] += eps;
                    let mut m = net.clone();
                    m.tensors_mut()[ti].data_mut()[i] -= eps;
                    let fd = (loss(&p, x.data()) - loss(&m, x.data())) / (2.0 * eps as f64);
                    let an = g.data()[i] as f64;
                    assert!(
                        (fd - an).abs() < 2e-3,
                        "{act:?} param {ti}[{i}]: fd {fd} vs {an}"
                    );
                }
            }
        }
    }
}
