// MADE (Germain et al. 2015) on the GPU: degree-masked matrix products with all-zero tiles
// skipped, the affine autoregressive transform of MAF / IAF (eq. 18.17–18.20) with its backward,
// and the sequential transform (MAF sampling, IAF density) as one launch that loops over the D
// coordinates on chip.
//
// Masks are never stored. A weight from a unit of degree a (layer input) to a unit of degree c
// (layer output) is live when c >= a in a hidden layer and c > a in the output layer
// (`strict`). Hidden units are sorted by degree, so a unit's live inputs are a prefix of the
// previous layer and the mask is block-triangular. The kernels do not assume sortedness for
// correctness: every weight is masked when it is staged, and the tile schedule is derived from
// the degree bounds of each warp's units (max output degree, min input degree), which for
// sorted degrees are the first/last degree of the range and give the triangular schedule. The
// input and output degrees of a MADE follow the data's column order (a permutation); for the
// natural or reversed order they are monotone per half and skip just as well, for a random
// order the first and last layers skip less (the results are exact either way).
//
// The three products of one masked linear layer y = x·(W⊙M) + b (W is in×out row-major) are
// the same GEMM C[M×N] = Σ_r A[m][r]·B[r][n] with different operands:
//   FWD: C = Y  (batch × out),  A = act_in?(X) (batch × in),  B = W⊙M,  reduction over in units
//   DX : C = dX (batch × in),   A = dY (batch × out),        B = (W⊙M)ᵀ, reduction over out units
//   DW : C = dW (in × out),     A = act_in?(X)ᵀ,             B = dY,    reduction over the batch
// Tiles: a block computes 128 (M) × 64 (N) outputs with 256 threads. In FWD/DX every warp owns
// a slice of the N dimension (the units: 8 for f32, 16 for bf16) and skips the reduction steps
// in which its units have no live weight, so the skipping granularity is 8/16 units × 16
// reduction indices rather than the block tile; the block only stages (loads) the steps some
// warp needs. In DW both dimensions are units and a warp skips its whole sub-tile (32 × 32 for
// f32, 64 × 16 for bf16) when it holds no live weight.
//
// Sizing for an H200 (sm_90): ~80 (f32) to ~100 (bf16) registers and 26–31 KiB of static shared
// memory per 256-thread block, so two blocks (16 warps) are resident per SM and a large batch
// gives hundreds of blocks for 132 SMs. Global loads are issued so that each warp instruction
// reads whole 32-byte sectors (64 or 128 contiguous bytes per row, or 8 floats of 4 rows), the
// next step's operands are loaded into registers while the current step computes, and the
// shared-memory reads of the inner loops are conflict-free (see the layouts below). The f32
// inner loop does 32 FMAs per 3 shared loads of 16 bytes; the bf16 loop 8 mma per 20 32-bit
// fragment loads. No speed has been measured on hardware here: benches/gpu_made.rs does that.

#include "common.cuh"

#define MADE_THREADS 256
#define MADE_WARPS (MADE_THREADS / FF_WARP)
#define MADE_BM 128
#define MADE_BN 64

// f32 SIMT tile: reduction step 16; operands staged k-major with 4 floats of padding so the
// transposed stores hit few banks and the float4 reads stay 16-byte aligned.
#define MADE_F32_BK 16
#define MADE_F32_LDA (MADE_BM + 4)
#define MADE_F32_LDB (MADE_BN + 4)
#define MADE_F32_WARP_N 8

// bf16 tensor-core tile: reduction step 32 (two mma k16 steps); operands staged as bf16 pairs
// (one u32 per two reduction indices), 20 words per row: fragment loads of the 8 row groups x 4
// pair columns of a warp then fall into 32 distinct banks (20·g + t mod 32 is a bijection).
#define MADE_BF16_BK 32
#define MADE_BF16_LDW 20
#define MADE_BF16_WARP_M 64
#define MADE_BF16_WARP_N 16

#define MADE_FWD 0
#define MADE_DX 1
#define MADE_DW 2

// Is the weight from degree a to degree c live?
FF_DEVICE bool made_live(unsigned a, unsigned c, int strict) { return strict ? c > a : c >= a; }

// Everything one GEMM launch needs (see the table above for what a, b and c are per mode).
struct MadeGemm {
    const float* a;
    const float* b;
    const float* bias;     // FWD: 1 x N, may be null
    const float* pre;      // DX: pre-activations of the layer input (M x N), null for the first layer
    float* c;              // FWD: Y; DX: dX; DW: partial sums [chunk][in + 1][out], row `in` = bias
    const unsigned* deg_in;
    const unsigned* deg_out;
    unsigned long long* counter;  // test/bench instrumentation: MACs executed (null: off)
    int m, n, r;           // C is m x n; the reduction runs over r (FWD/DX) or over the chunk (DW)
    int strict, in_act, out_act, accumulate;
    int r_begin, r_end;    // the reduction indices this block covers
};

// ---------------------------------------------------------------------------------------------
// Which reduction indices a warp needs. A warp's output units have degree bound `bound` (max
// output degree in FWD, min input degree in DX); reduction index r is live when any of the
// warp's units has a live weight with it. Returns the inclusive interval [lo, hi] (lo > hi when
// empty). A scan, not a binary search, so that unsorted input/output degrees stay correct.
FF_DEVICE void made_warp_interval(const MadeGemm& p, int mode, int unit0, int units, int lane, int* lo, int* hi) {
    const unsigned* own = mode == MADE_FWD ? p.deg_out : p.deg_in;
    const unsigned* red = mode == MADE_FWD ? p.deg_in : p.deg_out;
    const int u = unit0 + lane;
    const bool valid = lane < units && u < p.n;
    // Bound over the warp's units: max for FWD (output degrees), min for DX (input degrees).
    unsigned mine = 0u;
    if (mode == MADE_FWD) {
        mine = valid ? own[u] : 0u;
        mine = __reduce_max_sync(FF_FULL_MASK, mine);
    } else {
        mine = valid ? own[u] : 0xffffffffu;
        mine = __reduce_min_sync(FF_FULL_MASK, mine);
    }
    const int any = __reduce_or_sync(FF_FULL_MASK, valid ? 1u : 0u);
    int l = 0x7fffffff, h = -1;
    if (any) {
        for (int r = lane; r < p.r; r += FF_WARP) {
            const bool live = mode == MADE_FWD ? made_live(red[r], mine, p.strict) : made_live(mine, red[r], p.strict);
            if (live) {
                l = min(l, r);
                h = max(h, r);
            }
        }
    }
    *lo = __reduce_min_sync(FF_FULL_MASK, l);
    *hi = __reduce_max_sync(FF_FULL_MASK, h);
}

