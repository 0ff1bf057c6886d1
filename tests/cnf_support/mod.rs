//! An independent f64 reference of the vector-field MLP for the CNF tests: plain loops, the
//! Jacobian by forward mode in f64, and the divergence from it. Finite differences of these
//! functions are accurate to ~1e-9, so they can check the f32 ops' analytic derivatives.
#![allow(dead_code)]

use flowfuse::nn::{Activation, Mlp};
use flowfuse::tensor::{Shaped, Tensor};

fn act(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Relu => x.max(0.0),
        Activation::Tanh => x.tanh(),
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Softplus => {
            if x > 30.0 {
                x
            } else {
                x.exp().ln_1p()
            }
        }
    }
}

fn dact(a: Activation, x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    match a {
        Activation::Relu => (x > 0.0) as u8 as f64,
        Activation::Tanh => 1.0 - x.tanh().powi(2),
        Activation::Silu => s * (1.0 + x * (1.0 - s)),
        Activation::Softplus => s,
    }
}

/// One layer: w is in×out row-major, b has out entries.
#[derive(Clone, Debug)]
pub struct Layer64 {
    pub n_in: usize,
    pub n_out: usize,
    pub w: Vec<f64>,
    pub b: Vec<f64>,
}

#[derive(Clone, Debug)]
pub struct Net64 {
    pub layers: Vec<Layer64>,
    pub act: Activation,
}

impl Net64 {
    pub fn from_mlp(net: &Mlp<Tensor>) -> Self {
        let layers = net
            .layers
            .iter()
            .map(|l| Layer64 {
                n_in: l.w.rows(),
                n_out: l.w.cols(),
                w: l.w.data().iter().map(|&v| v as f64).collect(),
                b: l.b.data().iter().map(|&v| v as f64).collect(),
            })
            .collect();
        Net64 {
            layers,
            act: net.act,
        }
    }

    pub fn dim(&self) -> usize {
        self.layers.last().unwrap().n_out
    }

    /// Every parameter in `Mlp::tensors()` order (w0, b0, w1, b1, ...).
    pub fn params(&self) -> Vec<f64> {
        self.layers
            .iter()
            .flat_map(|l| l.w.iter().chain(&l.b).copied())
            .collect()
    }

    pub fn with_params(&self, p: &[f64]) -> Net64 {
        let mut out = self.clone();
        let mut k = 0;
        for l in &mut out.layers {
            for v in l.w.iter_mut().chain(l.b.iter_mut()) {
                *v = p[k];
                k += 1;
            }
        }
        assert_eq!(k, p.len());
        out
    }

    /// f(z, t) and the Jacobian ∂f/∂z (J[i][j] = ∂f_i/∂z_j) by forward mode.
    pub fn f_and_jac(&self, z: &[f64], t: f64) -> (Vec<f64>, Vec<Vec<f64>>) {
        let d = z.len();
        let mut h: Vec<f64> = z.iter().copied().chain([t]).collect();
        // tangents[j] = ∂h/∂z_j
        let mut tan: Vec<Vec<f64>> = (0..d)
            .map(|j| (0..=d).map(|i| (i == j) as u8 as f64).collect())
            .collect();
        let n = self.layers.len();
        for (li, l) in self.layers.iter().enumerate() {
            let mut a = l.b.clone();
            let mut ta = vec![vec![0.0; l.n_out]; d];
            for i in 0..l.n_in {
                for o in 0..l.n_out {
                    let w = l.w[i * l.n_out + o];
                    a[o] += h[i] * w;
                    for j in 0..d {
                        ta[j][o] += tan[j][i] * w;
                    }
                }
            }
            if li + 1 == n {
                let jac = (0..l.n_out)
                    .map(|o| (0..d).map(|j| ta[j][o]).collect())
                    .collect();
                return (a, jac);
            }
            h = a.iter().map(|&x| act(self.act, x)).collect();
            for tj in &mut ta {
                for (o, v) in tj.iter_mut().enumerate() {
                    *v *= dact(self.act, a[o]);
                }
            }
            tan = ta;
        }
        unreachable!()
    }

    pub fn f(&self, z: &[f64], t: f64) -> Vec<f64> {
        self.f_and_jac(z, t).0
    }

    pub fn div_exact(&self, z: &[f64], t: f64) -> f64 {
        let (_, j) = self.f_and_jac(z, t);
        (0..z.len()).map(|i| j[i][i]).sum()
    }

    /// (1/M)·Σ_m ε_mᵀ J ε_m with the M probes laid out one after the other.
    pub fn div_probes(&self, z: &[f64], t: f64, probes: &[f64]) -> f64 {
        let d = z.len();
        let m = probes.len() / d;
        let (_, j) = self.f_and_jac(z, t);
        let mut s = 0.0;
        for p in probes.chunks_exact(d) {
            for a in 0..d {
                for b in 0..d {
                    s += p[a] * j[a][b] * p[b];
                }
            }
        }
        s / m as f64
    }
}

/// Rows of a tensor as f64 vectors.
pub fn rows64(t: &Tensor) -> Vec<Vec<f64>> {
    (0..t.rows())
        .map(|r| t.row(r).iter().map(|&v| v as f64).collect())
        .collect()
}

/// Largest |got − want| / (atol + rtol·|want|) over paired slices (≤ 1 passes).
pub fn worst_ratio(got: &[f64], want: &[f64], atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / (atol + rtol * w.abs()))
        .fold(0.0, f64::max)
}

#[track_caller]
pub fn assert_all_close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    let r = worst_ratio(got, want, atol, rtol);
    // NaN compares false: a NaN anywhere fails too.
    let ok = r <= 1.0;
    if !ok {
        let shown: Vec<String> = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (g, w))| {
                let within = (*g - *w).abs() <= atol + rtol * w.abs();
                !within
            })
            .take(8)
            .map(|(i, (g, w))| format!("  [{i}] got {g:.9e} want {w:.9e}"))
            .collect();
        panic!(
            "{what}: outside atol {atol:e} + rtol {rtol:e} (worst ratio {r:.3}); first:\n{}",
            shown.join("\n")
        );
    }
}
