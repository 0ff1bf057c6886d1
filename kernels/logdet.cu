// Triangular log-det sums and batch reductions (eq. 18.16: the log|det| of a triangular
// Jacobian is the sum of the logs of its diagonal). All sums are f32 warp trees; batch totals
// are two-stage (per-block partials, then one block), so results are deterministic.
#include "common.cuh"

// out[r] = sum_j x[r, j]: one warp per row.
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
logdet_row_sum_f32(const float* __restrict__ x, float* __restrict__ out, int rows, int cols) {
    const int lane = threadIdx.x % FF_WARP;
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / FF_WARP;
    if (row >= rows) return;  // whole warps leave together: rows map to warps
    const float* xr = x + row * cols;
    float s = 0.0f;
#ifdef FF_PLANT_OFF_BY_ONE
    // Planted bug, built only for the emulator's tests: the bound admits one column too many.
    for (int j = lane; j <= cols; j += FF_WARP) s += xr[j];
#else
    for (int j = lane; j < cols; j += FF_WARP) s += xr[j];
#endif
#ifdef FF_PLANT_WRONG_SHUFFLE
    // Planted bug, built only for the emulator's tests: the butterfly pairs the wrong lanes.
    for (int offset = 15; offset > 0; offset >>= 1) s += __shfl_xor_sync(FF_FULL_MASK, s, offset);
#else
    s = ff_warp_sum(s);
#endif
    if (lane == 0) out[row] = s;
}

// out[r] = log N(z_r; 0, I) = -0.5 |z_r|^2 - cols * 0.5 log(2 pi): one warp per row.
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
logdet_gauss_f32(const float* __restrict__ z, float* __restrict__ out, int rows, int cols) {
    const int lane = threadIdx.x % FF_WARP;
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / FF_WARP;
    if (row >= rows) return;
    const float* zr = z + row * cols;
    float s = 0.0f;
    for (int j = lane; j < cols; j += FF_WARP) s += zr[j] * zr[j];
    s = ff_warp_sum(s);
    if (lane == 0) out[row] = -0.5f * s - (float)cols * FF_HALF_LOG_2PI;
}

// partial[slot + blockIdx.x] = sum over this block's grid-stride share of x (squared when
// `square` is set). A second launch with one block reduces the partials.
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
logdet_partial_sum_f32(const float* __restrict__ x, float* __restrict__ partial, long long n, int square, int slot) {
    __shared__ float scratch[32];
    float s = 0.0f;
    FF_GRID_STRIDE(i, n) {
        const float v = x[i];
        s += square ? v * v : v;
    }
    s = ff_block_sum(s, scratch);
    if (threadIdx.x == 0) partial[slot + blockIdx.x] = s;
}