// DW: does the warp's sub-tile (input units [m0, m0 + mrows), output units [n0, n0 + ncols))
// hold any live weight? Sorted or not, it does iff live(min input degree, max output degree).
FF_DEVICE bool made_warp_dw_live(const MadeGemm& p, int m0, int mrows, int n0, int ncols, int lane) {
    unsigned amin = 0xffffffffu, cmax = 0u;
    for (int i = lane; i < mrows; i += FF_WARP)
        if (m0 + i < p.m) amin = min(amin, p.deg_in[m0 + i]);
    for (int i = lane; i < ncols; i += FF_WARP)
        if (n0 + i < p.n) cmax = max(cmax, p.deg_out[n0 + i]);
    amin = __reduce_min_sync(FF_FULL_MASK, amin);
    cmax = __reduce_max_sync(FF_FULL_MASK, cmax);
    const bool any = amin != 0xffffffffu && n0 < p.n;
    return any && made_live(amin, cmax, p.strict);
}

// The reduction interval of the whole block: the hull of its warps' intervals.
FF_DEVICE void made_block_interval(int* s_lo, int* s_hi, int warp, int lane, int lo, int hi, int* blo, int* bhi) {
    if (lane == 0) {
        s_lo[warp] = lo;
        s_hi[warp] = hi;
    }
    __syncthreads();
    int l = 0x7fffffff, h = -1;
    for (int w = 0; w < MADE_WARPS; ++w) {
        l = min(l, s_lo[w]);
        h = max(h, s_hi[w]);
    }
    *blo = l;
    *bhi = h;
}

// A block's schedule: the steps [r_first, r_first + steps·BK) of BK reduction indices from
// p.r_begin cover the hull of its warps' live intervals, and a warp computes a step when its own
// interval [wlo, whi] meets it. FWD/DX: the warp's units are [unit0, unit0 + units). DW: the
// warp's sub-tile (input units [dm0, dm0 + drows), output units [dn0, dn0 + dcols)) is live for
// the whole chunk or not at all, and the blocks of the first row tile run every step of the chunk
// (`bias_block`: they also sum dY for the bias gradient).
struct MadeSchedule {
    int wlo, whi, steps, r_first;
    bool bias_block;
};

template <int MODE, int BK>
FF_DEVICE MadeSchedule made_schedule(const MadeGemm& p, int* s_lo, int* s_hi, int warp, int lane, int m0, int unit0,
                                     int units, int dm0, int drows, int dn0, int dcols) {
    MadeSchedule sc;
    int blo, bhi;
    sc.bias_block = false;
    if (MODE == MADE_DW) {
        const bool live = made_warp_dw_live(p, dm0, drows, dn0, dcols, lane);
        sc.wlo = live ? p.r_begin : 0x7fffffff;
        sc.whi = live ? p.r_end - 1 : -1;
        sc.bias_block = m0 == 0;
        made_block_interval(s_lo, s_hi, warp, lane, sc.wlo, sc.whi, &blo, &bhi);
        if (sc.bias_block) {
            blo = p.r_begin;
            bhi = p.r_end - 1;
        }
    } else {
        made_warp_interval(p, MODE, unit0, units, lane, &sc.wlo, &sc.whi);
        made_block_interval(s_lo, s_hi, warp, lane, sc.wlo, sc.whi, &blo, &bhi);
    }
    sc.steps = bhi >= blo ? (bhi - p.r_begin) / BK - (blo - p.r_begin) / BK + 1 : 0;
    sc.r_first = p.r_begin + ((blo - p.r_begin) / BK) * BK;
    return sc;
}

// Per-thread constants of the B loaders: FWD the output degree of the column `n` the thread
// loads; DX the input degrees of the four units n0 + (t >> 4) + 16i it loads.
template <int MODE>
FF_DEVICE void made_loader_degrees(const MadeGemm& p, int n0, int n, unsigned* col_deg, unsigned own_deg[4]) {
    const int t = threadIdx.x;
    *col_deg = 0u;
#pragma unroll
    for (int i = 0; i < 4; ++i) own_deg[i] = 0u;
    if (MODE == MADE_FWD) {
        *col_deg = n < p.n ? p.deg_out[n] : 0u;
    } else if (MODE == MADE_DX) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int u = n0 + (t >> 4) + 16 * i;
            own_deg[i] = u < p.n ? p.deg_in[u] : 0xffffffffu;
        }
    }
}

// Element epilogue shared by both precisions.
template <int MODE>
FF_DEVICE void made_store(const MadeGemm& p, int m, int n, float v) {
    if (m >= p.m || n >= p.n) return;
    const long long i = (long long)m * p.n + n;
    if (MODE == MADE_FWD) {
        if (p.bias) v += p.bias[n];
        if (p.out_act >= 0) v = ff_act(p.out_act, v);
        p.c[i] = v;
    } else if (MODE == MADE_DX) {
        if (p.pre) v *= ff_act_grad(p.in_act, p.pre[i]);
        if (p.accumulate) v += p.c[i];
        p.c[i] = v;
    } else {
        p.c[(long long)blockIdx.z * (p.m + 1) * p.n + i] = v;
    }
}

// DW: blocks of the first row tile also sum their chunk of dY per column (the bias gradient),
// from the f32 values they stage anyway. `slot` (0..3) and `col` (0..63) say which partial a
// thread holds; the four slots of a column are added in a fixed order.
FF_DEVICE void made_bias_partial(const MadeGemm& p, float* s_cols, int slot, int col, float sum) {
    s_cols[slot * MADE_BN + col] = sum;
    __syncthreads();
    const int t = threadIdx.x;
    const int n = blockIdx.x * MADE_BN + t;
    if (t < MADE_BN && n < p.n) {
        const float s = (s_cols[t] + s_cols[MADE_BN + t]) + (s_cols[2 * MADE_BN + t] + s_cols[3 * MADE_BN + t]);
        p.c[((long long)blockIdx.z * (p.m + 1) + p.m) * p.n + n] = s;
    }
}

