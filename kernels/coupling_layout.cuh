// The conditioner's layout inside the coupling kernels: padded widths, offsets of the packed
// weights and of the per-block gradient partials. src/ops/coupling/cuda.rs computes the same
// numbers on the host (NetLayout); the kernels check their shared-memory plan against the size
// the host launched with and report a mismatch instead of running past it.
#pragma once
#include "common.cuh"

// Threads per block of every coupling kernel except the packers and the reduction.
#define CP_THREADS 256
// The deepest conditioner the kernels take: 4 linear layers (3 hidden).
#define CP_MAX_LAYERS 4

// Status slots (long long each, zero-initialised by the host). A slot holds LLONG_MAX - key of
// the smallest key seen, so that atomicMax keeps the first offender whatever the thread order
// and 0 means "none".
#define CP_ST_INPUT 0     // key = row * dim + col
#define CP_ST_PARAM 1     // key = tensor << 40 | flat index (tensor = 2 l for w_l, 2 l + 1 for b_l)
#define CP_ST_OUTPUT 2    // key = row * dim + col
#define CP_ST_LOGDET 3    // key = row
#define CP_ST_DOUT 4      // key = row * dim + col
#define CP_ST_DLOGDET 5   // key = row
#define CP_ST_DINPUT 6    // key = row * dim + col
#define CP_ST_GRAD 7      // key as CP_ST_PARAM
#define CP_ST_LAYOUT 8    // key = shared-memory floats the kernel needed (host/kernel disagree)
#define CP_ST_SLOTS 9

#define CP_KEY_NONE 0x7fffffffffffffffLL

FF_DEVICE void cp_flag(long long* status, int slot, long long key) {
    atomicMax(status + slot, CP_KEY_NONE - key);
}

FF_DEVICE bool cp_finite(float v) { return fabsf(v) <= 3.402823466e38f; }

// Padded width of a layer input or output: a multiple of its column chunk, so that the tile
// GEMM below never needs a bounds test (the padding is zero weights).
FF_DEVICE int cp_pad(int n) {
    return n <= 32 ? 32 : n <= 64 ? 64 : n <= 128 ? 128 : ((n + 255) / 256) * 256;
}

// Output columns one pass of the tile GEMM covers (8 per thread column).
FF_DEVICE int cp_chunk(int padded) { return padded >= 256 ? 256 : padded; }

// The conditioner: widths, padded widths and offsets (in floats) of
// - the packed f32 weights: per layer W (kp x np), b (np), W^T (np x kp), all zero-padded;
// - one block's gradient partials: per layer dW (kp x np), db (np).
struct CpNet {
    int layers;
    int act;
    int width[CP_MAX_LAYERS + 1];
    int kp[CP_MAX_LAYERS];
    int np[CP_MAX_LAYERS];
    int off_w[CP_MAX_LAYERS];
    int off_b[CP_MAX_LAYERS];
    int off_wt[CP_MAX_LAYERS];
    int goff_w[CP_MAX_LAYERS];
    int goff_b[CP_MAX_LAYERS];
    int packed_len;
    int grad_len;
    int hmax;         // widest padded layer input or output
    int hidden_max;   // widest padded hidden layer (0 without hidden layers)
};

FF_DEVICE void cp_net_init(CpNet* n, int layers, int act, int w0, int w1, int w2, int w3, int w4) {
    n->layers = layers;
    n->act = act;
    n->width[0] = w0;
    n->width[1] = w1;
    n->width[2] = w2;
    n->width[3] = w3;
    n->width[4] = w4;
    int off = 0, goff = 0, hmax = 0, hid = 0;
    for (int l = 0; l < CP_MAX_LAYERS; ++l) {
        const bool used = l < layers;
        const int kp = used ? cp_pad(n->width[l]) : 0;
        const int np = used ? cp_pad(n->width[l + 1]) : 0;
        n->kp[l] = kp;
        n->np[l] = np;
        n->off_w[l] = off;
        n->off_b[l] = off + kp * np;
        n->off_wt[l] = off + kp * np + np;
        off += 2 * kp * np + np;
        n->goff_w[l] = goff;
        n->goff_b[l] = goff + kp * np;
        goff += kp * np + np;
        hmax = max(hmax, max(kp, np));
        if (used && l + 1 < layers) hid = max(hid, np);
    }
    n->packed_len = off;
    n->grad_len = goff;
    n->hmax = hmax;
    n->hidden_max = hid;
}

// The weight matrix and bias of layer l among the eight pointer arguments.
FF_DEVICE const float* cp_pick(int l, const float* a0, const float* a1, const float* a2, const float* a3) {
    return l == 0 ? a0 : l == 1 ? a1 : l == 2 ? a2 : a3;
}
