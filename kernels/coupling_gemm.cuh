// The f32 matrix product of one row tile inside the fused coupling kernels:
//   OUT(m, n) = sum_r A(r, m) * B(r, n)      m < rows, n < cols, r < red
// with A in shared memory at any two strides, B either in shared memory (resident weights, or a
// gradient buffer) or in global memory streamed through shared memory in k-slices, and an
// epilogue that adds the bias and applies the activation on the way out.
//
// Tiling. The 256 threads form a TY x TX grid over one (rows-pass x column-chunk) output tile;
// each thread owns an RM x 8 register micro-tile: RM consecutive rows and two groups of 4
// consecutive columns, NC/2 apart (so the 32 lanes of a warp read one contiguous 512-byte row of
// B per group: float4 loads, no bank conflicts). Per reduction step a thread loads RM values of A
// (all lanes of a warp share them: a broadcast) and 8 of B, for 8 RM FMAs; at RM = 8 (the widths
// that matter for speed, 256 columns x 64 rows) that is 64 FMAs per 4 LDS.128, enough to keep
// the FMA pipes ahead of shared memory. Narrower layers use smaller chunks (NC = 128, 64, 32)
// and smaller RM so that no thread computes a padded column. Widths are padded by the host to
// multiples of their chunk (zero weights), so the hot loop has no bounds tests.
//
// Streaming B (weights that do not fit in shared memory): KS x NC slices, double-buffered; each
// thread prefetches the next slice into registers (coalesced float4 global loads) while it
// computes on the current one, then stores it, with one barrier per slice.
#pragma once
#include "coupling_layout.cuh"

#define CP_EPI_T 0      // out[n * ldo + m] = act(acc + bias[n]); act < 0 keeps the pre-activation
#define CP_EPI_ROW 1    // out[m * ldo + n] = acc + bias[n]
#define CP_EPI_GATE 2   // out[m * ldo + n] = acc * gate[m * ldgate + n] (gate null: acc; may alias out)
#define CP_EPI_ACCUM 3  // out[m * ldo + n] += acc (a block's private gradient partial, global)

// Float4s of one staged slice a thread prefetches at most (KS 16 x NC 256 / 4 / 256 threads).
#define CP_STAGE_VEC 4

struct CpGemm {
    int rows, cols, red;
    const float* a;  // A(r, m) = a[r * a_red + m * a_row]
    int a_red, a_row;
    const float* b;  // B(r, n) = b[r * ldb + n]
    int ldb;
    int staged;      // b is in global memory: stream it through `stage` (2 * ks * (256 + 4))
    float* stage;
    int ks;
    int epi;
    const float* bias;
    int act;
    float* out;
    int ldo;
    const float* gate;
    int ldgate;
};

// Output rows per pass: rows are multiples of 16 (tiles) or 32 (padded widths).
FF_DEVICE int cp_rows_per_pass(int rows) { return rows % 64 == 0 ? 64 : rows % 32 == 0 ? 32 : 16; }