// ---------------------------------------------------------------------------------------------
// f32 SIMT GEMM. In FWD/DX, thread (warp w, lane l) owns rows 4l..4l+3 and columns 8w..8w+7 of
// the block tile: per reduction index one float4 of A (lanes read 512 consecutive bytes: no
// conflicts) and two float4 of B (the same address for the whole warp: a broadcast) feed 32
// FMAs. DW uses 32 x 32 warp squares instead (see `tm`, `tn`): 8 distinct float4 of A and 4
// pairs of B per warp, each group contiguous, again conflict-free. The next step's operands are
// loaded into registers while the current step computes (double-buffered shared memory, one
// barrier per step).

struct MadeF32Smem {
    float a[2][MADE_F32_BK][MADE_F32_LDA];
    float b[2][MADE_F32_BK][MADE_F32_LDB];
    float cols[4 * MADE_BN];
    int lo[MADE_WARPS];
    int hi[MADE_WARPS];
};

// Global -> registers, A operand. FWD/DX: A is row-major (m, r): 16 consecutive r per row,
// 16 rows per pass. DW: A[m][r] = X[r][m]: 128 consecutive m per row of X, 2 rows per pass.
template <int MODE>
FF_DEVICE void made_f32_load_a(const MadeGemm& p, int m0, int r0, float ra[8]) {
    const int t = threadIdx.x;
    if (MODE != MADE_DW) {
        const int r = r0 + (t & 15);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int m = m0 + (t >> 4) + 16 * i;
            float v = 0.0f;
            if (m < p.m && r < p.r_end) {
                v = p.a[(long long)m * p.r + r];
                if (MODE == MADE_FWD && p.in_act >= 0) v = ff_act(p.in_act, v);
            }
            ra[i] = v;
        }
    } else {
        const int m = m0 + (t & 127);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int r = r0 + (t >> 7) + 2 * i;
            float v = 0.0f;
            if (m < p.m && r < p.r_end) {
                v = p.a[(long long)r * p.m + m];
                if (p.in_act >= 0) v = ff_act(p.in_act, v);
            }
            ra[i] = v;
        }
    }
}

template <int MODE>
FF_DEVICE void made_f32_store_a(MadeF32Smem& sm, int buf, const float ra[8]) {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        if (MODE != MADE_DW) sm.a[buf][t & 15][(t >> 4) + 16 * i] = ra[i];
        else sm.a[buf][(t >> 7) + 2 * i][t & 127] = ra[i];
    }
}

// Global -> registers, B operand (masked in FWD/DX). FWD/DW: B is row-major (r, n): thread owns
// column t & 63 and rows (t >> 6) + 4i. DX: B[r][n] = W[n][r]: thread owns r = t & 15 and the
// units (t >> 4) + 16i, whose degrees it loaded once (`own_deg`).
template <int MODE>
FF_DEVICE void made_f32_load_b(const MadeGemm& p, int n0, int r0, unsigned col_deg, const unsigned own_deg[4], float rb[4], float* bias_sum) {
    const int t = threadIdx.x;
    if (MODE != MADE_DX) {
        const int n = n0 + (t & 63);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = r0 + (t >> 6) + 4 * i;
            float v = 0.0f;
            if (n < p.n && r < p.r_end) {
                v = p.b[(long long)r * p.n + n];
                if (MODE == MADE_FWD && !made_live(p.deg_in[r], col_deg, p.strict)) v = 0.0f;
            }
            if (MODE == MADE_DW) *bias_sum += v;
            rb[i] = v;
        }
    } else {
        const int r = r0 + (t & 15);
        const unsigned rdeg = r < p.r_end ? p.deg_out[r] : 0u;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = n0 + (t >> 4) + 16 * i;
            float v = 0.0f;
            if (n < p.n && r < p.r_end) {
                v = p.b[(long long)n * p.r + r];
                if (!made_live(own_deg[i], rdeg, p.strict)) v = 0.0f;
            }
            rb[i] = v;
        }
    }
}

template <int MODE>
FF_DEVICE void made_f32_store_b(MadeF32Smem& sm, int buf, const float rb[4]) {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (MODE != MADE_DX) sm.b[buf][(t >> 6) + 4 * i][t & 63] = rb[i];
        else sm.b[buf][t & 15][(t >> 4) + 16 * i] = rb[i];
    }
}

