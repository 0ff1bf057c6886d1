// The coupling functions h(z_B; conditioner output) of eq. 18.10-18.15 for one value, and their
// gradients: affine with soft clamp (RealNVP), additive (NICE) and the monotone
// rational-quadratic spline (Durkan et al. 2019). The arithmetic follows the CPU reference
// (src/ops/coupling/cpu.rs, cpu/spline.rs) step by step, including its f64 knot sums, so the two
// agree to rounding. The spline needs no per-thread arrays: knots and softmax weights are
// recomputed while walking the bins, so any bin count up to SPLINE_MAX_BINS costs registers only.
#pragma once
#include "coupling_layout.cuh"

#define CP_KIND_AFFINE 0
#define CP_KIND_ADDITIVE 1
#define CP_KIND_SPLINE 2

// Must equal SPLINE_MIN_BIN and SPLINE_MIN_DERIVATIVE in src/ops/coupling/mod.rs.
#define CP_SPLINE_MIN_BIN 1e-3f
#define CP_SPLINE_MIN_DERIV 1e-3f

// What one coupling layer does to its transformed half.
struct CpTransform {
    int kind;
    int dir;         // 0 forward (z -> x), 1 inverse
    int bins;
    float hp;        // affine clamp, or spline bound
    float dshift;    // spline: ln(e^(1 - min) - 1), computed on the host in f64
};

// The transform from the kernels' scalar arguments (the same five in every coupling kernel).
FF_DEVICE CpTransform cp_transform(int kind, int dir, int bins, float hp, float dshift) {
    CpTransform tf;
    tf.kind = kind;
    tf.dir = dir;
    tf.bins = bins;
    tf.hp = hp;
    tf.dshift = dshift;
    return tf;
}

// Softmax of n logits as p_i = expf(l_i - max) * inv, with the sum in f64 as on the CPU.
struct CpSoftmax {
    float max;
    float inv;
};

FF_DEVICE CpSoftmax cp_softmax(const float* l, int n) {
    float m = __int_as_float(0xff800000);  // -inf
    for (int i = 0; i < n; ++i) m = fmaxf(m, l[i]);
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += (double)expf(l[i] - m);
    CpSoftmax r;
    r.max = m;
    r.inv = (float)(1.0 / s);
    return r;
}

FF_DEVICE float cp_prob(const float* l, int i, CpSoftmax sm) { return expf(l[i] - sm.max) * sm.inv; }

// The bin holding a value: knots (x0, y0) .. (x0 + w, y0 + h), slope s = h / w, derivatives.
struct CpBin {
    int k;
    float x0, w, y0, h, d0, d1, s;
};

FF_DEVICE float cp_knot_deriv(const float* raw, int bins, int i, float dshift) {
    // Interior knot i in 1..bins-1; the boundary derivatives are fixed to 1.
    return (i <= 0 || i >= bins) ? 1.0f : CP_SPLINE_MIN_DERIV + ff_softplus(raw[2 * bins + i - 1] + dshift);
}

// Walks the knots from -bound and returns the bin whose interval holds v: along x (forward) or
// y (inverse). Bin k is the number of interior knots <= v, as partition_point on the CPU.
FF_DEVICE CpBin cp_find_bin(const float* raw, int bins, float bound, float dshift, CpSoftmax sw, CpSoftmax sh,
                            float v, bool by_y) {
    const double minb = (double)CP_SPLINE_MIN_BIN;
    const double scale = 1.0 - (double)bins * minb;
    const double lo = -(double)bound, span = 2.0 * (double)bound;
    double ax = 0.0, ay = 0.0;
    float x0 = -bound, y0 = -bound, x1 = bound, y1 = bound;
    int k = 0;
    for (int i = 1; i < bins; ++i) {
        ax += minb + scale * (double)cp_prob(raw, i - 1, sw);
        ay += minb + scale * (double)cp_prob(raw + bins, i - 1, sh);
        const float xi = (float)(lo + span * ax);
        const float yi = (float)(lo + span * ay);
        if ((by_y ? yi : xi) <= v) {
            k = i;
            x0 = xi;
            y0 = yi;
        } else {
            x1 = xi;
            y1 = yi;
            break;
        }
    }
    CpBin b;
    b.k = k;
    b.x0 = x0;
    b.w = x1 - x0;
    b.y0 = y0;
    b.h = y1 - y0;
    b.d0 = cp_knot_deriv(raw, bins, k, dshift);
    b.d1 = cp_knot_deriv(raw, bins, k + 1, dshift);
    b.s = b.h / b.w;
    return b;
}

// log y' at xi = 2 ln s + ln m - 2 ln den.
FF_DEVICE float cp_log_slope(const CpBin& b, float xi) {
    const float om = xi * (1.0f - xi);
    const float den = b.s + (b.d1 + b.d0 - 2.0f * b.s) * om;
    const float one_m = 1.0f - xi;
    const float m = b.d1 * xi * xi + 2.0f * b.s * om + b.d0 * one_m * one_m;
    return 2.0f * logf(b.s) + logf(m) - 2.0f * logf(den);
}

