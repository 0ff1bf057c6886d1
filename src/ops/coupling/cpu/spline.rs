//! The monotone rational-quadratic spline of Durkan et al. (2019), "Neural Spline Flows", as the
//! coupling function h of eq. 18.15: forward, closed-form inverse, and the gradients of both
//! with respect to the input and the unnormalised conditioner outputs.
//!
//! Notation inside bin k: knots (x0, y0) .. (x0 + w, y0 + h), slope s = h / w, knot
//! derivatives d0, d1, and ξ = (u − x0) / w ∈ [0, 1]. With ω = ξ(1 − ξ):
//!   y   = y0 + h·(s ξ² + d0 ω) / den,            den = s + (d1 + d0 − 2s)·ω
//!   y'  = s²·m / den²,                           m   = d1 ξ² + 2 s ω + d0 (1 − ξ)²
//! so log y' = 2 ln s + ln m − 2 ln den. den ≥ s/2 > 0 and m > 0 for positive s, d0, d1, so
//! every logarithm and division below is safe once ξ is clamped to [0, 1].

use crate::nn::mlp::{sigmoid, softplus};
use crate::ops::Direction;
use crate::ops::coupling::{SPLINE_MIN_BIN, SPLINE_MIN_DERIVATIVE};

/// One column's spline, rebuilt from each conditioner block by [`RqSpline::load`]. The buffers
/// are reused from column to column so that a batch allocates once per chunk.
pub struct RqSpline {
    bins: usize,
    bound: f32,
    /// The pre-activation shift that makes a zero conditioner output give derivative 1.
    deriv_shift: f32,
    /// Softmax of the width and height logits.
    pw: Vec<f32>,
    ph: Vec<f32>,
    /// Knots, `bins + 1` each: xs[0] = ys[0] = −bound, xs[bins] = ys[bins] = +bound.
    xs: Vec<f32>,
    ys: Vec<f32>,
    /// Knot derivatives, `bins + 1`: the two boundary ones are 1.
    ds: Vec<f32>,
    /// Scratch for the gradient with respect to the softmax outputs.
    gp: Vec<f32>,
}

/// The geometry of the bin a value falls in.
#[derive(Clone, Copy, Debug)]
struct Bin {
    k: usize,
    x0: f32,
    w: f32,
    y0: f32,
    h: f32,
    d0: f32,
    d1: f32,
    s: f32,
}

/// Partial derivatives of the bin's forward map y(ξ; s, h, y0, d0, d1) and of its log slope
/// l(ξ; s, d0, d1) = log y', holding the other arguments fixed (∂y/∂y0 = 1).
struct Partials {
    y_xi: f32,
    y_s: f32,
    y_h: f32,
    y_d0: f32,
    y_d1: f32,
    l_xi: f32,
    l_s: f32,
    l_d0: f32,
    l_d1: f32,
}

/// Gradients with respect to the bin geometry, before it is traced back to the logits.
#[derive(Default)]
struct BinGrad {
    x0: f32,
    w: f32,
    y0: f32,
    h: f32,
    d0: f32,
    d1: f32,
}

impl RqSpline {
    pub fn new(bins: usize, bound: f32) -> Self {
        let min_d = SPLINE_MIN_DERIVATIVE as f64;
        RqSpline {
            bins,
            bound,
            deriv_shift: ((1.0 - min_d).exp() - 1.0).ln() as f32,
            pw: vec![0.0; bins],
            ph: vec![0.0; bins],
            xs: vec![0.0; bins + 1],
            ys: vec![0.0; bins + 1],
            ds: vec![0.0; bins + 1],
            gp: vec![0.0; bins],
        }
    }

    /// Conditioner outputs per column: `3·bins − 1`.
    pub fn block_len(&self) -> usize {
        3 * self.bins - 1
    }

