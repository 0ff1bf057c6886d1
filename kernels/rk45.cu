// Continuous flows on the GPU (eq. 18.22–18.30): the vector-field MLP [z, t] -> hidden... -> D
// evaluated together with its forward-mode JVPs (the divergence, exactly by the D unit vectors
// or by Hutchinson's estimator with M probes), its reverse pass (the VJP of the augmented
// dynamics with the divergence cotangent, parameter gradients reduced deterministically), and
// the stage and step-control kernels of a device-resident Dormand–Prince RK45 (src/ode/device.rs).
// The CPU references are src/ops/rk45/{cpu,pass,step_cpu}.rs; the contracts are in
// src/ops/rk45/{mod,step}.rs.
//
// ---------------------------------------------------------------------------------------------
// The field kernels (rk45_field_f32, rk45_field_vjp_f32)
//
// A block owns a tile of R rows at a time (grid-stride over tiles, so a few hundred persistent
// blocks cover any batch) and keeps everything of the tile in shared memory. A row contributes
// S = 1 + K "streams": the primal [z, t] and K tangents [v_k, 0] (K = 0 for the field alone,
// D unit vectors for the exact trace, M probes for Hutchinson). Streams are stacked stream-major
// (row s·R + r), so every layer is one GEMM of R·S rows by the layer's width:
//   primal:   a = h·W + b,  h' = σ(a)
//   tangents: ȧ = ḣ·W,      ḣ' = σ'(a) ⊙ ȧ          (the JVP; J·v_k after the last layer)
// and the divergence of row r is α·Σ_k v_k·(J v_k), α = 1 (exact) or 1/M. The exact trace uses
// the D unit-vector tangents (not the CPU reference's closed form for <= 2 hidden layers), so
// it costs D extra streams. The VJP kernel keeps every layer (h, ḣ, ȧ, σ', σ'') and runs the
// reverse pass of Φ = a·f − c·div through both chains (src/ops/rk45/pass.rs has the equations):
//   ā_{l−1} = σ' ⊙ (ā_l W_lᵀ) + σ'' ⊙ Σ_k (ǡ_{l,k} W_lᵀ) ⊙ ȧ_{l−1,k},  ǡ_{l−1,k} = σ' ⊙ (ǡ_{l,k} W_lᵀ)
//   W̄_l += Σ_rows w_r·(h_lᵀ ā_l + Σ_k ḣ_{l,k}ᵀ ǡ_{l,k}),  b̄_l += Σ_rows w_r·ā_l.
// Parameter gradients go to per-block f64 partials (block b adds its tiles into slot b, in tile
// order) and rk45_reduce_partials_f32 sums the slots in a fixed order: deterministic.
//
// Tiling for an H200 (sm_90). Every product is the same register-tiled GEMM (rk_gemm): a thread
// owns 4 rows x 4 columns of the output, the columns strided by N/4 so that neighbouring lanes
// read neighbouring weights (conflict-free), the 4 rows shared by the lanes of a column group
// (broadcast reads); per reduction step 8 shared loads feed 16 FMAs. Weights are staged in
// shared memory once per block when they fit (a 3->64->64->2 field is 18 KiB) with odd row
// strides, so that the transposed reads of the reverse pass (W_lᵀ: lanes walk a column of W)
// hit 32 different banks; activations use odd strides too. The launch code picks R (at most
// 64 rows, R·S <= 128 stacked rows, so that a 64-wide layer has >= 256 micro-tiles for the 256
// threads) as large as fits in ~113 KiB of shared memory, and __launch_bounds__(256, 2) keeps
// registers at <= 128 so that two blocks (16 warps) are resident per SM. For 3->64->64->2: the
// field alone at R = 64 takes 51 KiB, with the exact trace (2 tangents) R = 32 and 68 KiB, the
// VJP with 2 tangents R = 16 and 100 KiB (48 stacked rows: 192 micro-tiles for 256 threads, the
// price of keeping every layer for the reverse pass on chip). Wider fields stream the weights
// from L2 instead of staging them. No speed has been measured on hardware here:
// benches/gpu_rk45.rs does that.
//
// ---------------------------------------------------------------------------------------------
// The step kernels
//
// Per-row solver state: a rows x 16 f32 matrix (columns in src/ops/rk45/step.rs, `col`). Stage
// combination, error norm, controller and update are element- or row-wise passes: the stage
// kernel is one pass over y and the stage derivatives so far; the step end reads y, y_new and
// k_0..k_6 once (error norm, controller, dense output, y <- y_new, k_0 <- k_6 in the same pass).
// Rows narrower than 32 are one thread each; wider rows one warp each. Error norms, the
// controller and the starting step run in f64 (per row: negligible), with fused multiply-adds
// where the CPU reference uses mul_add, so that the two agree to the last bit on the emulator.

#include "common.cuh"

#define RK_THREADS 256
#define RK_REDUCE_THREADS 1024
#define RK_STATE_COLS 16

// State columns (src/ops/rk45/step.rs `col`).
#define RK_T 0
#define RK_T_END 1
#define RK_DIR 2
#define RK_H_ABS 3
#define RK_H 4
#define RK_T_NEW 5
#define RK_ERR 6
#define RK_ACCEPTED 7
#define RK_REJECTED 8
#define RK_LAST_REJECTED 9
#define RK_PREV_ERR 10
#define RK_STATUS 11
#define RK_VERDICT 12
#define RK_NEXT_EVAL 13

#define RK_ACTIVE 0.0f
#define RK_DONE 1.0f
#define RK_NONFINITE 2.0f
#define RK_UNDERFLOW 3.0f
#define RK_MAXSTEPS 4.0f

#define RK_PHASE_ERROR 1
#define RK_PHASE_DECIDE 2
#define RK_PHASE_UPDATE 4

// Direction modes of the field kernels.
#define RK_DIR_NONE 0
#define RK_DIR_EXACT 1
#define RK_DIR_PROBES 2
#define RK_DIR_GENERATED 3

// Codes of the non-finite input report (src/ops/rk45/cuda.rs `BadInput`).
#define RK_BAD_Z 1
#define RK_BAD_T 2
#define RK_BAD_PROBES 3
#define RK_BAD_A 4
#define RK_BAD_ADIV 5
#define RK_BAD_WEIGHTS 6

extern __shared__ float ff_smem[];

// ---------------------------------------------------------------------------------------------
// Small helpers.

FF_DEVICE double rk_bits_to_double(long long b) { return __longlong_as_double(b); }

FF_DEVICE bool rk_finite(float v) { return !(isnan(v) || isinf(v)); }
FF_DEVICE bool rk_finite_d(double v) { return !(isnan(v) || isinf(v)); }

// Odd row strides: rows that differ by one start in different banks, and a column walk
// (stride ld) visits 32 distinct banks.
FF_DEVICE int rk_ld(int w) { return w | 1; }
FF_DEVICE int rk_round4(int n) { return (n + 3) & ~3; }

// The first non-finite input seen (smallest code, then index) for the op's error message:
// atomicMax of the complement, so that an untouched (zero) report means "none".
FF_DEVICE void rk_report_bad(unsigned long long* bad, int code, long long index) {
    if (bad) {
        const unsigned long long key = ((unsigned long long)code << 40) | (unsigned long long)index;
        atomicMax(bad, ~key);
    }
}

