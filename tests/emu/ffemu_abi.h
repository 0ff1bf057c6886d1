// The interface between emulated kernel code (cuda_emu.h), the generated kernel registry and the
// runtime (runtime/*.cpp). Everything that holds state lives in the runtime: this header only
// declares. That matters for planted-bug variants, whose objects get every defined global symbol
// renamed: an inline variable defined here would silently become a second, separate copy.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace ffemu {

struct uint3_t {
    unsigned int x, y, z;
};

// What one lane brings to a warp-collective operation. The runtime gathers one of these from every
// lane named in `mask`, executes the collective when all have arrived, and writes each lane's
// results back before resuming it.
enum class WarpKind : int { Shfl, Vote, Syncwarp, Match, Reduce, Mma };

enum class ShflMode : int { Idx, Up, Down, Bfly };
enum class VoteMode : int { Ballot, All, Any };
enum class ReduceMode : int { AddU, MinU, MaxU, MinI, MaxI, And, Or, Xor };

struct WarpOp {
    WarpKind kind;
    const char* name;   // the intrinsic, for messages
    unsigned mask;
    // shfl
    ShflMode shfl_mode;
    unsigned shfl_b;    // srcLane, delta or laneMask
    unsigned shfl_c;    // PTX "c" operand: clamp in bits 0-4, segment mask in bits 8-12
    uint64_t value;     // shfl/match/reduce input, raw bits
    unsigned size;      // bytes of `value` that are meaningful
    // vote
    VoteMode vote_mode;
    int pred;
    // reduce
    ReduceMode reduce_mode;
    // mma.m16n8k16.row.col.f32.bf16.bf16.f32
    const uint32_t* mma_a;
    const uint32_t* mma_b;
    const float* mma_c;
    float* mma_d;
    // results
    uint64_t result;
    int result_pred;
};

// Runtime entry points used by cuda_emu.h (defined in runtime/).
void syncthreads(const char* file, int line);
// kind: 1 = count, 2 = and, 3 = or; returns the block-wide result.
int syncthreads_reduce(int kind, int pred, const char* file, int line);
void warp_collective(WarpOp* op);
unsigned activemask();
unsigned lane_id();
[[noreturn]] void trap(const char* why);
unsigned long long clock_ticks();

extern uint3_t g_threadIdx;
extern uint3_t g_blockIdx;
extern uint3_t g_blockDim;
extern uint3_t g_gridDim;

}  // namespace ffemu

// ---- registry (filled by code that build/emu.rs generates) ----
extern "C" {

struct ffemu_kernel_entry {
    const char* name;
    void (*thunk)(void** args);
    unsigned arity;
    unsigned max_threads;  // from __launch_bounds__; 0 when the kernel has none
};

struct ffemu_kernel_table {
    const char* file;
    const ffemu_kernel_entry* entries;
    unsigned count;
};

// One static __shared__ object of a kernel file. `owner` is the kernel whose body declares it, or
// null for file-scope objects and objects declared in device helpers (charged to every kernel of
// the file). `addr` returns the calling OS thread's instance: __shared__ is thread_local here.
struct ffemu_smem_region {
    const char* owner;
    void* (*addr)();
    size_t size;
};

struct ffemu_registry_file {
    const char* variant;  // "" for the clean build
    const ffemu_kernel_table* table;
    const ffemu_smem_region* regions;
    unsigned region_count;
};

extern const ffemu_registry_file ffemu_registry_files[];
extern const unsigned ffemu_registry_file_count;
}
