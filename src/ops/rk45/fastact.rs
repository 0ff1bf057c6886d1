//! Activations with their first and second derivatives over whole slices, written so that the
//! compiler vectorises them: the vector-field ops evaluate B·width activations per field
//! evaluation, and the libm `tanhf`/`expf` calls behind `f32::tanh` would dominate their cost.
//!
//! tanh and the logistic sigmoid (silu, softplus derivatives) go through one exp routine:
//! y = n·ln2 + r with |r| <= ln2/2, e^r − 1 by its Taylor polynomial to r⁷ (truncation below
//! 2e-8 relative), and 2^n assembled in the exponent bits; tanh's one reciprocal is a Newton
//! iteration on a known range instead of a division. The results are within a few ulp of libm
//! (see the tests). NaN inputs stay NaN. Softplus's value itself uses libm (`ln_1p`).

use crate::nn::mlp::{Activation, softplus};

/// Which derivatives to produce next to the activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Derivs {
    None,
    First,
    Second,
}

/// 1.5·2^23: adding it rounds a float of magnitude < 2^22 to an integer that then sits in the
/// low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that n·LN2_HI is exact for |n| < 512 (Cody & Waite).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// (e^r − 1 for the reduced argument r, 2^n) with y = n·ln2 + r; needs −126 <= n <= 127.
/// Horner's steps are fused multiply-adds (`mul_add` is correctly rounded on every target, so
/// results do not depend on the CPU; it is one instruction where FMA exists).
#[inline(always)]
fn exp_split(y: f32) -> (f32, f32) {
    let shifted = y * LOG2_E + ROUND_MAGIC;
    let nf = shifted - ROUND_MAGIC;
    let n = shifted.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let r = (-nf).mul_add(LN2_LO, (-nf).mul_add(LN2_HI, y));
    let mut q = 1.0 / 5040.0f32;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0] {
        q = q.mul_add(r, c);
    }
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    (r * q, scale)
}

/// e^y − 1 for y in [−20, 0]: 2^n·(p + 1) − 1 = 2^n·p + (2^n − 1), exact-ish near 0.
#[inline(always)]
fn expm1_nonpositive(y: f32) -> f32 {
    let (p, scale) = exp_split(y);
    scale.mul_add(p, scale - 1.0)
}

/// e^y, y clamped to [−87, 87] (the normal range of 2^n); NaN stays NaN.
#[inline(always)]
fn exp_clamped(y: f32) -> f32 {
    let y = if y > 87.0 { 87.0 } else { y };
    let y = if y < -87.0 { -87.0 } else { y };
    let (p, scale) = exp_split(y);
    scale.mul_add(p, scale)
}

/// 1/y for y in [1, 2] without a division (a vector division is the slowest step of tanh):
/// Newton's iteration r ← r + r·(1 − y·r) from the best linear guess 48/17 − 32/17·(y/2) on
/// y/2 ∈ [½, 1], whose relative error 1/17 squares with each step: three steps reach 2e-10.
#[inline(always)]
fn recip_1_to_2(y: f32) -> f32 {
    let h = 0.5 * y;
    let mut r = (-32.0f32 / 17.0).mul_add(h, 48.0 / 17.0);
    for _ in 0..3 {
        r = r.mul_add((-h).mul_add(r, 1.0), r);
    }
    0.5 * r
}

/// tanh(x) = −expm1(−2|x|) / (2 + expm1(−2|x|)) with the sign of x; |x| > 9 rounds to ±1.
#[inline(always)]
pub(super) fn tanh(x: f32) -> f32 {
    let ax = x.abs();
    let ax = if ax > 9.0 { 9.0 } else { ax };
    let e = expm1_nonpositive(-2.0 * ax);
    (-e * recip_1_to_2(2.0 + e)).copysign(x)
}

#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_clamped(-x))
}

