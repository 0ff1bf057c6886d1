//! Vector lanes for the CPU microkernels: one small trait over AVX-512, AVX2 and a portable
//! array type, so that a kernel is written once (generic over [`Lanes`]) and compiled for each
//! instruction set inside a `#[target_feature]` wrapper, picked at run time by [`Isa::best`].
//!
//! Every implementation computes a·b + c as one fused multiply-add (`f32::mul_add` in the
//! portable one), and the comparisons of [`Lanes::relu`] and [`Lanes::keep_where_positive`]
//! are the same strict `> 0` everywhere, so a kernel that does the same operations in the same
//! order per element gives bit-identical results on every path. (On an x86 CPU without FMA the
//! portable path calls the C library's `fmaf`: correct but slow; every x86-64 CPU since 2013
//! has AVX2 and FMA, and on aarch64 `mul_add` is one instruction.)

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Calls `$imp` compiled for the widest vector instructions this CPU has. The crate is built
/// for baseline x86-64, where element-wise loops (transforms, activations, transposes) would
/// run 4 lanes wide; `$imp` and its helpers are `#[inline(always)]` so that they are compiled
/// again inside each `#[target_feature]` copy. (The kernels of `kernel` dispatch by
/// themselves.) Every copy does the same arithmetic in the same order: no reassociation and
/// no contraction into fused multiply-adds, so the results do not depend on the copy.
macro_rules! simd_dispatch {
    ($imp:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
            fn v4($($arg: $ty),*) -> $ret {
                $imp($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            fn v3($($arg: $ty),*) -> $ret {
                $imp($($arg),*)
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: every feature `v4` is compiled for was detected on this CPU.
                return unsafe { v4($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: every feature `v3` is compiled for was detected on this CPU.
                return unsafe { v3($($arg),*) };
            }
        }
        $imp($($arg),*)
    }};
}
pub(crate) use simd_dispatch;

/// The instruction sets the microkernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F (16 lanes, 32 registers).
    Avx512,
    /// AVX2 + FMA (8 lanes, 16 registers).
    Avx2,
    /// Plain Rust on arrays of 8 (whatever the compiler makes of it).
    Portable,
}

impl Isa {
    /// The widest instruction set this CPU has (std caches the detection).
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run, widest first (tests run each against the
    /// scalar reference).
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// Whether this CPU can run code compiled for `self`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// A vector of `N` f32 lanes.
///
/// # Safety
/// The methods are `unsafe` for two reasons: the pointer ones read or write `N` consecutive
/// f32 at the pointer, and the SIMD implementations may only run on a CPU that has their
/// instruction set (they are `#[inline(always)]` and meant to be inlined into a function
/// compiled with `#[target_feature]` for it, after checking [`Isa::is_supported`]).
pub trait Lanes: Copy {
    const N: usize;
    /// # Safety
    /// The CPU has the instruction set (see [`Lanes`]).
    unsafe fn zero() -> Self;
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn splat(x: f32) -> Self;
    /// Reads `N` values at `p` (no alignment needed).
    ///
    /// # Safety
    /// `N` values at `p` are readable, and the CPU has the instruction set.
    unsafe fn load(p: *const f32) -> Self;
    /// Writes `N` values at `p` (no alignment needed).
    ///
    /// # Safety
    /// `N` values at `p` are writable, and the CPU has the instruction set.
    unsafe fn store(self, p: *mut f32);
    /// a·b + c with one rounding.
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn add(a: Self, b: Self) -> Self;
    /// x where x > 0, else 0 (so NaN and −0 give +0, like the x86 `max` with 0 second).
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn relu(self) -> Self;
    /// self where gate > 0, else 0: the backward of [`Lanes::relu`], gated by the layer's
    /// output (positive exactly where the pre-activation was).
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn keep_where_positive(self, gate: Self) -> Self;
}

/// The scalar forms of the lane operations, shared by the portable lanes and the scalar
/// references of the kernels.
pub mod scalar {
    #[inline(always)]
    pub fn relu(x: f32) -> f32 {
        if x > 0.0 { x } else { 0.0 }
    }

    #[inline(always)]
    pub fn keep_where_positive(x: f32, gate: f32) -> f32 {
        if gate > 0.0 { x } else { 0.0 }
    }
}

/// 16 lanes of AVX-512.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct V16(__m512);

#[cfg(target_arch = "x86_64")]
impl Lanes for V16 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (this impl): the caller runs on an AVX-512 CPU (trait contract).
        unsafe { V16(_mm512_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: the CPU has AVX-512 (trait contract).
        unsafe { V16(_mm512_set1_ps(x)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: AVX-512 CPU, and 16 values at p (trait contract).
        unsafe { V16(_mm512_loadu_ps(p)) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: AVX-512 CPU, and 16 values at p (trait contract).
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: the CPU has AVX-512 (trait contract).
        unsafe { V16(_mm512_fmadd_ps(a.0, b.0, c.0)) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: the CPU has AVX-512 (trait contract).
        unsafe { V16(_mm512_add_ps(a.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn relu(self) -> Self {
        // max returns its second operand unless the first is greater: NaN and ±0 give +0.
        // SAFETY: the CPU has AVX-512 (trait contract).
        unsafe { V16(_mm512_max_ps(self.0, _mm512_setzero_ps())) }
    }
    #[inline(always)]
    unsafe fn keep_where_positive(self, gate: Self) -> Self {
        // SAFETY: the CPU has AVX-512 (trait contract).
        unsafe {
            let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(gate.0, _mm512_setzero_ps());
            V16(_mm512_maskz_mov_ps(m, self.0))
        }
    }
}

/// 8 lanes of AVX2 (with FMA).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct V8(__m256);

#[cfg(target_arch = "x86_64")]
impl Lanes for V8 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (this impl): the caller runs on an AVX2+FMA CPU (trait contract).
        unsafe { V8(_mm256_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: the CPU has AVX2+FMA (trait contract).
        unsafe { V8(_mm256_set1_ps(x)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: AVX2+FMA CPU, and 8 values at p (trait contract).
        unsafe { V8(_mm256_loadu_ps(p)) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: AVX2+FMA CPU, and 8 values at p (trait contract).
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: the CPU has AVX2+FMA (trait contract).
        unsafe { V8(_mm256_fmadd_ps(a.0, b.0, c.0)) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: the CPU has AVX2+FMA (trait contract).
        unsafe { V8(_mm256_add_ps(a.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn relu(self) -> Self {
        // SAFETY: the CPU has AVX2+FMA (trait contract).
        unsafe { V8(_mm256_max_ps(self.0, _mm256_setzero_ps())) }
    }
    #[inline(always)]
    unsafe fn keep_where_positive(self, gate: Self) -> Self {
        // SAFETY: the CPU has AVX2+FMA (trait contract).
        unsafe {
            let m = _mm256_cmp_ps::<_CMP_GT_OQ>(gate.0, _mm256_setzero_ps());
            V8(_mm256_and_ps(self.0, m))
        }
    }
}

/// 8 lanes as a plain array.
#[derive(Clone, Copy)]
pub struct Portable([f32; 8]);

impl Portable {
    #[inline(always)]
    fn zip(a: Self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Portable(std::array::from_fn(|i| f(a.0[i], b.0[i])))
    }
}

impl Lanes for Portable {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; 8])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Portable([x; 8])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable values at p (trait contract).
        unsafe { Portable(std::ptr::read_unaligned(p as *const [f32; 8])) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable values at p (trait contract).
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], c.0[i])))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Portable::zip(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn relu(self) -> Self {
        Portable(self.0.map(scalar::relu))
    }
    #[inline(always)]
    unsafe fn keep_where_positive(self, gate: Self) -> Self {
        Portable::zip(self, gate, scalar::keep_where_positive)
    }
}