template <int RM, bool ACONT>
FF_DEVICE void cp_mac(float (&acc)[RM][8], const float* __restrict__ a, int a_red, int a_row,
                      const float* __restrict__ b, int ldb, int kcount, int n0, int n1) {
#pragma unroll 4
    for (int k = 0; k < kcount; ++k) {
        float av[RM];
        const float* ak = a + k * a_red;
        if constexpr (ACONT && RM >= 4) {
#pragma unroll
            for (int i = 0; i < RM; i += 4) {
                const float4 v = *reinterpret_cast<const float4*>(ak + i);
                av[i] = v.x;
                av[i + 1] = v.y;
                av[i + 2] = v.z;
                av[i + 3] = v.w;
            }
        } else if constexpr (ACONT && RM == 2) {
            const float2 v = *reinterpret_cast<const float2*>(ak);
            av[0] = v.x;
            av[1] = v.y;
        } else {
#pragma unroll
            for (int i = 0; i < RM; ++i) av[i] = ak[i * a_row];
        }
        const float4 p = *reinterpret_cast<const float4*>(b + k * ldb + n0);
        const float4 q = *reinterpret_cast<const float4*>(b + k * ldb + n1);
        const float bv[8] = {p.x, p.y, p.z, p.w, q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
    }
}

// One slice (ks rows x nc columns starting at (k0, c0)) of a global row-major matrix: which
// float4 each thread moves. The stage keeps rows nc + 4 apart (cp_stage_ld), so that the
// tensor-core engine's fragment loads (8 columns x 4 row pairs) hit distinct banks.
FF_DEVICE void cp_stage_load(float4 (&pre)[CP_STAGE_VEC], const float* __restrict__ g, int ldg, int k0, int c0,
                             int nc, int per) {
    const int vpr = nc / 4;
#pragma unroll
    for (int i = 0; i < CP_STAGE_VEC; ++i) {
        const int q = threadIdx.x + i * CP_THREADS;
        if (q < per) {
            const int kk = q / vpr, cc = (q % vpr) * 4;
            pre[i] = *reinterpret_cast<const float4*>(g + (long long)(k0 + kk) * ldg + c0 + cc);
        }
    }
}

FF_DEVICE int cp_stage_ld(int nc) { return nc + 4; }

FF_DEVICE void cp_stage_store(const float4 (&pre)[CP_STAGE_VEC], float* stage, int per, int nc) {
    const int vpr = nc / 4, ld = cp_stage_ld(nc);
#pragma unroll
    for (int i = 0; i < CP_STAGE_VEC; ++i) {
        const int q = threadIdx.x + i * CP_THREADS;
        if (q < per) *reinterpret_cast<float4*>(stage + (q / vpr) * ld + (q % vpr) * 4) = pre[i];
    }
}

// Streams columns [c0, c0 + nc) of the weights g.b through the two shared-memory stages in
// slices of g.ks rows: the next slice's loads are in flight while `mac(stage, lds, s)` computes
// on slice s. The slice just computed is overwritten two iterations on and the one stored now is
// read in the next, so one barrier per slice covers both. Every thread of the block calls it.
template <class Mac>
FF_DEVICE void cp_staged_slices(const CpGemm& g, int c0, int nc, const Mac& mac) {
    const int slices = g.red / g.ks, lds = cp_stage_ld(nc), per = g.ks * nc / 4;
    float4 pre[CP_STAGE_VEC];
    cp_stage_load(pre, g.b, g.ldb, 0, c0, nc, per);
    cp_stage_store(pre, g.stage, per, nc);
    __syncthreads();
    for (int s = 0; s < slices; ++s) {
        const bool more = s + 1 < slices;
        if (more) cp_stage_load(pre, g.b, g.ldb, (s + 1) * g.ks, c0, nc, per);
        mac(g.stage + (s & 1) * g.ks * lds, lds, s);
        if (more) cp_stage_store(pre, g.stage + ((s + 1) & 1) * g.ks * lds, per, nc);
        __syncthreads();
    }
}

template <int RM>
FF_DEVICE void cp_epilogue(const CpGemm& g, const float (&acc)[RM][8], int m0, int c_lo, int c_hi) {
    if (g.epi == CP_EPI_T) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int n = j < 4 ? c_lo + j : c_hi + j - 4;
            const float bias = g.bias[n];
            float v[RM];
#pragma unroll
            for (int i = 0; i < RM; ++i) {
                v[i] = acc[i][j] + bias;
                if (g.act >= 0) v[i] = ff_act(g.act, v[i]);
            }
            float* o = g.out + n * g.ldo + m0;
            if constexpr (RM >= 4) {
#pragma unroll
                for (int i = 0; i < RM; i += 4)
                    *reinterpret_cast<float4*>(o + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
            } else {
#pragma unroll
                for (int i = 0; i < RM; ++i) o[i] = v[i];
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const int m = m0 + i;
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int n = j < 4 ? c_lo + j : c_hi + j - 4;
            if (g.epi == CP_EPI_ROW) {
                v[j] = acc[i][j] + g.bias[n];
            } else if (g.epi == CP_EPI_GATE) {
                v[j] = g.gate ? acc[i][j] * g.gate[(long long)m * g.ldgate + n] : acc[i][j];
            } else {
                v[j] = acc[i][j];
            }
        }
        float4* lo = reinterpret_cast<float4*>(g.out + (long long)m * g.ldo + c_lo);
        float4* hi = reinterpret_cast<float4*>(g.out + (long long)m * g.ldo + c_hi);
        if (g.epi == CP_EPI_ACCUM) {
            const float4 a = *lo, b = *hi;
            *lo = make_float4(a.x + v[0], a.y + v[1], a.z + v[2], a.w + v[3]);
            *hi = make_float4(b.x + v[4], b.y + v[5], b.z + v[6], b.w + v[7]);
        } else {
            *lo = make_float4(v[0], v[1], v[2], v[3]);
            *hi = make_float4(v[4], v[5], v[6], v[7]);
        }
    }
}

template <int RM, bool ACONT>
FF_DEVICE void cp_gemm_run(const CpGemm& g) {
    const int nc = cp_chunk(g.cols);
    const int txn = nc / 8;
    const int tyn = CP_THREADS / txn;
    const int tx = threadIdx.x % txn, ty = threadIdx.x / txn;
    // Rows per pass: 64 when the row count allows, else 32 or 16; where the thread grid is
    // taller than that (narrow chunks of few rows: small layers only) its lower part idles.
    const int mr = min(tyn * RM, cp_rows_per_pass(g.rows));
    const bool active = ty * RM < mr;
    const int n0 = tx * 4, n1 = nc / 2 + tx * 4;
    for (int r0 = 0; r0 < g.rows; r0 += mr) {
        const int m0 = r0 + ty * RM;
        const float* a = g.a + m0 * g.a_row;
        for (int c0 = 0; c0 < g.cols; c0 += nc) {
            float acc[RM][8];
#pragma unroll
            for (int i = 0; i < RM; ++i) {
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
            }
            if (g.staged) {
                cp_staged_slices(g, c0, nc, [&](const float* st, int lds, int s) {
                    if (active)
                        cp_mac<RM, ACONT>(acc, a + s * g.ks * g.a_red, g.a_red, g.a_row, st, lds, g.ks, n0, n1);
                });
            } else if (active) {
                cp_mac<RM, ACONT>(acc, a, g.a_red, g.a_row, g.b + c0, g.ldb, g.red, n0, n1);
            }
            if (active) cp_epilogue<RM>(g, acc, m0, c0 + n0, c0 + n1);
        }
    }
    // Outputs are visible to the whole block on return, and its inputs may be overwritten.
    __syncthreads();
}

// Picks the micro-tile height for this shape and runs the product (ends with a barrier).
FF_DEVICE void cp_gemm(const CpGemm& g) {
    const int tyn = CP_THREADS / (cp_chunk(g.cols) / 8);
    const int rm = max(1, cp_rows_per_pass(g.rows) / tyn);
    const bool cont = g.a_row == 1;
    switch (rm) {
        case 8:
            if (cont) cp_gemm_run<8, true>(g); else cp_gemm_run<8, false>(g);
            break;
        case 4:
            if (cont) cp_gemm_run<4, true>(g); else cp_gemm_run<4, false>(g);
            break;
        case 2:
            if (cont) cp_gemm_run<2, true>(g); else cp_gemm_run<2, false>(g);
            break;
        default:
            if (cont) cp_gemm_run<1, true>(g); else cp_gemm_run<1, false>(g);
            break;
    }
}