/// The body shared by the dispatch targets: h = σ(a), d1 = σ'(a), d2 = σ''(a).
#[inline(always)]
fn apply_all(
    act: Activation,
    derivs: Derivs,
    pre: &[f32],
    h: &mut [f32],
    d1: &mut [f32],
    d2: &mut [f32],
) {
    match (act, derivs) {
        (Activation::Tanh, Derivs::None) => {
            for (o, &x) in h.iter_mut().zip(pre) {
                *o = tanh(x);
            }
        }
        (Activation::Tanh, Derivs::First) => {
            for ((o, g), &x) in h.iter_mut().zip(d1.iter_mut()).zip(pre) {
                let t = tanh(x);
                *o = t;
                *g = 1.0 - t * t;
            }
        }
        (Activation::Tanh, Derivs::Second) => {
            for (((o, g), g2), &x) in h.iter_mut().zip(d1.iter_mut()).zip(d2.iter_mut()).zip(pre) {
                let t = tanh(x);
                let s = 1.0 - t * t;
                *o = t;
                *g = s;
                *g2 = -2.0 * t * s;
            }
        }
        (Activation::Silu, Derivs::None) => {
            for (o, &x) in h.iter_mut().zip(pre) {
                *o = x * sigmoid(x);
            }
        }
        (Activation::Silu, Derivs::First) => {
            for ((o, g), &x) in h.iter_mut().zip(d1.iter_mut()).zip(pre) {
                let s = sigmoid(x);
                *o = x * s;
                *g = s * (1.0 + x * (1.0 - s));
            }
        }
        (Activation::Silu, Derivs::Second) => {
            for (((o, g), g2), &x) in h.iter_mut().zip(d1.iter_mut()).zip(d2.iter_mut()).zip(pre) {
                let s = sigmoid(x);
                *o = x * s;
                *g = s * (1.0 + x * (1.0 - s));
                *g2 = s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s));
            }
        }
        (Activation::Softplus, _) => {
            for (o, &x) in h.iter_mut().zip(pre) {
                *o = softplus(x);
            }
            if derivs != Derivs::None {
                for (g, &x) in d1.iter_mut().zip(pre) {
                    *g = sigmoid(x);
                }
            }
            if derivs == Derivs::Second {
                for (g2, &g) in d2.iter_mut().zip(d1.iter()) {
                    *g2 = g * (1.0 - g);
                }
            }
        }
        (Activation::Relu, _) => {
            for (o, &x) in h.iter_mut().zip(pre) {
                // Written so that NaN propagates (f32::max would drop it).
                *o = if x < 0.0 { 0.0 } else { x };
            }
            if derivs != Derivs::None {
                for (g, &x) in d1.iter_mut().zip(pre) {
                    *g = if x > 0.0 { 1.0 } else { 0.0 };
                }
            }
            if derivs == Derivs::Second {
                d2.fill(0.0);
            }
        }
    }
}

/// `apply_all` compiled for AVX-512 (16-wide vectors).
///
/// # Safety
/// The CPU must support AVX-512F (which brings AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn apply_all_avx512(
    act: Activation,
    derivs: Derivs,
    pre: &[f32],
    h: &mut [f32],
    d1: &mut [f32],
    d2: &mut [f32],
) {
    apply_all(act, derivs, pre, h, d1, d2)
}

/// `apply_all` compiled for AVX2 (8-wide vectors).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_all_avx2(
    act: Activation,
    derivs: Derivs,
    pre: &[f32],
    h: &mut [f32],
    d1: &mut [f32],
    d2: &mut [f32],
) {
    apply_all(act, derivs, pre, h, d1, d2)
}