template <int MODE>
FF_DEVICE void made_gemm_f32(const MadeGemm& p, MadeF32Smem& sm) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int n0 = blockIdx.x * MADE_BN, m0 = blockIdx.y * MADE_BM;
    // The thread's 4 x 8 micro-tile starts at (tm, tn) of the block tile. FWD/DX: a warp owns 8
    // columns (units) and all 128 rows, so it skips by its own 8 units. DW: both dimensions are
    // units, so a warp owns a 32 x 32 square (warps 4 x 2) and skips when the square is dead.
    const int tm = MODE == MADE_DW ? (warp >> 1) * 32 + (lane >> 2) * 4 : lane * 4;
    const int tn = MODE == MADE_DW ? (warp & 1) * 32 + (lane & 3) * 8 : warp * MADE_F32_WARP_N;
    const int wn0 = n0 + warp * MADE_F32_WARP_N;

    const MadeSchedule sc = made_schedule<MODE, MADE_F32_BK>(p, sm.lo, sm.hi, warp, lane, m0, wn0, MADE_F32_WARP_N,
                                                            m0 + (warp >> 1) * 32, 32, n0 + (warp & 1) * 32, 32);
    const int wlo = sc.wlo, whi = sc.whi, steps = sc.steps, r_first = sc.r_first;
    const bool bias_block = sc.bias_block;
    unsigned col_deg, own_deg[4];
    made_loader_degrees<MODE>(p, n0, n0 + (t & 63), &col_deg, own_deg);

    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    float ra[8], rb[4];
    float bias_sum = 0.0f;
    int done = 0;
    if (steps > 0) {
        made_f32_load_a<MODE>(p, m0, r_first, ra);
        made_f32_load_b<MODE>(p, n0, r_first, col_deg, own_deg, rb, &bias_sum);
        made_f32_store_a<MODE>(sm, 0, ra);
        made_f32_store_b<MODE>(sm, 0, rb);
    }
    __syncthreads();
    for (int s = 0; s < steps; ++s) {
        const int buf = s & 1;
        const int r0 = r_first + s * MADE_F32_BK;
        if (s + 1 < steps) {
            made_f32_load_a<MODE>(p, m0, r0 + MADE_F32_BK, ra);
            made_f32_load_b<MODE>(p, n0, r0 + MADE_F32_BK, col_deg, own_deg, rb, &bias_sum);
        }
        if (r0 <= whi && r0 + MADE_F32_BK - 1 >= wlo) {
            ++done;
#pragma unroll
            for (int k = 0; k < MADE_F32_BK; ++k) {
                const float4 av = *reinterpret_cast<const float4*>(&sm.a[buf][k][tm]);
                const float4 b0 = *reinterpret_cast<const float4*>(&sm.b[buf][k][tn]);
                const float4 b1 = *reinterpret_cast<const float4*>(&sm.b[buf][k][tn + 4]);
                const float a4[4] = {av.x, av.y, av.z, av.w};
                const float b8[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a4[i], b8[j], acc[i][j]);
            }
        }
        if (s + 1 < steps) {
            made_f32_store_a<MODE>(sm, buf ^ 1, ra);
            made_f32_store_b<MODE>(sm, buf ^ 1, rb);
        }
        __syncthreads();
    }

    if (p.counter && lane == 0 && done > 0)
        atomicAdd(p.counter, (unsigned long long)done * (unsigned long long)(MADE_BM * MADE_F32_WARP_N * MADE_F32_BK));
    if (MODE == MADE_DW) {
        if (bias_block) made_bias_partial(p, sm.cols, t >> 6, t & 63, bias_sum);
        if (whi < wlo) return;  // a dead sub-tile: its partials are never read
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) made_store<MODE>(p, m0 + tm + i, n0 + tn + j, acc[i][j]);
}

// ---------------------------------------------------------------------------------------------
// bf16 tensor-core GEMM (mma.m16n8k16, f32 accumulation). Warp w = (wm, wn) = (w / 4, w % 4)
// owns rows 64·wm.. (four m16 tiles) and columns 16·wn.. (two n8 tiles) of the block tile:
// 8 mma per k16 step from 16 + 4 fragment registers. Operands are converted to bf16 when staged;
// global memory stays f32.

struct MadeBf16Smem {
    unsigned int a[2][MADE_BM][MADE_BF16_LDW];
    unsigned int b[2][MADE_BN][MADE_BF16_LDW];
    float cols[4 * MADE_BN];
    int lo[MADE_WARPS];
    int hi[MADE_WARPS];
};

// A operand as pairs along the reduction. FWD/DX: (m, r..r+1) adjacent in memory: thread owns
// pair column t & 15 of rows (t >> 4) + 16i. DW: pairs are two rows of X: a warp covers 8 m x 4
// pairs per pass (32-byte segments, and 20·m + q distinct banks when stored).
template <int MODE>
FF_DEVICE void made_bf16_load_a(const MadeGemm& p, int m0, int r0, float ra[16]) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        int m, r;
        if (MODE != MADE_DW) {
            m = m0 + (t >> 4) + 16 * i;
            r = r0 + 2 * (t & 15);
        } else {
            const int combo = warp + 8 * i;
            m = m0 + (combo & 15) * 8 + (lane & 7);
            r = r0 + 2 * ((combo >> 4) * 4 + (lane >> 3));
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v = 0.0f;
            if (m < p.m && r + h < p.r_end) {
                v = MODE != MADE_DW ? p.a[(long long)m * p.r + r + h] : p.a[(long long)(r + h) * p.m + m];
                if (MODE != MADE_DX && p.in_act >= 0) v = ff_act(p.in_act, v);
            }
            ra[2 * i + h] = v;
        }
    }
}

template <int MODE>
FF_DEVICE void made_bf16_store_a(MadeBf16Smem& sm, int buf, const float ra[16]) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        int m, q;
        if (MODE != MADE_DW) {
            m = (t >> 4) + 16 * i;
            q = t & 15;
        } else {
            const int combo = warp + 8 * i;
            m = (combo & 15) * 8 + (lane & 7);
            q = (combo >> 4) * 4 + (lane >> 3);
        }
        sm.a[buf][m][q] = ff_pack_bf16x2(ra[2 * i], ra[2 * i + 1]);
    }
}

// B operand as pairs along the reduction. FWD/DW: two rows of a row-major (r, n) matrix: warp w
// owns columns 8w + (lane & 7), pairs (lane >> 3) + 4i. DX: B[r][n] = W[n][r], pairs adjacent in
// W's row n: thread owns pair column t & 15 of units (t >> 4) + 16i.
template <int MODE>
FF_DEVICE void made_bf16_load_b(const MadeGemm& p, int n0, int r0, unsigned col_deg, const unsigned own_deg[4], float rb[8], float* bias_sum) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int n, r;
        if (MODE != MADE_DX) {
            n = n0 + warp * 8 + (lane & 7);
            r = r0 + 2 * ((lane >> 3) + 4 * i);
        } else {
            n = n0 + (t >> 4) + 16 * i;
            r = r0 + 2 * (t & 15);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v = 0.0f;
            if (n < p.n && r + h < p.r_end) {
                if (MODE != MADE_DX) {
                    v = p.b[(long long)(r + h) * p.n + n];
                    if (MODE == MADE_FWD && !made_live(p.deg_in[r + h], col_deg, p.strict)) v = 0.0f;
                } else {
                    v = p.b[(long long)n * p.r + r + h];
                    if (!made_live(own_deg[i], p.deg_out[r + h], p.strict)) v = 0.0f;
                }
            }
            if (MODE == MADE_DW) *bias_sum += v;
            rb[2 * i + h] = v;
        }
    }
}

