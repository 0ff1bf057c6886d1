#include "machine.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

extern __thread unsigned char ff_smem[];

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

const char* barrier_name(int kind) {
    switch (kind) {
        case 1: return "__syncthreads_count";
        case 2: return "__syncthreads_and";
        case 3: return "__syncthreads_or";
        default: return "__syncthreads";
    }
}

size_t env_stack_bytes() {
    const char* s = std::getenv("FFEMU_STACK_KIB");
    long kib = s != nullptr ? std::strtol(s, nullptr, 10) : 0;
    if (kib < 16) kib = 256;
    return (size_t)kib * 1024;
}

}  // namespace

Machine& machine() {
    static Machine m;
    return m;
}

std::string Machine::block_name() const {
    return fmt("block (%u,%u,%u)", block_idx_.x, block_idx_.y, block_idx_.z);
}

std::string Machine::where(const Thread& t) const {
    std::string s = fmt("thread (%u,%u,%u) [warp %u lane %u]", t.tid.x, t.tid.y, t.tid.z, t.warp, t.lane);
    switch (t.st) {
        case St::Exited: return s + " has exited";
        case St::Runnable: return s + " is runnable";
        case St::Barrier:
            return s + fmt(" waits at %s() %s:%d", barrier_name(t.bar_kind), t.bar_file, t.bar_line);
        case St::Warp: return s + fmt(" waits in %s(mask 0x%08x)", t.op->name, t.op->mask);
    }
    return s;
}

void Machine::fail(const std::string& why) {
    if (!failed_) {
        failed_ = true;
        error_ = spec_.kernel->name + std::string(": ") + block_name() + ": " + why;
    }
}

void Machine::fail_in_thread(const std::string& why) {
    fail(why);
    // This fiber is never resumed: the scheduler sees the failure and abandons the block.
    pool_.yield(cur_->linear);
    std::abort();
}

