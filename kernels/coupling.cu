// Coupling layers as fused kernels (eq. 18.10-18.15): per row tile, the conditioner MLP on the
// copied half, the coupling transform of the other half and the per-row log-det, in one launch;
// and the backward (recompute, transform backward, backprop through the MLP, parameter
// gradients per block) in another, with a deterministic reduction launch after it.
//
// Launch sequence (src/ops/coupling/cuda.rs):
//   coupling_pack_f32 (+ coupling_pack_bf16)   the conditioner's tensors -> zero-padded buffers
//   coupling_fwd_f32 / coupling_fwd_bf16       forward or inverse of the layer
//   coupling_bwd_f32 / coupling_bwd_bf16 + coupling_grad_reduce_f32
// Every kernel reports non-finite inputs, parameters and results through `status` (see
// coupling_layout.cuh) instead of returning NaN silently.
//
// Row tiles of TM = 64 rows (32 or 16 when shared memory is short) live in shared memory from
// the copied half to the log-det: activations never return to global memory between layers.
// Weights are either resident in shared memory for the whole (persistent, grid-stride) block,
// or, when they do not fit, streamed through it in k-slices for every tile (coupling_gemm.cuh).
// Blocks are 256 threads with __launch_bounds__(256, 1): the register micro-tiles (64 f32
// accumulators per thread at the widest) may use up to 255 registers without spilling.
#include "common.cuh"
#include "coupling_layout.cuh"
#include "coupling_transform.cuh"
#include "coupling_gemm.cuh"
#include "coupling_mma.cuh"

extern __shared__ float4 ff_smem[];

// Everything a tile's transform needs besides the parameters.
struct CpRows {
    int rows, dim, na, nb, a0, t0;
};

FF_DEVICE CpRows cp_rows(int rows, int dim, int copied_upper) {
    CpRows r;
    const int mid = dim / 2;
    r.rows = rows;
    r.dim = dim;
    r.a0 = copied_upper ? mid : 0;
    r.t0 = copied_upper ? 0 : mid;
    r.na = copied_upper ? dim - mid : mid;
    r.nb = dim - r.na;
    return r;
}

// Lanes per row in the transform: the smallest power of two >= nb (at most a warp), so that a
// narrow layer (D = 2) still keeps every lane busy on its own row.
FF_DEVICE int cp_group(int nb) {
    int g = 1;
    while (g < nb && g < FF_WARP) g <<= 1;
    return g;
}

// The per-row log-det partials of a lane group, summed as a butterfly inside the group
// (f32 warp tree, DESIGN.md). Every lane of the warp must call it.
FF_DEVICE float cp_group_sum(float v, int group) {
    for (int off = group / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FF_FULL_MASK, v, off);
    return v;
}

// Every value (m, a) of the copied half of a tile, tm rows by kp columns, handed to
// `store(m, a, v)`: zeros for padding columns and rows past the batch, so the products stay
// finite; a non-finite input is flagged.
template <class Store>
FF_DEVICE void cp_each_copied(int tm, int kp, const float* __restrict__ x, const CpRows& rw, long long row0,
                              int valid, long long* status, const Store& store) {
    for (int i = threadIdx.x; i < tm * kp; i += CP_THREADS) {
        const int m = i / kp, a = i % kp;
        float v = 0.0f;
        if (m < valid && a < rw.na) {
            const long long at = (row0 + m) * rw.dim + rw.a0 + a;
            v = x[at];
            if (!cp_finite(v)) cp_flag(status, CP_ST_INPUT, at);
        }
        store(m, a, v);
    }
}

// The copied half of a tile, transposed into `dst` (kp rows of TMS floats, row k = input
// column k).
FF_DEVICE void cp_load_copied(float* dst, int tms, int tm, int kp, const float* __restrict__ x, const CpRows& rw,
                              long long row0, int valid, long long* status) {
    cp_each_copied(tm, kp, x, rw, row0, valid, status, [&](int m, int a, float v) { dst[a * tms + m] = v; });
}