template <int MODE>
FF_DEVICE void made_bf16_store_b(MadeBf16Smem& sm, int buf, const float rb[8]) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int n, q;
        if (MODE != MADE_DX) {
            n = warp * 8 + (lane & 7);
            q = (lane >> 3) + 4 * i;
        } else {
            n = (t >> 4) + 16 * i;
            q = t & 15;
        }
        sm.b[buf][n][q] = ff_pack_bf16x2(rb[2 * i], rb[2 * i + 1]);
    }
}

template <int MODE>
FF_DEVICE void made_gemm_bf16(const MadeGemm& p, MadeBf16Smem& sm) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const int g = lane >> 2, tq = lane & 3;
    const int n0 = blockIdx.x * MADE_BN, m0 = blockIdx.y * MADE_BM;
    const int wn0 = n0 + wn * MADE_BF16_WARP_N;

    const MadeSchedule sc = made_schedule<MODE, MADE_BF16_BK>(p, sm.lo, sm.hi, warp, lane, m0, wn0, MADE_BF16_WARP_N,
                                                             m0 + wm * MADE_BF16_WARP_M, MADE_BF16_WARP_M, wn0,
                                                             MADE_BF16_WARP_N);
    const int wlo = sc.wlo, whi = sc.whi, steps = sc.steps, r_first = sc.r_first;
    const bool bias_block = sc.bias_block;
    unsigned col_deg, own_deg[4];
    made_loader_degrees<MODE>(p, n0, n0 + warp * 8 + (lane & 7), &col_deg, own_deg);

    float acc[4][2][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    float ra[16], rb[8];
    float bias_sum = 0.0f;
    int done = 0;
    if (steps > 0) {
        made_bf16_load_a<MODE>(p, m0, r_first, ra);
        made_bf16_load_b<MODE>(p, n0, r_first, col_deg, own_deg, rb, &bias_sum);
        made_bf16_store_a<MODE>(sm, 0, ra);
        made_bf16_store_b<MODE>(sm, 0, rb);
    }
    __syncthreads();
    for (int s = 0; s < steps; ++s) {
        const int buf = s & 1;
        const int r0 = r_first + s * MADE_BF16_BK;
        if (s + 1 < steps) {
            made_bf16_load_a<MODE>(p, m0, r0 + MADE_BF16_BK, ra);
            made_bf16_load_b<MODE>(p, n0, r0 + MADE_BF16_BK, col_deg, own_deg, rb, &bias_sum);
        }
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            const int k0 = r0 + ks * 16;
            if (k0 > whi || k0 + 15 < wlo) continue;  // warp-uniform: no live weight here
            ++done;
            unsigned int af[4][4], bfr[2][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                const int row = wm * MADE_BF16_WARP_M + mt * 16 + g;
                af[mt][0] = sm.a[buf][row][ks * 8 + tq];
                af[mt][1] = sm.a[buf][row + 8][ks * 8 + tq];
                af[mt][2] = sm.a[buf][row][ks * 8 + tq + 4];
                af[mt][3] = sm.a[buf][row + 8][ks * 8 + tq + 4];
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int col = wn * MADE_BF16_WARP_N + nt * 8 + g;
                bfr[nt][0] = sm.b[buf][col][ks * 8 + tq];
                bfr[nt][1] = sm.b[buf][col][ks * 8 + tq + 4];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) ff_mma_m16n8k16_bf16(acc[mt][nt], af[mt], bfr[nt], acc[mt][nt]);
        }
        if (s + 1 < steps) {
            made_bf16_store_a<MODE>(sm, buf ^ 1, ra);
            made_bf16_store_b<MODE>(sm, buf ^ 1, rb);
        }
        __syncthreads();
    }

    if (p.counter && lane == 0 && done > 0)
        atomicAdd(p.counter, (unsigned long long)done * (unsigned long long)(MADE_BF16_WARP_M * MADE_BF16_WARP_N * 16));
    if (MODE == MADE_DW) {
        if (bias_block) made_bias_partial(p, sm.cols, lane >> 3, warp * 8 + (lane & 7), bias_sum);
        if (whi < wlo) return;
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + wm * MADE_BF16_WARP_M + mt * 16 + g + 8 * (e >> 1);
                const int n = wn0 + nt * 8 + 2 * tq + (e & 1);
                made_store<MODE>(p, m, n, acc[mt][nt][e]);
            }
}

// ---------------------------------------------------------------------------------------------
// The GEMM kernels. Grid: x over 64-column tiles of C, y over 128-row tiles; DW adds z over
// chunks of the batch (each chunk writes its own partial sums: the reduction is deterministic).

// Y = act_out?(act_in?(X) · (W⊙M) + b). x: rows x k, w: k x n, y: rows x n. Codes < 0: no act.
#define MADE_MATMUL_KERNEL(NAME, BODY, SMEM)                                                                \
    extern "C" __global__ void __launch_bounds__(MADE_THREADS)                                           \
    NAME(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,         \
         const unsigned* __restrict__ deg_in, const unsigned* __restrict__ deg_out, float* __restrict__ y, \
         int rows, int k, int n, int strict, int in_act, int out_act, unsigned long long* counter) {      \
        __shared__ __align__(16) SMEM sm;                                                                  \
        MadeGemm p;                                                                                        \
        p.a = x; p.b = w; p.bias = bias; p.pre = nullptr; p.c = y;                                          \
        p.deg_in = deg_in; p.deg_out = deg_out; p.counter = counter;                                       \
        p.m = rows; p.n = n; p.r = k;                                                                      \
        p.strict = strict; p.in_act = in_act; p.out_act = out_act; p.accumulate = 0;                      \
        p.r_begin = 0; p.r_end = k;                                                                        \
        BODY<MADE_FWD>(p, sm);                                                                             \
    }