// σ, σ' and σ'' at the pre-activation x with one exponential (codes of Activation::code()).
FF_DEVICE void rk_act(int code, float x, float* s, float* d1, float* d2) {
    switch (code) {
        case 0:
            *s = fmaxf(x, 0.0f);
            *d1 = x > 0.0f ? 1.0f : 0.0f;
            *d2 = 0.0f;
            break;
        case 1: {
            const float t = ff_tanh(x);
            const float q = 1.0f - t * t;
            *s = t;
            *d1 = q;
            *d2 = -2.0f * t * q;
            break;
        }
        case 2: {
            const float g = ff_sigmoid(x);
            *s = x * g;
            *d1 = g * (1.0f + x * (1.0f - g));
            *d2 = g * (1.0f - g) * (2.0f + x * (1.0f - 2.0f * g));
            break;
        }
        default: {
            const float g = ff_sigmoid(x);
            *s = ff_softplus(x);
            *d1 = g;
            *d2 = g * (1.0f - g);
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hutchinson probes from the counter hash of src/ops/rk45/probes.rs, bit for bit: splitmix64's
// finaliser twice, then a sign (Rademacher) or Box–Muller in f64 (Gaussian) with the
// reference's own ln and cos (fixed fma polynomials: the same bits on every device).

FF_DEVICE unsigned long long rk_mix(unsigned long long x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// ln x for a normal x > 0 (src/ops/rk45/probes.rs `portable_ln`, operation for operation).
FF_DEVICE double rk_ln(double x) {
    const unsigned long long bits = (unsigned long long)__double_as_longlong(x);
    long long e = (long long)((bits >> 52) & 0x7FFull) - 1023;
    double m = __longlong_as_double((long long)((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull));
    if (m > 1.41421356237309504880168872420969808) {
        m *= 0.5;
        e += 1;
    }
    const double s = (m - 1.0) / (m + 1.0);
    const double z = s * s;
    double p = 1.0 / 27.0;
    for (int k = 12; k >= 1; --k) p = fma(p, z, 1.0 / (double)(2 * k + 1));
    const double t = fma(s * z, p, s);
    return fma((double)e, 0.693147180559945309417232121458176568, 2.0 * t);
}

// k! for k = 0..19, exact in f64.
FF_DEVICE double rk_factorial(int k) {
    double f = 1.0;
    for (int i = 2; i <= k; ++i) f *= (double)i;
    return f;
}

// cos(2π·v/2^32) (src/ops/rk45/probes.rs `portable_cos_turns`, operation for operation).
FF_DEVICE double rk_cos_turns(unsigned int v) {
    const unsigned int quadrant = v >> 30;
    const double r = (double)(v & 0x3FFFFFFFu) / 1073741824.0;
    const bool swap = r > 0.5;
    const double x = 1.57079632679489661923132169163975144 * (swap ? 1.0 - r : r);
    const double y = -(x * x);
    double ts = 1.0 / rk_factorial(19);
    for (int k = 8; k >= 1; --k) ts = fma(ts, y, 1.0 / rk_factorial(2 * k + 1));
    const double sn = fma(x * y, ts, x);
    double tc = 1.0 / rk_factorial(18);
    for (int k = 8; k >= 1; --k) tc = fma(tc, y, 1.0 / rk_factorial(2 * k));
    const double cs = fma(y, tc, 1.0);
    const double sin_phi = swap ? cs : sn, cos_phi = swap ? sn : cs;
    switch (quadrant) {
        case 0: return cos_phi;
        case 1: return -sin_phi;
        case 2: return -cos_phi;
        default: return sin_phi;
    }
}

FF_DEVICE float rk_probe(int kind, unsigned long long seed, unsigned long long n) {
    const unsigned long long h = rk_mix(rk_mix(n + 0x9E3779B97F4A7C15ull) ^ seed);
    if (kind == 0) return (h >> 63) == 0ull ? 1.0f : -1.0f;
    const double u1 = ((double)(h >> 32) + 0.5) / 4294967296.0;
    const double radius = sqrt(-2.0 * rk_ln(u1));
    return (float)(radius * rk_cos_turns((unsigned int)(h & 0xFFFFFFFFull)));
}

// out (rows x cols) = the probes of row ids[r] (or r), counter id·cols + c.
extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_probes_f32(float* __restrict__ out, int rows, int cols, int kind, long long seed, const float* __restrict__ ids) {
    FF_GRID_STRIDE(i, (long long)rows * cols) {
        const long long r = i / cols;
        const long long c = i % cols;
        const long long id = ids ? (long long)ids[r] : r;
        out[i] = rk_probe(kind, (unsigned long long)seed, (unsigned long long)(id * cols + c));
    }
}

// ---------------------------------------------------------------------------------------------
// The register-tiled GEMM of one block: C[m][n] = Σ_k A(m, k)·B(k, n) for m < M, n < N,
// handed to `store(m, n, value)`. Thread micro-tile: rows 4·mt..4·mt+3 by columns nt + j·NT
// (j < 4, NT = ceil(N/4)), tiles dealt round-robin with the column tile fastest. Out-of-range
// rows and columns are clamped for the loads and skipped by the store.

template <class LoadA, class LoadB, class Store>
FF_DEVICE void rk_gemm(int M, int N, int K, const LoadA& load_a, const LoadB& load_b, const Store& store) {
    const int nt_count = (N + 3) >> 2;
    const int mt_count = (M + 3) >> 2;
    const int tiles = nt_count * mt_count;
    for (int tile = threadIdx.x; tile < tiles; tile += blockDim.x) {
        const int m0 = (tile / nt_count) * 4;
        const int n0 = tile % nt_count;
        int mi[4], ni[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            mi[i] = min(m0 + i, M - 1);
            ni[i] = min(n0 + i * nt_count, N - 1);
        }
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
        for (int k = 0; k < K; ++k) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = load_a(mi[i], k);
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = load_b(k, ni[j]);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int m = m0 + i, n = n0 + j * nt_count;
                if (m < M && n < N) store(m, n, acc[i][j]);
            }
    }
}

// ---------------------------------------------------------------------------------------------
// The network and the tile layout (mirrored by `FieldLayout` in src/ops/rk45/cuda.rs).

// The network. Its per-layer arrays are indexed by the layer loop variable, so they sit in the
// (L1-cached) stack frame; they are read once per layer, never in the inner loops.
struct RkNet {
    const float* w[4];
    const float* b[4];
    int ldw[4];  // row stride of w[l] (its width in global memory, odd when staged)
    int n[5];    // widths: n[0] = D + 1, ..., n[nl] = D
    int nl;
    int act;
};

FF_DEVICE int rk_max_out(const RkNet& net) {
    int m = 1;
    for (int l = 1; l <= net.nl; ++l) m = max(m, net.n[l]);
    return m;
}

// Copies the weights into shared memory at `base` (odd strides) and points the net at them.
// Returns the floats used.
FF_DEVICE int rk_stage_weights(RkNet& net, float* base) {
    int off = 0;
    for (int l = 0; l < net.nl; ++l) {
        const int nin = net.n[l], nout = net.n[l + 1], ld = rk_ld(nout);
        const float* gw = net.w[l];
        const float* gb = net.b[l];
        float* w = base + off;
        for (int i = threadIdx.x; i < nin * nout; i += blockDim.x) w[(i / nout) * ld + i % nout] = gw[i];
        off += rk_round4(nin * ld);
        float* b = base + off;
        for (int i = threadIdx.x; i < nout; i += blockDim.x) b[i] = gb[i];
        off += rk_round4(nout);
        net.w[l] = w;
        net.b[l] = b;
        net.ldw[l] = ld;
    }
    return off;
}

FF_DEVICE RkNet rk_net(const float* w0, const float* b0, const float* w1, const float* b1, const float* w2,
                       const float* b2, const float* w3, const float* b3, int n0, int n1, int n2, int n3, int n4,
                       int nl, int act) {
    RkNet net;
    net.w[0] = w0; net.w[1] = w1; net.w[2] = w2; net.w[3] = w3;
    net.b[0] = b0; net.b[1] = b1; net.b[2] = b2; net.b[3] = b3;
    net.n[0] = n0; net.n[1] = n1; net.n[2] = n2; net.n[3] = n3; net.n[4] = n4;
    for (int l = 0; l < 4; ++l) net.ldw[l] = net.n[l + 1];
    net.nl = nl;
    net.act = act;
    return net;
}

// Everything about where a row's directions come from.
struct RkDirs {
    int mode;  // RK_DIR_*
    int k;     // directions per row
    int dim;
    const float* probes;  // rows x (k·dim)
    int kind;
    unsigned long long seed;
    const float* ids;  // caller rows (generated probes); null: the batch row
};

// Component j of direction q of batch row `row` (j < dim).
FF_DEVICE float rk_direction(const RkDirs& d, long long row, int q, int j, unsigned long long* bad) {
    if (d.mode == RK_DIR_EXACT) return q == j ? 1.0f : 0.0f;
    const long long cols = (long long)d.k * d.dim;
    if (d.mode == RK_DIR_PROBES) {
        const long long idx = row * cols + (long long)q * d.dim + j;
        const float v = d.probes[idx];
        if (!rk_finite(v)) rk_report_bad(bad, RK_BAD_PROBES, idx);
        return v;
    }
    const long long id = d.ids ? (long long)d.ids[row] : row;
    return rk_probe(d.kind, d.seed, (unsigned long long)(id * cols + (long long)q * d.dim + j));
}

// The stacked input of a tile: rows r < R hold [z, t], rows (q + 1)·R + r hold [v_q, 0];
// rows past the batch are zero.
FF_DEVICE void rk_load_input(float* x0, int ldx, int R, int S, long long row0, int rows, const float* zsrc, int ldz,
                             int zoff, const float* t, const RkDirs& dirs, unsigned long long* bad) {
    const int dim = dirs.dim;
    const int n0 = dim + 1;
    for (int i = threadIdx.x; i < R * S * n0; i += blockDim.x) {
        const int m = i / n0, j = i % n0;
        const int s = m / R, r = m % R;
        const long long row = row0 + r;
        float v = 0.0f;
        if (row < rows) {
            if (s == 0) {
                if (j < dim) {
                    v = zsrc[row * ldz + zoff + j];
                    if (!rk_finite(v)) rk_report_bad(bad, RK_BAD_Z, row * dim + j);
                } else {
                    v = t[row];
                    if (!rk_finite(v)) rk_report_bad(bad, RK_BAD_T, row);
                }
            } else if (j < dim) {
                v = rk_direction(dirs, row, s - 1, j, bad);
            }
        }
        x0[m * ldx + j] = v;
    }
}

// One layer's GEMM for the stacked rows: out = in·W_l (+ b_l on the primal rows), rows m < R to
// `prim` and rows m >= R to `tan` (row m − R), both with stride ldo.
FF_DEVICE void rk_layer_forward(const RkNet& net, int l, const float* in, int ldi, int R, int S, float* prim, float* tan,
                                int ldo) {
    const float* w = net.w[l];
    const float* b = net.b[l];
    const int ldw = net.ldw[l];
    rk_gemm(
        R * S, net.n[l + 1], net.n[l],
        [=](int m, int k) { return in[m * ldi + k]; },
        [=](int k, int n) { return w[k * ldw + n]; },
        [=](int m, int n, float v) {
            if (m < R)
                prim[m * ldo + n] = v + b[n];
            else
                tan[(m - R) * ldo + n] = v;
        });
}

// ---------------------------------------------------------------------------------------------
// rk45_field_f32: f (and the divergence when K > 0) of `rows` rows. z is read at
// zsrc[row·ldz + zoff + j], t at t[row]; f is written to out_f[row·ldf + foff + j] and
// dsign·div to out_d[row·ldd + doff]. Layout (floats): [weights] X0 (R·S x ld(n0)), P, Q
// (R·S x ld(max width) each).

extern "C" __global__ void __launch_bounds__(RK_THREADS, 2)
rk45_field_f32(const float* __restrict__ w0, const float* __restrict__ b0, const float* __restrict__ w1,
               const float* __restrict__ b1, const float* __restrict__ w2, const float* __restrict__ b2,
               const float* __restrict__ w3, const float* __restrict__ b3, int n0, int n1, int n2, int n3, int n4,
               int nl, int act, const float* __restrict__ zsrc, int ldz, int zoff, const float* __restrict__ t,
               int rows, int dmode, int K, const float* __restrict__ probes, int pkind, long long seed,
               const float* __restrict__ ids, float* __restrict__ out_f, int ldf, int foff,
               float* __restrict__ out_d, int ldd, int doff, float dsign, unsigned long long* bad, int R,
               int stage_w) {
    RkNet net = rk_net(w0, b0, w1, b1, w2, b2, w3, b3, n0, n1, n2, n3, n4, nl, act);
    const int dim = net.n[nl];
    RkDirs dirs = {dmode, K, dim, probes, pkind, (unsigned long long)seed, ids};
    const int S = 1 + K;
    const int RS = R * S;
    int off = 0;
    if (stage_w) off = rk_stage_weights(net, ff_smem);
    const int ldx = rk_ld(n0);
    const int ldh = rk_ld(rk_max_out(net));
    float* x0 = ff_smem + off;
    off += rk_round4(RS * ldx);
    float* ping = ff_smem + off;
    float* pong = ping + rk_round4(RS * ldh);
    const float alpha = dmode == RK_DIR_EXACT ? 1.0f : 1.0f / (float)max(K, 1);
    const int tiles = (rows + R - 1) / R;
    const int warp = threadIdx.x / FF_WARP, lane = threadIdx.x % FF_WARP;
    const int warps = blockDim.x / FF_WARP;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long row0 = (long long)tile * R;
        __syncthreads();  // the previous tile (and the weight staging) is finished
        rk_load_input(x0, ldx, R, S, row0, rows, zsrc, ldz, zoff, t, dirs, bad);
        __syncthreads();
        const float* in = x0;
        int ldi = ldx;
        for (int l = 0; l < nl; ++l) {
            float* out = ping;
            rk_layer_forward(net, l, in, ldi, R, S, out, out + R * ldh, ldh);
            __syncthreads();
            if (l + 1 < nl) {
                // h = σ(a) on the primal rows, ḣ = σ'(a)·ȧ on the tangent rows: one thread does
                // every stream of an element, so the primal a is read before it is replaced.
                const int w = net.n[l + 1];
                for (int i = threadIdx.x; i < R * w; i += blockDim.x) {
                    const int r = i / w, j = i % w;
                    float s, d1, d2;
                    rk_act(act, out[r * ldh + j], &s, &d1, &d2);
                    for (int q = 1; q < S; ++q) out[(q * R + r) * ldh + j] *= d1;
                    out[r * ldh + j] = s;
                }
                __syncthreads();
            }
            in = out;
            ldi = ldh;
            ping = pong;
            pong = out;
        }
        const float* f = in;
        for (int i = threadIdx.x; i < R * dim; i += blockDim.x) {
            const int r = i / dim, j = i % dim;
            const long long row = row0 + r;
            if (row < rows && out_f) out_f[row * ldf + foff + j] = f[r * ldh + j];
        }
        if (K > 0 && out_d) {
            // div_r = α·Σ_q v_q·(J v_q): a warp per row, lanes over (q, j).
            for (int r = warp; r < R; r += warps) {
                float acc = 0.0f;
                for (int i = lane; i < K * dim; i += FF_WARP) {
                    const int q = i / dim, j = i % dim;
                    const int m = (q + 1) * R + r;
                    acc = fmaf(x0[m * ldx + j], f[m * ldh + j], acc);
                }
                acc = ff_warp_sum(acc);
                const long long row = row0 + r;
                if (lane == 0 && row < rows) out_d[row * ldd + doff] = dsign * alpha * acc;
            }
        }
    }
}

// The kept buffers of hidden layer l in the VJP kernel: h (R·S rows: σ(a), then ḣ), σ' (R rows)
// and, with tangents, ȧ (R·K rows) and σ'' (R rows), all with stride ld = ld(width).
struct RkHidden {
    float* h;
    float* d1;
    float* a;
    float* d2;
    int ld;
};

FF_DEVICE int rk_hidden_size(int width, int R, int K) {
    const int ld = rk_ld(width);
    int n = rk_round4(R * (1 + K) * ld) + rk_round4(R * ld);
    if (K > 0) n += rk_round4(R * K * ld) + rk_round4(R * ld);
    return n;
}

// Floats of the first `layers` hidden layers.
FF_DEVICE int rk_hidden_floats(const RkNet& net, int layers, int R, int K) {
    int n = 0;
    for (int l = 0; l < layers; ++l) n += rk_hidden_size(net.n[l + 1], R, K);
    return n;
}

FF_DEVICE RkHidden rk_hidden(float* base, const RkNet& net, int l, int R, int K) {
    float* p = base + rk_hidden_floats(net, l, R, K);
    RkHidden b;
    b.ld = rk_ld(net.n[l + 1]);
    b.h = p;
    p += rk_round4(R * (1 + K) * b.ld);
    b.d1 = p;
    p += rk_round4(R * b.ld);
    b.a = nullptr;
    b.d2 = nullptr;
    if (K > 0) {
        b.a = p;
        p += rk_round4(R * K * b.ld);
        b.d2 = p;
    }
    return b;
}

// ---------------------------------------------------------------------------------------------
// rk45_field_vjp_f32: the forward pass with tangents kept, then the reverse pass of
// Φ = a·f − c·div: g_z (to out_g, times gsign), f (to out_f), and parameter gradients weighted
// per row into the f64 partials of slot blockIdx.x. Row weights: V·H·wscale from a solver state
// (wstate: the adjoint quadrature), else w[r]·wscale, else wscale; rows of weight 0 add nothing
// whatever their values. Layout (floats): [weights] X0, then per hidden layer H (R·S x ld),
// D1 (R x ld), and with tangents A (R·K x ld), D2 (R x ld); F (R·S x ld(D)); G0, G1 (R·S x
// ld(max width)); then 2R per-row values (−c·α, weight).

extern "C" __global__ void __launch_bounds__(RK_THREADS, 2)
rk45_field_vjp_f32(const float* __restrict__ w0, const float* __restrict__ b0, const float* __restrict__ w1,
                   const float* __restrict__ b1, const float* __restrict__ w2, const float* __restrict__ b2,
                   const float* __restrict__ w3, const float* __restrict__ b3, int n0, int n1, int n2, int n3,
                   int n4, int nl, int act, const float* __restrict__ zsrc, int ldz, int zoff,
                   const float* __restrict__ asrc, int lda, int aoff, const float* __restrict__ t, int rows,
                   const float* __restrict__ a_div, int dmode, int K, const float* __restrict__ probes, int pkind,
                   long long seed, const float* __restrict__ ids, const float* __restrict__ w,
                   const float* __restrict__ wstate, long long wscale_bits, double* __restrict__ partial,
                   int nparams, float* __restrict__ out_f, int ldf, int foff, float* __restrict__ out_g, int ldg,
                   int goff, float gsign, unsigned long long* bad, int R, int stage_w) {
    RkNet net = rk_net(w0, b0, w1, b1, w2, b2, w3, b3, n0, n1, n2, n3, n4, nl, act);
    const int dim = net.n[nl];
    RkDirs dirs = {dmode, K, dim, probes, pkind, (unsigned long long)seed, ids};
    const int S = 1 + K;
    const int RS = R * S;
    const double wscale = rk_bits_to_double(wscale_bits);
    int off = 0;
    if (stage_w) off = rk_stage_weights(net, ff_smem);
    const int ldx = rk_ld(n0);
    float* x0 = ff_smem + off;
    off += rk_round4(RS * ldx);
    float* hidden = ff_smem + off;
    off += rk_hidden_floats(net, nl - 1, R, K);
    const int ldf_s = rk_ld(dim);
    float* fbuf = ff_smem + off;
    off += rk_round4(RS * ldf_s);
    const int ldg_s = rk_ld(rk_max_out(net));
    float* const g_a = ff_smem + off;
    off += rk_round4(RS * ldg_s);
    float* const g_b = ff_smem + off;
    off += rk_round4(RS * ldg_s);
    float* row_c = ff_smem + off;      // −c_r·α
    float* row_w = row_c + R;          // the row's weight (0 past the batch)
    const float alpha = dmode == RK_DIR_EXACT ? 1.0f : 1.0f / (float)max(K, 1);
    const int tiles = (rows + R - 1) / R;
    double* slot = partial ? partial + (long long)blockIdx.x * nparams : nullptr;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long row0 = (long long)tile * R;
        __syncthreads();
        rk_load_input(x0, ldx, R, S, row0, rows, zsrc, ldz, zoff, t, dirs, bad);
        for (int r = threadIdx.x; r < R; r += blockDim.x) {
            const long long row = row0 + r;
            float c = 0.0f, wt = 0.0f;
            if (row < rows) {
                if (a_div) {
                    c = a_div[row];
                    if (!rk_finite(c)) rk_report_bad(bad, RK_BAD_ADIV, row);
                }
                double base = 1.0;
                if (wstate)
                    base = (double)wstate[row * RK_STATE_COLS + RK_VERDICT] * (double)wstate[row * RK_STATE_COLS + RK_H];
                else if (w) {
                    base = (double)w[row];
                    if (!rk_finite(w[row])) rk_report_bad(bad, RK_BAD_WEIGHTS, row);
                }
                wt = (float)(base * wscale);
            }
            row_c[r] = -c * alpha;
            row_w[r] = wt;
        }
        __syncthreads();
        // Forward, keeping every layer.
        const float* in = x0;
        int ldi = ldx;
        for (int l = 0; l < nl; ++l) {
            if (l + 1 < nl) {
                const RkHidden hb = rk_hidden(hidden, net, l, R, K);
                float* h = hb.h;
                const int ld = hb.ld;
                rk_layer_forward(net, l, in, ldi, R, S, h, hb.a, ld);
                __syncthreads();
                const int wd = net.n[l + 1];
                for (int i = threadIdx.x; i < R * wd; i += blockDim.x) {
                    const int r = i / wd, j = i % wd;
                    float s, d1, d2;
                    rk_act(act, h[r * ld + j], &s, &d1, &d2);
                    h[r * ld + j] = s;
                    hb.d1[r * ld + j] = d1;
                    if (K > 0) {
                        hb.d2[r * ld + j] = d2;
                        for (int q = 0; q < K; ++q) h[((q + 1) * R + r) * ld + j] = d1 * hb.a[(q * R + r) * ld + j];
                    }
                }
                __syncthreads();
                in = h;
                ldi = ld;
            } else {
                rk_layer_forward(net, l, in, ldi, R, S, fbuf, fbuf + R * ldf_s, ldf_s);
                __syncthreads();
            }
        }
        // f, and the seeds of the reverse pass: ā = a on the primal rows, ǡ_q = −c·α·v_q.
        float* g = g_a;
        float* g_next = g_b;
        for (int i = threadIdx.x; i < RS * dim; i += blockDim.x) {
            const int m = i / dim, j = i % dim;
            const int s = m / R, r = m % R;
            const long long row = row0 + r;
            float v = 0.0f;
            if (s == 0) {
                if (row < rows) {
                    if (out_f) out_f[row * ldf + foff + j] = fbuf[r * ldf_s + j];
                    v = asrc[row * lda + aoff + j];
                    if (!rk_finite(v)) rk_report_bad(bad, RK_BAD_A, row * dim + j);
                }
            } else {
                v = row_c[r] * x0[m * ldx + j];
            }
            g[m * ldg_s + j] = v;
        }
        __syncthreads();
        // Reverse pass, layer by layer from the top.
        for (int l = nl - 1; l >= 0; --l) {
            const int nin = net.n[l], nout = net.n[l + 1];
            const RkHidden below = rk_hidden(hidden, net, l > 0 ? l - 1 : 0, R, K);
            const float* xin = l == 0 ? x0 : below.h;
            const int ldin = l == 0 ? ldx : below.ld;
            if (slot) {
                // Parameter offsets of layer l in the flat order w0, b0, w1, b1, ...
                long long pw = 0;
                for (int q = 0; q < l; ++q) pw += (long long)net.n[q] * net.n[q + 1] + net.n[q + 1];
                double* gw = slot + pw;
                double* gb = gw + (long long)nin * nout;
                rk_gemm(
                    nin, nout, RS,
                    // Rows of weight 0 (past the batch, or masked out) add exactly nothing,
                    // even when their values are not finite.
                    [=](int m, int k) { return row_w[k % R] != 0.0f ? xin[k * ldin + m] : 0.0f; },
                    [=](int k, int n) {
                        const float wr = row_w[k % R];
                        return wr != 0.0f ? g[k * ldg_s + n] * wr : 0.0f;
                    },
                    [=](int m, int n, float v) { gw[(long long)m * nout + n] += (double)v; });
                for (int n = threadIdx.x; n < nout; n += blockDim.x) {
                    float s = 0.0f;
                    for (int r = 0; r < R; ++r) {
                        const float wr = row_w[r];
                        if (wr != 0.0f) s = fmaf(g[r * ldg_s + n], wr, s);
                    }
                    gb[n] += (double)s;
                }
            }
            const float* wl = net.w[l];
            const int ldw = net.ldw[l];
            if (l == 0) {
                // g_z = ā_0·W_0ᵀ restricted to the z rows of W_0.
                if (out_g) {
                    for (int i = threadIdx.x; i < R * dim; i += blockDim.x) {
                        const int r = i / dim, j = i % dim;
                        const long long row = row0 + r;
                        if (row >= rows) continue;
                        float s = 0.0f;
                        for (int n = 0; n < nout; ++n) s = fmaf(g[r * ldg_s + n], wl[j * ldw + n], s);
                        out_g[row * ldg + goff + j] = gsign * s;
                    }
                }
                break;
            }
            // P = G·W_lᵀ (R·S x nin) into the other buffer, then through the activation of layer
            // l − 1 (σ' on every stream, and the σ'' term of the tangents on the primal rows).
            float* p = g_next;
            rk_gemm(
                RS, nin, nout,
                [=](int m, int k) { return g[m * ldg_s + k]; },
                [=](int k, int n) { return wl[n * ldw + k]; },
                [=](int m, int n, float v) { p[m * ldg_s + n] = v; });
            __syncthreads();
            const int ld = below.ld;
            const float* d1 = below.d1;
            for (int i = threadIdx.x; i < R * nin; i += blockDim.x) {
                const int r = i / nin, j = i % nin;
                const float s1 = d1[r * ld + j];
                float prim = s1 * p[r * ldg_s + j];
                if (K > 0) {
                    float sum2 = 0.0f;
                    for (int q = 0; q < K; ++q) {
                        const int m = (q + 1) * R + r;
                        sum2 = fmaf(p[m * ldg_s + j], below.a[(q * R + r) * ld + j], sum2);
                        p[m * ldg_s + j] *= s1;
                    }
                    prim = fmaf(below.d2[r * ld + j], sum2, prim);
                }
                p[r * ldg_s + j] = prim;
            }
            __syncthreads();
            g_next = g;
            g = p;
        }
    }
}

// out[i] = Σ_slot partial[slot·nparams + offset + i] in slot order (f64), for i < count.
extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_reduce_partials_f32(const double* __restrict__ partial, float* __restrict__ out, int nslots, int nparams,
                         int offset, int count) {
    FF_GRID_STRIDE(i, count) {
        double s = 0.0;
        for (int b = 0; b < nslots; ++b) s += partial[(long long)b * nparams + offset + i];
        out[i] = (float)s;
    }
}

// ---------------------------------------------------------------------------------------------
// The Dormand–Prince tableau (src/ode/tableau.rs), as f32 stage coefficients (each fraction
// rounded once, as the reference's `A[s][j] as f32`) and f64 error and dense-output weights.

FF_DEVICE float rk_a(int s, int j) {
    switch (s * 8 + j) {
        case 8: return (float)(1.0 / 5.0);
        case 16: return (float)(3.0 / 40.0);
        case 17: return (float)(9.0 / 40.0);
        case 24: return (float)(44.0 / 45.0);
        case 25: return (float)(-56.0 / 15.0);
        case 26: return (float)(32.0 / 9.0);
        case 32: return (float)(19372.0 / 6561.0);
        case 33: return (float)(-25360.0 / 2187.0);
        case 34: return (float)(64448.0 / 6561.0);
        case 35: return (float)(-212.0 / 729.0);
        case 40: return (float)(9017.0 / 3168.0);
        case 41: return (float)(-355.0 / 33.0);
        case 42: return (float)(46732.0 / 5247.0);
        case 43: return (float)(49.0 / 176.0);
        case 44: return (float)(-5103.0 / 18656.0);
        case 48: return (float)(35.0 / 384.0);
        case 49: return 0.0f;
        case 50: return (float)(500.0 / 1113.0);
        case 51: return (float)(125.0 / 192.0);
        case 52: return (float)(-2187.0 / 6784.0);
        case 53: return (float)(11.0 / 84.0);
        default: return 0.0f;
    }
}

FF_DEVICE double rk_c(int s) {
    switch (s) {
        case 1: return 1.0 / 5.0;
        case 2: return 3.0 / 10.0;
        case 3: return 4.0 / 5.0;
        case 4: return 8.0 / 9.0;
        case 5: return 1.0;
        case 6: return 1.0;
        default: return 0.0;
    }
}

FF_DEVICE double rk_e(int s) {
    switch (s) {
        case 0: return 71.0 / 57600.0;
        case 2: return -71.0 / 16695.0;
        case 3: return 71.0 / 1920.0;
        case 4: return -17253.0 / 339200.0;
        case 5: return 22.0 / 525.0;
        case 6: return -1.0 / 40.0;
        default: return 0.0;
    }
}

// Shampine's continuous extension: b_s(σ) = σ·(P0 + σ·(P1 + σ·(P2 + σ·P3))) by fused
// multiply-adds (the reference's `dense_weights_fma`).
FF_DEVICE double rk_dense_weight(int s, double sigma) {
    double p0 = 0.0, p1 = 0.0, p2 = 0.0, p3 = 0.0;
    switch (s) {
        case 0: p0 = 1.0; p1 = -8048581381.0 / 2820520608.0; p2 = 8663915743.0 / 2820520608.0; p3 = -12715105075.0 / 11282082432.0; break;
        case 2: p1 = 131558114200.0 / 32700410799.0; p2 = -68118460800.0 / 10900136933.0; p3 = 87487479700.0 / 32700410799.0; break;
        case 3: p1 = -1754552775.0 / 470086768.0; p2 = 14199869525.0 / 1410260304.0; p3 = -10690763975.0 / 1880347072.0; break;
        case 4: p1 = 127303824393.0 / 49829197408.0; p2 = -318862633887.0 / 49829197408.0; p3 = 701980252875.0 / 199316789632.0; break;
        case 5: p1 = -282668133.0 / 205662961.0; p2 = 2019193451.0 / 616988883.0; p3 = -1453857185.0 / 822651844.0; break;
        case 6: p1 = 40617522.0 / 29380423.0; p2 = -110615467.0 / 29380423.0; p3 = 69997945.0 / 29380423.0; break;
        default: break;
    }
    double q = fma(p3, sigma, p2);
    q = fma(q, sigma, p1);
    q = fma(q, sigma, p0);
    return q * sigma;
}

// ---------------------------------------------------------------------------------------------
// Step control (src/ode/controller.rs), per row in f64.

struct RkCtl {
    double rtol, atol, h_min, h_max;
    double safety, min_factor, max_factor, alpha, beta;
    int max_steps;
    int pi;  // 0: integral controller (exponent 1/5), 1: PI controller
};

FF_DEVICE RkCtl rk_ctl(long long rtol, long long atol, long long h_min, long long h_max, int max_steps, int pi,
                       long long safety, long long min_factor, long long max_factor, long long alpha,
                       long long beta) {
    RkCtl c;
    c.rtol = rk_bits_to_double(rtol);
    c.atol = rk_bits_to_double(atol);
    c.h_min = rk_bits_to_double(h_min);
    c.h_max = rk_bits_to_double(h_max);
    c.max_steps = max_steps;
    c.pi = pi;
    c.safety = rk_bits_to_double(safety);
    c.min_factor = rk_bits_to_double(min_factor);
    c.max_factor = rk_bits_to_double(max_factor);
    c.alpha = rk_bits_to_double(alpha);
    c.beta = rk_bits_to_double(beta);
    return c;
}

#define RK_CTL_PARAMS                                                                                            \
    long long rtol, long long atol, long long h_min, long long h_max, int max_steps, int pi, long long safety, \
        long long min_factor, long long max_factor, long long alpha, long long beta
#define RK_CTL_ARGS rtol, atol, h_min, h_max, max_steps, pi, safety, min_factor, max_factor, alpha, beta

// The f32 spacing at t towards dir as f64 (the smallest normal f32 at t = 0); bit arithmetic,
// so flush-to-zero cannot touch it.
FF_DEVICE double rk_spacing(float t, float dir) {
    if (t == 0.0f) return 1.17549435082228750797e-38;
    const float a = fabsf(t);
    const unsigned int bits = __float_as_uint(a);
    if ((t > 0.0f) == (dir > 0.0f)) return (double)__uint_as_float(bits + 1u) - (double)a;
    return (double)a - (double)__uint_as_float(bits - 1u);
}

FF_DEVICE double rk_min_step(float t, float dir, double h_min) { return fmax(h_min, 10.0 * rk_spacing(t, dir)); }

// The controller's factor for the next step; updates the memory (last_rejected, prev_err).
FF_DEVICE bool rk_decide(const RkCtl& c, double err, float* last_rejected, float* prev_err, double* factor) {
    const double exponent = 0.2;  // 1 / (ERROR_ORDER + 1)
    const double alpha = c.pi ? c.alpha : exponent;
    if (err <= 1.0) {
        double f;
        if (c.pi) {
            const double floor_err = fmax(err, 1e-4);
            f = fmin(fmax(c.safety * pow(floor_err, -c.alpha) * pow((double)*prev_err, c.beta), c.min_factor), c.max_factor);
            *prev_err = (float)floor_err;
        } else {
            f = err == 0.0 ? c.max_factor : fmin(c.safety * pow(err, -exponent), c.max_factor);
            *prev_err = (float)fmax(err, 1e-4);
        }
        if (*last_rejected != 0.0f) f = fmin(f, 1.0);
        *last_rejected = 0.0f;
        *factor = f;
        return true;
    }
    *last_rejected = 1.0f;
    *factor = rk_finite_d(err) ? fmin(fmax(c.safety * pow(err, -alpha), c.min_factor), 1.0) : c.min_factor;
    return false;
}

// The next attempt of an active row (state row s): H and T_NEW from H_ABS.
FF_DEVICE void rk_propose(float* s, const RkCtl& c) {
    const float t = s[RK_T], dir = s[RK_DIR];
    double h_abs = fmin((double)s[RK_H_ABS], c.h_max);
    if (s[RK_LAST_REJECTED] == 0.0f) h_abs = fmax(h_abs, rk_min_step(t, dir, c.h_min));
    float t_new = (float)fma(h_abs, (double)dir, (double)t);
    if (dir * (t_new - s[RK_T_END]) > 0.0f) t_new = s[RK_T_END];
    s[RK_T_NEW] = t_new;
    s[RK_H] = (float)((double)t_new - (double)t);
}

extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_init_state_f32(const float* __restrict__ t0, const float* __restrict__ t1, float* __restrict__ state, int rows,
                    int has_h0, long long h0_bits) {
    const double h0 = rk_bits_to_double(h0_bits);
    FF_GRID_STRIDE(r, rows) {
        float* s = state + r * RK_STATE_COLS;
        const float a = t0[r], b = t1[r];
        for (int c = 0; c < RK_STATE_COLS; ++c) s[c] = 0.0f;
        s[RK_T] = a;
        s[RK_T_END] = b;
        s[RK_DIR] = a == b ? 0.0f : (b > a ? 1.0f : -1.0f);
        s[RK_H_ABS] = has_h0 ? (float)h0 : 0.0f;
        s[RK_PREV_ERR] = 1.0f;
        s[RK_STATUS] = a == b ? RK_DONE : RK_ACTIVE;
    }
}

extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_propose_f32(float* __restrict__ state, int rows, RK_CTL_PARAMS) {
    const RkCtl c = rk_ctl(RK_CTL_ARGS);
    FF_GRID_STRIDE(r, rows) {
        float* s = state + r * RK_STATE_COLS;
        if (s[RK_STATUS] == RK_ACTIVE) rk_propose(s, c);
    }
}

// Stage s: ys = y + H·Σ_{j<s} a_sj·k_j (f32, fused, j in order), ts = t + c_s·H. With ys null
// only ts is written (stage 0: t).
extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_stage_f32(const float* __restrict__ y, const float* __restrict__ k0, const float* __restrict__ k1,
               const float* __restrict__ k2, const float* __restrict__ k3, const float* __restrict__ k4,
               const float* __restrict__ k5, const float* __restrict__ state, float* __restrict__ ys,
               float* __restrict__ ts, int rows, int width, int stage) {
    FF_GRID_STRIDE(i, (long long)rows * width) {
        const long long r = i / width;
        const int j = (int)(i % width);
        const float* s = state + r * RK_STATE_COLS;
        if (ys) {
            float acc = 0.0f;
            if (stage > 0) acc = fmaf(rk_a(stage, 0), k0[i], acc);
            if (stage > 1) acc = fmaf(rk_a(stage, 1), k1[i], acc);
            if (stage > 2) acc = fmaf(rk_a(stage, 2), k2[i], acc);
            if (stage > 3) acc = fmaf(rk_a(stage, 3), k3[i], acc);
            if (stage > 4) acc = fmaf(rk_a(stage, 4), k4[i], acc);
            if (stage > 5) acc = fmaf(rk_a(stage, 5), k5[i], acc);
            ys[i] = stage == 0 ? y[i] : fmaf(s[RK_H], acc, y[i]);
        }
        if (j == 0) {
            float tv;
            if (stage == 0)
                tv = s[RK_T];
            else if (rk_c(stage) == 1.0)
                tv = s[RK_T_NEW];
            else
                tv = (float)fma(rk_c(stage), (double)s[RK_H], (double)s[RK_T]);
            ts[r] = tv;
        }
    }
}

// Row r's controller state into registers. Threads past the batch carry a finished row of
// zeros through the collectives.
FF_DEVICE void rk_load_state(float (&s)[RK_STATE_COLS], const float* state, long long r, bool in_batch) {
#pragma unroll
    for (int q = 0; q < RK_STATE_COLS; ++q) s[q] = in_batch ? state[r * RK_STATE_COLS + q] : 0.0f;
    if (!in_batch) s[RK_STATUS] = RK_DONE;
}

// Sum over the `lanes` consecutive lanes of a row group (1 or 32); every lane of the warp
// calls it.
FF_DEVICE double rk_group_sum(double v, int lanes) {
    for (int off = lanes >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(FF_FULL_MASK, v, off);
    return v;
}

FF_DEVICE int rk_group_or(int v, int lanes) {
    for (int off = lanes >> 1; off > 0; off >>= 1) v |= __shfl_xor_sync(FF_FULL_MASK, v, off);
    return v;
}

// The end of a step attempt (phases ERROR, DECIDE, UPDATE; src/ops/rk45/step.rs `Phase`). A
// group of `lanes` threads per row; y, k0 are updated in place, y_eval (when t_eval is given)
// at rows e·rows_total + ids[r].
extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_step_end_f32(float* __restrict__ y, float* __restrict__ k0, const float* __restrict__ k1,
                  const float* __restrict__ k2, const float* __restrict__ k3, const float* __restrict__ k4,
                  const float* __restrict__ k5, const float* __restrict__ k6, const float* __restrict__ ynew,
                  float* __restrict__ state, int rows, int width, int lanes, int phase,
                  const float* __restrict__ t_eval, int n_eval, float* __restrict__ y_eval,
                  const float* __restrict__ ids, int rows_total, RK_CTL_PARAMS) {
    const RkCtl c = rk_ctl(RK_CTL_ARGS);
    const long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long r = gid / lanes;
    const int sub = (int)(gid % lanes);
    const bool in_batch = r < rows;
    float s[RK_STATE_COLS];
    rk_load_state(s, state, r, in_batch);
    const float* ks[7] = {k0, k1, k2, k3, k4, k5, k6};
    if (phase & RK_PHASE_ERROR) {
        s[RK_VERDICT] = 0.0f;
        const bool act = s[RK_STATUS] == RK_ACTIVE;
        double sum = 0.0;
        int bad = 0;
        if (act) {
            const double h = (double)s[RK_H];
            for (int j = sub; j < width; j += lanes) {
                const long long i = r * width + j;
                double acc = 0.0;
#pragma unroll
                for (int q = 0; q < 7; ++q) {
                    const float kv = ks[q][i];
                    bad |= !rk_finite(kv);
                    acc = fma(rk_e(q), (double)kv, acc);
                }
                const float yn = ynew[i];
                bad |= !rk_finite(yn);
                const double scale = fmax(fma(c.rtol, (double)fmaxf(fabsf(y[i]), fabsf(yn)), c.atol), 2.2250738585072014e-308);
                const double q = h * acc / scale;
                sum = fma(q, q, sum);
            }
        }
        sum = rk_group_sum(sum, lanes);
        bad = rk_group_or(bad, lanes);
        if (act) {
            const double err = sqrt(sum / (double)width);
            s[RK_ERR] = (float)err;
            if (bad || !rk_finite_d(err)) s[RK_STATUS] = RK_NONFINITE;
        }
    }
    if ((phase & RK_PHASE_DECIDE) && s[RK_STATUS] == RK_ACTIVE) {
        double factor;
        const bool accept = rk_decide(c, (double)s[RK_ERR], &s[RK_LAST_REJECTED], &s[RK_PREV_ERR], &factor);
        s[RK_H_ABS] = (float)(fabs((double)s[RK_H]) * factor);
        if (accept) {
            s[RK_VERDICT] = 1.0f;
            s[RK_ACCEPTED] += 1.0f;
            if (s[RK_T_NEW] == s[RK_T_END]) s[RK_STATUS] = RK_DONE;
        } else {
            s[RK_VERDICT] = 0.0f;
            s[RK_REJECTED] += 1.0f;
            if ((double)s[RK_H_ABS] < rk_min_step(s[RK_T], s[RK_DIR], c.h_min)) s[RK_STATUS] = RK_UNDERFLOW;
        }
        if (s[RK_STATUS] == RK_ACTIVE && (int)(s[RK_ACCEPTED] + s[RK_REJECTED]) >= c.max_steps) s[RK_STATUS] = RK_MAXSTEPS;
    }
    if (phase & RK_PHASE_UPDATE) {
        const bool moved =
            in_batch && s[RK_VERDICT] == 1.0f && (s[RK_STATUS] == RK_ACTIVE || s[RK_STATUS] == RK_DONE);
        if (moved) {
            if (y_eval && n_eval > 0) {
                const long long id = (long long)ids[r];
                const float t = s[RK_T], t_new = s[RK_T_NEW], h = s[RK_H], dir = s[RK_DIR];
                int e = (int)s[RK_NEXT_EVAL];
                for (; e < n_eval; ++e) {
                    const float te = t_eval[e];
                    if (dir * (te - t_new) > 0.0f) break;
                    if (id < 0 || id >= rows_total) continue;
                    float* dst = y_eval + ((long long)e * rows_total + id) * width;
                    if (te == t_new) {
                        for (int j = sub; j < width; j += lanes) dst[j] = ynew[r * width + j];
                    } else {
                        const double sigma = ((double)te - (double)t) / (double)h;
                        double wts[7];
#pragma unroll
                        for (int q = 0; q < 7; ++q) wts[q] = rk_dense_weight(q, sigma);
                        for (int j = sub; j < width; j += lanes) {
                            const long long i = r * width + j;
                            double acc = 0.0;
#pragma unroll
                            for (int q = 0; q < 7; ++q) acc = fma(wts[q], (double)ks[q][i], acc);
                            dst[j] = (float)fma((double)h, acc, (double)y[i]);
                        }
                    }
                }
                s[RK_NEXT_EVAL] = (float)e;
            }
            s[RK_T] = s[RK_T_NEW];
        }
        if (s[RK_STATUS] == RK_ACTIVE) rk_propose(s, c);
        // Every lane has read y, k0 and k6 of its columns before they are replaced.
        if (moved) {
            for (int j = sub; j < width; j += lanes) {
                const long long i = r * width + j;
                y[i] = ynew[i];
                k0[i] = k6[i];
            }
        }
    }
    __syncwarp();  // every lane has read the row's state before lane 0 replaces it
    if (in_batch && sub == 0) {
#pragma unroll
        for (int q = 0; q < RK_STATE_COLS; ++q) state[r * RK_STATE_COLS + q] = s[q];
    }
}

// Hairer's starting step (src/ode/initial_step.rs). Without f1: the first guess h0 into H_ABS
// and the probe point (yp, tp); with f1: the refined step into H_ABS.
extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_initial_step_f32(const float* __restrict__ y0, const float* __restrict__ f0, const float* __restrict__ f1,
                      float* __restrict__ state, float* __restrict__ yp, float* __restrict__ tp, int rows, int width,
                      int lanes, long long rtol_bits, long long atol_bits) {
    const double rtol = rk_bits_to_double(rtol_bits), atol = rk_bits_to_double(atol_bits);
    const long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long r = gid / lanes;
    const int sub = (int)(gid % lanes);
    const bool in_batch = r < rows;
    float s[RK_STATE_COLS];
    rk_load_state(s, state, r, in_batch);
    const bool act = s[RK_STATUS] == RK_ACTIVE;
    // Scaled sums of squares of y0, f0 and (f1 − f0); a non-finite derivative.
    double sy = 0.0, sf = 0.0, sd = 0.0;
    int bad = 0;
    if (act) {
        for (int j = sub; j < width; j += lanes) {
            const long long i = r * width + j;
            const double yv = (double)y0[i], fv = (double)f0[i];
            const double sc = fmax(atol + rtol * fabs(yv), 2.2250738585072014e-308);
            if (f1) {
                const double gv = (double)f1[i];
                bad |= !rk_finite_d(gv);
                const double dv = (gv - fv) / sc;
                sd += dv * dv;
            } else {
                bad |= !rk_finite_d(fv);
            }
            sy += (yv / sc) * (yv / sc);
            sf += (fv / sc) * (fv / sc);
        }
    }
    sy = rk_group_sum(sy, lanes);
    sf = rk_group_sum(sf, lanes);
    sd = rk_group_sum(sd, lanes);
    bad = rk_group_or(bad, lanes);
    const double interval = fabs((double)s[RK_T_END] - (double)s[RK_T]);
    const double n = (double)width;
    double step = 0.0;
    bool moving = false;
    if (act && bad) {
        s[RK_STATUS] = RK_NONFINITE;
    } else if (act) {
        const double d0 = sqrt(sy / n), d1 = sqrt(sf / n);
        if (!f1) {
            double h0 = (d0 < 1e-5 || d1 < 1e-5) ? 1e-6 : 0.01 * d0 / d1;
            h0 = fmin(h0, interval);
            s[RK_H_ABS] = (float)h0;
            step = (double)s[RK_H_ABS] * (double)s[RK_DIR];
            moving = true;
        } else {
            const double h0 = (double)s[RK_H_ABS];
            const double d2 = sqrt(sd / n) / h0;
            const double h1 = (d1 <= 1e-15 && d2 <= 1e-15) ? fmax(h0 * 1e-3, 1e-6) : pow(0.01 / fmax(d1, d2), 0.2);
            s[RK_H_ABS] = (float)fmin(fmin(100.0 * h0, h1), interval);
        }
    }
    if (!f1 && in_batch) {
        for (int j = sub; j < width; j += lanes) {
            const long long i = r * width + j;
            yp[i] = moving ? (float)((double)y0[i] + step * (double)f0[i]) : y0[i];
        }
        if (sub == 0) tp[r] = moving ? (float)((double)s[RK_T] + step) : s[RK_T];
    }
    __syncwarp();
    if (in_batch && sub == 0) {
#pragma unroll
        for (int q = 0; q < RK_STATE_COLS; ++q) state[r * RK_STATE_COLS + q] = s[q];
    }
}

// Dense output at or before each row's start.
extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_dense_start_f32(const float* __restrict__ y, float* __restrict__ state, const float* __restrict__ t_eval,
                     int n_eval, float* __restrict__ y_eval, const float* __restrict__ ids, int rows, int width,
                     int rows_total) {
    FF_GRID_STRIDE(r, rows) {
        float* s = state + r * RK_STATE_COLS;
        const long long id = (long long)ids[r];
        int e = (int)s[RK_NEXT_EVAL];
        for (; e < n_eval; ++e) {
            if (s[RK_DIR] * (t_eval[e] - s[RK_T]) > 0.0f) break;
            if (id < 0 || id >= rows_total) continue;
            float* dst = y_eval + ((long long)e * rows_total + id) * width;
            for (int j = 0; j < width; ++j) dst[j] = y[r * width + j];
        }
        s[RK_NEXT_EVAL] = (float)e;
    }
}

// Finished or failed rows to their caller rows of out_y and out_state.
extern "C" __global__ void __launch_bounds__(RK_THREADS)
rk45_retire_f32(const float* __restrict__ y, const float* __restrict__ state, const float* __restrict__ ids,
                float* __restrict__ out_y, float* __restrict__ out_state, int rows, int width, int rows_total) {
    const int cols = width + RK_STATE_COLS;
    FF_GRID_STRIDE(i, (long long)rows * cols) {
        const long long r = i / cols;
        const int c = (int)(i % cols);
        if (state[r * RK_STATE_COLS + RK_STATUS] == RK_ACTIVE) continue;
        const long long id = (long long)ids[r];
        if (id < 0 || id >= rows_total) continue;
        if (c < width)
            out_y[id * width + c] = y[r * width + c];
        else
            out_state[id * RK_STATE_COLS + (c - width)] = state[r * RK_STATE_COLS + (c - width)];
    }
}

// ---------------------------------------------------------------------------------------------
// Batch reductions over the rows: one block of 1024 threads, each summing a contiguous chunk,
// then a fixed tree (deterministic, and order-preserving for the scan).

struct RkChunk {
    long long begin, end;
};

FF_DEVICE RkChunk rk_chunk(int rows) {
    const long long per = ((long long)rows + blockDim.x - 1) / blockDim.x;
    RkChunk c;
    c.begin = min((long long)threadIdx.x * per, (long long)rows);
    c.end = min(c.begin + per, (long long)rows);
    return c;
}

// mode 0: column `column` of every active row = the min over the active rows; mode 1: the max,
// NaN counting as the largest.
extern "C" __global__ void __launch_bounds__(RK_REDUCE_THREADS)
rk45_share_f32(float* __restrict__ state, int rows, int column, int mode) {
    __shared__ float s_val[RK_REDUCE_THREADS];
    __shared__ int s_any[RK_REDUCE_THREADS];
    const RkChunk ch = rk_chunk(rows);
    float v = 0.0f;
    int any = 0;
    for (long long r = ch.begin; r < ch.end; ++r) {
        const float* s = state + r * RK_STATE_COLS;
        if (s[RK_STATUS] != RK_ACTIVE) continue;
        const float x = s[column];
        if (!any) {
            v = x;
        } else if (mode == 0) {
            v = fminf(v, x);
        } else if (!isnan(v) && (isnan(x) || x > v)) {
            v = x;
        }
        any = 1;
    }
    s_val[threadIdx.x] = v;
    s_any[threadIdx.x] = any;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) {
            const float a = s_val[threadIdx.x], b = s_val[threadIdx.x + half];
            const int ia = s_any[threadIdx.x], ib = s_any[threadIdx.x + half];
            float m = a;
            if (!ia) {
                m = b;
            } else if (ib) {
                if (mode == 0)
                    m = fminf(a, b);
                else if (!isnan(a) && (isnan(b) || b > a))
                    m = b;
            }
            s_val[threadIdx.x] = m;
            s_any[threadIdx.x] = ia | ib;
        }
        __syncthreads();
    }
    const float shared_value = s_val[0];
    const int found = s_any[0];
    if (found)
        for (long long r = ch.begin; r < ch.end; ++r) {
            float* s = state + r * RK_STATE_COLS;
            if (s[RK_STATUS] == RK_ACTIVE) s[column] = shared_value;
        }
}

// out[0] = active rows, out[1] = failed rows, out[2] = the first failed row (−1: none).
extern "C" __global__ void __launch_bounds__(RK_REDUCE_THREADS)
rk45_summary_f32(const float* __restrict__ state, int rows, float* __restrict__ out) {
    __shared__ int s_act[RK_REDUCE_THREADS];
    __shared__ int s_fail[RK_REDUCE_THREADS];
    __shared__ int s_first[RK_REDUCE_THREADS];
    const RkChunk ch = rk_chunk(rows);
    int act = 0, fail = 0, first = 0x7fffffff;
    for (long long r = ch.begin; r < ch.end; ++r) {
        const float st = state[r * RK_STATE_COLS + RK_STATUS];
        if (st == RK_ACTIVE) {
            ++act;
        } else if (st != RK_DONE) {
            ++fail;
            first = min(first, (int)r);
        }
    }
    s_act[threadIdx.x] = act;
    s_fail[threadIdx.x] = fail;
    s_first[threadIdx.x] = first;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) {
            s_act[threadIdx.x] += s_act[threadIdx.x + half];
            s_fail[threadIdx.x] += s_fail[threadIdx.x + half];
            s_first[threadIdx.x] = min(s_first[threadIdx.x], s_first[threadIdx.x + half]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[0] = (float)s_act[0];
        out[1] = (float)s_fail[0];
        out[2] = s_fail[0] > 0 ? (float)s_first[0] : -1.0f;
    }
}

// idx[0..count) = the active rows in order (an exclusive scan of the chunk counts).
extern "C" __global__ void __launch_bounds__(RK_REDUCE_THREADS)
rk45_active_rows_f32(const float* __restrict__ state, int rows, unsigned int* __restrict__ idx, int count) {
    __shared__ int s_scan[RK_REDUCE_THREADS];
    const RkChunk ch = rk_chunk(rows);
    int mine = 0;
    for (long long r = ch.begin; r < ch.end; ++r) mine += state[r * RK_STATE_COLS + RK_STATUS] == RK_ACTIVE;
    s_scan[threadIdx.x] = mine;
    __syncthreads();
    // Hillis–Steele inclusive scan over the block.
    for (int d = 1; d < (int)blockDim.x; d <<= 1) {
        const int add = (int)threadIdx.x >= d ? s_scan[threadIdx.x - d] : 0;
        __syncthreads();
        s_scan[threadIdx.x] += add;
        __syncthreads();
    }
    int at = s_scan[threadIdx.x] - mine;
    for (long long r = ch.begin; r < ch.end; ++r)
        if (state[r * RK_STATE_COLS + RK_STATUS] == RK_ACTIVE) {
            if (at < count) idx[at] = (unsigned int)r;
            ++at;
        }
}
