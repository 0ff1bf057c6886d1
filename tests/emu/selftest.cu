// Kernels that exercise the grid emulator itself (tests/emu_selftest.rs launches them). They are
// written as ordinary CUDA; the FF_PLANT_* macros plant known bugs for the variant builds listed in
// build/emu.rs, which the tests must catch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#ifdef FF_PLANT_WRONG_SHUFFLE
    // Planted bug: the first butterfly step pairs lane l with l ^ 15, so the upper half-warp is
    // never folded in.
    v += __shfl_xor_sync(FULL_MASK, v, 15);
    for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
#else
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
#endif
    return v;
}

// One partial sum per block: a warp-shuffle tree inside each warp, then the warp totals through
// shared memory and a second shuffle tree in warp 0. Threads past n contribute zero but still take
// part in every collective and barrier.
extern "C" __global__ void __launch_bounds__(256) emu_selftest_block_sum(const float* __restrict__ x,
                                                                         float* __restrict__ out, int n) {
    __shared__ float warp_totals[32];
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float v = i < (unsigned)n ? x[i] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) warp_totals[warp] = v;
#ifndef FF_PLANT_NO_BARRIER
    __syncthreads();
#endif
    if (warp == 0) {
        const unsigned nwarps = (blockDim.x + 31) / 32;
        float t = lane < nwarps ? warp_totals[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) out[blockIdx.x] = t;
    }
}

// y = a * x over n elements, one element per thread, partial last block.
extern "C" __global__ void __launch_bounds__(256) emu_selftest_scale(const float* x, float* y, int n, float a) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
#ifdef FF_PLANT_OFF_BY_ONE
    if (i <= n) y[i] = a * x[i];
#else
    if (i < n) y[i] = a * x[i];
#endif
}

// ---- misuse the emulator must report as launch errors ----

extern "C" __global__ void __launch_bounds__(32) emu_selftest_shfl_reads_outside_mask(float* out) {
    const unsigned lane = threadIdx.x % 32;
    if (lane < 16) out[lane] = __shfl_sync(0x0000ffffu, (float)lane, 20);
}

extern "C" __global__ void __launch_bounds__(32) emu_selftest_shfl_caller_outside_mask(float* out) {
    const unsigned lane = threadIdx.x % 32;
    out[lane] = __shfl_sync(0x0000ffffu, (float)lane, 0);
}

extern "C" __global__ void __launch_bounds__(32) emu_selftest_shfl_lane_exited(float* out) {
    const unsigned lane = threadIdx.x % 32;
    if (lane >= 16) return;
    out[lane] = __shfl_down_sync(FULL_MASK, (float)lane, 1);
}

