// The bf16 tensor-core product of one 64-row tile: OUT = A W + b with A (activations) and W^T in
// shared memory as bf16, accumulation in f32 by mma.m16n8k16 (ff_mma_m16n8k16_bf16).
//
// Tiling. The 8 warps form a 2 x 4 grid over a 64-row x NC-column output chunk: each warp owns
// 32 rows (two m16 tiles) and NC/4 columns (NT8 n8 tiles), so per k16 step it loads two A
// fragments and NT8 B fragments and issues 2 NT8 mma (16 at NC = 256). Fragments are 32-bit
// loads of bf16 pairs: A is stored row-major [m][k] and W transposed [n][k], both with a row
// stride of (width + 8) bf16, i.e. 4 (mod 8) words, so the 8 row groups x 4 pair columns of a
// fragment load hit 32 distinct banks.
//
// Weights that do not fit stay in global memory as bf16 W^T and are streamed through two
// NC x 32 stages (register prefetch of the next slice while the current one feeds the mma, one
// barrier per slice), as in coupling_gemm.cuh.
#pragma once
#include "coupling_layout.cuh"
#include "coupling_gemm.cuh"

#define CP_MMA_TM 64
#define CP_MMA_KS 32
#define CP_MMA_PAD 8
// uint4 (8 bf16) per thread of one staged slice: 256 columns x 32 k / 8 / 256 threads.
#define CP_MMA_STAGE_VEC 4

struct CpMma {
    int cols, red;
    const unsigned short* a;  // [64][lda] bf16, row-major
    int lda;
    const unsigned short* b;  // W^T [cols][ldb] bf16: shared (resident) or global (staged)
    int ldb;
    int staged;
    unsigned short* stage;    // 2 x 256 x (32 + 8) bf16
    const float* bias;        // global f32
    int act;
    int last;                 // last layer: f32 row-major output, no activation
    unsigned short* out_bf;   // hidden: bf16 [64][ldo]
    float* out_f;             // last: f32 [64][ldo]
    int ldo;
};

FF_DEVICE unsigned int cp_ld32(const unsigned short* p) { return *reinterpret_cast<const unsigned int*>(p); }

FF_DEVICE void cp_mma_stage_load(uint4 (&pre)[CP_MMA_STAGE_VEC], const unsigned short* __restrict__ g, int ldg,
                                 int k0, int c0, int nc) {
    // Slice: rows n = c0 .. c0 + nc of W^T, columns k0 .. k0 + 32: 4 uint4 per row.
#pragma unroll
    for (int i = 0; i < CP_MMA_STAGE_VEC; ++i) {
        const int q = threadIdx.x + i * CP_THREADS;
        if (q < nc * 4) {
            const int n = q / 4, part = q % 4;
            pre[i] = *reinterpret_cast<const uint4*>(g + (long long)(c0 + n) * ldg + k0 + part * 8);
        }
    }
}

FF_DEVICE void cp_mma_stage_store(const uint4 (&pre)[CP_MMA_STAGE_VEC], unsigned short* stage, int nc) {
#pragma unroll
    for (int i = 0; i < CP_MMA_STAGE_VEC; ++i) {
        const int q = threadIdx.x + i * CP_THREADS;
        if (q < nc * 4) {
            const int n = q / 4, part = q % 4;
            *reinterpret_cast<uint4*>(stage + n * (CP_MMA_KS + CP_MMA_PAD) + part * 8) = pre[i];
        }
    }
}

// acc += A[rows of this warp][k0 .. k0 + 16) x W^T[cols of this warp][k0 .. k0 + 16).
template <int NT8>
FF_DEVICE void cp_mma_k16(float (&acc)[2][NT8][4], const unsigned short* a, int lda, int arow, int ak,
                          const unsigned short* b, int ldb, int bcol, int bk) {
    const int lane = threadIdx.x % FF_WARP, gq = lane >> 2, tq = lane & 3;
    unsigned int af[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const unsigned short* r0 = a + (arow + 16 * i + gq) * lda + ak + 2 * tq;
        const unsigned short* r8 = r0 + 8 * lda;
        af[i][0] = cp_ld32(r0);
        af[i][1] = cp_ld32(r8);
        af[i][2] = cp_ld32(r0 + 8);
        af[i][3] = cp_ld32(r8 + 8);
    }
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
        const unsigned short* c = b + (bcol + 8 * j + gq) * ldb + bk + 2 * tq;
        const unsigned int bf[2] = {cp_ld32(c), cp_ld32(c + 8)};
#pragma unroll
        for (int i = 0; i < 2; ++i) ff_mma_m16n8k16_bf16(acc[i][j], af[i], bf, acc[i][j]);
    }
}