// dX = (dY · (W⊙M)ᵀ) ⊙ act'(pre) [+ dX]. dy: rows x n, w: k x n, pre/dx: rows x k. `pre` null:
// no activation derivative (the first layer); `accumulate`: add to what dx holds.
#define MADE_DX_KERNEL(NAME, BODY, SMEM)                                                                    \
    extern "C" __global__ void __launch_bounds__(MADE_THREADS)                                           \
    NAME(const float* __restrict__ dy, const float* __restrict__ w, const unsigned* __restrict__ deg_in,    \
         const unsigned* __restrict__ deg_out, const float* __restrict__ pre, float* dx, int rows, int k,   \
         int n, int strict, int act, int accumulate, unsigned long long* counter) {                        \
        __shared__ __align__(16) SMEM sm;                                                                  \
        MadeGemm p;                                                                                        \
        p.a = dy; p.b = w; p.bias = nullptr; p.pre = pre; p.c = dx;                                         \
        p.deg_in = deg_in; p.deg_out = deg_out; p.counter = counter;                                       \
        p.m = rows; p.n = k; p.r = n;                                                                      \
        p.strict = strict; p.in_act = act; p.out_act = -1; p.accumulate = accumulate;                     \
        p.r_begin = 0; p.r_end = n;                                                                        \
        BODY<MADE_DX>(p, sm);                                                                              \
    }

// Partial dW = act_in?(X)ᵀ · dY and db = column sums of dY over the rows of chunk blockIdx.z.
// x: rows x k, dy: rows x n, partial: chunks x (k + 1) x n (row k holds db).
#define MADE_DW_KERNEL(NAME, BODY, SMEM)                                                                    \
    extern "C" __global__ void __launch_bounds__(MADE_THREADS)                                           \
    NAME(const float* __restrict__ x, const float* __restrict__ dy, const unsigned* __restrict__ deg_in,   \
         const unsigned* __restrict__ deg_out, float* __restrict__ partial, int rows, int k, int n,         \
         int strict, int in_act, int chunk_rows, unsigned long long* counter) {                            \
        __shared__ __align__(16) SMEM sm;                                                                  \
        MadeGemm p;                                                                                        \
        p.a = x; p.b = dy; p.bias = nullptr; p.pre = nullptr; p.c = partial;                                \
        p.deg_in = deg_in; p.deg_out = deg_out; p.counter = counter;                                       \
        p.m = k; p.n = n; p.r = rows;                                                                      \
        p.strict = strict; p.in_act = in_act; p.out_act = -1; p.accumulate = 0;                           \
        p.r_begin = (int)blockIdx.z * chunk_rows;                                                          \
        p.r_end = min(rows, p.r_begin + chunk_rows);                                                       \
        BODY<MADE_DW>(p, sm);                                                                              \
    }

MADE_MATMUL_KERNEL(made_matmul_f32, made_gemm_f32, MadeF32Smem)
MADE_MATMUL_KERNEL(made_matmul_bf16, made_gemm_bf16, MadeBf16Smem)
MADE_DX_KERNEL(made_matmul_dx_f32, made_gemm_f32, MadeF32Smem)
MADE_DX_KERNEL(made_matmul_dx_bf16, made_gemm_bf16, MadeBf16Smem)
MADE_DW_KERNEL(made_matmul_dw_f32, made_gemm_f32, MadeF32Smem)
MADE_DW_KERNEL(made_matmul_dw_bf16, made_gemm_bf16, MadeBf16Smem)

// dW[i][j] = Σ_chunks partial (dead weights exactly 0), db[j] = Σ_chunks of row k. Partials are
// added in chunk order in f64: the result does not depend on the schedule.
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
made_grad_reduce_f32(const float* __restrict__ partial, const unsigned* __restrict__ deg_in,
                     const unsigned* __restrict__ deg_out, float* __restrict__ dw, float* __restrict__ db,
                     int k, int n, int chunks, int strict) {
    const long long plane = (long long)(k + 1) * n;
    FF_GRID_STRIDE(i, plane) {
        const int row = (int)(i / n), col = (int)(i % n);
        if (row < k && !made_live(deg_in[row], deg_out[col], strict)) {
            dw[i] = 0.0f;
            continue;
        }
        double s = 0.0;
        for (int c = 0; c < chunks; ++c) s += (double)partial[c * plane + i];
        if (row < k) dw[i] = (float)s;
        else db[col] = (float)s;
    }
}

// ---------------------------------------------------------------------------------------------
// The affine transform on the MADE output o = [b | raw s] (rows x 2D, the data's column order):
//   Inverse (dir 1, MAF density):  y = (x - b)·exp(-s), logdet = -Σ s   (eq. 18.18)
//   Forward (dir 0, IAF sampling): y = x·exp(s) + b,    logdet = +Σ s   (eq. 18.19)
// with s = clamp·tanh(raw/clamp). One warp per row; the log-det is a warp-tree sum.
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
made_ar_transform_f32(const float* __restrict__ o, const float* __restrict__ x, float* __restrict__ y,
                      float* __restrict__ ld, int rows, int d, float clamp, int dir) {
    const int lane = threadIdx.x % FF_WARP;
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / FF_WARP;
    if (row >= rows) return;  // whole warps leave together
    const float* orow = o + row * 2 * d;
    float acc = 0.0f;
    for (int j = lane; j < d; j += FF_WARP) {
        const float b = orow[j];
        const float s = ff_soft_clamp(orow[d + j], clamp);
        const float g = x[row * d + j];
        y[row * d + j] = dir == 0 ? g * expf(s) + b : (g - b) * expf(-s);
        acc += dir == 0 ? s : -s;
    }
    acc = ff_warp_sum(acc);
    if (lane == 0) ld[row] = acc;
}