// Solves y(xi) = v in the bin by the cancellation-free root 2c / (-b - sqrt(b^2 - 4ac)).
FF_DEVICE float cp_invert(const CpBin& bin, float v) {
    const float dy = v - bin.y0;
    const float t = bin.d1 + bin.d0 - 2.0f * bin.s;
    const float a = bin.h * (bin.s - bin.d0) + dy * t;
    const float b = bin.h * bin.d0 - dy * t;
    const float c = -bin.s * dy;
    const float disc = fmaxf(b * b - 4.0f * a * c, 0.0f);
    const float denom = -b - sqrtf(disc);
    const float xi = denom < 0.0f ? 2.0f * c / denom : 0.0f;
    return fminf(fmaxf(xi, 0.0f), 1.0f);
}

// Spline of one value: (output, log|d out / d in|); the identity outside [-bound, bound].
FF_DEVICE float2 cp_spline_apply(const float* raw, const CpTransform& t, float v) {
    if (!(v >= -t.hp && v <= t.hp)) return make_float2(v, 0.0f);
    const CpSoftmax sw = cp_softmax(raw, t.bins), sh = cp_softmax(raw + t.bins, t.bins);
    const CpBin b = cp_find_bin(raw, t.bins, t.hp, t.dshift, sw, sh, v, t.dir != 0);
    if (t.dir == 0) {
        const float xi = fminf(fmaxf((v - b.x0) / b.w, 0.0f), 1.0f);
        const float om = xi * (1.0f - xi);
        const float den = b.s + (b.d1 + b.d0 - 2.0f * b.s) * om;
        const float y = b.y0 + b.h * (b.s * xi * xi + b.d0 * om) / den;
        return make_float2(y, cp_log_slope(b, xi));
    }
    const float xi = cp_invert(b, v);
    return make_float2(b.x0 + xi * b.w, -cp_log_slope(b, xi));
}

// Partial derivatives of the bin map y(xi; s, h, y0, d0, d1) and of l = log y' (see spline.rs).
struct CpPartials {
    float y_xi, y_s, y_h, y_d0, y_d1, l_xi, l_s, l_d0, l_d1;
};

FF_DEVICE CpPartials cp_partials(const CpBin& b, float xi) {
    const float om = xi * (1.0f - xi);
    const float om_xi = 1.0f - 2.0f * xi;
    const float t = b.d1 + b.d0 - 2.0f * b.s;
    const float den = b.s + t * om;
    const float n = b.s * xi * xi + b.d0 * om;
    const float one_m = 1.0f - xi;
    const float m = b.d1 * xi * xi + 2.0f * b.s * om + b.d0 * one_m * one_m;
    const float den2 = den * den;
    const float den_xi = t * om_xi;
    const float den_s = 1.0f - 2.0f * om;
    const float m_xi = 2.0f * b.d1 * xi + 2.0f * b.s * om_xi - 2.0f * b.d0 * one_m;
    CpPartials p;
    p.y_xi = b.h * b.s * m / den2;
    p.y_s = b.h * (xi * xi * den - n * den_s) / den2;
    p.y_h = n / den;
    p.y_d0 = b.h * om * (den - n) / den2;
    p.y_d1 = -b.h * n * om / den2;
    p.l_xi = m_xi / m - 2.0f * den_xi / den;
    p.l_s = 2.0f / b.s + 2.0f * om / m - 2.0f * den_s / den;
    p.l_d0 = one_m * one_m / m - 2.0f * om / den;
    p.l_d1 = xi * xi / m - 2.0f * om / den;
    return p;
}

// Gradient of a loss that sees the softmax p of `logits` through g_left * sum_{j<k} p_j +
// g_bin * p_k (a bin's left knot and its size): writes d/d logits into g (n values).
FF_DEVICE void cp_softmax_backward(const float* logits, int n, CpSoftmax sm, int k, float g_left, float g_bin,
                                   float* g) {
    float dot = 0.0f;
    for (int j = 0; j <= k && j < n; ++j) dot += cp_prob(logits, j, sm) * (j < k ? g_left : g_bin);
    for (int j = 0; j < n; ++j) {
        const float gj = j < k ? g_left : (j == k ? g_bin : 0.0f);
        g[j] = cp_prob(logits, j, sm) * (gj - dot);
    }
}

