#include "fiber.h"

#include <cstdlib>
#include <cstring>

#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__ELF__)
#define FFEMU_HAVE_ASM_SWITCH 1
// ffemu_ctx_switch(save, load): pushes the callee-saved registers, MXCSR and the x87 control word
// onto the current stack, stores the stack pointer in *save, switches to `load` and pops the same
// frame from there. A new fiber's stack is prepared so that the final `ret` lands in
// ffemu_ctx_trampoline with the entry function in r13 and its argument in r12.
asm(R"(
    .text
    .globl ffemu_ctx_switch
    .hidden ffemu_ctx_switch
    .type ffemu_ctx_switch, @function
ffemu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ffemu_ctx_switch, .-ffemu_ctx_switch

    .globl ffemu_ctx_trampoline
    .hidden ffemu_ctx_trampoline
    .type ffemu_ctx_trampoline, @function
ffemu_ctx_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size ffemu_ctx_trampoline, .-ffemu_ctx_trampoline
)");
extern "C" void ffemu_ctx_switch(void** save_sp, void* load_sp);
extern "C" void ffemu_ctx_trampoline();
#else
#define FFEMU_HAVE_ASM_SWITCH 0
#endif

namespace ffemu {

bool asm_switch_available() { return FFEMU_HAVE_ASM_SWITCH != 0; }

FiberPool::~FiberPool() {
    if (region_ != nullptr) munmap(region_, region_bytes_);
}

bool FiberPool::reserve(unsigned n, size_t stack_bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    stack_bytes = (stack_bytes + page - 1) / page * page;
    if (n <= slots_.size() && stack_bytes == stack_bytes_) return true;
    if (region_ != nullptr) {
        munmap(region_, region_bytes_);
        region_ = nullptr;
    }
    // Stacks are reserved, not committed: only the pages a thread touches become resident.
    const size_t per = stack_bytes + page;
    region_bytes_ = per * n;
    void* mem = mmap(nullptr, region_bytes_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        region_ = nullptr;
        slots_.clear();
        return false;
    }
    region_ = static_cast<char*>(mem);
    stack_bytes_ = stack_bytes;
    slots_.assign(n, Slot());
    for (unsigned i = 0; i < n; ++i) {
        char* base = region_ + per * i;
        // A guard page below each stack turns an overflow into a fault instead of silently
        // overwriting the neighbouring thread's stack.
        mprotect(base, page, PROT_NONE);
        slots_[i].stack_lo = base + page;
        slots_[i].stack_size = stack_bytes;
    }
    return true;
}

void FiberPool::ucontext_entry(unsigned hi, unsigned lo) {
    Slot* s = reinterpret_cast<Slot*>(((uintptr_t)hi << 32) | (uintptr_t)lo);
    s->entry(s->arg);
    std::abort();  // a fiber never returns: it yields for the last time when its thread exits
}

void FiberPool::start(unsigned i, void (*entry)(void*), void* arg, SwitchImpl impl) {
    Slot& s = slots_[i];
    s.entry = entry;
    s.arg = arg;
    s.impl = FFEMU_HAVE_ASM_SWITCH ? impl : SwitchImpl::Ucontext;
#if FFEMU_HAVE_ASM_SWITCH
    if (s.impl == SwitchImpl::Asm) {
        uintptr_t top = ((uintptr_t)(s.stack_lo + s.stack_size)) & ~(uintptr_t)15;
        uint64_t* frame = reinterpret_cast<uint64_t*>(top - 64);
        // After ffemu_ctx_switch pops this frame and returns, rsp == top (16-byte aligned), so
        // the trampoline's call enters the function with the ABI's alignment.
        frame[0] = 0x1f80ull | (0x037full << 32);  // default MXCSR, default x87 control word
        frame[1] = 0;                              // r15
        frame[2] = 0;                              // r14
        frame[3] = (uint64_t)(uintptr_t)entry;     // r13
        frame[4] = (uint64_t)(uintptr_t)arg;       // r12
        frame[5] = 0;                              // rbx
        frame[6] = 0;                              // rbp
        frame[7] = (uint64_t)(uintptr_t)&ffemu_ctx_trampoline;
        s.sp = frame;
        return;
    }
#endif
    getcontext(&s.uc);
    s.uc.uc_stack.ss_sp = s.stack_lo;
    s.uc.uc_stack.ss_size = s.stack_size;
    s.uc.uc_link = nullptr;
    uintptr_t p = (uintptr_t)&s;
    makecontext(&s.uc, (void (*)())&FiberPool::ucontext_entry, 2, (unsigned)(p >> 32),
                (unsigned)(p & 0xffffffffu));
}

void FiberPool::resume(unsigned i) {
    Slot& s = slots_[i];
    ++switches_;
#if FFEMU_HAVE_ASM_SWITCH
    if (s.impl == SwitchImpl::Asm) {
        ffemu_ctx_switch(&sched_sp_, s.sp);
        return;
    }
#endif
    swapcontext(&sched_uc_, &s.uc);
}

void FiberPool::yield(unsigned i) {
    Slot& s = slots_[i];
    ++switches_;
#if FFEMU_HAVE_ASM_SWITCH
    if (s.impl == SwitchImpl::Asm) {
        ffemu_ctx_switch(&s.sp, sched_sp_);
        return;
    }
#endif
    swapcontext(&s.uc, &sched_uc_);
}

}  // namespace ffemu
