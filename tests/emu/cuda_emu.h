// cuda_emu.h: lets CUDA kernel source compile unmodified with g++ and run on the CPU under the grid
// emulator (tests/emu/runtime). It is force-included (`-include`) before every .cu that the emu
// feature builds; kernels/common.cuh tests `#ifdef FFEMU` to pick the emulated definitions.
//
// Rules for kernel source that this emulation imposes (all of them also hold for nvcc):
// - Dynamic shared memory is declared as `extern __shared__ T ff_smem[];` (that name, one element
//   type per .cu file). `__shared__` expands to `thread_local`, the only storage class that is
//   valid both after `extern` and at block scope; a different name is a build error.
// - Shared memory is poisoned with 0xFF bytes (a NaN for f32/bf16/f16, -1 for integers) at the
//   start of every block, so a read before the write shows up.
// - Threads of a block are fibers and switch only at __syncthreads and warp collectives. Nothing
//   is warp-synchronous implicitly: code that needs lanes to see each other's writes must use
//   __syncwarp or a collective, as on Volta and later.
// - A file-scope `__constant__` or `__shared__` variable has external linkage here; two .cu files
//   must not define the same name.
//
// Where results differ from the hardware (documented, tolerances cover them):
// - __expf(x) = exp2f(x * log2(e)) and __logf(x) = log2f(x) * ln(2), rounded in f32 like the
//   hardware's approximate path, but exp2f/log2f themselves are correctly rounded here while
//   ex2.approx/lg2.approx have ~2 ulp error. __sinf/__cosf/__tanf use the accurate functions.
// - No FMA contraction: nvcc fuses a*b+c by default, g++ on x86-64 does not; results can differ
//   in the last bit. fmaf() is a real fused multiply-add.
// - ff_mma_m16n8k16_bf16 accumulates the 16 products of each output in k order in f32 (fmaf),
//   starting from C. Tensor cores sum in an unspecified order with their own internal precision.
// - __half/__nv_bfloat16 arithmetic operators compute in f32 and round once to the 16-bit type.
// - Conversions to f16/bf16 of a NaN give the canonical NaN 0x7FFF, as the CUDA conversions do.
#pragma once

#define FFEMU 1

// Standard headers first: libstdc++ itself spells attributes like __noinline__, so they must be
// parsed before the CUDA qualifiers below become macros.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <math.h>
#include <new>
#include <stdint.h>
#include <string.h>
#include <type_traits>
#include <utility>

#include "ffemu_abi.h"

// ---- qualifiers ----
// __global__ becomes an attribute g++ ignores (-Wno-attributes) but that survives `g++ -E`, so
// build/emu.rs can find every kernel in the preprocessed source, macro-instantiated ones included.
#define __global__ __attribute__((ffemu_global))
// The bounds are stringized: g++ parses the arguments of unknown attributes and would reject
// qualified names such as ff::kBlock.
#define __launch_bounds__(...) __attribute__((ffemu_launch_bounds(#__VA_ARGS__)))
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __constant__
#define __managed__
#define __grid_constant__

// Kernels are compiled as if in nvcc's device pass for sm_90 (H100/H200), so code guarded by
// `#if __CUDA_ARCH__ >= 800` (candle's bf16 kernels, for instance) is built. Inline PTX under such
// a guard must also be excluded with `#ifndef FFEMU`.
#define __CUDA_ARCH__ 900

// ---- vector types and built-in variables ----
typedef ffemu::uint3_t uint3;

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define FFEMU_VEC2(T, NAME, AL)                                                              \
    struct __align__(AL) NAME {                                                               \
        T x, y;                                                                               \
    };                                                                                        \
    inline NAME make_##NAME(T a, T b) { return NAME{a, b}; }
#define FFEMU_VEC3(T, NAME)                                                                   \
    struct NAME {                                                                             \
        T x, y, z;                                                                            \
    };                                                                                        \
    inline NAME make_##NAME(T a, T b, T c) { return NAME{a, b, c}; }
#define FFEMU_VEC4(T, NAME, AL)                                                              \
    struct __align__(AL) NAME {                                                               \
        T x, y, z, w;                                                                         \
    };                                                                                        \
    inline NAME make_##NAME(T a, T b, T c, T d) { return NAME{a, b, c, d}; }

