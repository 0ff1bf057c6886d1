//! exp and tanh written so that a loop over them vectorises (shared by the CPU reference ops):
//! libm's are calls, so a loop over them runs one element at a time, and in the affine
//! couplings and MADE transforms they would cost more than the GEMMs. These are branch-free
//! (selects only) and inline, and come in block forms that run each step across a block of
//! values ([`exp_block`], [`Blockwise`]).
//!
//! Accuracy: exp within 2 ulp of the correctly rounded value over the whole f32 range (with inf
//! above ln(f32::MAX) and 0 below ln(f32::MIN_POSITIVE)); tanh within 2e-7 absolute, which is
//! what the soft clamp s = c·tanh(raw/c) needs (s enters through exp(s) and a log-det sum).

/// Whether the CPU has AVX2 and FMA (the detection is cached by std).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Largest x with e^x finite in f32.
const EXP_HI: f32 = 88.72283;
/// Below this e^x is under the smallest normal f32; we return 0.
const EXP_LO: f32 = -87.33654;

/// e^x for finite x (NaN in gives NaN out).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let mut v = [x];
    exp_block(&mut v);
    v[0]
}

/// tanh(x) = sign(x)·(1 − e^(−2|x|)) / (1 + e^(−2|x|)).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let mut v = [x];
    tanh_block(&mut v);
    v[0]
}

/// Values per block of [`exp_block`] and [`tanh_block`] in the element-wise loops: four
/// AVX-512 vectors.
pub const BLOCK: usize = 64;

/// [`exp`] of every value, one step of the computation at a time across the block. One
/// value's e^x is a chain of about 25 dependent operations; a loop that runs the whole chain
/// per vector keeps only two or three vectors in flight (the scheduler's window is full of the
/// chain), so it runs at the chain's latency. Step by step over several vectors, the chains are
/// interleaved and the loop runs at the vector units' throughput. Same operations in the same
/// order, so the result is the same for any block length.
#[inline(always)]
pub fn exp_block<const W: usize>(x: &mut [f32; W]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| <= 256 (Cody–Waite reduction).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by adding 1.5·2^23 (|x·log2 e| < 2^22): the sum's low mantissa bits
    // then hold n + 2^22, so n comes out of the bits with no float-to-int conversion. Unlike
    // `round`/`floor` (libm calls without SSE4.1) and `as i32` (saturating, with NaN checks),
    // this vectorises on any x86-64.
    const ROUNDER: f32 = 12_582_912.0;
    let xc: [f32; W] = std::array::from_fn(|i| x[i].clamp(EXP_LO, EXP_HI));
    let t: [f32; W] = std::array::from_fn(|i| xc[i] * LOG2E + ROUNDER);
    let n: [f32; W] = std::array::from_fn(|i| t[i] - ROUNDER);
    let ni: [i32; W] = std::array::from_fn(|i| t[i].to_bits() as i32 - ROUNDER.to_bits() as i32);
    let r: [f32; W] = std::array::from_fn(|i| (xc[i] - n[i] * LN2_HI) - n[i] * LN2_LO);
    // Minimax polynomial for (e^r − 1 − r)/r² on |r| <= ln2/2 (Cephes expf).
    let mut p = [1.987_569_1e-4f32; W];
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        for (p, &r) in p.iter_mut().zip(&r) {
            *p = *p * r + c;
        }
    }
    // 2^n as 2^n1·2^n2 with both halves in [−64, 64], so that n = 128 (x near EXP_HI) and
    // n = −126 (x near EXP_LO) stay representable.
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    for i in 0..W {
        let er = p[i] * r[i] * r[i] + r[i] + 1.0;
        let n1 = ni[i] >> 1;
        let y = er * pow2(n1) * pow2(ni[i] - n1);
        let y = if x[i] > EXP_HI { f32::INFINITY } else { y };
        let y = if x[i] < EXP_LO { 0.0 } else { y };
        x[i] = if x[i].is_nan() { x[i] } else { y };
    }
}