// Backward of made_ar_transform_f32: from dL/dy (g_out) and dL/dlogdet (g_ld) to the direct
// part of dL/dx and dL/do (rows x 2D). With t = tanh(raw/clamp), ds/draw = 1 - t²:
//   Forward: dx = go·e^s,  db = go,        draw = (go·x·e^s + gl)·(1 - t²)
//   Inverse: dx = go·e^-s, db = -go·e^-s,  draw = (-go·y - gl)·(1 - t²),  y = (x - b)·e^-s
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
made_ar_transform_bwd_f32(const float* __restrict__ o, const float* __restrict__ x, const float* __restrict__ g_out,
                          const float* __restrict__ g_ld, float* __restrict__ dx, float* __restrict__ d_o, int rows,
                          int d, float clamp, int dir) {
    FF_GRID_STRIDE(i, (long long)rows * d) {
        const long long r = i / d;
        const int j = (int)(i % d);
        const float* orow = o + r * 2 * d;
        const float b = orow[j];
        const float th = ff_tanh(orow[d + j] / clamp);
        const float s = clamp * th;
        const float dsdraw = 1.0f - th * th;
        const float go = g_out[i], gl = g_ld[r], xv = x[i];
        float* drow = d_o + r * 2 * d;
        if (dir == 0) {
            const float e = expf(s);
            dx[i] = go * e;
            drow[j] = go;
            drow[d + j] = (go * xv * e + gl) * dsdraw;
        } else {
            const float e = expf(-s);
            const float out = (xv - b) * e;
            dx[i] = go * e;
            drow[j] = -go * e;
            drow[d + j] = (-go * out - gl) * dsdraw;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sequential transform. Derivation (as in the CPU reference): a hidden unit of degree c
// depends only on inputs of degree <= c, an output of degree c only on inputs of degree < c. So
// at step k = 1..D: (1) the outputs (b, raw s) of degree k read last-hidden units of degree < k,
// all finished; (2) they give the MADE input of degree k; (3) then the units of degree k of
// hidden layer 1, 2, ... are finished in turn. Every unit is computed once: the cost is one
// masked pass, done in one launch.
//
// A block owns MADE_SEQ_ROWS (or fewer) rows and keeps in shared memory the rows' MADE input
// in degree order (given values, overwritten by the results as they are known), every hidden
// layer's activations and the current (b, raw s). Weights are read from global memory (L2) in a
// layout packed by made_seq_pack_f32: unit-major (a unit's live prefix is contiguous) and in
// degree order (inputs by degree, outputs as [b, raw s] pairs by degree).
//
// A dot product over a prefix of length P for 8 rows is one warp item: lane = (row 8·item + l/4,
// split l%4); split j adds inputs j, j+4, ... and two shuffles combine the four splits. Rows are
// laid out with a stride of 4 mod 32 floats, so the 32 lanes read 32 distinct banks.

#define MADE_SEQ_MAX_HIDDEN 3

// Row stride (floats) of a shared buffer of `width` units: a multiple of 32 plus 4.
FF_DEVICE int made_seq_stride(int width) { return ((width + 31) / 32) * 32 + 4; }

// The degree-order index of data column j with degree k: k - 1, or j itself for a degree outside
// 1..d (wrong degrees give wrong numbers, never an access out of bounds).
FF_DEVICE int made_seq_col(unsigned k, int d, int j) { return (k >= 1u && k <= (unsigned)d) ? (int)k - 1 : j; }

extern __shared__ float ff_smem[];

// acc = Σ_{a < len} w[a]·src[row·stride + a] over a warp item; the result in every lane.
FF_DEVICE float made_seq_dot(const float* __restrict__ w, const float* src, int stride, int row, int len, int split) {
    float acc = 0.0f;
    const float* s = src + row * stride;
#pragma unroll 4
    for (int a = split; a < len; a += 4) acc = fmaf(w[a], s[a], acc);
    acc += __shfl_xor_sync(FF_FULL_MASK, acc, 1);
    acc += __shfl_xor_sync(FF_FULL_MASK, acc, 2);
    return acc;
}

// One of three per-layer values, chosen without an indexed local array (which would live in
// local memory: ptxas counts it as a spill).
template <typename T>
FF_DEVICE T made_pick(int l, T a, T b, T c) { return l == 0 ? a : (l == 1 ? b : c); }

// The rows of a block: x, y are rows x d (the data's column order); ld is rows x 1.
// wt: packed weights (layer l at offset woff_l, unit-major; the output layer's [b, raw s] bias
// pairs at woff_{nh+1}); bh*: hidden biases (unit order = degree order already); deg0: input
// degrees; hd*: hidden degrees (sorted); h*: hidden widths (0 past nh).
extern "C" __global__ void __launch_bounds__(MADE_THREADS)
made_seq_f32(const float* __restrict__ x, float* __restrict__ y, float* __restrict__ ld, int rows, int d,
             const float* __restrict__ wt, int woff1, int woff2, int woff3, int woff4,
             const float* __restrict__ bh0, const float* __restrict__ bh1, const float* __restrict__ bh2,
             const unsigned* __restrict__ deg0, const unsigned* __restrict__ hd0, const unsigned* __restrict__ hd1,
             const unsigned* __restrict__ hd2, int h0, int h1, int h2, int nh, int act, float clamp, int dir,
             int block_rows) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int row0 = blockIdx.x * block_rows;
    const int groups = block_rows / 8;  // 8-row groups per block
    const int dd = d + 2;               // entries per layer of `first`

    // Shared layout: u (rows x su), h_0, h_1, h_2 (rows x sh_l each, absent layers empty),
    // o (rows x 2), then ints first[l][k] = first unit of hidden layer l with degree >= k,
    // k = 0..d+1.
    const int su = made_seq_stride(d);
    const int sh0 = nh > 0 ? made_seq_stride(h0) : 0;
    const int sh1 = nh > 1 ? made_seq_stride(h1) : 0;
    const int sh2 = nh > 2 ? made_seq_stride(h2) : 0;
    float* u = ff_smem;
    float* hb0 = u + block_rows * su;
    float* hb1 = hb0 + block_rows * sh0;
    float* hb2 = hb1 + block_rows * sh1;
    float* o = hb2 + block_rows * sh2;
    int* first = reinterpret_cast<int*>(o + block_rows * 2);

    // Given values into u in degree order; hidden buffers zeroed (finite even for bad degrees).
    for (int i = t; i < block_rows * d; i += MADE_THREADS) {
        const int r = i / d, j = i % d;
        const int col = made_seq_col(deg0[j], d, j);
        u[r * su + col] = row0 + r < rows ? x[(long long)(row0 + r) * d + j] : 0.0f;
    }
    for (int i = t; i < block_rows * (sh0 + sh1 + sh2); i += MADE_THREADS) hb0[i] = 0.0f;
    for (int i = t; i < nh * dd; i += MADE_THREADS) {
        const int l = i / dd, k = i % dd;
        const unsigned* deg = made_pick(l, hd0, hd1, hd2);
        int lo = 0, hi = made_pick(l, h0, h1, h2);
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (deg[mid] < (unsigned)k) lo = mid + 1;
            else hi = mid;
        }
        first[i] = lo;
    }
    __syncthreads();

    double ld_acc = 0.0;
    const int lrow = lane >> 2, split = lane & 3;
    // The output layer reads the last hidden layer (or the inputs when there is none).
    const int out_in = nh > 0 ? made_pick(nh - 1, h0, h1, h2) : d;
    const float* out_src = nh > 0 ? made_pick(nh - 1, hb0, hb1, hb2) : u;
    const int out_stride = nh > 0 ? made_pick(nh - 1, sh0, sh1, sh2) : su;
    const int woff_out = nh == 0 ? 0 : made_pick(nh - 1, woff1, woff2, woff3);
    const int woff_bias = nh == 0 ? woff1 : (nh == 1 ? woff2 : (nh == 2 ? woff3 : woff4));
    for (int k = 1; k <= d; ++k) {
        // (1) b and raw s of degree k: packed output units 2(k-1), 2(k-1)+1, reading the
        // units of the last hidden layer (or inputs) of degree < k.
        const int p_out = nh > 0 ? first[(nh - 1) * dd + k] : k - 1;
        for (int item = warp; item < 2 * groups; item += MADE_WARPS) {
            const int unit = item / groups, row = (item % groups) * 8 + lrow;
            const int c = 2 * (k - 1) + unit;
            const float v = made_seq_dot(wt + woff_out + (long long)c * out_in, out_src, out_stride, row, p_out, split);
            if (split == 0) o[row * 2 + unit] = v + wt[woff_bias + c];
        }
        __syncthreads();
        // (2) the MADE input of degree k.
        if (t < block_rows) {
            const float b = o[t * 2];
            const float s = ff_soft_clamp(o[t * 2 + 1], clamp);
            const float g = u[t * su + k - 1];
            u[t * su + k - 1] = dir == 0 ? g * expf(s) + b : (g - b) * expf(-s);
            ld_acc += dir == 0 ? (double)s : -(double)s;
        }
        __syncthreads();
        // (3) hidden units of degree k, layer by layer (none has degree d).
        if (k < d) {
            for (int l = 0; l < nh; ++l) {
                const int c0 = first[l * dd + k], c1 = first[l * dd + k + 1];
                const int width_in = l == 0 ? d : made_pick(l - 1, h0, h1, h2);
                const int p_in = l == 0 ? k : first[(l - 1) * dd + k + 1];
                const float* src = l == 0 ? u : made_pick(l - 1, hb0, hb1, hb2);
                const int sstride = l == 0 ? su : made_pick(l - 1, sh0, sh1, sh2);
                float* dst = made_pick(l, hb0, hb1, hb2);
                const int dstride = made_pick(l, sh0, sh1, sh2);
                const float* w = wt + (l == 0 ? 0 : made_pick(l - 1, woff1, woff2, woff3));
                const float* bias = made_pick(l, bh0, bh1, bh2);
                for (int item = warp; item < (c1 - c0) * groups; item += MADE_WARPS) {
                    const int c = c0 + item / groups, row = (item % groups) * 8 + lrow;
                    const float v = made_seq_dot(w + (long long)c * width_in, src, sstride, row, p_in, split);
                    if (split == 0) dst[row * dstride + c] = ff_act(act, v + bias[c]);
                }
                __syncthreads();
            }
        }
    }

    // Results back in the data's column order.
    for (int i = t; i < block_rows * d; i += MADE_THREADS) {
        const int r = i / d, j = i % d;
        const int col = made_seq_col(deg0[j], d, j);
        if (row0 + r < rows) y[(long long)(row0 + r) * d + j] = u[r * su + col];
    }
    if (t < block_rows && row0 + t < rows) ld[row0 + t] = (float)ld_acc;
}

// Packs the weights for made_seq_f32: layer l (in_l x out_l, row-major, in the data's order)
// becomes unit-major wt[woff[l] + c'·in_l + a'] with a' the degree-order input index (layer 0:
// deg0[a] - 1) and c' the degree-order output index (output layer: 2(deg0[j] - 1) + half for
// output j + half·d). The output bias follows at woff[nh + 1]. Written as a scatter from the
// source (deg0 is the map source -> destination; entries it misses stay zero).
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
made_seq_pack_f32(const float* __restrict__ w0, const float* __restrict__ w1, const float* __restrict__ w2,
                  const float* __restrict__ w3, const float* __restrict__ bo, float* __restrict__ wt,
                  const unsigned* __restrict__ deg0, int d, int nh, int h0, int h1, int h2) {
    const int width[MADE_SEQ_MAX_HIDDEN + 2] = {d, h0, h1, h2, 0};
    const float* src[MADE_SEQ_MAX_HIDDEN + 1] = {w0, w1, w2, w3};
    // Layer l maps width[l] -> width[l + 1], except the output layer (l = nh) -> 2d.
    long long off[MADE_SEQ_MAX_HIDDEN + 2];
    off[0] = 0;
    for (int l = 0; l <= nh; ++l) {
        const int out = l == nh ? 2 * d : width[l + 1];
        off[l + 1] = off[l] + (long long)width[l] * out;
    }
    const long long total = off[nh + 1] + 2 * d;
    FF_GRID_STRIDE(e, total) {
        if (e >= off[nh + 1]) {
            const int c = (int)(e - off[nh + 1]);
            const int j = c % d, half = c / d;
            const int kk = made_seq_col(deg0[j], d, j);
            wt[off[nh + 1] + 2 * kk + half] = bo[c];
            continue;
        }
        int l = 0;
        while (e >= off[l + 1]) ++l;
        const int in = width[l];
        const int out = l == nh ? 2 * d : width[l + 1];
        const long long local = e - off[l];
        int a = (int)(local / out), c = (int)(local % out);
        const float v = src[l][local];
        if (l == 0) a = made_seq_col(deg0[a], d, a);
        if (l == nh) {
            const int j = c % d, half = c / d;
            const int kk = made_seq_col(deg0[j], d, j);
            c = 2 * kk + half;
        }
        wt[off[l] + (long long)c * in + a] = v;
    }
}