FFEMU_VEC2(float, float2, 8)
FFEMU_VEC3(float, float3)
FFEMU_VEC4(float, float4, 16)
FFEMU_VEC2(int, int2, 8)
FFEMU_VEC3(int, int3)
FFEMU_VEC4(int, int4, 16)
FFEMU_VEC2(unsigned int, uint2, 8)
FFEMU_VEC4(unsigned int, uint4, 16)
FFEMU_VEC2(double, double2, 16)
FFEMU_VEC2(unsigned short, ushort2, 4)
FFEMU_VEC2(short, short2, 4)
FFEMU_VEC4(unsigned char, uchar4, 4)
FFEMU_VEC4(signed char, char4, 4)
FFEMU_VEC2(long long, longlong2, 16)
FFEMU_VEC2(unsigned long long, ulonglong2, 16)
inline uint3 make_uint3(unsigned int a, unsigned int b, unsigned int c) { return uint3{a, b, c}; }
#undef FFEMU_VEC2
#undef FFEMU_VEC3
#undef FFEMU_VEC4

// The scheduler stores the running fiber's indices in these globals before resuming it; the
// references are internal to each translation unit, so reads compile to a plain load.
[[maybe_unused]] static const uint3& threadIdx = ffemu::g_threadIdx;
[[maybe_unused]] static const uint3& blockIdx = ffemu::g_blockIdx;
[[maybe_unused]] static const uint3& blockDim = ffemu::g_blockDim;
[[maybe_unused]] static const uint3& gridDim = ffemu::g_gridDim;
[[maybe_unused]] static constexpr int warpSize = 32;

// ---- block barriers ----
// The call site identifies the barrier, so that threads waiting at two different __syncthreads()
// (divergent code) are reported instead of being released together.
#define __syncthreads() ::ffemu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::ffemu::syncthreads_reduce(1, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::ffemu::syncthreads_reduce(2, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_or(p) ::ffemu::syncthreads_reduce(3, (p) ? 1 : 0, __FILE__, __LINE__)

inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned int) {}
[[noreturn]] inline void __trap() { ffemu::trap("__trap() called"); }
[[noreturn]] inline void __brkpt() { ffemu::trap("__brkpt() called"); }
inline long long clock64() { return (long long)ffemu::clock_ticks(); }
inline long long __clock64_emu() { return clock64(); }

// ---- warp collectives ----
namespace ffemu {

inline WarpOp make_op(WarpKind kind, const char* name, unsigned mask) {
    WarpOp op;
    std::memset(&op, 0, sizeof op);
    op.kind = kind;
    op.name = name;
    op.mask = mask;
    return op;
}

template <typename T>
inline uint64_t to_bits(const T& v) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "warp shuffles move values of at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// CUDA's shfl wrappers encode `width` as the PTX c operand: segment mask (32 - width) << 8 and a
// clamp of 31 (0 for shfl.up, whose bound is the segment start).
template <typename T>
inline T shfl(const char* name, ShflMode mode, unsigned mask, T var, unsigned b, int width) {
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
        trap("shuffle width must be a power of two in 1..32");
    }
    WarpOp op = make_op(WarpKind::Shfl, name, mask);
    op.shfl_mode = mode;
    op.shfl_b = b;
    op.shfl_c = ((32u - (unsigned)width) << 8) | (mode == ShflMode::Up ? 0u : 31u);
    op.value = to_bits(var);
    op.size = sizeof(T);
    warp_collective(&op);
    return from_bits<T>(op.result);
}

inline int vote(const char* name, VoteMode mode, unsigned mask, int pred) {
    WarpOp op = make_op(WarpKind::Vote, name, mask);
    op.vote_mode = mode;
    op.pred = pred != 0;
    warp_collective(&op);
    return (int)op.result;
}

