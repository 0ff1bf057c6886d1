//! The CUDA grid emulator (feature `emu`, tests only): the kernels of kernels/*.cu, compiled
//! unmodified by the host C++ compiler with tests/emu/cuda_emu.h force-included, run on the CPU
//! with real block barriers, warp collectives and shared memory (see tests/emu/ and
//! build/emu.rs). Every GPU thread of a block is a fiber on the launching OS thread.
//!
//! Device memory is host memory: a kernel argument that is a device pointer is a host pointer.
//! Planted-bug builds of the same kernels (build/emu.rs, `VARIANTS`) are launched as
//! "variant/kernel" next to the clean "kernel".

mod ffi;
mod grid;

pub use grid::{Emu, EmuBuf, EmuGrid};

pub use ffi::{
    ContextSwitch, KernelInfo, ThreadOrder, arg, duplicate_kernel, kernel_info, kernel_names,
    launch, set_context_switch, switch_count,
};
