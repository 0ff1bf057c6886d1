// The runtime's entry points: the functions cuda_emu.h calls from kernel code, and the C API the
// Rust side (src/backend/emu/ffi.rs) calls to list and launch kernels.
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "machine.h"

// The dynamic shared memory of the running block. Kernels declare it as
// `extern __shared__ T ff_smem[];`, which cuda_emu.h turns into a thread_local declaration. It is
// per OS thread, and the fibers of a launch all run on the launching thread.
alignas(256) __thread unsigned char ff_smem[ffemu::kMaxSharedBytes + ffemu::kRedzoneBytes];

namespace ffemu {

uint3_t g_threadIdx{0, 0, 0};
uint3_t g_blockIdx{0, 0, 0};
uint3_t g_blockDim{1, 1, 1};
uint3_t g_gridDim{1, 1, 1};

namespace {

// Launches are serialised: shared memory and the built-in index variables are process-global
// from the kernels' point of view.
std::mutex g_launch_mutex;
std::atomic<bool> g_in_launch{false};
// FFEMU_SWITCH=ucontext selects swapcontext for every launch (to test that path).
int initial_switch_impl() {
    const char* s = std::getenv("FFEMU_SWITCH");
    return (s != nullptr && std::strcmp(s, "ucontext") == 0) || !asm_switch_available() ? 1 : 0;
}
std::atomic<int> g_switch_impl{initial_switch_impl()};
std::atomic<unsigned long long> g_clock{0};

struct KernelRef {
    const ffemu_kernel_entry* entry;
    const ffemu_registry_file* file;
};

struct Registry {
    std::unordered_map<std::string, KernelRef> by_name;
    std::vector<std::string> names;
    std::string duplicate;  // first name registered twice, if any
};

const Registry& registry() {
    static const Registry reg = [] {
        Registry r;
        for (unsigned f = 0; f < ffemu_registry_file_count; ++f) {
            const ffemu_registry_file& file = ffemu_registry_files[f];
            for (unsigned k = 0; k < file.table->count; ++k) {
                const ffemu_kernel_entry& e = file.table->entries[k];
                std::string name = file.variant[0] == '\0' ? std::string(e.name)
                                                           : std::string(file.variant) + "/" + e.name;
                if (!r.by_name.emplace(name, KernelRef{&e, &file}).second) {
                    if (r.duplicate.empty()) r.duplicate = name;
                    continue;
                }
                r.names.push_back(name);
            }
        }
        return r;
    }();
    return reg;
}

size_t static_smem_bytes(const KernelRef& k) {
    size_t total = 0;
    for (unsigned i = 0; i < k.file->region_count; ++i) {
        const ffemu_smem_region& r = k.file->regions[i];
        if (r.owner == nullptr || std::strcmp(r.owner, k.entry->name) == 0) total += r.size;
    }
    return total;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// The limits a real launch on an H100/H200 would reject.
std::string check_launch(const std::string& name, const KernelRef& k, const unsigned grid[3],
                         const unsigned block[3], unsigned dynamic_smem, size_t nargs) {
    if (nargs != k.entry->arity) {
        return fmt("%s takes %u arguments, %zu given", name.c_str(), k.entry->arity, nargs);
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || block[0] == 0 || block[1] == 0 || block[2] == 0) {
        return fmt("%s: empty launch grid (%u,%u,%u) x block (%u,%u,%u)", name.c_str(), grid[0], grid[1],
                   grid[2], block[0], block[1], block[2]);
    }
    if (grid[0] > 2147483647u || grid[1] > 65535u || grid[2] > 65535u) {
        return fmt("%s: grid (%u,%u,%u) exceeds CUDA's limits (2^31-1, 65535, 65535)", name.c_str(),
                   grid[0], grid[1], grid[2]);
    }
    if (block[0] > 1024u || block[1] > 1024u || block[2] > 64u) {
        return fmt("%s: block (%u,%u,%u) exceeds CUDA's limits (1024, 1024, 64)", name.c_str(), block[0],
                   block[1], block[2]);
    }
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads > 1024u) {
        return fmt("%s: block of %llu threads exceeds 1024", name.c_str(), threads);
    }
    if (k.entry->max_threads != 0 && threads > k.entry->max_threads) {
        return fmt("%s: block of %llu threads exceeds the kernel's __launch_bounds__ maximum of %u",
                   name.c_str(), threads, k.entry->max_threads);
    }
    if (dynamic_smem > kMaxSharedBytes) {
        return fmt("%s: %u bytes of dynamic shared memory exceed the %u-byte limit", name.c_str(),
                   dynamic_smem, kMaxSharedBytes);
    }
    const size_t stat = static_smem_bytes(k);
    if (stat + dynamic_smem > kMaxSharedBytes) {
        return fmt("%s: %zu bytes of static plus %u bytes of dynamic shared memory exceed the %u-byte "
                   "limit",
                   name.c_str(), stat, dynamic_smem, kMaxSharedBytes);
    }
    return std::string();
}

void write_error(const std::string& msg, char* buf, size_t cap) {
    if (buf == nullptr || cap == 0) return;
    size_t n = msg.size() < cap - 1 ? msg.size() : cap - 1;
    std::memcpy(buf, msg.data(), n);
    buf[n] = '\0';
}

Machine& running() { return machine(); }

void outside_launch(const char* what) {
    std::fprintf(stderr, "ffemu: %s called outside a kernel launch\n", what);
    std::abort();
}

}  // namespace

bool launch_in_progress() { return g_in_launch.load(); }

int syncthreads_reduce(int kind, int pred, const char* file, int line) {
    if (!g_in_launch.load(std::memory_order_relaxed)) outside_launch("__syncthreads");
    return running().syncthreads(kind, pred, file, line);
}

void syncthreads(const char* file, int line) { (void)syncthreads_reduce(0, 0, file, line); }

void warp_collective(WarpOp* op) {
    if (!g_in_launch.load(std::memory_order_relaxed)) outside_launch(op->name);
    running().collective(op);
}

unsigned activemask() { return running().activemask(); }

unsigned lane_id() { return running().lane_id(); }

void trap(const char* why) {
    if (!g_in_launch.load(std::memory_order_relaxed)) outside_launch(why);
    running().fail_in_thread(why);
}

unsigned long long clock_ticks() { return g_clock.fetch_add(1, std::memory_order_relaxed) + 1; }

}  // namespace ffemu

