// The Adam update (with decoupled weight decay), one thread per parameter.
#include "common.cuh"

// g is multiplied by grad_scale (global-norm clipping) before the moments are updated;
// lr_t = lr / (1 - beta1^t), c2 = 1 - beta2^t, decay = 1 - lr * weight_decay.
extern "C" __global__ void __launch_bounds__(FF_BLOCK)
optim_adam_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
               long long n, float lr_t, float beta1, float beta2, float eps, float c2, float decay, float grad_scale) {
    FF_GRID_STRIDE(i, n) {
        const float gi = g[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - lr_t * mi / (sqrtf(vi / c2) + eps);
    }
}