extern "C" __global__ void __launch_bounds__(128) emu_selftest_sync_after_exit(float* out) {
    if (threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void __launch_bounds__(128) emu_selftest_sync_two_sites(float* out) {
    if (threadIdx.x & 1) {
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.0f;
    }
}

extern "C" __global__ void __launch_bounds__(64) emu_selftest_warp_vs_barrier(float* out) {
    if (threadIdx.x < 16) {
        out[threadIdx.x] = __shfl_sync(FULL_MASK, 1.0f, 0);
    } else {
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(64) emu_selftest_trap(float* out) {
    if (threadIdx.x == 5) __trap();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void __launch_bounds__(64) emu_selftest_dynamic_overflow(int n) {
    extern __shared__ float ff_smem[];
    // Writes one float past the n floats the launch requested.
    if (threadIdx.x == 0) ff_smem[n] = 1.0f;
}

// ---- warp votes, matches, reductions, block-wide barrier reductions ----

// Per warp w: ballots[w], alls[w], anys[w] over the full warp; half[w] = ballot over lanes 0-15
// with a 16-lane mask (the upper half-warp stays away).
extern "C" __global__ void __launch_bounds__(256) emu_selftest_votes(const float* x, int n, unsigned* ballots,
                                                                     int* alls, int* anys, unsigned* half,
                                                                     int* block_counts) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned lane = threadIdx.x % 32;
    const unsigned w = i / 32;
    const int pred = i < (unsigned)n && x[i] > 0.0f;
    const unsigned b = __ballot_sync(FULL_MASK, pred);
    const int all = __all_sync(FULL_MASK, pred);
    const int any = __any_sync(FULL_MASK, pred);
    unsigned h = 0;
    if (lane < 16) h = __ballot_sync(0x0000ffffu, pred);
    const int count = __syncthreads_count(pred);
    const int and_ = __syncthreads_and(pred);
    const int or_ = __syncthreads_or(pred);
    if (lane == 0) {
        ballots[w] = b;
        alls[w] = all;
        anys[w] = any;
        half[w] = h;
    }
    if (threadIdx.x == 0) {
        block_counts[3 * blockIdx.x] = count;
        block_counts[3 * blockIdx.x + 1] = and_;
        block_counts[3 * blockIdx.x + 2] = or_;
    }
}

// Per lane: __match_any_sync of (key), and warp reductions of key.
extern "C" __global__ void __launch_bounds__(32) emu_selftest_match_reduce(const unsigned* keys, unsigned* match,
                                                                           unsigned* sums, unsigned* mins,
                                                                           int* imaxs) {
    const unsigned lane = threadIdx.x;
    const unsigned k = keys[lane];
    match[lane] = __match_any_sync(FULL_MASK, k);
    sums[lane] = __reduce_add_sync(FULL_MASK, k);
    mins[lane] = __reduce_min_sync(FULL_MASK, k);
    imaxs[lane] = __reduce_max_sync(FULL_MASK, (int)k - 100);
}

// out[mode * 32 + lane] for the four shuffle modes, all with the given width; idx reads lane
// (lane * 7 + 3), up shifts by 3, down by 5, xor by 6.
extern "C" __global__ void __launch_bounds__(32) emu_selftest_shfl_modes(const int* x, int* out, int width) {
    const unsigned lane = threadIdx.x;
    const int v = x[lane];
    out[lane] = __shfl_sync(FULL_MASK, v, (int)(lane * 7 + 3), width);
    out[32 + lane] = __shfl_up_sync(FULL_MASK, v, 3, width);
    out[64 + lane] = __shfl_down_sync(FULL_MASK, v, 5, width);
    out[96 + lane] = __shfl_xor_sync(FULL_MASK, v, 6, width);
}

// ---- atomics across threads and blocks ----

extern "C" __global__ void __launch_bounds__(128) emu_selftest_atomics(const int* keys, const float* vals, int n,
                                                                       unsigned* hist, float* sum, int* imax,
                                                                       unsigned* umax, float* fmax_out,
                                                                       int* last, int* prev, float* fmax_helper) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    atomicAdd(&hist[keys[i] % 16], 1u);
    atomicAdd(sum, vals[i]);
    atomicMax(imax, keys[i] - 500);
    atomicMax(umax, (unsigned)keys[i]);
    // The classic compare-and-swap loop for a float maximum.
    int* addr = (int*)fmax_out;
    int old = *addr, assumed;
    do {
        assumed = old;
        if (__int_as_float(assumed) >= vals[i]) break;
        old = atomicCAS(addr, assumed, __float_as_int(vals[i]));
    } while (assumed != old);
    prev[i] = atomicExch(last, i);
    ff_atomic_max_f32(fmax_helper, vals[i]);
}

// ---- shared memory ----

// y[i] = x of the mirrored thread in the same block + a per-block bias, through dynamic shared
// memory (the block's slice of x) and a static one (the bias).
extern "C" __global__ void __launch_bounds__(256) emu_selftest_shared_mix(const float* x, float* y, int n) {
    extern __shared__ float ff_smem[];
    __shared__ float bias;
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    ff_smem[threadIdx.x] = i < (unsigned)n ? x[i] : 0.0f;
    if (threadIdx.x == 0) bias = (float)blockIdx.x;
    __syncthreads();
    const unsigned mirror = blockDim.x - 1 - threadIdx.x;
    if (i < (unsigned)n) y[i] = ff_smem[mirror] + bias;
}

// Reads static and dynamic shared memory before writing it, in every block: each read must see
// the poison pattern, not the previous block's data.
extern "C" __global__ void __launch_bounds__(64) emu_selftest_read_before_write(unsigned* stat, unsigned* dyn) {
    extern __shared__ float ff_smem[];
    __shared__ unsigned tile[64];
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    stat[i] = tile[threadIdx.x];
    dyn[i] = __float_as_uint(ff_smem[threadIdx.x]);
    __syncthreads();
    tile[threadIdx.x] = 7u;
    ff_smem[threadIdx.x] = 3.0f;
}

// 48 KiB of static shared memory: with dynamic memory on top, the launch limit applies.
extern "C" __global__ void __launch_bounds__(64) emu_selftest_big_static(float* out) {
    __shared__ float big[12288];
    big[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = big[63 - threadIdx.x];
}

// ---- launch geometry ----

// For every in-range point of an nx * ny * nz volume covered by a 3-D grid of 3-D blocks: the
// number of writers (must be 1) and the block and thread index that covered it.
extern "C" __global__ void __launch_bounds__(512) emu_selftest_index_map(unsigned* hits, unsigned* who, int nx,
                                                                         int ny, int nz) {
    const unsigned gx = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned gy = blockIdx.y * blockDim.y + threadIdx.y;
    const unsigned gz = blockIdx.z * blockDim.z + threadIdx.z;
    if (gx >= (unsigned)nx || gy >= (unsigned)ny || gz >= (unsigned)nz) return;
    const unsigned cell = (gz * (unsigned)ny + gy) * (unsigned)nx + gx;
    atomicAdd(&hits[cell], 1u);
    who[2 * cell] = blockIdx.x | (blockIdx.y << 10) | (blockIdx.z << 20);
    who[2 * cell + 1] = threadIdx.x | (threadIdx.y << 10) | (threadIdx.z << 20);
}

extern "C" __global__ void __launch_bounds__(64) emu_selftest_bounded(float* out) { out[threadIdx.x] = 1.0f; }

// Order probe: the ticket each thread draws before and after a barrier.
extern "C" __global__ void __launch_bounds__(256) emu_selftest_order(unsigned* before, unsigned* after,
                                                                     unsigned* counter) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    before[i] = atomicAdd(counter, 1u);
    __syncthreads();
    after[i] = atomicAdd(counter, 1u);
}

// Fiber switch rate: each thread passes `iters` __syncwarp and iters/8 __syncthreads.
extern "C" __global__ void __launch_bounds__(1024) emu_selftest_spin(int iters, unsigned* out) {
    unsigned acc = 0;
    for (int k = 0; k < iters; ++k) {
        __syncwarp();
        acc += (unsigned)k;
        if ((k & 7) == 7) __syncthreads();
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// ---- tensor core wrapper ----

// D = A B + C for one 16x16 (A, bf16 row-major) by 16x8 (B, bf16 row-major K x N) tile, C/D f32
// row-major 16x8; the lanes gather their fragments as the PTX ISA lays them out.
extern "C" __global__ void __launch_bounds__(32) emu_selftest_mma(const unsigned short* a, const unsigned short* b,
                                                                  const float* c, float* d) {
    const unsigned lane = threadIdx.x;
    const unsigned g = lane >> 2, t = lane & 3u;
    auto pack = [](unsigned short lo, unsigned short hi) { return (uint32_t)lo | ((uint32_t)hi << 16); };
    uint32_t fa[4], fb[2];
    fa[0] = pack(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]);
    fa[1] = pack(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]);
    fa[2] = pack(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]);
    fa[3] = pack(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9]);
    fb[0] = pack(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]);
    fb[1] = pack(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]);
    float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    ff_mma_m16n8k16_bf16(acc, fa, fb, acc);
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// ---- 16-bit float conversions and math intrinsics ----

