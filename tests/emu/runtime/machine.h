// The emulated streaming multiprocessor: runs the blocks of one launch, one after another, each
// as a set of fibers with real barriers and warp collectives.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../ffemu_abi.h"
#include "fiber.h"

namespace ffemu {

// The order in which runnable threads (and the blocks of the grid) are resumed.
enum class Order : int { Forward = 0, Reverse = 1, Shuffle = 2 };

enum class St : uint8_t { Runnable, Barrier, Warp, Exited };

struct Thread {
    St st = St::Runnable;
    unsigned linear = 0, warp = 0, lane = 0;
    uint3_t tid{0, 0, 0};
    // at a barrier
    const char* bar_file = nullptr;
    int bar_line = 0;
    int bar_kind = 0;  // 0 = __syncthreads, 1 = count, 2 = and, 3 = or
    int bar_pred = 0;
    int bar_result = 0;
    // at a warp collective
    WarpOp* op = nullptr;
};

struct LaunchSpec {
    const ffemu_kernel_entry* kernel = nullptr;
    const ffemu_registry_file* file = nullptr;
    void** args = nullptr;
    uint3_t grid{1, 1, 1};
    uint3_t block{1, 1, 1};
    unsigned dynamic_smem = 0;
    Order order = Order::Forward;
    uint64_t seed = 0;
};

// Dynamic shared memory limit: the H100/H200 opt-in maximum per block.
constexpr unsigned kMaxSharedBytes = 227u * 1024u;
// Bytes after the requested dynamic shared memory that must still hold the poison pattern when
// the block ends; a write there is reported as an overflow.
constexpr unsigned kRedzoneBytes = 256u;
constexpr unsigned char kPoison = 0xff;

class Machine {
public:
    // Runs every block; returns false and fills `error` when the launch fails.
    bool run(const LaunchSpec& spec, SwitchImpl impl, std::string& error);

    // Called from kernel code (on a fiber).
    // Returns the block-wide result of __syncthreads_count/_and/_or (0 for plain barriers).
    int syncthreads(int kind, int pred, const char* file, int line);
    void collective(WarpOp* op);
    unsigned activemask() const;
    unsigned lane_id() const { return cur_ != nullptr ? cur_->lane : 0; }
    [[noreturn]] void fail_in_thread(const std::string& why);

    uint64_t switches() const { return pool_.switches(); }

private:
    static void fiber_main(void* thread);
    bool run_block(uint3_t block_idx);
    void poison_shared();
    bool check_redzone();
    void schedule_phase();
    bool resolve();
    bool resolve_warp(unsigned warp, bool& progress);
    bool resolve_barrier(bool& progress);
    bool execute_collective(unsigned warp, unsigned mask);
    std::string describe_deadlock() const;
    std::string where(const Thread& t) const;
    std::string block_name() const;
    void fail(const std::string& why);
    uint64_t next_random();

    LaunchSpec spec_;
    SwitchImpl impl_ = SwitchImpl::Asm;
    FiberPool pool_;
    std::vector<Thread> threads_;
    std::vector<unsigned> order_;
    unsigned nthreads_ = 0;
    unsigned nwarps_ = 0;
    unsigned exited_ = 0;
    Thread* cur_ = nullptr;
    uint3_t block_idx_{0, 0, 0};
    uint64_t rng_ = 0;
    bool failed_ = false;
    std::string error_;
};

Machine& machine();
bool launch_in_progress();

}  // namespace ffemu
