//! Coupling fixtures shared by the layer suite (tests/coupling.rs) and the kernel parity suite
//! (tests/parity_coupling.rs).

use flowfuse::nn::mlp::{Activation, Mlp};
use flowfuse::ops::coupling::{CouplingKind, CouplingSpec};
use flowfuse::{Rng, Tensor};

/// The interval [−bound, bound] of the spline in [`kinds`].
pub const SPLINE_BOUND: f32 = 2.0;

/// One of each coupling function.
pub fn kinds() -> [CouplingKind; 3] {
    [
        CouplingKind::Affine { clamp: 2.0 },
        CouplingKind::Additive,
        CouplingKind::Spline {
            bins: 5,
            bound: SPLINE_BOUND,
        },
    ]
}

/// A conditioner far from the identity, `spec.net_in()` -> `hidden` -> `spec.net_out()`: random
/// weights with the output layer scaled up, so that affine scales reach e^±1 and beyond and
/// spline bins are clearly uneven.
pub fn random_net(
    spec: &CouplingSpec,
    hidden: &[usize],
    act: Activation,
    seed: u64,
) -> Mlp<Tensor> {
    let mut rng = Rng::new(seed);
    let mut widths = vec![spec.net_in()];
    widths.extend_from_slice(hidden);
    widths.push(spec.net_out());
    let mut net = Mlp::new(&widths, act, &mut rng).unwrap();
    let gain = match spec.kind {
        // Steeper splines make the f32 finite differences of the log-det too noisy.
        CouplingKind::Spline { .. } => 2.0,
        _ => 3.0,
    };
    let last = net.layers.last_mut().unwrap();
    last.w = last.w.map(|v| gain * v);
    last.b = last.b.map(|v| gain * v);
    net
}

/// Standard normal inputs of scale 1.5. For splines every third transformed value is pushed
/// at least 0.1 outside [−bound, bound] and the others at least 0.1 inside, so that a test sees
/// both the spline and its identity tails.
pub fn random_input(spec: &CouplingSpec, rows: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let mut x = Tensor::randn(rows, spec.dim, &mut rng).map(|v| 1.5 * v);
    if let CouplingKind::Spline { bound, .. } = spec.kind {
        for i in 0..rows {
            for c in spec.transformed_cols() {
                let v = x.get(i, c);
                let v = if (i + c) % 3 == 0 {
                    v.signum() * (bound + 0.1 + v.abs())
                } else {
                    (bound - 0.1) * v / (1.0 + v.abs())
                };
                x.set(i, c, v);
            }
        }
    }
    x
}