extern "C" __global__ void __launch_bounds__(256) emu_selftest_convert(const float* x, unsigned short* f16,
                                                                       unsigned short* bf16, float* f16_back,
                                                                       float* bf16_back, int n) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    const __half h = __float2half(x[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    f16[i] = __half_as_ushort(h);
    bf16[i] = __bfloat16_as_ushort(b);
    f16_back[i] = __half2float(__ushort_as_half(f16[i]));
    bf16_back[i] = __bfloat162float(b);
}

// out[9 * i + k] for k = expf, __expf, logf(|x|+1), __logf(|x|+1), __fdividef(x, 3), rsqrtf(|x|+1),
// __saturatef(x), tanhf, log1pf(|x|); iout[4 * i + k] for __popc, __clz, __ffs, __float2int_rn of
// the bits/value of x.
extern "C" __global__ void __launch_bounds__(256) emu_selftest_math(const float* x, float* out, int* iout, int n) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    const float v = x[i];
    const float p = fabsf(v) + 1.0f;
    float* o = out + 9 * i;
    o[0] = expf(v);
    o[1] = __expf(v);
    o[2] = logf(p);
    o[3] = __logf(p);
    o[4] = __fdividef(v, 3.0f);
    o[5] = rsqrtf(p);
    o[6] = __saturatef(v);
    o[7] = tanhf(v);
    o[8] = log1pf(fabsf(v));
    const int bits = __float_as_int(v);
    iout[4 * i] = __popc((unsigned)bits);
    iout[4 * i + 1] = __clz(bits);
    iout[4 * i + 2] = __ffs(bits);
    iout[4 * i + 3] = __float2int_rn(v * 10.0f) + max(0, min(i, 3));
}

// ---- kernels that a macro instantiates per dtype, as candle's kernels do ----
#define FF_SELFTEST_AXPY(T, SUFFIX, LOAD)                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                              \
        emu_selftest_axpy_##SUFFIX(const T* x, float* y, float a, int n) {                         \
        const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);                                 \
        if (i < n) y[i] += a * LOAD(x[i]);                                                          \
    }
FF_SELFTEST_AXPY(float, f32, (float))
// Guarded as candle guards its bf16 kernels: the emulator compiles as for sm_90.
#if __CUDA_ARCH__ >= 800
FF_SELFTEST_AXPY(__nv_bfloat16, bf16, __bfloat162float)
#endif
FF_SELFTEST_AXPY(__half, f16, __half2float)

// Declarations in a namespace and inside an extern "C" block are found too.
namespace ffst {
extern "C" __global__ void __launch_bounds__(32) emu_selftest_in_namespace(int* out) { out[threadIdx.x] = 1; }
}  // namespace ffst

extern "C" {
__global__ void __launch_bounds__(32) emu_selftest_in_extern_block(int* out) { out[threadIdx.x] = 2; }
}