template <typename T>
inline unsigned reduce(const char* name, ReduceMode mode, unsigned mask, T v) {
    WarpOp op = make_op(WarpKind::Reduce, name, mask);
    op.reduce_mode = mode;
    op.value = (uint32_t)v;
    op.size = 4;
    warp_collective(&op);
    return (unsigned)op.result;
}

}  // namespace ffemu

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    return ffemu::shfl("__shfl_sync", ffemu::ShflMode::Idx, mask, var, (unsigned)srcLane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ffemu::shfl("__shfl_up_sync", ffemu::ShflMode::Up, mask, var, delta, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ffemu::shfl("__shfl_down_sync", ffemu::ShflMode::Down, mask, var, delta, width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    return ffemu::shfl("__shfl_xor_sync", ffemu::ShflMode::Bfly, mask, var, (unsigned)laneMask, width);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)ffemu::vote("__ballot_sync", ffemu::VoteMode::Ballot, mask, pred);
}
inline int __all_sync(unsigned mask, int pred) {
    return ffemu::vote("__all_sync", ffemu::VoteMode::All, mask, pred);
}
inline int __any_sync(unsigned mask, int pred) {
    return ffemu::vote("__any_sync", ffemu::VoteMode::Any, mask, pred);
}
inline int __uni_sync(unsigned mask, int pred) {
    int all = __all_sync(mask, pred);
    int any = __any_sync(mask, pred);
    return all || !any;
}
// The lanes of the calling warp that have not exited. On hardware the answer also depends on
// which lanes happen to be converged, which a program must not rely on; a collective that then
// waits for a lane that diverged away is reported as a deadlock.
inline unsigned __activemask() { return ffemu::activemask(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ffemu::WarpOp op = ffemu::make_op(ffemu::WarpKind::Syncwarp, "__syncwarp", mask);
    ffemu::warp_collective(&op);
}

template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value) {
    ffemu::WarpOp op = ffemu::make_op(ffemu::WarpKind::Match, "__match_any_sync", mask);
    op.value = ffemu::to_bits(value);
    op.size = sizeof(T);
    ffemu::warp_collective(&op);
    return (unsigned)op.result;
}
template <typename T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
    ffemu::WarpOp op = ffemu::make_op(ffemu::WarpKind::Match, "__match_all_sync", mask);
    op.value = ffemu::to_bits(value);
    op.size = sizeof(T);
    ffemu::warp_collective(&op);
    *pred = op.result_pred;
    return op.result_pred ? mask : 0u;
}

inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    return ffemu::reduce("__reduce_add_sync", ffemu::ReduceMode::AddU, mask, v);
}
inline int __reduce_add_sync(unsigned mask, int v) {
    return (int)ffemu::reduce("__reduce_add_sync", ffemu::ReduceMode::AddU, mask, (unsigned)v);
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
    return ffemu::reduce("__reduce_min_sync", ffemu::ReduceMode::MinU, mask, v);
}
inline int __reduce_min_sync(unsigned mask, int v) {
    return (int)ffemu::reduce("__reduce_min_sync", ffemu::ReduceMode::MinI, mask, (unsigned)v);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    return ffemu::reduce("__reduce_max_sync", ffemu::ReduceMode::MaxU, mask, v);
}
inline int __reduce_max_sync(unsigned mask, int v) {
    return (int)ffemu::reduce("__reduce_max_sync", ffemu::ReduceMode::MaxI, mask, (unsigned)v);
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
    return ffemu::reduce("__reduce_and_sync", ffemu::ReduceMode::And, mask, v);
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
    return ffemu::reduce("__reduce_or_sync", ffemu::ReduceMode::Or, mask, v);
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
    return ffemu::reduce("__reduce_xor_sync", ffemu::ReduceMode::Xor, mask, v);
}

// One warp-collective mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D = A·B + C with
// A 16x16 (row-major), B 16x8 ("col"), C/D 16x8 f32, fragments laid out as in the PTX ISA
// (groupID = lane >> 2, t = lane % 4):
//   A: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..2t+1), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..);
//   B: b[0] = (k = 2t..2t+1, n = g), b[1] = (k = 2t+8..2t+9, n = g);
//   C/D: c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1); lower-indexed element in the low half.
// All 32 lanes must arrive. c and d may alias.
inline void ff_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    ffemu::WarpOp op = ffemu::make_op(ffemu::WarpKind::Mma, "ff_mma_m16n8k16_bf16", 0xffffffffu);
    op.mma_a = a;
    op.mma_b = b;
    op.mma_c = c;
    op.mma_d = d;
    ffemu::warp_collective(&op);
}