uint64_t Machine::next_random() {
    // splitmix64
    uint64_t z = (rng_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void Machine::fiber_main(void* p) {
    Machine& m = machine();
    Thread* t = static_cast<Thread*>(p);
    m.spec_.kernel->thunk(m.spec_.args);
    t->st = St::Exited;
    ++m.exited_;
    m.pool_.yield(t->linear);
    std::abort();  // exited fibers are never resumed
}

bool Machine::run(const LaunchSpec& spec, SwitchImpl impl, std::string& error) {
    spec_ = spec;
    impl_ = impl;
    failed_ = false;
    error_.clear();
    rng_ = spec.seed ^ 0x6a09e667f3bcc909ull;
    nthreads_ = spec.block.x * spec.block.y * spec.block.z;
    nwarps_ = (nthreads_ + 31) / 32;
    if (!pool_.reserve(nthreads_, env_stack_bytes())) {
        error = std::string(spec.kernel->name) + ": cannot map fiber stacks";
        return false;
    }
    threads_.assign(nthreads_, Thread());
    for (unsigned i = 0; i < nthreads_; ++i) {
        Thread& t = threads_[i];
        t.linear = i;
        t.warp = i / 32;
        t.lane = i % 32;
        t.tid = uint3_t{i % spec.block.x, (i / spec.block.x) % spec.block.y, i / (spec.block.x * spec.block.y)};
    }
    g_blockDim = spec.block;
    g_gridDim = spec.grid;

    const uint64_t nblocks = (uint64_t)spec.grid.x * spec.grid.y * spec.grid.z;
    // Shuffled block order: an affine permutation i -> (a*i + c) mod n with gcd(a, n) = 1, which
    // needs no table even for the largest grids.
    uint64_t mul = 1, add = 0;
    if (spec.order == Order::Shuffle && nblocks > 1) {
        add = next_random() % nblocks;
        for (;;) {
            mul = next_random() % nblocks;
            uint64_t a = mul, b = nblocks;
            while (b != 0) {
                uint64_t r = a % b;
                a = b;
                b = r;
            }
            if (mul != 0 && a == 1) break;
        }
    }
    for (uint64_t i = 0; i < nblocks; ++i) {
        uint64_t b = i;
        if (spec.order == Order::Reverse) b = nblocks - 1 - i;
        if (spec.order == Order::Shuffle && nblocks > 1) {
            b = (uint64_t)(((unsigned __int128)mul * i + add) % nblocks);
        }
        uint3_t idx{(unsigned)(b % spec.grid.x), (unsigned)((b / spec.grid.x) % spec.grid.y),
                    (unsigned)(b / ((uint64_t)spec.grid.x * spec.grid.y))};
        if (!run_block(idx)) {
            error = error_;
            cur_ = nullptr;
            return false;
        }
    }
    cur_ = nullptr;
    return true;
}

void Machine::poison_shared() {
    std::memset(ff_smem, kPoison, (size_t)spec_.dynamic_smem + kRedzoneBytes);
    const ffemu_registry_file* f = spec_.file;
    for (unsigned i = 0; i < f->region_count; ++i) {
        std::memset(f->regions[i].addr(), kPoison, f->regions[i].size);
    }
}

bool Machine::check_redzone() {
    const unsigned char* z = ff_smem + spec_.dynamic_smem;
    for (unsigned i = 0; i < kRedzoneBytes; ++i) {
        if (z[i] != kPoison) {
            fail(fmt("write past the end of dynamic shared memory: byte %u of ff_smem was written, "
                     "but the launch requested %u bytes",
                     spec_.dynamic_smem + i, spec_.dynamic_smem));
            return false;
        }
    }
    return true;
}

bool Machine::run_block(uint3_t block_idx) {
    block_idx_ = block_idx;
    g_blockIdx = block_idx;
    exited_ = 0;
    for (unsigned i = 0; i < nthreads_; ++i) {
        threads_[i].st = St::Runnable;
        threads_[i].op = nullptr;
        pool_.start(i, &Machine::fiber_main, &threads_[i], impl_);
    }
    poison_shared();
    for (;;) {
        schedule_phase();
        if (failed_) return false;
        if (exited_ == nthreads_) break;
        if (!resolve()) return false;
    }
    return check_redzone();
}

// Resumes every runnable thread once, in the launch's order; each runs to its next sync point.
void Machine::schedule_phase() {
    order_.clear();
    if (spec_.order == Order::Reverse) {
        for (unsigned i = nthreads_; i-- > 0;) {
            if (threads_[i].st == St::Runnable) order_.push_back(i);
        }
    } else {
        for (unsigned i = 0; i < nthreads_; ++i) {
            if (threads_[i].st == St::Runnable) order_.push_back(i);
        }
        if (spec_.order == Order::Shuffle) {
            for (size_t i = order_.size(); i > 1; --i) {
                size_t j = (size_t)(next_random() % i);
                std::swap(order_[i - 1], order_[j]);
            }
        }
    }
    for (unsigned i : order_) {
        Thread& t = threads_[i];
        cur_ = &t;
        g_threadIdx = t.tid;
        pool_.resume(i);
        if (failed_) return;
    }
    cur_ = nullptr;
}

// Called when no thread is runnable: completes every warp collective and barrier whose
// participants have all arrived. No progress at all is a deadlock.
bool Machine::resolve() {
    bool progress = false;
    for (unsigned w = 0; w < nwarps_; ++w) {
        if (!resolve_warp(w, progress)) return false;
    }
    if (!resolve_barrier(progress)) return false;
    if (!progress) {
        fail(describe_deadlock());
        return false;
    }
    return true;
}

bool Machine::resolve_warp(unsigned w, bool& progress) {
    const unsigned base = w * 32;
    const unsigned nlanes = std::min(32u, nthreads_ - base);
    const unsigned existing = nlanes == 32 ? 0xffffffffu : ((1u << nlanes) - 1u);
    unsigned waiting = 0, exited = 0;
    for (unsigned l = 0; l < nlanes; ++l) {
        St st = threads_[base + l].st;
        if (st == St::Warp) waiting |= 1u << l;
        if (st == St::Exited) exited |= 1u << l;
    }
    while (waiting != 0) {
        const unsigned first = (unsigned)__builtin_ctz(waiting);
        const Thread& ft = threads_[base + first];
        const unsigned mask = ft.op->mask;
        unsigned group = 0;
        for (unsigned rest = waiting; rest != 0; rest &= rest - 1) {
            unsigned l = (unsigned)__builtin_ctz(rest);
            if (threads_[base + l].op->mask == mask) group |= 1u << l;
        }
        waiting &= ~group;
        if ((mask & ~existing) != 0) {
            fail(fmt("%s(mask 0x%08x) in warp %u names lane %d, but the warp has only %u threads "
                     "(block of %u)",
                     ft.op->name, mask, w, __builtin_ctz(mask & ~existing), nlanes, nthreads_));
            return false;
        }
        if ((mask & exited) != 0) {
            unsigned l = (unsigned)__builtin_ctz(mask & exited);
            fail(fmt("%s(mask 0x%08x) in warp %u: lane %u named in the mask exited without "
                     "arriving (lanes arrived: 0x%08x)",
                     ft.op->name, mask, w, l, group));
            return false;
        }
        if (group != mask) continue;  // someone is still elsewhere; maybe later
        if (!execute_collective(w, mask)) return false;
        for (unsigned rest = mask; rest != 0; rest &= rest - 1) {
            Thread& t = threads_[base + (unsigned)__builtin_ctz(rest)];
            t.st = St::Runnable;
            t.op = nullptr;
        }
        progress = true;
    }
    return true;
}

bool Machine::resolve_barrier(bool& progress) {
    unsigned at_barrier = 0;
    const Thread* first = nullptr;
    for (const Thread& t : threads_) {
        if (t.st == St::Barrier) {
            ++at_barrier;
            if (first == nullptr) first = &t;
        }
    }
    if (at_barrier == 0) return true;
    if (exited_ > 0) {
        for (const Thread& t : threads_) {
            if (t.st == St::Exited) {
                fail(fmt("%s() at %s:%d can never complete (%u of %u threads wait there): ",
                         barrier_name(first->bar_kind), first->bar_file, first->bar_line, at_barrier,
                         nthreads_) +
                     where(t) + " (a barrier in divergent code)");
                return false;
            }
        }
    }
    if (at_barrier < nthreads_) return true;
    for (const Thread& t : threads_) {
        if (t.bar_line != first->bar_line || t.bar_kind != first->bar_kind ||
            std::strcmp(t.bar_file, first->bar_file) != 0) {
            fail("threads wait at different barriers (a barrier in divergent code): " + where(*first) +
                 ", " + where(t));
            return false;
        }
    }
    int result = 0;
    if (first->bar_kind != 0) {
        int count = 0;
        for (const Thread& t : threads_) count += t.bar_pred;
        result = first->bar_kind == 1 ? count
                 : first->bar_kind == 2 ? (count == (int)nthreads_)
                                        : (count != 0);
    }
    for (Thread& t : threads_) {
        t.bar_result = result;
        t.st = St::Runnable;
    }
    progress = true;
    return true;
}

std::string Machine::describe_deadlock() const {
    // Prefer an incomplete warp collective: name a lane it is waiting for.
    for (unsigned w = 0; w < nwarps_; ++w) {
        for (unsigned l = 0; l < 32 && w * 32 + l < nthreads_; ++l) {
            const Thread& t = threads_[w * 32 + l];
            if (t.st != St::Warp) continue;
            for (unsigned rest = t.op->mask; rest != 0; rest &= rest - 1) {
                const Thread& o = threads_[w * 32 + (unsigned)__builtin_ctz(rest)];
                if (o.st != St::Warp || o.op->mask != t.op->mask) {
                    return "deadlock: " + where(t) + ", but " + where(o);
                }
            }
        }
    }
    const Thread* at = nullptr;
    const Thread* other = nullptr;
    for (const Thread& t : threads_) {
        if (t.st == St::Barrier && at == nullptr) at = &t;
        if (t.st != St::Barrier && other == nullptr) other = &t;
    }
    if (at != nullptr && other != nullptr) return "deadlock: " + where(*at) + ", but " + where(*other);
    return "deadlock: no thread can make progress";
}

int Machine::syncthreads(int kind, int pred, const char* file, int line) {
    Thread* t = cur_;
    t->st = St::Barrier;
    t->bar_kind = kind;
    t->bar_pred = pred;
    t->bar_file = file;
    t->bar_line = line;
    pool_.yield(t->linear);
    return t->bar_result;
}

void Machine::collective(WarpOp* op) {
    Thread* t = cur_;
    if ((op->mask & (1u << t->lane)) == 0) {
        fail_in_thread(fmt("%s(mask 0x%08x) called by lane %u of warp %u, which is not in the mask",
                           op->name, op->mask, t->lane, t->warp));
    }
    t->op = op;
    t->st = St::Warp;
    pool_.yield(t->linear);
}

unsigned Machine::activemask() const {
    const unsigned base = cur_->warp * 32;
    unsigned m = 0;
    for (unsigned l = 0; l < 32 && base + l < nthreads_; ++l) {
        if (threads_[base + l].st != St::Exited) m |= 1u << l;
    }
    return m;
}

}  // namespace ffemu