template <int NT8>
FF_DEVICE void cp_mma_run(const CpMma& g) {
    const int nc = NT8 * 32;
    const int warp = threadIdx.x / FF_WARP, lane = threadIdx.x % FF_WARP;
    const int gq = lane >> 2, tq = lane & 3;
    const int arow = (warp / 4) * 32;          // this warp's rows
    const int wcol = (warp % 4) * (nc / 4);    // this warp's columns inside the chunk
    constexpr int ldst = CP_MMA_KS + CP_MMA_PAD;
    for (int c0 = 0; c0 < g.cols; c0 += nc) {
        float acc[2][NT8][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
            for (int j = 0; j < NT8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
            }
        }
        if (g.staged) {
            const int slices = g.red / CP_MMA_KS;
            uint4 pre[CP_MMA_STAGE_VEC];
            cp_mma_stage_load(pre, g.b, g.ldb, 0, c0, nc);
            cp_mma_stage_store(pre, g.stage, nc);
            __syncthreads();
            for (int s = 0; s < slices; ++s) {
                const bool more = s + 1 < slices;
                if (more) cp_mma_stage_load(pre, g.b, g.ldb, (s + 1) * CP_MMA_KS, c0, nc);
                const unsigned short* st = g.stage + (s & 1) * 256 * ldst;
#pragma unroll
                for (int kk = 0; kk < CP_MMA_KS; kk += 16)
                    cp_mma_k16<NT8>(acc, g.a, g.lda, arow, s * CP_MMA_KS + kk, st, ldst, wcol, kk);
                if (more) cp_mma_stage_store(pre, g.stage + ((s + 1) & 1) * 256 * ldst, nc);
                __syncthreads();
            }
        } else {
            for (int k0 = 0; k0 < g.red; k0 += 16)
                cp_mma_k16<NT8>(acc, g.a, g.lda, arow, k0, g.b + (long long)c0 * g.ldb, g.ldb, wcol, k0);
        }
        // Epilogue: c[0..1] at (row g, cols 2t, 2t+1), c[2..3] at row g + 8.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
            for (int j = 0; j < NT8; ++j) {
                const int col = c0 + wcol + 8 * j + 2 * tq;
                const float b0 = g.bias[col], b1 = g.bias[col + 1];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = arow + 16 * i + gq + 8 * h;
                    float v0 = acc[i][j][2 * h] + b0, v1 = acc[i][j][2 * h + 1] + b1;
                    if (g.last) {
                        *reinterpret_cast<float2*>(g.out_f + row * g.ldo + col) = make_float2(v0, v1);
                    } else {
                        v0 = ff_act(g.act, v0);
                        v1 = ff_act(g.act, v1);
                        *reinterpret_cast<unsigned int*>(g.out_bf + row * g.ldo + col) = ff_pack_bf16x2(v0, v1);
                    }
                }
            }
        }
    }
    __syncthreads();
}