/// An element-wise computation written for a block of `W` consecutive values at `at`, for
/// any `W` (with the same result for every value whatever the block), run by [`blockwise`].
pub trait Blockwise {
    fn block<const W: usize>(&mut self, at: usize);
}

/// Runs `f` over the values `0..n`: blocks of [`BLOCK`], then of one AVX-512 vector, then
/// single values.
#[inline(always)]
pub fn blockwise(n: usize, f: &mut impl Blockwise) {
    let mut at = 0;
    while at + BLOCK <= n {
        f.block::<BLOCK>(at);
        at += BLOCK;
    }
    while at + 16 <= n {
        f.block::<16>(at);
        at += 16;
    }
    while at < n {
        f.block::<1>(at);
        at += 1;
    }
}

/// Values `at .. at + W` of `v` as an array.
#[inline(always)]
pub fn arr<const W: usize>(v: &[f32], at: usize) -> &[f32; W] {
    v[at..at + W].try_into().expect("W values")
}

/// Values `at .. at + W` of `v` as a mutable array.
#[inline(always)]
pub fn arr_mut<const W: usize>(v: &mut [f32], at: usize) -> &mut [f32; W] {
    (&mut v[at..at + W]).try_into().expect("W values")
}

/// [`tanh`] of every value, step by step across the block as [`exp_block`].
#[inline(always)]
pub fn tanh_block<const W: usize>(x: &mut [f32; W]) {
    let mut e: [f32; W] = std::array::from_fn(|i| -2.0 * x[i].abs());
    exp_block(&mut e);
    for (x, &e) in x.iter_mut().zip(&e) {
        *x = ((1.0 - e) / (1.0 + e)).copysign(*x);
    }
}

/// Whether every value is finite (the scan every op runs over its inputs and results): integer
/// tests on the exponent bits with no early exit inside a stretch, so that it vectorises, in
/// the widest vector instructions available. The position of a bad value is looked up by the
/// caller only on failure.
pub fn all_finite(data: &[f32]) -> bool {
    super::simd::simd_dispatch!(all_finite_impl(data: &[f32]) -> bool)
}

#[inline(always)]
fn all_finite_impl(data: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    data.chunks(4096).all(|c| {
        c.iter()
            .fold(0u32, |bad, v| bad | ((v.to_bits() & EXP) == EXP) as u32)
            == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised scan against `f32::is_finite` one value at a time: a bad value of each
    /// kind at the start, inside a vector, in a tail and past the first stretch.
    #[test]
    fn all_finite_matches_the_scalar_test() {
        let clean: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.7).sin() * 1e30).collect();
        assert!(all_finite(&clean) && all_finite(&[]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for len in [1, 15, 16, 17, 100, 4097, 10_000] {
                for at in [0, len / 2, len - 1] {
                    let mut v = clean[..len].to_vec();
                    v[at] = bad;
                    assert_eq!(all_finite(&v), v.iter().all(|x| x.is_finite()));
                    assert!(!all_finite(&v), "{bad} at {at} of {len}");
                }
            }
        }
        let extremes = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0];
        assert!(all_finite(&extremes));
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0;
        let n = 400_000;
        for i in 0..=n {
            let x = EXP_LO + (EXP_HI - EXP_LO) * i as f32 / n as f32;
            let want = (x as f64).exp() as f32;
            if want.is_normal() {
                worst = worst.max(ulps(exp(x), want));
            }
        }
        for x in [-1e-30f32, 0.0, 1e-30, 1e-8, -3.5, 2.0] {
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
        }
        assert!(worst <= 2, "exp off by {worst} ulp");
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(EXP_HI).is_finite());
    }

    #[test]
    fn tanh_is_close() {
        let n = 200_000;
        for i in 0..=n {
            let x = -20.0 + 40.0 * i as f32 / n as f32;
            let want = (x as f64).tanh();
            let got = tanh(x) as f64;
            assert!((got - want).abs() < 2e-7, "tanh({x}) = {got}, want {want}");
        }
        assert_eq!(tanh(100.0), 1.0);
        assert_eq!(tanh(-100.0), -1.0);
        assert_eq!(tanh(0.0), 0.0);
    }
}
