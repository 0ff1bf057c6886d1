// Element-wise glue between the fused layers: linear combinations, gathers (permutation
// layers, mini-batches), and the ActNorm / standardisation affine map with its backward.
#include "common.cuh"

// out = a * x + b * y
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
elem_axpby_f32(const float* __restrict__ x, const float* __restrict__ y, float* __restrict__ out, long long n, float a, float b) {
    FF_GRID_STRIDE(i, n) out[i] = a * x[i] + b * y[i];
}

extern "C" __global__ void __launch_bounds__(FF_BLOCK)
elem_mul_f32(const float* __restrict__ x, const float* __restrict__ y, float* __restrict__ out, long long n) {
    FF_GRID_STRIDE(i, n) out[i] = x[i] * y[i];
}

extern "C" __global__ void __launch_bounds__(FF_BLOCK)
elem_fill_f32(float* __restrict__ out, long long n, float value) {
    FF_GRID_STRIDE(i, n) out[i] = value;
}

// out[r, j] = x[r, perm[j]]
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
elem_gather_cols_f32(const float* __restrict__ x, const unsigned int* __restrict__ perm, float* __restrict__ out, int rows, int cols) {
    FF_GRID_STRIDE(i, (long long)rows * cols) {
        const long long r = i / cols;
        const int j = (int)(i % cols);
        out[i] = x[r * cols + perm[j]];
    }
}

// out[r, :] = x[idx[r], :]
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
elem_gather_rows_f32(const float* __restrict__ x, const unsigned int* __restrict__ idx, float* __restrict__ out, int rows, int cols) {
    FF_GRID_STRIDE(i, (long long)rows * cols) {
        const long long r = i / cols;
        const int j = (int)(i % cols);
        out[i] = x[(long long)idx[r] * cols + j];
    }
}

// Forward (dir 0): y = x * exp(ls) + loc;  Inverse (dir 1): y = (x - loc) * exp(-ls).
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
elem_scale_shift_f32(const float* __restrict__ x, const float* __restrict__ loc, const float* __restrict__ ls,
                     float* __restrict__ y, int rows, int cols, int dir) {
    FF_GRID_STRIDE(i, (long long)rows * cols) {
        const int j = (int)(i % cols);
        y[i] = dir == 0 ? x[i] * expf(ls[j]) + loc[j] : (x[i] - loc[j]) * expf(-ls[j]);
    }
}

// Per-element terms of the scale_shift backward; their column sums are dL/dloc and dL/dls.
// Forward:  dx = g e^ls,   t_loc = g,            t_ls = g x e^ls + dld
// Inverse:  dx = g e^-ls,  t_loc = -g e^-ls,     t_ls = -g (x - loc) e^-ls - dld
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
elem_scale_shift_bwd_f32(const float* __restrict__ x, const float* __restrict__ loc, const float* __restrict__ ls,
                         const float* __restrict__ g, const float* __restrict__ dld,
                         float* __restrict__ dx, float* __restrict__ t_loc, float* __restrict__ t_ls,
                         int rows, int cols, int dir) {
    FF_GRID_STRIDE(i, (long long)rows * cols) {
        const long long r = i / cols;
        const int j = (int)(i % cols);
        if (dir == 0) {
            const float s = expf(ls[j]);
            dx[i] = g[i] * s;
            t_loc[i] = g[i];
            t_ls[i] = g[i] * x[i] * s + dld[r];
        } else {
            const float s = expf(-ls[j]);
            dx[i] = g[i] * s;
            t_loc[i] = -g[i] * s;
            t_ls[i] = -g[i] * (x[i] - loc[j]) * s - dld[r];
        }
    }
}

// Column statistics. Block: 32 columns (threadIdx.x) x 8 row lanes (threadIdx.y); each thread
// walks its rows, then the 8 lanes are summed as a tree in shared memory.
// mode 0: out[j] = sum_r x[r, j]
// mode 1: out[j] = mean_r x[r, j], out2[j] = population std of column j (two-pass)
#define FF_COL_LANES 8
extern "C" __global__ void __launch_bounds__(32 * FF_COL_LANES)
elem_col_stats_f32(const float* __restrict__ x, float* __restrict__ out, float* __restrict__ out2, int rows, int cols, int mode) {
    __shared__ float acc[FF_COL_LANES][32];
    const int j = blockIdx.x * 32 + threadIdx.x;
    const int ty = threadIdx.y;
    float s = 0.0f;
    if (j < cols)
        for (int r = ty; r < rows; r += FF_COL_LANES) s += x[(long long)r * cols + j];
    acc[ty][threadIdx.x] = s;
    __syncthreads();
    for (int half = FF_COL_LANES / 2; half > 0; half >>= 1) {
        if (ty < half) acc[ty][threadIdx.x] += acc[ty + half][threadIdx.x];
#ifndef FF_PLANT_NO_BARRIER  // a planted bug for the emulator's tests removes this barrier
        __syncthreads();
#endif
    }
    const float total = acc[0][threadIdx.x];
    if (mode == 0) {
        if (ty == 0 && j < cols) out[j] = total;
        return;
    }
    const float mean = total / (float)rows;
    __syncthreads();  // everyone has read acc[0] before it is reused
    float q = 0.0f;
    if (j < cols)
        for (int r = ty; r < rows; r += FF_COL_LANES) {
            const float c = x[(long long)r * cols + j] - mean;
            q += c * c;
        }
    acc[ty][threadIdx.x] = q;
    __syncthreads();
    for (int half = FF_COL_LANES / 2; half > 0; half >>= 1) {
        if (ty < half) acc[ty][threadIdx.x] += acc[ty + half][threadIdx.x];
        __syncthreads();
    }
    if (ty == 0 && j < cols) {
        out[j] = mean;
        out2[j] = sqrtf(acc[0][threadIdx.x] / (float)rows);
    }
}

// out[r] = sign * sum_j ls[j] for every row: the log-det of the element-wise affine map, the
// same for every row. Each block sums ls itself (a block tree), then writes its share of rows.
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
elem_logdet_broadcast_f32(const float* __restrict__ ls, float* __restrict__ out, int rows, int cols, float sign) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += ls[j];
    s = sign * ff_block_sum(s, scratch);
    FF_GRID_STRIDE(r, rows) out[r] = s;
}