// Runs the product for this layer's column chunk (ends with a barrier).
FF_DEVICE void cp_mma(const CpMma& g) {
    switch (cp_chunk(g.cols)) {
        case 256: cp_mma_run<8>(g); break;
        case 128: cp_mma_run<4>(g); break;
        case 64: cp_mma_run<2>(g); break;
        default: cp_mma_run<1>(g); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core engine for the backward (coupling_bwd_bf16): the same operands and epilogues as
// the f32 engine of coupling_gemm.cuh (CpGemm), with the products on mma.m16n8k16. The
// backward reads its tiles both ways round (h and dZ as row- and column-major operands), so
// they stay f32 in shared memory and every fragment is built from two f32 loads converted to a
// bf16 pair (cvt.rn), rather than keeping a bf16 copy in each orientation. Accumulation is f32.
//
// Tiling: warps in a WR x WC grid over a (rows-pass x NC) output chunk, each owning MT m16 and
// NT8 n8 tiles: 64-row passes are 2 x 4 warps of 32 rows (NT8 = NC / 32), 32-row passes 1 x 8
// warps (NT8 = NC / 64), or 2 x 4 warps of 16 rows for a 32 x 32 chunk. The row strides of the
// f32 tiles (TM + 4, hmax + 4, staged and resident weights + 4) are 4 (mod 32) words, so the
// 8 x 4 lanes of a fragment load mostly hit distinct banks.

FF_DEVICE unsigned int cp_frag(const float* p, int step) { return ff_pack_bf16x2(p[0], p[step]); }

template <int MT, int NT8>
FF_DEVICE void cp_mma_f32_k16(float (&acc)[MT][NT8][4], const CpGemm& g, int mw, int ka, const float* b, int ldb,
                              int nw, int kb) {
    const int lane = threadIdx.x % FF_WARP, gq = lane >> 2, tq = lane & 3;
    const int ar = g.a_red, am = g.a_row;
    unsigned int af[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        // A(r, m) = a[r * a_red + m * a_row]; fragment rows m, m + 8, reduction pairs 2t, 2t + 8.
        const float* p = g.a + (ka + 2 * tq) * ar + (mw + 16 * i + gq) * am;
        af[i][0] = cp_frag(p, ar);
        af[i][1] = cp_frag(p + 8 * am, ar);
        af[i][2] = cp_frag(p + 8 * ar, ar);
        af[i][3] = cp_frag(p + 8 * am + 8 * ar, ar);
    }
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
        const float* q = b + (kb + 2 * tq) * ldb + nw + 8 * j + gq;
        const unsigned int bf[2] = {cp_frag(q, ldb), cp_frag(q + 8 * ldb, ldb)};
#pragma unroll
        for (int i = 0; i < MT; ++i) ff_mma_m16n8k16_bf16(acc[i][j], af[i], bf, acc[i][j]);
    }
}

// Two adjacent outputs (row, col), (row, col + 1) through CpGemm's epilogue.
FF_DEVICE void cp_mma_store2(const CpGemm& g, int row, int col, float v0, float v1) {
    if (g.epi == CP_EPI_T) {
        v0 += g.bias[col];
        v1 += g.bias[col + 1];
        if (g.act >= 0) {
            v0 = ff_act(g.act, v0);
            v1 = ff_act(g.act, v1);
        }
        g.out[col * g.ldo + row] = v0;
        g.out[(col + 1) * g.ldo + row] = v1;
        return;
    }
    float2* o = reinterpret_cast<float2*>(g.out + (long long)row * g.ldo + col);
    if (g.epi == CP_EPI_ROW) {
        *o = make_float2(v0 + g.bias[col], v1 + g.bias[col + 1]);
    } else if (g.epi == CP_EPI_GATE) {
        if (g.gate) {
            const float2 s = *reinterpret_cast<const float2*>(g.gate + (long long)row * g.ldgate + col);
            v0 *= s.x;
            v1 *= s.y;
        }
        *o = make_float2(v0, v1);
    } else {
        const float2 a = *o;
        *o = make_float2(a.x + v0, a.y + v1);
    }
}

template <int MT, int NT8>
FF_DEVICE void cp_gemm_mma_run(const CpGemm& g) {
    const int nc = cp_chunk(g.cols);
    const int wcn = nc / (8 * NT8);
    const int warp = threadIdx.x / FF_WARP, lane = threadIdx.x % FF_WARP;
    const int gq = lane >> 2, tq = lane & 3;
    const int wr = warp / wcn, wc = warp % wcn;
    const int mr = (CP_THREADS / FF_WARP / wcn) * 16 * MT;
    const int nw = wc * 8 * NT8;
    for (int r0 = 0; r0 < g.rows; r0 += mr) {
        const int mw = r0 + wr * 16 * MT;
        for (int c0 = 0; c0 < g.cols; c0 += nc) {
            float acc[MT][NT8][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
#pragma unroll
                for (int j = 0; j < NT8; ++j) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
                }
            }
            if (g.staged) {
                cp_staged_slices(g, c0, nc, [&](const float* st, int lds, int s) {
#pragma unroll 1
                    for (int kk = 0; kk < g.ks; kk += 16)
                        cp_mma_f32_k16<MT, NT8>(acc, g, mw, s * g.ks + kk, st, lds, nw, kk);
                });
            } else {
#pragma unroll 1
                for (int k0 = 0; k0 < g.red; k0 += 16)
                    cp_mma_f32_k16<MT, NT8>(acc, g, mw, k0, g.b + c0, g.ldb, nw, k0);
            }
#pragma unroll
            for (int i = 0; i < MT; ++i) {
#pragma unroll
                for (int j = 0; j < NT8; ++j) {
                    const int col = c0 + nw + 8 * j + 2 * tq;
                    const int row = mw + 16 * i + gq;
                    cp_mma_store2(g, row, col, acc[i][j][0], acc[i][j][1]);
                    cp_mma_store2(g, row + 8, col, acc[i][j][2], acc[i][j][3]);
                }
            }
        }
    }
    __syncthreads();
}

// Rows a multiple of 32, reduction (and staged slices) a multiple of 16; ends with a barrier.
FF_DEVICE void cp_gemm_mma(const CpGemm& g) {
    const int nc = cp_chunk(g.cols);
    if (g.rows % 64 == 0) {
        switch (nc) {
            case 256: cp_gemm_mma_run<2, 8>(g); break;
            case 128: cp_gemm_mma_run<2, 4>(g); break;
            case 64: cp_gemm_mma_run<2, 2>(g); break;
            default: cp_gemm_mma_run<2, 1>(g); break;
        }
    } else {
        switch (nc) {
            case 256: cp_gemm_mma_run<2, 4>(g); break;
            case 128: cp_gemm_mma_run<2, 2>(g); break;
            case 64: cp_gemm_mma_run<2, 1>(g); break;
            default: cp_gemm_mma_run<1, 1>(g); break;
        }
    }
}
