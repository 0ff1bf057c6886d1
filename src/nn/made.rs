//! MADE (Germain et al. 2015): an MLP whose weights are masked so that output `j` (and `D + j`)
//! depends only on the inputs that come before input `j` in a chosen order. It is the
//! conditioner of the autoregressive flows (MAF, IAF; eq. 18.17–18.20).
//!
//! The masks are never stored: each unit carries a degree, and a weight from degree `a` to
//! degree `c` is live iff `c >= a` (into a hidden layer) or `c > a` (into the output layer).
//! This file chooses the degrees and builds the host network; the ops apply the masks.

use crate::error::{Error, Result};
use crate::nn::mlp::{Activation, Mlp};
use crate::ops::made::MadeSpec;
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};

/// The autoregressive order, given as the degrees of the D inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Input j has degree j + 1: x_1 first.
    Natural,
    /// Input j has degree D − j: x_D first. Alternating Natural and Reversed between stacked
    /// layers lets every coordinate condition on every other one.
    Reversed,
    /// A random permutation drawn from a generator seeded with this value.
    Random(u64),
}

/// How the hidden units get their degrees (each hidden degree lies in 1..=D−1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenDegrees {
    /// Unit i of every hidden layer gets degree (i mod (D − 1)) + 1, Germain's "deterministic"
    /// choice: every degree is used as evenly as the width allows.
    Cycle,
    /// Unit degrees drawn uniformly from [smallest degree of the previous layer, D − 1], as in
    /// Germain et al., from a generator seeded with this value.
    Random(u64),
}

/// Input degrees for `order`: a permutation of 1..=dim.
pub fn input_degrees(dim: usize, order: Order) -> Vec<u32> {
    match order {
        Order::Natural => (1..=dim as u32).collect(),
        Order::Reversed => (1..=dim as u32).rev().collect(),
        Order::Random(seed) => Rng::new(seed)
            .permutation(dim)
            .into_iter()
            .map(|k| k as u32 + 1)
            .collect(),
    }
}

/// Degrees of every layer: inputs, each hidden layer (sorted ascending, so the masks are
/// block-triangular), and the 2D outputs [b | raw s] that repeat the input degrees.
pub fn degrees(
    dim: usize,
    hidden: &[usize],
    order: Order,
    rule: HiddenDegrees,
) -> Result<Vec<Vec<u32>>> {
    check_shape(dim, hidden)?;
    let top = dim as u32 - 1;
    let input = input_degrees(dim, order);
    let mut rng = match rule {
        HiddenDegrees::Random(seed) => Some(Rng::new(seed)),
        HiddenDegrees::Cycle => None,
    };
    let mut layers = vec![input.clone()];
    for &width in hidden {
        let lowest = layers
            .last()
            .and_then(|d| d.iter().min().copied())
            .unwrap_or(1);
        let lowest = lowest.clamp(1, top);
        let mut deg: Vec<u32> = match rng.as_mut() {
            None => (0..width).map(|i| (i as u32 % top) + 1).collect(),
            Some(r) => (0..width)
                .map(|_| lowest + r.below((top - lowest + 1) as usize) as u32)
                .collect(),
        };
        deg.sort_unstable();
        layers.push(deg);
    }
    let mut out = input.clone();
    out.extend_from_slice(&input);
    layers.push(out);
    Ok(layers)
}

/// A MADE with hidden degrees cycled over 1..=D−1 (see [`made_with`]).
pub fn made(
    dim: usize,
    hidden: &[usize],
    act: Activation,
    order: Order,
    clamp: f32,
    rng: &mut Rng,
) -> Result<(MadeSpec, Mlp<Tensor>)> {
    made_with(dim, hidden, act, order, HiddenDegrees::Cycle, clamp, rng)
}

/// Builds the degrees and a host MLP [D, hidden.., 2D] whose output layer is zero, so the
/// affine autoregressive layer built on it starts as the identity (b = s = 0). Dead weights are
/// zeroed too (the ops ignore them anyway).
///
/// A hidden width below D − 1 is legal MADE but leaves some degrees without hidden units, so
/// some outputs see fewer inputs than the order allows (with `Cycle`, inputs of degree above
/// the width reach no output at all).
///
/// Errors: `dim < 2`, no hidden layer, a zero hidden width, or a clamp that is not positive
/// and finite.
pub fn made_with(
    dim: usize,
    hidden: &[usize],
    act: Activation,
    order: Order,
    rule: HiddenDegrees,
    clamp: f32,
    rng: &mut Rng,
) -> Result<(MadeSpec, Mlp<Tensor>)> {
    if !(clamp > 0.0 && clamp.is_finite()) {
        return Err(Error::invalid(format!(
            "MADE: clamp must be positive and finite, got {clamp}"
        )));
    }
    let spec = MadeSpec {
        dim,
        degrees: degrees(dim, hidden, order, rule)?,
        clamp,
    };
    let widths: Vec<usize> = spec.degrees.iter().map(Vec::len).collect();
    let mut net = Mlp::new(&widths, act, rng)?.zero_last();
    zero_dead_weights(&spec, &mut net)?;
    spec.check("made", &net, &Tensor::zeros(0, dim))?;
    Ok((spec, net))
}

/// The 0/1 mask of layer `layer` (in × out, same layout as its weight).
pub fn layer_mask(spec: &MadeSpec, layer: usize) -> Result<Tensor> {
    if layer + 1 >= spec.degrees.len() {
        return Err(Error::invalid(format!(
            "MADE layer {layer} out of range for {} layers",
            spec.degrees.len().saturating_sub(1)
        )));
    }
    let (din, dout) = (&spec.degrees[layer], &spec.degrees[layer + 1]);
    Ok(Tensor::from_fn(din.len(), dout.len(), |a, c| {
        if spec.connected(layer, din[a], dout[c]) {
            1.0
        } else {
            0.0
        }
    }))
}

/// Sets every masked-out weight of `net` to zero (biases are never masked).
pub fn zero_dead_weights(spec: &MadeSpec, net: &mut Mlp<Tensor>) -> Result<()> {
    for (l, layer) in net.layers.iter_mut().enumerate() {
        let mask = layer_mask(spec, l)?;
        layer
            .w
            .expect_shape("zero_dead_weights", mask.rows(), mask.cols())?;
        for (w, m) in layer.w.data_mut().iter_mut().zip(mask.data()) {
            *w *= m;
        }
    }
    Ok(())
}

fn check_shape(dim: usize, hidden: &[usize]) -> Result<()> {
    if dim < 2 {
        return Err(Error::invalid(format!(
            "MADE: an autoregressive network needs dim >= 2, got {dim}"
        )));
    }
    if dim > u32::MAX as usize / 2 {
        return Err(Error::invalid(format!("MADE: dim {dim} is too large")));
    }
    if hidden.is_empty() || hidden.contains(&0) {
        return Err(Error::invalid(format!(
            "MADE: needs at least one hidden layer, all widths positive, got {hidden:?}"
        )));
    }
    Ok(())
}