// Backward of cp_spline_apply for g_out * out + g_ld * logdet: returns d/d(input) and writes
// d/d(raw block) into g_raw (3 bins - 1 values; the caller zeroed it).
FF_DEVICE float cp_spline_backward(const float* raw, const CpTransform& t, float v, float g_out, float g_ld,
                                   float* g_raw) {
    if (!(v >= -t.hp && v <= t.hp)) return g_out;  // identity tail: no conditioner dependence
    const int bins = t.bins;
    const CpSoftmax sw = cp_softmax(raw, bins), sh = cp_softmax(raw + bins, bins);
    const CpBin b = cp_find_bin(raw, bins, t.hp, t.dshift, sw, sh, v, t.dir != 0);
    float g_in, gx0, gw, gy0, gh, gd0, gd1;
    if (t.dir == 0) {
        const float xi = fminf(fmaxf((v - b.x0) / b.w, 0.0f), 1.0f);
        const CpPartials p = cp_partials(b, xi);
        const float g_xi = g_out * p.y_xi + g_ld * p.l_xi;
        const float g_s = g_out * p.y_s + g_ld * p.l_s;
        // xi = (v - x0) / w and s = h / w.
        gx0 = -g_xi / b.w;
        gw = -g_xi * xi / b.w - g_s * b.s / b.w;
        gy0 = g_out;
        gh = g_out * p.y_h + g_s / b.w;
        gd0 = g_out * p.y_d0 + g_ld * p.l_d0;
        gd1 = g_out * p.y_d1 + g_ld * p.l_d1;
        g_in = g_xi / b.w;
    } else {
        const float xi = cp_invert(b, v);
        const CpPartials p = cp_partials(b, xi);
        // out = x0 + w xi, logdet = -l; xi solves y(xi) = v (implicit differentiation).
        const float g_xi = g_out * b.w - g_ld * p.l_xi;
        const float r = g_xi / p.y_xi;
        const float g_s = -g_ld * p.l_s - r * p.y_s;
        gx0 = g_out;
        gw = g_out * xi - g_s * b.s / b.w;
        gy0 = -r;
        gh = -r * p.y_h + g_s / b.w;
        gd0 = -g_ld * p.l_d0 - r * p.y_d0;
        gd1 = -g_ld * p.l_d1 - r * p.y_d1;
        g_in = r;
    }
    const float span = 2.0f * t.hp * (1.0f - (float)bins * CP_SPLINE_MIN_BIN);
    cp_softmax_backward(raw, bins, sw, b.k, span * gx0, span * gw, g_raw);
    cp_softmax_backward(raw + bins, bins, sh, b.k, span * gy0, span * gh, g_raw + bins);
    // Interior derivative i (1..bins-1) is raw[2 bins + i - 1]; d softplus = sigmoid.
    if (b.k >= 1) g_raw[2 * bins + b.k - 1] += gd0 * ff_sigmoid(raw[2 * bins + b.k - 1] + t.dshift);
    if (b.k + 1 < bins) g_raw[2 * bins + b.k] += gd1 * ff_sigmoid(raw[2 * bins + b.k] + t.dshift);
    return g_in;
}

// Transformed column j of one row, forward: params p (the row's conditioner output, nb
// transformed columns), input v. Returns (output, log-det term).
FF_DEVICE float2 cp_apply(const CpTransform& t, const float* p, int nb, int j, float v) {
    if (t.kind == CP_KIND_AFFINE) {
        const float s = ff_soft_clamp(p[j], t.hp);
        const float b = p[nb + j];
        // eq. 18.10 forward; the inverse divides by exp(s).
        return t.dir == 0 ? make_float2(v * expf(s) + b, s) : make_float2((v - b) * expf(-s), -s);
    }
    if (t.kind == CP_KIND_ADDITIVE) return make_float2(t.dir == 0 ? v + p[j] : v - p[j], 0.0f);
    return cp_spline_apply(p + j * (3 * t.bins - 1), t, v);
}

// Backward of cp_apply: writes d/d params into gp (the row's zeroed gradient row) and returns
// d/d v.
FF_DEVICE float cp_apply_backward(const CpTransform& t, const float* p, int nb, int j, float v, float g_out,
                                  float g_ld, float* gp) {
    if (t.kind == CP_KIND_AFFINE) {
        const float c = t.hp;
        const float th = tanhf(p[j] / c);
        const float s = c * th;
        float g_s, g_b, g_x;
        if (t.dir == 0) {  // x = z e^s + b, logdet += s
            const float e = expf(s);
            g_s = g_out * v * e + g_ld;
            g_b = g_out;
            g_x = g_out * e;
        } else {  // z = (x - b) e^-s, logdet -= s
            const float e = expf(-s);
            const float z = (v - p[nb + j]) * e;
            g_s = -g_out * z - g_ld;
            g_b = -g_out * e;
            g_x = g_out * e;
        }
        gp[j] = g_s * (1.0f - th * th);  // d(c tanh(r / c)) / dr
        gp[nb + j] = g_b;
        return g_x;
    }
    if (t.kind == CP_KIND_ADDITIVE) {
        gp[j] = t.dir == 0 ? g_out : -g_out;
        return g_out;
    }
    const int bl = 3 * t.bins - 1;
    return cp_spline_backward(p + j * bl, t, v, g_out, g_ld, gp + j * bl);
}
