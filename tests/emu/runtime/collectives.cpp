// Executes a warp collective once every lane named in its mask has arrived.
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "machine.h"

namespace ffemu {

namespace {

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

float bf16_to_f32(uint32_t h) {
    uint32_t x = (h & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// Source lane of a shfl.sync, following the PTX ISA's definition: the c operand packs a clamp
// value (bits 0-4) and a segment mask (bits 8-12); out-of-segment sources read the own lane.
unsigned shfl_source(const WarpOp& op, unsigned lane) {
    const int segmask = (int)((op.shfl_c >> 8) & 0x1fu);
    const int clamp = (int)(op.shfl_c & 0x1fu);
    const int min_lane = (int)lane & segmask;
    const int max_lane = min_lane | (clamp & ~segmask);
    const long long b = (long long)op.shfl_b;
    long long j = lane;
    bool ok = false;
    switch (op.shfl_mode) {
        case ShflMode::Up:
            j = (long long)lane - b;
            ok = j >= max_lane;
            break;
        case ShflMode::Down:
            j = (long long)lane + b;
            ok = j <= max_lane;
            break;
        case ShflMode::Bfly:
            j = (long long)(lane ^ (unsigned)b);
            ok = j <= max_lane;
            break;
        case ShflMode::Idx:
            j = min_lane | (int)(op.shfl_b & 0x1fu & ~(unsigned)segmask);
            ok = j <= max_lane;
            break;
    }
    return ok ? (unsigned)j : lane;
}

// mma.m16n8k16.row.col.f32.bf16.bf16.f32 with the PTX fragment layout (see cuda_emu.h).
void mma_m16n8k16(WarpOp* const* ops) {
    float a[16][16], b[16][8], c[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
        const WarpOp& op = *ops[lane];
        const unsigned g = lane >> 2, t = lane & 3u;
        for (unsigned r = 0; r < 4; ++r) {
            const unsigned row = g + ((r & 1u) ? 8u : 0u);
            const unsigned col = 2 * t + ((r & 2u) ? 8u : 0u);
            a[row][col] = bf16_to_f32(op.mma_a[r]);
            a[row][col + 1] = bf16_to_f32(op.mma_a[r] >> 16);
        }
        for (unsigned r = 0; r < 2; ++r) {
            const unsigned k = 2 * t + (r ? 8u : 0u);
            b[k][g] = bf16_to_f32(op.mma_b[r]);
            b[k + 1][g] = bf16_to_f32(op.mma_b[r] >> 16);
        }
        for (unsigned i = 0; i < 4; ++i) {
            c[g + (i >= 2 ? 8u : 0u)][2 * t + (i & 1u)] = op.mma_c[i];
        }
    }
    // All C fragments are read before any D is written: callers usually pass the same array.
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane >> 2, t = lane & 3u;
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned m = g + (i >= 2 ? 8u : 0u), n = 2 * t + (i & 1u);
            float acc = c[m][n];
            for (unsigned k = 0; k < 16; ++k) acc = std::fma(a[m][k], b[k][n], acc);
            ops[lane]->mma_d[i] = acc;
        }
    }
}

}  // namespace

bool Machine::execute_collective(unsigned w, unsigned mask) {
    WarpOp* ops[32] = {};
    const WarpOp* first = nullptr;
    for (unsigned rest = mask; rest != 0; rest &= rest - 1) {
        unsigned l = (unsigned)__builtin_ctz(rest);
        ops[l] = threads_[w * 32 + l].op;
        if (first == nullptr) {
            first = ops[l];
        } else if (ops[l]->kind != first->kind || std::strcmp(ops[l]->name, first->name) != 0 ||
                   ops[l]->size != first->size) {
            fail(fmt("warp %u, mask 0x%08x: lanes meet in different collectives: lane %d in %s, "
                     "lane %u in %s",
                     w, mask, __builtin_ctz(mask), first->name, l, ops[l]->name));
            return false;
        }
    }
    switch (first->kind) {
        case WarpKind::Syncwarp: break;
        case WarpKind::Shfl:
            for (unsigned rest = mask; rest != 0; rest &= rest - 1) {
                unsigned l = (unsigned)__builtin_ctz(rest);
                unsigned src = shfl_source(*ops[l], l);
                if ((mask & (1u << src)) == 0) {
                    fail(fmt("%s(mask 0x%08x): lane %u of warp %u reads lane %u, which is not in "
                             "the mask",
                             ops[l]->name, mask, l, w, src));
                    return false;
                }
                ops[l]->result = ops[src]->value;
            }
            break;
        case WarpKind::Vote: {
            unsigned ballot = 0;
            for (unsigned rest = mask; rest != 0; rest &= rest - 1) {
                unsigned l = (unsigned)__builtin_ctz(rest);
                if (ops[l]->pred) ballot |= 1u << l;
            }
            uint64_t r = first->vote_mode == VoteMode::Ballot ? ballot
                         : first->vote_mode == VoteMode::All  ? (ballot == mask)
                                                              : (ballot != 0);
            for (unsigned rest = mask; rest != 0; rest &= rest - 1) ops[__builtin_ctz(rest)]->result = r;
            break;
        }
        case WarpKind::Match: {
            bool all = true;
            for (unsigned rest = mask; rest != 0; rest &= rest - 1) {
                unsigned l = (unsigned)__builtin_ctz(rest);
                unsigned same = 0;
                for (unsigned r2 = mask; r2 != 0; r2 &= r2 - 1) {
                    unsigned k = (unsigned)__builtin_ctz(r2);
                    if (ops[k]->value == ops[l]->value) same |= 1u << k;
                }
                if (same != mask) all = false;
                ops[l]->result = same;
            }
            for (unsigned rest = mask; rest != 0; rest &= rest - 1) ops[__builtin_ctz(rest)]->result_pred = all;
            break;
        }
        case WarpKind::Reduce: {
            uint32_t acc = 0;
            bool started = false;
            for (unsigned rest = mask; rest != 0; rest &= rest - 1) {
                uint32_t v = (uint32_t)ops[__builtin_ctz(rest)]->value;
                if (!started) {
                    acc = v;
                    started = true;
                    continue;
                }
                switch (first->reduce_mode) {
                    case ReduceMode::AddU: acc += v; break;
                    case ReduceMode::MinU: acc = v < acc ? v : acc; break;
                    case ReduceMode::MaxU: acc = v > acc ? v : acc; break;
                    case ReduceMode::MinI: acc = (int32_t)v < (int32_t)acc ? v : acc; break;
                    case ReduceMode::MaxI: acc = (int32_t)v > (int32_t)acc ? v : acc; break;
                    case ReduceMode::And: acc &= v; break;
                    case ReduceMode::Or: acc |= v; break;
                    case ReduceMode::Xor: acc ^= v; break;
                }
            }
            for (unsigned rest = mask; rest != 0; rest &= rest - 1) ops[__builtin_ctz(rest)]->result = acc;
            break;
        }
        case WarpKind::Mma:
            if (mask != 0xffffffffu) {
                fail(fmt("%s needs all 32 lanes of warp %u (mask 0x%08x)", first->name, w, mask));
                return false;
            }
            mma_m16n8k16(ops);
            break;
    }
    return true;
}

}  // namespace ffemu