    /// Builds knots and derivatives from one column's block of conditioner outputs.
    pub fn load(&mut self, raw: &[f32]) {
        let k = self.bins;
        softmax(&raw[..k], &mut self.pw);
        softmax(&raw[k..2 * k], &mut self.ph);
        knots(&self.pw, self.bound, &mut self.xs);
        knots(&self.ph, self.bound, &mut self.ys);
        self.ds[0] = 1.0;
        self.ds[k] = 1.0;
        for i in 1..k {
            self.ds[i] = SPLINE_MIN_DERIVATIVE + softplus(raw[2 * k + i - 1] + self.deriv_shift);
        }
    }

    fn inside(&self, v: f32) -> bool {
        (-self.bound..=self.bound).contains(&v)
    }

    fn bin(&self, k: usize) -> Bin {
        let (x0, y0) = (self.xs[k], self.ys[k]);
        let w = self.xs[k + 1] - x0;
        let h = self.ys[k + 1] - y0;
        Bin {
            k,
            x0,
            w,
            y0,
            h,
            d0: self.ds[k],
            d1: self.ds[k + 1],
            s: h / w,
        }
    }

    /// The bin whose knot interval (in `knots`) holds v: the number of interior knots <= v.
    fn bin_of(&self, knots: &[f32], v: f32) -> Bin {
        self.bin(knots[1..self.bins].partition_point(|&q| q <= v))
    }

    /// Applies the loaded spline to one value: (output, log|d out / d in|).
    pub fn apply(&self, v: f32, dir: Direction) -> (f32, f32) {
        if !self.inside(v) {
            return (v, 0.0);
        }
        match dir {
            Direction::Forward => {
                let b = self.bin_of(&self.xs, v);
                let xi = ((v - b.x0) / b.w).clamp(0.0, 1.0);
                eval(&b, xi)
            }
            Direction::Inverse => {
                let b = self.bin_of(&self.ys, v);
                let xi = invert(&b, v);
                (b.x0 + xi * b.w, -log_slope(&b, xi))
            }
        }
    }

    /// Gradient of g_out·out + g_ld·logdet for one value through the loaded spline: returns
    /// d/d(input) and adds d/d(raw conditioner block) into `g_raw` (of `block_len()`).
    pub fn backward(
        &mut self,
        raw: &[f32],
        v: f32,
        dir: Direction,
        g_out: f32,
        g_ld: f32,
        g_raw: &mut [f32],
    ) -> f32 {
        if !self.inside(v) {
            // Identity tail: no dependence on the conditioner.
            return g_out;
        }
        let (g_in, b, g) = match dir {
            Direction::Forward => {
                let b = self.bin_of(&self.xs, v);
                let xi = ((v - b.x0) / b.w).clamp(0.0, 1.0);
                let p = partials(&b, xi);
                let g_xi = g_out * p.y_xi + g_ld * p.l_xi;
                let g_s = g_out * p.y_s + g_ld * p.l_s;
                // ξ = (v − x0)/w and s = h/w.
                let g = BinGrad {
                    x0: -g_xi / b.w,
                    w: -g_xi * xi / b.w - g_s * b.s / b.w,
                    y0: g_out,
                    h: g_out * p.y_h + g_s / b.w,
                    d0: g_out * p.y_d0 + g_ld * p.l_d0,
                    d1: g_out * p.y_d1 + g_ld * p.l_d1,
                };
                (g_xi / b.w, b, g)
            }
            Direction::Inverse => {
                let b = self.bin_of(&self.ys, v);
                let xi = invert(&b, v);
                let p = partials(&b, xi);
                // out = x0 + w·ξ and logdet = −l(ξ; s, d0, d1), where ξ solves y(ξ) = v.
                // Implicit differentiation: dξ = (dv − dy0 − y_h dh − y_s ds − ...) / y_ξ.
                let g_xi = g_out * b.w - g_ld * p.l_xi;
                let r = g_xi / p.y_xi;
                let g_s = -g_ld * p.l_s - r * p.y_s;
                let g = BinGrad {
                    x0: g_out,
                    w: g_out * xi - g_s * b.s / b.w,
                    y0: -r,
                    h: -r * p.y_h + g_s / b.w,
                    d0: -g_ld * p.l_d0 - r * p.y_d0,
                    d1: -g_ld * p.l_d1 - r * p.y_d1,
                };
                (r, b, g)
            }
        };
        self.scatter(raw, &b, &g, g_raw);
        g_in
    }