/// Fills `h` with σ(pre) and, as `derivs` asks, `d1` with σ' and `d2` with σ'' (slices not
/// asked for may be empty). Same results on every CPU: the wide path only changes the vector
/// width (the fused multiply-adds are explicit and exactly rounded everywhere; Rust never
/// contracts a multiply and an add on its own). Without FMA hardware `mul_add` is a slow
/// library call: x86 CPUs without AVX2 (before 2013) take that path.
pub(super) fn activate(
    act: Activation,
    derivs: Derivs,
    pre: &[f32],
    h: &mut [f32],
    d1: &mut [f32],
    d2: &mut [f32],
) {
    debug_assert_eq!(pre.len(), h.len());
    debug_assert!(derivs == Derivs::None || d1.len() == pre.len());
    debug_assert!(derivs != Derivs::Second || d2.len() == pre.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { apply_all_avx512(act, derivs, pre, h, d1, d2) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for (checked above).
            unsafe { apply_all_avx2(act, derivs, pre, h, d1, d2) };
            return;
        }
    }
    apply_all(act, derivs, pre, h, d1, d2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> impl Iterator<Item = f32> {
        (-40_000..=40_000).map(|i| i as f32 * 5e-4)
    }

    #[test]
    fn tanh_matches_libm() {
        let mut worst = 0.0f32;
        for x in grid().chain([1e-30, -1e-30, 1e-8, 0.0, -0.0, 30.0, -100.0]) {
            let (got, want) = (tanh(x), (x as f64).tanh() as f32);
            let err = (got - want).abs() / want.abs().max(f32::MIN_POSITIVE);
            worst = worst.max(if want == 0.0 { got.abs() } else { err });
        }
        assert!(worst < 5e-7, "relative error {worst:e}");
        assert!(tanh(f32::NAN).is_nan());
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn sigmoid_matches_libm() {
        let mut worst = 0.0f32;
        for x in grid().chain([-87.0, 87.0, 200.0, -200.0]) {
            let want = (1.0 / (1.0 + (-(x as f64)).exp())) as f32;
            let err = (sigmoid(x) - want).abs() / want.max(f32::MIN_POSITIVE);
            if want > 1e-30 {
                worst = worst.max(err);
            }
        }
        assert!(worst < 5e-7, "relative error {worst:e}");
        assert!(sigmoid(f32::NAN).is_nan());
    }

    /// The widest path this CPU takes returns the baseline's bits (a NaN's payload aside).
    #[test]
    fn every_path_returns_the_same_bits() {
        let pre: Vec<f32> = grid()
            .step_by(13)
            .chain([f32::NAN, 0.0, -0.0, 1e-20])
            .collect();
        let n = pre.len();
        for act in [
            Activation::Tanh,
            Activation::Silu,
            Activation::Softplus,
            Activation::Relu,
        ] {
            let run = |dispatch: bool| {
                let (mut h, mut d1, mut d2) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                if dispatch {
                    activate(act, Derivs::Second, &pre, &mut h, &mut d1, &mut d2);
                } else {
                    apply_all(act, Derivs::Second, &pre, &mut h, &mut d1, &mut d2);
                }
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                (bits(h), bits(d1), bits(d2))
            };
            let (a, b) = (run(true), run(false));
            for (what, x, y) in [("h", &a.0, &b.0), ("d1", &a.1, &b.1), ("d2", &a.2, &b.2)] {
                for i in 0..n {
                    let both_nan = f32::from_bits(x[i]).is_nan() && f32::from_bits(y[i]).is_nan();
                    if x[i] != y[i] && !both_nan {
                        panic!(
                            "{act:?} {what} at {}: {:e} vs {:e}",
                            pre[i],
                            f32::from_bits(x[i]),
                            f32::from_bits(y[i])
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn derivatives_match_the_scalar_definitions() {
        let pre: Vec<f32> = grid().step_by(97).collect();
        for act in [
            Activation::Tanh,
            Activation::Silu,
            Activation::Softplus,
            Activation::Relu,
        ] {
            let n = pre.len();
            let (mut h, mut d1, mut d2) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            activate(act, Derivs::Second, &pre, &mut h, &mut d1, &mut d2);
            for i in 0..n {
                let x = pre[i];
                for (got, want, what) in [
                    (h[i], act.apply(x), "value"),
                    (d1[i], act.grad(x), "grad"),
                    (d2[i], act.grad2(x), "grad2"),
                ] {
                    assert!(
                        (got - want).abs() <= 2e-6 * (1.0 + want.abs()),
                        "{act:?} {what} at {x}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
