//! The C API of the grid emulator runtime (tests/emu/runtime/api.cpp) and a thin wrapper over it.

use std::ffi::{CStr, CString, c_char, c_int, c_void};

unsafe extern "C" {
    fn ffemu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        dynamic_smem: u32,
        args: *mut *mut c_void,
        nargs: usize,
        order: c_int,
        seed: u64,
        err: *mut c_char,
        err_cap: usize,
    ) -> c_int;
    fn ffemu_kernel_count() -> usize;
    fn ffemu_kernel_name(i: usize) -> *const c_char;
    fn ffemu_kernel_info(
        name: *const c_char,
        arity: *mut u32,
        max_threads: *mut u32,
        static_smem: *mut usize,
    ) -> c_int;
    fn ffemu_duplicate_kernel() -> *const c_char;
    fn ffemu_switch_count() -> u64;
    fn ffemu_set_switch_impl(imp: c_int) -> c_int;
}

/// The order in which the emulator resumes runnable threads between two sync points, and runs
/// the blocks of the grid. A correct kernel gives the same answer under every order; a race shows
/// up as a difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadOrder {
    /// Ascending linear thread index (and block index).
    Forward,
    /// Descending.
    Reverse,
    /// A seeded random permutation, drawn again at every phase between sync points (blocks in a
    /// seeded pseudo-random order).
    Shuffle(u64),
}

/// What the registry knows about a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelInfo {
    /// Number of parameters; `launch` requires exactly this many argument pointers.
    pub arity: usize,
    /// The `__launch_bounds__` maximum threads per block, if the kernel declares one.
    pub max_threads: Option<u32>,
    /// Static `__shared__` bytes charged to the kernel at launch.
    pub static_smem: usize,
}

/// How fibers switch: the hand-written x86-64 switch (default where available) or `swapcontext`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextSwitch {
    Asm,
    Ucontext,
}

/// A pointer to one kernel argument, for the `args` array of [`launch`].
pub fn arg<T>(value: &mut T) -> *mut c_void {
    (value as *mut T).cast()
}

/// Runs `kernel` ("name", or "variant/name" for a planted-bug build) on the emulated grid, on the
/// calling thread, and returns when every block has finished. `args[i]` points at the value of
/// the kernel's i-th parameter, as with `cuLaunchKernel`; a device pointer is a host pointer.
/// Launch errors (unknown kernel, wrong argument count, limits, a deadlock, a bad shuffle, a trap,
/// a write past dynamic shared memory) come back as a message naming the kernel and block.
/// Launches from several threads are serialised.
///
/// # Safety
/// Each `args[i]` must point at a live value of the type of the kernel's i-th parameter, and
/// every pointer the kernel dereferences must be valid for the accesses it makes.
pub unsafe fn launch(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem: u32,
    args: &mut [*mut c_void],
    order: ThreadOrder,
) -> Result<(), String> {
    let name =
        CString::new(kernel).map_err(|_| format!("kernel name {kernel:?} contains a NUL byte"))?;
    let (order, seed) = match order {
        ThreadOrder::Forward => (0, 0),
        ThreadOrder::Reverse => (1, 0),
        ThreadOrder::Shuffle(seed) => (2, seed),
    };
    let mut err = vec![0u8; 2048];
    // SAFETY: the name, dims and error buffer are valid for the call; the caller vouches for
    // the argument pointers.
    let rc = unsafe {
        ffemu_launch(
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dynamic_smem,
            args.as_mut_ptr(),
            args.len(),
            order,
            seed,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(msg)
}

/// Every registered kernel: "name" for the clean build, "variant/name" for planted-bug variants.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the registry is immutable after its first use; names are NUL-terminated and live
    // for the whole program.
    unsafe {
        (0..ffemu_kernel_count())
            .filter_map(|i| {
                let p = ffemu_kernel_name(i);
                (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
            })
            .collect()
    }
}

/// Arity, launch bound and static shared memory of a registered kernel.
pub fn kernel_info(kernel: &str) -> Option<KernelInfo> {
    let name = CString::new(kernel).ok()?;
    let (mut arity, mut max_threads, mut static_smem) = (0u32, 0u32, 0usize);
    // SAFETY: valid NUL-terminated name and output pointers.
    let rc = unsafe {
        ffemu_kernel_info(
            name.as_ptr(),
            &mut arity,
            &mut max_threads,
            &mut static_smem,
        )
    };
    (rc == 0).then_some(KernelInfo {
        arity: arity as usize,
        max_threads: (max_threads != 0).then_some(max_threads),
        static_smem,
    })
}

/// A kernel name that two sources registered (the first wins), if any.
pub fn duplicate_kernel() -> Option<String> {
    // SAFETY: a NUL-terminated string owned by the registry.
    let s = unsafe { CStr::from_ptr(ffemu_duplicate_kernel()) }
        .to_string_lossy()
        .into_owned();
    (!s.is_empty()).then_some(s)
}

/// Fiber switches performed so far by all launches (each resume and each yield counts one).
pub fn switch_count() -> u64 {
    // SAFETY: no arguments.
    unsafe { ffemu_switch_count() }
}

/// Selects how later launches switch fibers; returns the previous setting. `Asm` falls back to
/// `Ucontext` on targets without the hand-written switch.
pub fn set_context_switch(kind: ContextSwitch) -> ContextSwitch {
    let v = match kind {
        ContextSwitch::Asm => 0,
        ContextSwitch::Ucontext => 1,
    };
    // SAFETY: plain integer argument.
    match unsafe { ffemu_set_switch_impl(v) } {
        0 => ContextSwitch::Asm,
        _ => ContextSwitch::Ucontext,
    }
}
