// Shared by every kernel family: qualifiers, activations, bf16/f16 storage, warp and block
// reductions, and the tensor-core wrapper.
//
// The same source compiles three ways: nvcc, NVRTC (no CUDA headers available: everything here
// is self-contained), and g++ with the grid emulator (tests/emu/cuda_emu.h defines FFEMU and
// provides the CUDA built-ins). Nothing here includes a CUDA header.
#pragma once

#define FF_DEVICE __device__ __forceinline__

// Kernels are launched with this many threads per block unless a family says otherwise.
#define FF_BLOCK 256
#define FF_WARP 32
#define FF_FULL_MASK 0xffffffffu

// 0.5 * log(2*pi): the per-coordinate constant of the standard normal log-density.
#define FF_HALF_LOG_2PI 0.91893853320467274178f

// ---------------------------------------------------------------------------------------------
// Activations (codes match nn::mlp::Activation::code): 0 relu, 1 tanh, 2 silu, 3 softplus.

FF_DEVICE float ff_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// tanh without tanh.approx.f32, which --use_fast_math substitutes for tanhf (relative error
// about 2^-11, enough to move a log-det by 1e-3 per coordinate): 1 - 2/(e^{2|x|} + 1) with the
// sign restored, absolute error ~1e-7. Every tanh in the kernels goes through this.
FF_DEVICE float ff_tanh(float x) {
    const float e = expf(2.0f * fabsf(x));
    return copysignf(1.0f - 2.0f / (e + 1.0f), x);
}

FF_DEVICE float ff_softplus(float x) {
    return x > 20.0f ? x : (x < -20.0f ? expf(x) : log1pf(expf(x)));
}

FF_DEVICE float ff_act(int code, float x) {
    switch (code) {
        case 0: return fmaxf(x, 0.0f);
        case 1: return ff_tanh(x);
        case 2: return x * ff_sigmoid(x);
        default: return ff_softplus(x);
    }
}

// d act / dx at the pre-activation x.
FF_DEVICE float ff_act_grad(int code, float x) {
    switch (code) {
        case 0: return x > 0.0f ? 1.0f : 0.0f;
        case 1: { float t = ff_tanh(x); return 1.0f - t * t; }
        case 2: { float s = ff_sigmoid(x); return s * (1.0f + x * (1.0f - s)); }
        default: return ff_sigmoid(x);
    }
}

// d^2 act / dx^2 at the pre-activation x (zero almost everywhere for relu).
FF_DEVICE float ff_act_grad2(int code, float x) {
    switch (code) {
        case 0: return 0.0f;
        case 1: { float t = ff_tanh(x); return -2.0f * t * (1.0f - t * t); }
        case 2: { float s = ff_sigmoid(x); return s * (1.0f - s) * (2.0f + x * (1.0f - 2.0f * s)); }
        default: { float s = ff_sigmoid(x); return s * (1.0f - s); }
    }
}

// d^3 act / dx^3 at the pre-activation x.
FF_DEVICE float ff_act_grad3(int code, float x) {
    switch (code) {
        case 0: return 0.0f;
        case 1: { float t = ff_tanh(x); float d = 1.0f - t * t; return -2.0f * d * (d - 2.0f * t * t); }
        case 2: {
            float s = ff_sigmoid(x);
            float d1 = s * (1.0f - s);
            float d2 = d1 * (1.0f - 2.0f * s);
            float d3 = d1 * (1.0f - 6.0f * s + 6.0f * s * s);
            return 3.0f * d2 + x * d3;
        }
        default: { float s = ff_sigmoid(x); return s * (1.0f - s) * (1.0f - 2.0f * s); }
    }
}

// Soft clamp of a log-scale: c * tanh(raw / c) (DESIGN.md "Numerics").
FF_DEVICE float ff_soft_clamp(float raw, float c) { return c * ff_tanh(raw / c); }

// ---------------------------------------------------------------------------------------------
// bf16 / f16 storage (16-bit patterns in unsigned short), f32 arithmetic.

FF_DEVICE float ff_bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

#ifdef FFEMU
FF_DEVICE unsigned short ff_f32_to_bf16(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
FF_DEVICE float ff_f16_to_f32(unsigned short h) { return __half2float(__ushort_as_half(h)); }
FF_DEVICE unsigned short ff_f32_to_f16(float x) { return __half_as_ushort(__float2half_rn(x)); }
#else
FF_DEVICE unsigned short ff_f32_to_bf16(float x) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
FF_DEVICE float ff_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
FF_DEVICE unsigned short ff_f32_to_f16(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
#endif

// Two bf16 values in one 32-bit register, the low half first (the mma fragment packing).
FF_DEVICE unsigned int ff_pack_bf16x2(float lo, float hi) {
    return (unsigned int)ff_f32_to_bf16(lo) | ((unsigned int)ff_f32_to_bf16(hi) << 16);
}

// ---------------------------------------------------------------------------------------------
// Reductions. Sums are warp trees in f32 (DESIGN.md: never a long serial sum).

FF_DEVICE float ff_warp_sum(float v) {
    for (int offset = FF_WARP / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FF_FULL_MASK, v, offset);
    return v;
}

FF_DEVICE float ff_warp_max(float v) {
    for (int offset = FF_WARP / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FF_FULL_MASK, v, offset));
    return v;
}

// Sum over a 1-D block of blockDim.x threads (a multiple of 32, at most 1024); every thread
// gets the total. `scratch` holds at least 32 floats of shared memory.
FF_DEVICE float ff_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % FF_WARP;
    const int warp = threadIdx.x / FF_WARP;
    const int warps = blockDim.x / FF_WARP;
    v = ff_warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return ff_warp_sum(v);
}

// ---------------------------------------------------------------------------------------------
// Tensor cores: D = A·B + C for one warp, m16n8k16, bf16 inputs, f32 accumulation. Fragments
// are laid out as the PTX ISA documents for mma.m16n8k16 (groupID = lane/4, t = lane%4):
// a[0]: A[g][2t..2t+1], a[1]: A[g+8][2t..2t+1], a[2]: A[g][2t+8..], a[3]: A[g+8][2t+8..];
// b[0]: B[2t..2t+1][g], b[1]: B[2t+8..2t+9][g]; c/d[0..1]: C[g][2t..2t+1], c/d[2..3]: C[g+8][2t..].
// Under emulation the header supplies a warp-collective implementation with the same layout.
#ifndef FFEMU
FF_DEVICE void ff_mma_m16n8k16_bf16(float d[4], const unsigned int a[4], const unsigned int b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#endif

// Grid-stride loop over n items.
#define FF_GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); i += (long long)gridDim.x * blockDim.x)