// ---- atomics ----
// Fibers of a launch share one OS thread and only switch at barriers and collectives, so a plain
// read-modify-write is atomic with respect to every other emulated thread.
#define FFEMU_ATOMIC(NAME, T, EXPR)                                                            \
    inline T NAME(T* address, T val) {                                                         \
        T old = *address;                                                                      \
        *address = (EXPR);                                                                     \
        return old;                                                                            \
    }
FFEMU_ATOMIC(atomicAdd, int, old + val)
FFEMU_ATOMIC(atomicAdd, unsigned int, old + val)
FFEMU_ATOMIC(atomicAdd, unsigned long long, old + val)
FFEMU_ATOMIC(atomicAdd, float, old + val)
FFEMU_ATOMIC(atomicAdd, double, old + val)
FFEMU_ATOMIC(atomicSub, int, old - val)
FFEMU_ATOMIC(atomicSub, unsigned int, old - val)
FFEMU_ATOMIC(atomicMax, int, old > val ? old : val)
FFEMU_ATOMIC(atomicMax, unsigned int, old > val ? old : val)
FFEMU_ATOMIC(atomicMax, long long, old > val ? old : val)
FFEMU_ATOMIC(atomicMax, unsigned long long, old > val ? old : val)
FFEMU_ATOMIC(atomicMin, int, old < val ? old : val)
FFEMU_ATOMIC(atomicMin, unsigned int, old < val ? old : val)
FFEMU_ATOMIC(atomicMin, long long, old < val ? old : val)
FFEMU_ATOMIC(atomicMin, unsigned long long, old < val ? old : val)
FFEMU_ATOMIC(atomicAnd, int, old & val)
FFEMU_ATOMIC(atomicAnd, unsigned int, old & val)
FFEMU_ATOMIC(atomicAnd, unsigned long long, old & val)
FFEMU_ATOMIC(atomicOr, int, old | val)
FFEMU_ATOMIC(atomicOr, unsigned int, old | val)
FFEMU_ATOMIC(atomicOr, unsigned long long, old | val)
FFEMU_ATOMIC(atomicXor, int, old ^ val)
FFEMU_ATOMIC(atomicXor, unsigned int, old ^ val)
FFEMU_ATOMIC(atomicXor, unsigned long long, old ^ val)
FFEMU_ATOMIC(atomicExch, int, val)
FFEMU_ATOMIC(atomicExch, unsigned int, val)
FFEMU_ATOMIC(atomicExch, unsigned long long, val)
FFEMU_ATOMIC(atomicExch, float, val)
// atomicInc/atomicDec wrap as the hardware does: inc -> (old >= val) ? 0 : old + 1.
FFEMU_ATOMIC(atomicInc, unsigned int, (old >= val) ? 0u : old + 1u)
FFEMU_ATOMIC(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef FFEMU_ATOMIC

#define FFEMU_ATOMIC_CAS(T)                                                                    \
    inline T atomicCAS(T* address, T compare, T val) {                                         \
        T old = *address;                                                                      \
        if (old == compare) *address = val;                                                    \
        return old;                                                                            \
    }
FFEMU_ATOMIC_CAS(int)
FFEMU_ATOMIC_CAS(unsigned int)
FFEMU_ATOMIC_CAS(unsigned long long)
FFEMU_ATOMIC_CAS(unsigned short)
#undef FFEMU_ATOMIC_CAS

// f32 max/min with the usual integer-ordering trick is what kernels write by hand; this helper
// does the same by comparison (NaN in `val` is ignored, as fmaxf would).
inline float ff_atomic_max_f32(float* address, float val) {
    float old = *address;
    *address = std::fmax(old, val);
    return old;
}
inline float ff_atomic_min_f32(float* address, float val) {
    float old = *address;
    *address = std::fmin(old, val);
    return old;
}

// ---- cache-hinted loads and stores ----
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// ---- integer intrinsics ----
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
inline unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) {
        unsigned sel = (s >> (4 * i)) & 7u;
        r |= (unsigned)((v >> (8 * sel)) & 0xffu) << (8 * i);
    }
    return r;
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)((v << (shift & 31)) >> 32);
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)(v >> (shift & 31));
}
inline int __mul24(int x, int y) { return (int)((long long)((x << 8) >> 8) * ((y << 8) >> 8)); }
inline unsigned __umul24(unsigned x, unsigned y) { return (x & 0xffffffu) * (y & 0xffffffu); }
inline int __mulhi(int x, int y) { return (int)(((long long)x * y) >> 32); }
inline unsigned __umulhi(unsigned x, unsigned y) { return (unsigned)(((unsigned long long)x * y) >> 32); }
inline long long __mul64hi(long long x, long long y) { return (long long)(((__int128)x * y) >> 64); }
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
    return (unsigned long long)(((unsigned __int128)x * y) >> 64);
}
inline unsigned __sad(int x, int y, unsigned z) { return z + (unsigned)(x > y ? x - y : y - x); }
inline unsigned __usad(unsigned x, unsigned y, unsigned z) { return z + (x > y ? x - y : y - x); }
inline unsigned __laneid() { return ffemu::lane_id(); }