// ---- C API for the Rust side ----
extern "C" {

// order: 0 forward, 1 reverse, 2 shuffle (seeded). Returns 0 on success; otherwise writes a
// message to err (NUL-terminated, truncated to err_cap) and returns 1.
int ffemu_launch(const char* name, const unsigned grid[3], const unsigned block[3], unsigned dynamic_smem,
                 void** args, size_t nargs, int order, unsigned long long seed, char* err, size_t err_cap) {
    using namespace ffemu;
    try {
        const Registry& reg = registry();
        auto it = reg.by_name.find(name);
        if (it == reg.by_name.end()) {
            write_error(fmt("unknown kernel \"%s\" (%zu kernels registered)", name, reg.names.size()), err,
                        err_cap);
            return 1;
        }
        std::string bad = check_launch(name, it->second, grid, block, dynamic_smem, nargs);
        if (!bad.empty()) {
            write_error(bad, err, err_cap);
            return 1;
        }
        LaunchSpec spec;
        spec.kernel = it->second.entry;
        spec.file = it->second.file;
        spec.args = args;
        spec.grid = uint3_t{grid[0], grid[1], grid[2]};
        spec.block = uint3_t{block[0], block[1], block[2]};
        spec.dynamic_smem = dynamic_smem;
        spec.order = order == 1 ? Order::Reverse : order == 2 ? Order::Shuffle : Order::Forward;
        spec.seed = seed;
        std::lock_guard<std::mutex> lock(g_launch_mutex);
        g_in_launch.store(true);
        std::string error;
        bool ok = machine().run(spec, (SwitchImpl)g_switch_impl.load(), error);
        g_in_launch.store(false);
        if (!ok) {
            write_error(error, err, err_cap);
            return 1;
        }
        return 0;
    } catch (const std::exception& e) {
        ffemu::g_in_launch.store(false);
        write_error(std::string("emulator failure: ") + e.what(), err, err_cap);
        return 1;
    }
}

size_t ffemu_kernel_count() { return ffemu::registry().names.size(); }

// The i-th registered kernel: "name" for the clean build, "variant/name" for a variant.
const char* ffemu_kernel_name(size_t i) {
    const auto& names = ffemu::registry().names;
    return i < names.size() ? names[i].c_str() : nullptr;
}

// Returns 0 and fills the outputs when the kernel exists, 1 otherwise.
int ffemu_kernel_info(const char* name, unsigned* arity, unsigned* max_threads, size_t* static_smem) {
    const auto& reg = ffemu::registry();
    auto it = reg.by_name.find(name);
    if (it == reg.by_name.end()) return 1;
    *arity = it->second.entry->arity;
    *max_threads = it->second.entry->max_threads;
    *static_smem = ffemu::static_smem_bytes(it->second);
    return 0;
}

// A name registered twice across files or variants (the first one wins), or "" when none.
const char* ffemu_duplicate_kernel() { return ffemu::registry().duplicate.c_str(); }

// Total fiber switches so far (both directions), for measuring the switch rate.
unsigned long long ffemu_switch_count() {
    std::lock_guard<std::mutex> lock(ffemu::g_launch_mutex);
    return ffemu::machine().switches();
}

// 0: hand-written switch (default where available), 1: swapcontext. Returns the previous value.
int ffemu_set_switch_impl(int impl) {
    if (impl == 0 && !ffemu::asm_switch_available()) impl = 1;
    return ffemu::g_switch_impl.exchange(impl);
}
}
