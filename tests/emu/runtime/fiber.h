// Fibers: one per emulated GPU thread of a block, all running on the OS thread that launched the
// kernel. The scheduler resumes a fiber; the fiber runs until it yields back (at a barrier, a warp
// collective, or when it exits).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <ucontext.h>

namespace ffemu {

enum class SwitchImpl : int {
    // A hand-written x86-64 switch: saves the callee-saved registers, MXCSR and the x87 control
    // word, nothing else. Chosen by default where available.
    Asm = 0,
    // swapcontext: portable, but it saves and restores the signal mask with a system call on
    // every switch.
    Ucontext = 1,
};

class FiberPool {
public:
    FiberPool() = default;
    FiberPool(const FiberPool&) = delete;
    FiberPool& operator=(const FiberPool&) = delete;
    ~FiberPool();

    // Makes room for `n` fibers with stacks of `stack_bytes` (plus a guard page each). Returns
    // false when memory cannot be mapped.
    bool reserve(unsigned n, size_t stack_bytes);
    // Prepares fiber `i` so that its next resume calls entry(arg) on a fresh stack.
    void start(unsigned i, void (*entry)(void*), void* arg, SwitchImpl impl);
    // Scheduler side: runs fiber `i` until it yields.
    void resume(unsigned i);
    // Fiber side: returns control to the scheduler; returns when the fiber is resumed again.
    void yield(unsigned i);

    uint64_t switches() const { return switches_; }

private:
    struct Slot {
        void* sp = nullptr;   // Asm: saved stack pointer
        ucontext_t uc;        // Ucontext: saved context
        char* stack_lo = nullptr;
        size_t stack_size = 0;
        SwitchImpl impl = SwitchImpl::Asm;
        void (*entry)(void*) = nullptr;
        void* arg = nullptr;
    };
    static void ucontext_entry(unsigned hi, unsigned lo);

    std::vector<Slot> slots_;
    char* region_ = nullptr;
    size_t region_bytes_ = 0;
    size_t stack_bytes_ = 0;
    void* sched_sp_ = nullptr;
    ucontext_t sched_uc_;
    uint64_t switches_ = 0;
};

// Whether the hand-written switch exists on this target.
bool asm_switch_available();

}  // namespace ffemu