// CUDA's device min/max overload set, including the mixed signed/unsigned forms.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// ---- float intrinsics ----
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }
inline float sinpif(float x) { return sinf(3.14159265358979324f * x); }
inline float cospif(float x) { return cosf(3.14159265358979324f * x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }
inline float saturate(float x) { return __saturatef(x); }
// Hardware: ex2.approx(x * log2 e); the f32 product's rounding is what makes __expf drift from
// expf for large |x| (relative error ~ |x| * 2^-24).
inline float __expf(float x) { return exp2f(x * 1.44269504088896341f); }
inline float __exp10f(float x) { return exp2f(x * 3.32192809488736235f); }
inline float __logf(float x) { return log2f(x) * 0.693147180559945309f; }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log2f(x) * 0.301029995663981195f; }
inline float __powf(float x, float y) { return exp2f(y * log2f(x)); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
    *s = sinf(x);
    *c = cosf(x);
}
// __fdividef: x * rcp(y), and 0 when 2^126 < |y| < 2^128 (the hardware's documented quirk).
inline float __fdividef(float x, float y) {
    float ay = fabsf(y);
    if (ay > 8.507059173023462e37f && ay < INFINITY) return 0.0f * x;
    return x * (1.0f / y);
}
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; std::memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }
// Rounding conversions (the _rn forms assume the default round-to-nearest-even mode).
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)truncf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)truncf(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }
inline float __double2float_rn(double x) { return (float)x; }

// ---- 16-bit floats ----
namespace ffemu {

// Round to nearest even; overflow to infinity; subnormal results rounded correctly.
inline unsigned short f32_to_f16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;                  // NaN -> canonical NaN
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: rounds to inf
    if (ax < 0x38800000u) {                               // below 2^-14: subnormal or zero
        if (ax <= 0x33000000u) return (unsigned short)sign;  // <= 2^-25: ties to even 0
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;                         // value / 2^-24 = m * 2^(e-126)
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return (unsigned short)(sign | q);
    }
    uint32_t r = ax - 0x38000000u;                        // rebias 127 -> 15
    uint32_t q = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
    return (unsigned short)(sign | q);
}

inline unsigned short f32_to_f16_bits_rz(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;
    if (ax == 0x7f800000u) return (unsigned short)(sign | 0x7c00u);
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7bffu);
    if (ax < 0x38800000u) {
        if (ax < 0x33800000u) return (unsigned short)sign;
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        return (unsigned short)(sign | (m >> (126u - e)));
    }
    return (unsigned short)(sign | ((ax - 0x38000000u) >> 13));
}