    /// Traces the bin-geometry gradient back through knots, softmax and softplus to the logits.
    fn scatter(&mut self, raw: &[f32], b: &Bin, g: &BinGrad, g_raw: &mut [f32]) {
        let k = self.bins;
        let (wg, rest) = g_raw.split_at_mut(k);
        let (hg, dg) = rest.split_at_mut(k);
        let span = 2.0 * self.bound * (1.0 - k as f32 * SPLINE_MIN_BIN);
        // x0 = −bound + span·Σ_{j<k} p_j (+ min-bin terms); w = span·p_k (+ min bin).
        softmax_backward(&self.pw, b.k, span * g.x0, span * g.w, &mut self.gp, wg);
        softmax_backward(&self.ph, b.k, span * g.y0, span * g.h, &mut self.gp, hg);
        // Interior derivative i (1..bins) is raw[2·bins + i − 1]; the boundary ones are fixed.
        for (i, gd) in [(b.k, g.d0), (b.k + 1, g.d1)] {
            if (1..k).contains(&i) {
                dg[i - 1] += gd * sigmoid(raw[2 * k + i - 1] + self.deriv_shift);
            }
        }
    }
}

/// Softmax with the maximum subtracted (no overflow for large logits).
fn softmax(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = (l - max).exp();
        sum += *o as f64;
    }
    let inv = (1.0 / sum) as f32;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Knots −bound, ..., +bound from bin fractions p (softmax) with the minimum bin size.
fn knots(p: &[f32], bound: f32, out: &mut [f32]) {
    let n = p.len();
    let scale = 1.0 - n as f64 * SPLINE_MIN_BIN as f64;
    let mut acc = 0.0f64;
    out[0] = -bound;
    for i in 1..n {
        acc += SPLINE_MIN_BIN as f64 + scale * p[i - 1] as f64;
        out[i] = (-(bound as f64) + 2.0 * bound as f64 * acc) as f32;
    }
    // Exactly +bound, so that the bins tile the domain whatever the rounding.
    out[n] = bound;
}

/// Adds to `g_logits` the gradient of a loss that depends on the softmax p through
/// g_left·Σ_{j<k} p_j + g_bin·p_k (a bin's left knot and its size).
fn softmax_backward(
    p: &[f32],
    k: usize,
    g_left: f32,
    g_bin: f32,
    gp: &mut [f32],
    g_logits: &mut [f32],
) {
    let mut dot = 0.0f32;
    for (j, (g, &pj)) in gp.iter_mut().zip(p).enumerate() {
        *g = match j.cmp(&k) {
            std::cmp::Ordering::Less => g_left,
            std::cmp::Ordering::Equal => g_bin,
            std::cmp::Ordering::Greater => 0.0,
        };
        dot += pj * *g;
    }
    for ((gl, &g), &pj) in g_logits.iter_mut().zip(gp.iter()).zip(p) {
        *gl += pj * (g - dot);
    }
}

/// The bin's forward map at ξ: (y, log y').
fn eval(b: &Bin, xi: f32) -> (f32, f32) {
    let om = xi * (1.0 - xi);
    let den = b.s + (b.d1 + b.d0 - 2.0 * b.s) * om;
    let y = b.y0 + b.h * (b.s * xi * xi + b.d0 * om) / den;
    (y, log_slope(b, xi))
}

/// log y' at ξ = 2 ln s + ln m − 2 ln den.
fn log_slope(b: &Bin, xi: f32) -> f32 {
    let om = xi * (1.0 - xi);
    let den = b.s + (b.d1 + b.d0 - 2.0 * b.s) * om;
    let one_m = 1.0 - xi;
    let m = b.d1 * xi * xi + 2.0 * b.s * om + b.d0 * one_m * one_m;
    2.0 * b.s.ln() + m.ln() - 2.0 * den.ln()
}