// Forward/inverse transform of a tile: params are row-major (row m at params + m * ldp). Writes
// the output rows (copied half bit for bit) and the log-dets.
FF_DEVICE void cp_transform_tile(const CpTransform& t, const CpRows& rw, const float* params, int ldp, int tm,
                                 long long row0, int valid, const float* __restrict__ x, float* __restrict__ y,
                                 float* __restrict__ logdet, long long* status) {
    const int group = cp_group(rw.nb);
    const int lane = threadIdx.x % FF_WARP, warp = threadIdx.x / FF_WARP;
    const int sub = lane / group, jl = lane % group;
    const int per_warp = FF_WARP / group;
    const int per_pass = per_warp * (CP_THREADS / FF_WARP);
    for (int base = 0; base < tm; base += per_pass) {
        const int m = base + warp * per_warp + sub;
        const bool ok = m < valid;
        float ld = 0.0f;
        if (ok) {
            const long long r = row0 + m;
            const float* p = params + m * ldp;
            for (int j = jl; j < rw.nb; j += group) {
                const long long at = r * rw.dim + rw.t0 + j;
                const float v = x[at];
                if (!cp_finite(v)) cp_flag(status, CP_ST_INPUT, at);
                const float2 o = cp_apply(t, p, rw.nb, j, v);
                y[at] = o.x;
                if (!cp_finite(o.x)) cp_flag(status, CP_ST_OUTPUT, at);
                ld += o.y;
            }
            for (int a = jl; a < rw.na; a += group) {
                const long long at = r * rw.dim + rw.a0 + a;
                y[at] = x[at];
            }
        }
        ld = cp_group_sum(ld, group);
        if (ok && jl == 0) {
            logdet[row0 + m] = ld;
            if (!cp_finite(ld)) cp_flag(status, CP_ST_LOGDET, row0 + m);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packing: the conditioner's 2 L tensors -> per layer W (kp x np), b (np), W^T (np x kp), zero
// padded, in one buffer (offsets in CpNet). Non-finite parameters are reported here.

extern "C" __global__ void __launch_bounds__(FF_BLOCK)
coupling_pack_f32(const float* __restrict__ w0, const float* __restrict__ b0, const float* __restrict__ w1,
                  const float* __restrict__ b1, const float* __restrict__ w2, const float* __restrict__ b2,
                  const float* __restrict__ w3, const float* __restrict__ b3, float* __restrict__ packed,
                  long long* status, int layers, int act, int n0, int n1, int n2, int n3, int n4) {
    __shared__ CpNet net;
    if (threadIdx.x == 0) cp_net_init(&net, layers, act, n0, n1, n2, n3, n4);
    __syncthreads();
    FF_GRID_STRIDE(i, net.packed_len) {
        int l = 0;
        while (l + 1 < net.layers && i >= net.off_w[l + 1]) ++l;
        const int K = net.width[l], N = net.width[l + 1], kp = net.kp[l], np = net.np[l];
        const float* W = cp_pick(l, w0, w1, w2, w3);
        const float* B = cp_pick(l, b0, b1, b2, b3);
        int rel = (int)(i - net.off_w[l]);
        float v = 0.0f;
        if (rel < kp * np) {
            const int k = rel / np, n = rel % np;
            if (k < K && n < N) {
                v = W[k * N + n];
                if (!cp_finite(v)) cp_flag(status, CP_ST_PARAM, ((long long)(2 * l) << 40) | (k * N + n));
            }
        } else if (rel < kp * np + np) {
            const int n = rel - kp * np;
            if (n < N) {
                v = B[n];
                if (!cp_finite(v)) cp_flag(status, CP_ST_PARAM, ((long long)(2 * l + 1) << 40) | n);
            }
        } else {
            rel -= kp * np + np;
            const int n = rel / kp, k = rel % kp;
            if (k < K && n < N) v = W[k * N + n];
        }
        packed[i] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// f32 forward / inverse.
//
// Shared memory (floats): two activation buffers of max(hmax * TMS, TM * ldp) (TMS = TM + 4:
// transposed tiles, the +4 keeps float4 alignment and spreads the columns of the dW product over
// banks), then either the resident weights (W, b per layer) or two k-slice stages of
// ks x (256 + 4).

FF_DEVICE int cp_fwd_act_len(const CpNet& net, int tm) {
    const int ldp = net.np[net.layers - 1] + 4;
    return max(net.hmax * (tm + 4), tm * ldp);
}

// Resident weights of layer l: W (kp rows of np + 4), b (np), and for the backward W^T (np rows
// of kp + 4); the padded rows keep the tensor-core fragment loads free of bank conflicts.
FF_DEVICE int cp_resident_layer_len(const CpNet& net, int l, bool with_transpose) {
    const int kp = net.kp[l], np = net.np[l];
    return kp * (np + 4) + np + (with_transpose ? np * (kp + 4) : 0);
}

FF_DEVICE int cp_resident_len(const CpNet& net, bool with_transpose) {
    int len = 0;
    for (int l = 0; l < net.layers; ++l) len += cp_resident_layer_len(net, l, with_transpose);
    return len;
}

FF_DEVICE int cp_stage_len(const CpNet& net, int ks) { return 2 * ks * cp_stage_ld(cp_chunk(net.hmax)); }

// Copies every layer's packed W, b (and W^T) into shared memory with padded rows.
FF_DEVICE void cp_load_resident(float* dst, const float* __restrict__ packed, const CpNet& net,
                                bool with_transpose) {
    for (int l = 0; l < net.layers; ++l) {
        const int kp = net.kp[l], np = net.np[l];
        const int parts = with_transpose ? 3 : 2;
        for (int part = 0; part < parts; ++part) {
            // (rows, columns) of W, b, W^T and where they come from and go to.
            const int rows = part == 0 ? kp : part == 1 ? 1 : np;
            const int cols = part == 0 ? np : part == 1 ? np : kp;
            const int ld = part == 1 ? np : cols + 4;
            const float* src = packed + (part == 0 ? net.off_w[l] : part == 1 ? net.off_b[l] : net.off_wt[l]);
            float* d = dst + (part == 0 ? 0 : part == 1 ? kp * (np + 4) : kp * (np + 4) + np);
            const int vpr = cols / 4;
            for (int i = threadIdx.x; i < rows * vpr; i += CP_THREADS) {
                const int r = i / vpr, c = (i % vpr) * 4;
                *reinterpret_cast<float4*>(d + r * ld + c) = *reinterpret_cast<const float4*>(src + r * cols + c);
            }
        }
        dst += cp_resident_layer_len(net, l, with_transpose);
    }
    __syncthreads();
}

// Layer l's operands: W (ldw), b, W^T (ldwt), resident in shared memory or the packed global
// buffer.
struct CpLayerPtrs {
    const float* w;
    const float* b;
    const float* wt;
    int ldw, ldwt;
};

FF_DEVICE CpLayerPtrs cp_layer_ptrs(const CpNet& net, int l, bool resident, bool with_transpose,
                                    const float* wsm, const float* packed) {
    const int kp = net.kp[l], np = net.np[l];
    CpLayerPtrs p;
    if (resident) {
        int at = 0;
        for (int i = 0; i < l; ++i) at += cp_resident_layer_len(net, i, with_transpose);
        p.w = wsm + at;
        p.b = p.w + kp * (np + 4);
        p.wt = p.b + np;
        p.ldw = np + 4;
        p.ldwt = kp + 4;
    } else {
        p.w = packed + net.off_w[l];
        p.b = packed + net.off_b[l];
        p.wt = packed + net.off_wt[l];
        p.ldw = np;
        p.ldwt = kp;
    }
    return p;
}

extern "C" __global__ void __launch_bounds__(CP_THREADS, 1)
coupling_fwd_f32(const float* __restrict__ x, float* __restrict__ y, float* __restrict__ logdet,
                 const float* __restrict__ packed, long long* status, int rows, int dim, int copied_upper, int kind,
                 int dir, float hp, int bins, float dshift, int layers, int act, int n0, int n1, int n2, int n3,
                 int n4, int tm, int resident, int ks, int smem_bytes) {
    __shared__ CpNet net;
    if (threadIdx.x == 0) cp_net_init(&net, layers, act, n0, n1, n2, n3, n4);
    __syncthreads();
    const int L = net.layers;
    const int tms = tm + 4;
    const int ldp = net.np[L - 1] + 4;
    const int act_len = cp_fwd_act_len(net, tm);
    const int need = 2 * act_len + (resident ? cp_resident_len(net, false) : cp_stage_len(net, ks));
    if ((long long)need * 4 > smem_bytes) {
        // Host and kernel disagree about the plan: report it rather than run past the buffer.
        if (threadIdx.x == 0) cp_flag(status, CP_ST_LAYOUT, need);
        return;
    }
    float* sm = reinterpret_cast<float*>(ff_smem);
    float* buf[2] = {sm, sm + act_len};
    float* wsm = sm + 2 * act_len;
    if (resident) cp_load_resident(wsm, packed, net, false);
    const CpRows rw = cp_rows(rows, dim, copied_upper);
    const CpTransform tf = cp_transform(kind, dir, bins, hp, dshift);

    const int tiles = (int)(((long long)rows + tm - 1) / tm);
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long row0 = (long long)tile * tm;
        const int valid = (int)min((long long)tm, rows - row0);
        cp_load_copied(buf[0], tms, tm, net.kp[0], x, rw, row0, valid, status);
        __syncthreads();
        int cur = 0;
        for (int l = 0; l < L; ++l) {
            const bool last = l + 1 == L;
            const int kp = net.kp[l], np = net.np[l];
            const CpLayerPtrs w = cp_layer_ptrs(net, l, resident != 0, false, wsm, packed);
            CpGemm g;
            g.rows = tm;
            g.cols = np;
            g.red = kp;
            g.a = buf[cur];
            g.a_red = tms;
            g.a_row = 1;
            g.b = w.w;
            g.bias = w.b;
            g.staged = !resident;
            g.ldb = w.ldw;
            g.stage = wsm;
            g.ks = ks;
            g.epi = last ? CP_EPI_ROW : CP_EPI_T;
            g.act = net.act;
            g.out = buf[cur ^ 1];
            g.ldo = last ? ldp : tms;
            g.gate = nullptr;
            g.ldgate = 0;
            cp_gemm(g);
            cur ^= 1;
        }
        cp_transform_tile(tf, rw, buf[cur], ldp, tm, row0, valid, x, y, logdet, status);
        // The next tile's copied half overwrites buf[0], which may hold these parameters.
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// f32 backward. Per tile: recompute the pre-activations z_l of every hidden layer (kept), the
// conditioner output, the transform's backward into dL/d params, then down the layers
//   dW_l += h_l^T dZ_{l+1},  db_l += colsum dZ_{l+1},  dZ_l = (dZ_{l+1} W_l^T) * act'(z_l).
// Before layer l's products, one pass turns z_l into h_l = act(z_l) in place and writes
// act'(z_l) into the free gradient buffer, where the dZ_l product then scales it in place; so
// each hidden layer costs one tile buffer. The recompute's h_l scratch lives in the second
// gradient buffer, unused until the transform's backward.
// dW and db go to this block's private partial in global memory (no atomics);
// coupling_grad_reduce_f32 sums the partials in block order, so gradients are deterministic.
//
// Shared memory (floats): xa (kp0 x TMS), z_1..z_{L-1} (np_{l-1} x TMS), Z0, Z1 (each
// max(TM x ldz, hidden_max x TMS), ldz = hmax + 4), then resident W, b, W^T per layer or two
// ks x (256 + 4) stages.

FF_DEVICE int cp_bwd_zlen(const CpNet& net, int tm) {
    return max(tm * (net.hmax + 4), net.hidden_max * (tm + 4));
}

FF_DEVICE int cp_bwd_len(const CpNet& net, int tm, bool resident, int ks) {
    const int tms = tm + 4;
    int len = net.kp[0] * tms;
    for (int l = 1; l < net.layers; ++l) len += net.np[l - 1] * tms;
    len += 2 * cp_bwd_zlen(net, tm);
    len += resident ? cp_resident_len(net, true) : cp_stage_len(net, ks);
    return len;
}

// Transform backward of a tile: params row-major in P (ldz), dL/d params into G (zeroed).
FF_DEVICE void cp_transform_tile_backward(const CpTransform& t, const CpRows& rw, const float* P, float* G,
                                          int ldz, int tm, long long row0, int valid,
                                          const float* __restrict__ x, const float* __restrict__ d_out,
                                          const float* __restrict__ d_logdet, float* __restrict__ d_in,
                                          long long* status) {
    const int group = cp_group(rw.nb);
    const int lane = threadIdx.x % FF_WARP, warp = threadIdx.x / FF_WARP;
    const int sub = lane / group, jl = lane % group;
    const int per_warp = FF_WARP / group;
    const int per_pass = per_warp * (CP_THREADS / FF_WARP);
    for (int base = 0; base < tm; base += per_pass) {
        const int m = base + warp * per_warp + sub;
        if (m >= valid) continue;
        const long long r = row0 + m;
        const float g_ld = d_logdet[r];
        if (jl == 0 && !cp_finite(g_ld)) cp_flag(status, CP_ST_DLOGDET, r);
        for (int j = jl; j < rw.nb; j += group) {
            const long long at = r * rw.dim + rw.t0 + j;
            const float v = x[at], g_out = d_out[at];
            if (!cp_finite(v)) cp_flag(status, CP_ST_INPUT, at);
            if (!cp_finite(g_out)) cp_flag(status, CP_ST_DOUT, at);
            const float g = cp_apply_backward(t, P + m * ldz, rw.nb, j, v, g_out, g_ld, G + m * ldz);
            d_in[at] = g;
            if (!cp_finite(g)) cp_flag(status, CP_ST_DINPUT, at);
        }
    }
}

// The start of hidden layer l's pre-activation buffer z_l (l >= 1).
FF_DEVICE float* cp_zbuf(float* first, const CpNet& net, int tms, int l) {
    float* p = first;
    for (int i = 1; i < l; ++i) p += net.np[i - 1] * tms;
    return p;
}

// The products of the backward: f32 FMAs, or (MMA) bf16 tensor cores with f32 accumulation.
template <bool MMA>
FF_DEVICE void cp_bgemm(const CpGemm& g) {
    if constexpr (MMA) {
        cp_gemm_mma(g);
    } else {
        cp_gemm(g);
    }
}

template <bool MMA>
FF_DEVICE void cp_backward(const CpNet& net, const float* __restrict__ x, const float* __restrict__ d_out,
                           const float* __restrict__ d_logdet, float* __restrict__ d_in,
                           float* __restrict__ partial, const float* __restrict__ packed, long long* status,
                           int rows, int dim, int copied_upper, int kind, int dir, float hp, int bins, float dshift,
                           int tm, int resident, int ks, int smem_bytes) {
    const int L = net.layers;
    const int tms = tm + 4;
    const int ldz = net.hmax + 4;
    const int need = cp_bwd_len(net, tm, resident != 0, ks);
    // The tensor-core engine takes 32-row multiples and 16-deep slices (the host plans so).
    const bool shape_ok = !MMA || (tm % 32 == 0 && ks % 16 == 0);
    if ((long long)need * 4 > smem_bytes || !shape_ok) {
        if (threadIdx.x == 0) cp_flag(status, CP_ST_LAYOUT, need);
        return;
    }
    float* sm = reinterpret_cast<float*>(ff_smem);
    float* xa = sm;
    float* z1 = xa + net.kp[0] * tms;
    float* zend = cp_zbuf(z1, net, tms, L);
    const int zlen = cp_bwd_zlen(net, tm);
    float* Z0 = zend;
    float* Z1 = zend + zlen;
    float* wsm = Z1 + zlen;
    if (resident) cp_load_resident(wsm, packed, net, true);
    float* my_partial = partial + (long long)blockIdx.x * net.grad_len;
    const CpRows rw = cp_rows(rows, dim, copied_upper);
    const CpTransform tf = cp_transform(kind, dir, bins, hp, dshift);
    const int actc = net.act;

    const int tiles = (int)(((long long)rows + tm - 1) / tm);
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long row0 = (long long)tile * tm;
        const int valid = (int)min((long long)tm, rows - row0);
        cp_load_copied(xa, tms, tm, net.kp[0], x, rw, row0, valid, status);
        __syncthreads();

        // Recompute: z_{l+1} = h_l W_l + b_l kept, h_{l+1} = act(z_{l+1}) in Z1 as the next
        // layer's input; the conditioner output goes to Z0, row-major.
        for (int l = 0; l < L; ++l) {
            const bool last = l + 1 == L;
            const int kp = net.kp[l], np = net.np[l];
            const CpLayerPtrs w = cp_layer_ptrs(net, l, resident != 0, true, wsm, packed);
            float* z = cp_zbuf(z1, net, tms, l + 1);
            CpGemm g;
            g.rows = tm;
            g.cols = np;
            g.red = kp;
            g.a = l == 0 ? xa : Z1;
            g.a_red = tms;
            g.a_row = 1;
            g.staged = !resident;
            g.b = w.w;
            g.bias = w.b;
            g.ldb = w.ldw;
            g.stage = wsm;
            g.ks = ks;
            g.epi = last ? CP_EPI_ROW : CP_EPI_T;
            g.act = -1;
            g.out = last ? Z0 : z;
            g.ldo = last ? ldz : tms;
            g.gate = nullptr;
            g.ldgate = 0;
            cp_bgemm<MMA>(g);
            if (!last) {
                for (int i = threadIdx.x; i < np * tm; i += CP_THREADS) {
                    const int k = i / tm, m = i % tm;
                    Z1[k * tms + m] = ff_act(actc, z[k * tms + m]);
                }
                __syncthreads();
            }
        }

        // dL/d params of the tile into Z1 (zero where no parameter or no row).
        for (int i = threadIdx.x; i < zlen; i += CP_THREADS) Z1[i] = 0.0f;
        __syncthreads();
        cp_transform_tile_backward(tf, rw, Z0, Z1, ldz, tm, row0, valid, x, d_out, d_logdet, d_in, status);
        __syncthreads();

        float* dz = Z1;     // dZ_{l+1}, row-major
        float* other = Z0;  // free: receives act'(z_l), then dZ_l in place
        for (int l = L - 1; l >= 0; --l) {
            const int kp = net.kp[l], np = net.np[l];
            const CpLayerPtrs w = cp_layer_ptrs(net, l, resident != 0, true, wsm, packed);
            float* z = l >= 1 ? cp_zbuf(z1, net, tms, l) : nullptr;
            // db_l: column sums of dZ over the tile (threads over columns, a short f32 sum).
            float* pb = my_partial + net.goff_b[l];
            for (int n = threadIdx.x; n < np; n += CP_THREADS) {
                float s = 0.0f;
                for (int m = 0; m < tm; ++m) s += dz[m * ldz + n];
                pb[n] += s;
            }
            if (l >= 1) {
                for (int i = threadIdx.x; i < kp * tm; i += CP_THREADS) {
                    const int k = i / tm, m = i % tm;
                    const float v = z[k * tms + m];
                    other[m * ldz + k] = ff_act_grad(actc, v);
                    z[k * tms + m] = ff_act(actc, v);
                }
                __syncthreads();
            }
            {
                // dW_l += h_l^T dZ: rows k, columns n, reduction over the tile's rows.
                CpGemm g;
                g.rows = kp;
                g.cols = np;
                g.red = tm;
                g.a = l == 0 ? xa : z;
                g.a_red = 1;
                g.a_row = tms;
                g.b = dz;
                g.ldb = ldz;
                g.staged = 0;
                g.stage = wsm;
                g.ks = ks;
                g.epi = CP_EPI_ACCUM;
                g.bias = nullptr;
                g.act = -1;
                g.out = my_partial + net.goff_w[l];
                g.ldo = np;
                g.gate = nullptr;
                g.ldgate = 0;
                cp_bgemm<MMA>(g);
            }
            {
                // dZ_l = (dZ W_l^T) * act'(z_l), in place over act'(z_l); the input layer's
                // product is the copied half's gradient through the conditioner.
                CpGemm g;
                g.rows = tm;
                g.cols = kp;
                g.red = np;
                g.a = dz;
                g.a_red = 1;
                g.a_row = ldz;
                g.staged = !resident;
                g.b = w.wt;
                g.ldb = w.ldwt;
                g.stage = wsm;
                g.ks = ks;
                g.epi = CP_EPI_GATE;
                g.bias = nullptr;
                g.act = -1;
                g.out = other;
                g.ldo = ldz;
                g.gate = l >= 1 ? other : nullptr;
                g.ldgate = ldz;
                cp_bgemm<MMA>(g);
            }
            float* t = dz;
            dz = other;
            other = t;
        }

        // The copied half: pass-through gradient plus the conditioner's input gradient.
        for (int i = threadIdx.x; i < valid * rw.na; i += CP_THREADS) {
            const int m = i / rw.na, a = i % rw.na;
            const long long at = (row0 + m) * rw.dim + rw.a0 + a;
            const float go = d_out[at];
            if (!cp_finite(go)) cp_flag(status, CP_ST_DOUT, at);
            const float g = go + dz[m * ldz + a];
            d_in[at] = g;
            if (!cp_finite(g)) cp_flag(status, CP_ST_DINPUT, at);
        }
        __syncthreads();
    }
}

#define CP_BWD_KERNEL(NAME, MMA)                                                                      \
    extern "C" __global__ void __launch_bounds__(CP_THREADS, 1)                                      \
    NAME(const float* __restrict__ x, const float* __restrict__ d_out, const float* __restrict__ d_logdet, \
         float* __restrict__ d_in, float* __restrict__ partial, const float* __restrict__ packed,      \
         long long* status, int rows, int dim, int copied_upper, int kind, int dir, float hp, int bins,  \
         float dshift, int layers, int act, int n0, int n1, int n2, int n3, int n4, int tm, int resident, \
         int ks, int smem_bytes) {                                                                     \
        __shared__ CpNet net;                                                                          \
        if (threadIdx.x == 0) cp_net_init(&net, layers, act, n0, n1, n2, n3, n4);                      \
        __syncthreads();                                                                               \
        cp_backward<MMA>(net, x, d_out, d_logdet, d_in, partial, packed, status, rows, dim, copied_upper, \
                         kind, dir, hp, bins, dshift, tm, resident, ks, smem_bytes);                   \
    }

CP_BWD_KERNEL(coupling_bwd_f32, false)
// Precision::Bf16: the same backward with its products on tensor cores (coupling_mma.cuh).
CP_BWD_KERNEL(coupling_bwd_bf16, true)

// Sums the per-block gradient partials in block order (f64) into the conditioner's gradient
// tensors, dropping the padding.
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
coupling_grad_reduce_f32(const float* __restrict__ partial, int blocks, float* __restrict__ gw0,
                         float* __restrict__ gb0, float* __restrict__ gw1, float* __restrict__ gb1,
                         float* __restrict__ gw2, float* __restrict__ gb2, float* __restrict__ gw3,
                         float* __restrict__ gb3, long long* status, int layers, int act, int n0, int n1, int n2,
                         int n3, int n4) {
    __shared__ CpNet net;
    __shared__ int first[2 * CP_MAX_LAYERS + 1];
    if (threadIdx.x == 0) {
        cp_net_init(&net, layers, act, n0, n1, n2, n3, n4);
        int at = 0;
        for (int t = 0; t < 2 * CP_MAX_LAYERS; ++t) {
            first[t] = at;
            const int l = t / 2;
            if (l < layers) at += (t % 2 == 0 ? net.width[l] : 1) * net.width[l + 1];
        }
        first[2 * CP_MAX_LAYERS] = at;
    }
    __syncthreads();
    FF_GRID_STRIDE(i, first[2 * net.layers]) {
        int t = 0;
        while (i >= first[t + 1]) ++t;
        const int l = t / 2, N = net.width[l + 1];
        const int idx = (int)(i - first[t]);
        const int goff = t % 2 == 0 ? net.goff_w[l] + (idx / N) * net.np[l] + idx % N : net.goff_b[l] + idx;
        double s = 0.0;
        for (int b = 0; b < blocks; ++b) s += (double)partial[(long long)b * net.grad_len + goff];
        const float v = (float)s;
        float* out = t % 2 == 0 ? (l == 0 ? gw0 : l == 1 ? gw1 : l == 2 ? gw2 : gw3)
                                : (l == 0 ? gb0 : l == 1 ? gb1 : l == 2 ? gb2 : gb3);
        out[idx] = v;
        if (!cp_finite(v)) cp_flag(status, CP_ST_GRAD, ((long long)t << 40) | idx);
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 forward / inverse on tensor cores (Precision::Bf16): the matrix products take bf16
// weights (converted once per call by coupling_pack_bf16) and bf16 activations (converted as
// they are written to shared memory), accumulate in f32; biases, the conditioner output, the
// transform and the log-dets stay f32. Tiles are 64 rows.

// Offset (in bf16 elements) of layer l's W^T in the bf16 buffer: layers back to back, np x kp.
FF_DEVICE int cp_bf16_offset(const CpNet& net, int l) {
    int at = 0;
    for (int i = 0; i < l; ++i) at += net.np[i] * net.kp[i];
    return at;
}

extern "C" __global__ void __launch_bounds__(FF_BLOCK)
coupling_pack_bf16(const float* __restrict__ w0, const float* __restrict__ w1, const float* __restrict__ w2,
                   const float* __restrict__ w3, unsigned short* __restrict__ wt, int layers, int act, int n0,
                   int n1, int n2, int n3, int n4) {
    __shared__ CpNet net;
    __shared__ int start[CP_MAX_LAYERS + 1];
    if (threadIdx.x == 0) {
        cp_net_init(&net, layers, act, n0, n1, n2, n3, n4);
        for (int l = 0; l <= CP_MAX_LAYERS; ++l) start[l] = cp_bf16_offset(net, min(l, layers));
    }
    __syncthreads();
    FF_GRID_STRIDE(i, start[net.layers]) {
        int l = 0;
        while (l + 1 < net.layers && i >= start[l + 1]) ++l;
        const int K = net.width[l], N = net.width[l + 1], kp = net.kp[l];
        const int rel = (int)(i - start[l]);
        const int n = rel / kp, k = rel % kp;
        const float v = (k < K && n < N) ? cp_pick(l, w0, w1, w2, w3)[k * N + n] : 0.0f;
        wt[i] = ff_f32_to_bf16(v);
    }
}

FF_DEVICE int cp_fwd_bf16_len(const CpNet& net, bool resident) {
    const int lda = net.hmax + CP_MMA_PAD;
    int len = 2 * (CP_MMA_TM * lda / 2) + CP_MMA_TM * (net.np[net.layers - 1] + 4);
    if (resident) {
        for (int l = 0; l < net.layers; ++l) len += net.np[l] * (net.kp[l] + CP_MMA_PAD) / 2;
    } else {
        len += 2 * 256 * (CP_MMA_KS + CP_MMA_PAD) / 2;
    }
    return len;
}

extern "C" __global__ void __launch_bounds__(CP_THREADS, 1)
coupling_fwd_bf16(const float* __restrict__ x, float* __restrict__ y, float* __restrict__ logdet,
                  const float* __restrict__ packed, const unsigned short* __restrict__ wt, long long* status,
                  int rows, int dim, int copied_upper, int kind, int dir, float hp, int bins, float dshift,
                  int layers, int act, int n0, int n1, int n2, int n3, int n4, int resident, int smem_bytes) {
    __shared__ CpNet net;
    if (threadIdx.x == 0) cp_net_init(&net, layers, act, n0, n1, n2, n3, n4);
    __syncthreads();
    const int L = net.layers;
    const int tm = CP_MMA_TM;
    const int lda = net.hmax + CP_MMA_PAD;
    const int ldp = net.np[L - 1] + 4;
    const int need = cp_fwd_bf16_len(net, resident != 0);
    if ((long long)need * 4 > smem_bytes) {
        if (threadIdx.x == 0) cp_flag(status, CP_ST_LAYOUT, need);
        return;
    }
    float* sm = reinterpret_cast<float*>(ff_smem);
    unsigned short* act0 = reinterpret_cast<unsigned short*>(sm);
    unsigned short* act1 = act0 + tm * lda;
    float* params = sm + tm * lda;  // two bf16 buffers of tm x lda = tm x lda floats
    unsigned short* wsm = reinterpret_cast<unsigned short*>(params + tm * ldp);
    if (resident) {
        // W^T of every layer, rows padded to kp + 8.
        int at = 0;
        for (int l = 0; l < L; ++l) {
            const int kp = net.kp[l], np = net.np[l], vpr = kp / 8;
            const unsigned short* src = wt + cp_bf16_offset(net, l);
            for (int i = threadIdx.x; i < np * vpr; i += CP_THREADS) {
                const int n = i / vpr, part = i % vpr;
                *reinterpret_cast<uint4*>(wsm + at + n * (kp + CP_MMA_PAD) + part * 8) =
                    *reinterpret_cast<const uint4*>(src + n * kp + part * 8);
            }
            at += np * (kp + CP_MMA_PAD);
        }
        __syncthreads();
    }
    const CpRows rw = cp_rows(rows, dim, copied_upper);
    const CpTransform tf = cp_transform(kind, dir, bins, hp, dshift);

    const int tiles = (int)(((long long)rows + tm - 1) / tm);
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long row0 = (long long)tile * tm;
        const int valid = (int)min((long long)tm, rows - row0);
        // Row-major in bf16 (row m at act0 + m * lda).
        cp_each_copied(tm, net.kp[0], x, rw, row0, valid, status,
                       [&](int m, int a, float v) { act0[m * lda + a] = ff_f32_to_bf16(v); });
        __syncthreads();
        int cur = 0, roff = 0;
        for (int l = 0; l < L; ++l) {
            const bool last = l + 1 == L;
            const int kp = net.kp[l], np = net.np[l];
            CpMma g;
            g.cols = np;
            g.red = kp;
            g.a = cur ? act1 : act0;
            g.lda = lda;
            g.staged = !resident;
            g.b = resident ? wsm + roff : wt + cp_bf16_offset(net, l);
            g.ldb = resident ? kp + CP_MMA_PAD : kp;
            g.stage = wsm;
            g.bias = packed + net.off_b[l];
            g.act = net.act;
            g.last = last;
            g.out_bf = cur ? act0 : act1;
            g.out_f = params;
            g.ldo = last ? ldp : lda;
            cp_mma(g);
            roff += np * (kp + CP_MMA_PAD);
            cur ^= 1;
        }
        cp_transform_tile(tf, rw, params, ldp, tm, row0, valid, x, y, logdet, status);
        __syncthreads();
    }
}
