//! exp and tanh in f32, written without branches or library calls so that the element-wise
//! loops of the passes vectorise (the libm calls do not, and the transform evaluates two of
//! them per coordinate). Accurate to a few ulp; see the tests.

/// ln 2 split so that n·LN2_HI is exact for |n| < 2^9 (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5·2^23 rounds an f32 of magnitude below 2^22 to the nearest
/// integer.
const ROUND: f32 = 12_582_912.0;

/// e^x. Overflows to +inf a little early (from x ≈ 88.4 instead of 88.7), gives e^−87.3
/// (≈ 1.2e-38, the smallest normal) for anything smaller, propagates NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // x = n·ln2 + r with |r| <= ln2/2; n in [-126, 128], where 128 builds +inf below.
    let x = x.clamp(-87.3, 88.8);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r by its Taylor series to degree 7: the remainder is below 1e-8 relative.
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from its exponent bits: the low mantissa bits of (n + 127) + 1.5·2^23 hold the
    // integer n + 127 (in 1..=255; 255 is the exponent of +inf).
    let scale = f32::from_bits((n + 127.0 + ROUND).to_bits() << 23);
    p * scale
}

/// tanh x = sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}). Absolute error ~1e-7 (relative error
/// grows for |x| below 1e-3, where the result is itself that small).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_whole_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-6, "worst relative error {worst:e}");
        let mut near = 0.0f64;
        for i in -20000..20000 {
            let x = i as f32 * 1e-3;
            let want = (x as f64).exp();
            near = near.max(((exp(x) as f64 - want) / want).abs());
        }
        assert!(near < 3e-7, "worst relative error on [-20, 20]: {near:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(-100.0) > 0.0 && exp(-100.0) < 1.3e-38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_is_accurate() {
        let mut worst = 0.0f64;
        for i in -30000..30000 {
            let x = i as f32 * 3e-4;
            let want = (x as f64).tanh();
            worst = worst.max((tanh(x) as f64 - want).abs());
        }
        assert!(worst < 2e-7, "worst absolute error {worst:e}");
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert_eq!(tanh(0.0), 0.0);
        assert!(tanh(f32::NAN).is_nan());
    }
}