inline float f16_bits_to_f32(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    uint32_t x;
    if (e == 0x1fu) {
        x = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        if (m == 0) {
            x = sign;
        } else {
            uint32_t sh = 0;
            while (!(m & 0x400u)) {
                m <<= 1;
                ++sh;
            }
            x = sign | ((113u - sh) << 23) | ((m & 0x3ffu) << 13);
        }
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

inline unsigned short f32_to_bf16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN -> canonical NaN
    x += 0x7fffu + ((x >> 16) & 1u);                      // round to nearest even
    return (unsigned short)(x >> 16);
}

inline unsigned short f32_to_bf16_bits_rz(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return (unsigned short)(x >> 16);
}

inline float bf16_bits_to_f32(unsigned short h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

}  // namespace ffemu

// Trivially default-constructible (so __shared__ arrays of them need no constructor), converting
// from and to float like CUDA's types. Arithmetic goes through float.
struct __align__(2) __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(ffemu::f32_to_f16_bits(f)) {}
    __half(double f) : __x(ffemu::f32_to_f16_bits((float)f)) {}
    __half(int v) : __x(ffemu::f32_to_f16_bits((float)v)) {}
    operator float() const { return ffemu::f16_bits_to_f32(__x); }
};
struct __align__(2) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(ffemu::f32_to_bf16_bits(f)) {}
    __nv_bfloat16(double f) : __x(ffemu::f32_to_bf16_bits((float)f)) {}
    __nv_bfloat16(int v) : __x(ffemu::f32_to_bf16_bits((float)v)) {}
    operator float() const { return ffemu::bf16_bits_to_f32(__x); }
};
struct __align__(4) __half2 {
    __half x, y;
};
struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __half __ushort_as_half(unsigned short v) { __half h; h.__x = v; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { __nv_bfloat16 h; h.__x = v; return h; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }

inline __half __float2half(float f) { return __ushort_as_half(ffemu::f32_to_f16_bits(f)); }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __float2half_rz(float f) { return __ushort_as_half(ffemu::f32_to_f16_bits_rz(f)); }
inline float __half2float(__half h) { return ffemu::f16_bits_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __ushort_as_bfloat16(ffemu::f32_to_bf16_bits(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return __ushort_as_bfloat16(ffemu::f32_to_bf16_bits_rz(f)); }
inline float __bfloat162float(__nv_bfloat16 h) { return ffemu::bf16_bits_to_f32(h.__x); }

inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
    return float2{__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162{a, a}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// Arithmetic: exact f32 result of the operation, rounded once to the 16-bit type.
#define FFEMU_H_OPS(T, TO, FROM)                                                               \
    inline T __hadd(T a, T b) { return TO(FROM(a) + FROM(b)); }                                \
    inline T __hsub(T a, T b) { return TO(FROM(a) - FROM(b)); }                                \
    inline T __hmul(T a, T b) { return TO(FROM(a) * FROM(b)); }                                \
    inline T __hdiv(T a, T b) { return TO(FROM(a) / FROM(b)); }                                \
    inline T __hneg(T a) { return TO(-FROM(a)); }                                              \
    inline T __habs(T a) { return TO(fabsf(FROM(a))); }                                        \
    inline T __hfma(T a, T b, T c) { return TO(fmaf(FROM(a), FROM(b), FROM(c))); }             \
    inline T __hmax(T a, T b) { return TO(fmaxf(FROM(a), FROM(b))); }                          \
    inline T __hmin(T a, T b) { return TO(fminf(FROM(a), FROM(b))); }                          \
    inline bool __heq(T a, T b) { return FROM(a) == FROM(b); }                                 \
    inline bool __hne(T a, T b) { return FROM(a) != FROM(b); }                                 \
    inline bool __hlt(T a, T b) { return FROM(a) < FROM(b); }                                  \
    inline bool __hle(T a, T b) { return FROM(a) <= FROM(b); }                                 \
    inline bool __hgt(T a, T b) { return FROM(a) > FROM(b); }                                  \
    inline bool __hge(T a, T b) { return FROM(a) >= FROM(b); }                                 \
    inline bool __hisnan(T a) { return std::isnan(FROM(a)); }                                  \
    inline int __hisinf(T a) {                                                                 \
        float f = FROM(a);                                                                     \
        return std::isinf(f) ? (f > 0 ? 1 : -1) : 0;                                           \
    }
FFEMU_H_OPS(__half, __float2half, __half2float)
FFEMU_H_OPS(__nv_bfloat16, __float2bfloat16, __bfloat162float)
#undef FFEMU_H_OPS