/// Solves y(ξ) = v for ξ in [0, 1] by the root of a ξ² + b ξ + c = 0 that avoids
/// cancellation: ξ = 2c / (−b − sqrt(b² − 4ac)).
fn invert(bin: &Bin, v: f32) -> f32 {
    let dy = v - bin.y0;
    let t = bin.d1 + bin.d0 - 2.0 * bin.s;
    let a = bin.h * (bin.s - bin.d0) + dy * t;
    let b = bin.h * bin.d0 - dy * t;
    let c = -bin.s * dy;
    let disc = (b * b - 4.0 * a * c).max(0.0);
    let denom = -b - disc.sqrt();
    // c <= 0 inside the bin, so a negative denominator gives ξ >= 0; a zero one only arises
    // from rounding at the left knot.
    let xi = if denom < 0.0 { 2.0 * c / denom } else { 0.0 };
    xi.clamp(0.0, 1.0)
}

fn partials(b: &Bin, xi: f32) -> Partials {
    let om = xi * (1.0 - xi);
    let om_xi = 1.0 - 2.0 * xi;
    let t = b.d1 + b.d0 - 2.0 * b.s;
    let den = b.s + t * om;
    let n = b.s * xi * xi + b.d0 * om;
    let one_m = 1.0 - xi;
    let m = b.d1 * xi * xi + 2.0 * b.s * om + b.d0 * one_m * one_m;
    let den2 = den * den;
    // ∂den: ξ -> t·ω', s -> 1 − 2ω, d0 and d1 -> ω.  ∂n: ξ -> 2sξ + d0 ω', s -> ξ², d0 -> ω.
    let den_xi = t * om_xi;
    let den_s = 1.0 - 2.0 * om;
    // ∂m: ξ -> 2 d1 ξ + 2 s ω' − 2 d0 (1 − ξ), s -> 2ω, d0 -> (1 − ξ)², d1 -> ξ².
    let m_xi = 2.0 * b.d1 * xi + 2.0 * b.s * om_xi - 2.0 * b.d0 * one_m;
    Partials {
        // h·(n_ξ den − n den_ξ)/den² simplifies to h·s·m/den² (= w·y', always positive).
        y_xi: b.h * b.s * m / den2,
        y_s: b.h * (xi * xi * den - n * den_s) / den2,
        y_h: n / den,
        y_d0: b.h * om * (den - n) / den2,
        y_d1: -b.h * n * om / den2,
        l_xi: m_xi / m - 2.0 * den_xi / den,
        l_s: 2.0 / b.s + 2.0 * om / m - 2.0 * den_s / den,
        l_d0: one_m * one_m / m - 2.0 * om / den,
        l_d1: xi * xi / m - 2.0 * om / den,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spline(raw: &[f32]) -> RqSpline {
        let mut s = RqSpline::new(4, 2.0);
        s.load(raw);
        s
    }

    const RAW: [f32; 11] = [0.3, -1.2, 0.8, 0.1, -0.5, 1.4, 0.2, -0.9, 0.7, -1.1, 1.9];

    #[test]
    fn zero_block_is_identity() {
        let s = spline(&[0.0; 11]);
        for v in [-1.9f32, -0.3, 0.0, 0.77, 1.5] {
            let (y, ld) = s.apply(v, Direction::Forward);
            assert!((y - v).abs() < 1e-6 && ld.abs() < 1e-6, "{v} -> {y}, {ld}");
        }
    }

    #[test]
    fn inverse_undoes_forward_and_slopes_match() {
        let s = spline(&RAW);
        for i in 0..200 {
            let v = -2.5 + 5.0 * i as f32 / 199.0;
            let (y, ld) = s.apply(v, Direction::Forward);
            let (back, ld_inv) = s.apply(y, Direction::Inverse);
            assert!((back - v).abs() < 2e-5, "{v} -> {y} -> {back}");
            assert!((ld + ld_inv).abs() < 2e-4, "{v}: {ld} vs {ld_inv}");
            let eps = 1e-3;
            let fd = (s.apply(v + eps, Direction::Forward).0
                - s.apply(v - eps, Direction::Forward).0)
                / (2.0 * eps);
            assert!(
                (fd.ln() - ld).abs() < 5e-3,
                "{v}: log slope {ld} vs fd {}",
                fd.ln()
            );
        }
    }
}
