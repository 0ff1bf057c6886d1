//! The emulated grid as a [`GridDevice`]: the same launch code as the CUDA backend
//! (ops/<family>/cuda.rs) runs the kernels through the CPU emulator. Device memory is host
//! memory; every allocation carries a canary tail that is checked after each launch, so a
//! kernel writing past the end of a buffer fails the launch instead of corrupting the heap.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ffi::c_void;

use super::ffi::{ThreadOrder, launch};
use crate::backend::grid::{Grid, GridDevice, KArg, LaunchCfg};
use crate::error::{Error, Result};

/// The emulated backend.
pub type Emu = Grid<EmuGrid>;

/// cudaMalloc aligns to 256 bytes; kernels may rely on it for vector loads.
const ALIGN: usize = 256;
/// Bytes of canary after every allocation; reads past the end see these (NaN as f32).
const CANARY: usize = 256;
const CANARY_BYTE: u8 = 0xFF;

/// A host allocation standing in for device memory. Written only through raw pointers by
/// kernels and copies, so Rust never holds a reference that a kernel write could invalidate.
#[derive(Debug)]
pub struct EmuBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; all access is serialised by the
// emulator's launch lock or happens through &mut / copies on one thread.
unsafe impl Send for EmuBuf {}
// SAFETY: as above.
unsafe impl Sync for EmuBuf {}

impl EmuBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len + CANARY, ALIGN).expect("allocation size fits a Layout")
    }

    fn new(len: usize) -> Result<EmuBuf> {
        // SAFETY: the layout has a non-zero size (CANARY > 0).
        let ptr = unsafe { alloc_zeroed(Self::layout(len)) };
        if ptr.is_null() {
            return Err(Error::OutOfMemory(format!(
                "emulated device allocation of {len} bytes"
            )));
        }
        // SAFETY: ptr covers len + CANARY bytes.
        unsafe { std::ptr::write_bytes(ptr.add(len), CANARY_BYTE, CANARY) };
        Ok(EmuBuf { ptr, len })
    }

    fn canary_intact(&self) -> bool {
        // SAFETY: the canary lies inside the allocation.
        let tail = unsafe { std::slice::from_raw_parts(self.ptr.add(self.len), CANARY) };
        tail.iter().all(|&b| b == CANARY_BYTE)
    }
}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, Self::layout(self.len)) };
    }
}

/// The emulator as a device: a thread order for every launch, and optionally a planted-bug
/// variant of the kernels (build/emu.rs `VARIANTS`) to launch instead of the clean ones.
#[derive(Debug, Clone)]
pub struct EmuGrid {
    pub order: ThreadOrder,
    pub variant: Option<&'static str>,
}

impl Emu {
    pub fn emulated(order: ThreadOrder) -> Emu {
        Grid::with_device(EmuGrid {
            order,
            variant: None,
        })
    }

    /// The same kernels built with a planted bug (for the tests that prove parity catches it).
    pub fn planted(order: ThreadOrder, variant: &'static str) -> Emu {
        Grid::with_device(EmuGrid {
            order,
            variant: Some(variant),
        })
    }
}

/// One kernel argument's value, kept at a stable address for the launch.
enum Slot {
    Ptr(*mut c_void),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

impl GridDevice for EmuGrid {
    type Buf = EmuBuf;

    fn describe(&self) -> String {
        match self.variant {
            None => format!("emulated grid ({:?})", self.order),
            Some(v) => format!("emulated grid ({:?}, variant {v})", self.order),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<EmuBuf> {
        EmuBuf::new(bytes)
    }

    fn htod(&self, src: &[u8]) -> Result<EmuBuf> {
        let buf = EmuBuf::new(src.len())?;
        // SAFETY: buf holds src.len() writable bytes and does not overlap src.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf.ptr, src.len()) };
        Ok(buf)
    }

    fn dtoh(&self, src: &EmuBuf, dst: &mut [u8]) -> Result<()> {
        if dst.len() > src.len {
            return Err(Error::shape("device to host copy", src.len, dst.len()));
        }
        // SAFETY: src holds at least dst.len() bytes; no kernel runs during the copy (launches
        // are synchronous).
        unsafe { std::ptr::copy_nonoverlapping(src.ptr, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn dtod(&self, src: &EmuBuf) -> Result<EmuBuf> {
        let buf = EmuBuf::new(src.len)?;
        // SAFETY: both hold src.len bytes and are distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr, buf.ptr, src.len) };
        Ok(buf)
    }

    fn launch(
        &self,
        kernel: &'static str,
        cfg: LaunchCfg,
        args: &[KArg<'_, EmuBuf>],
    ) -> Result<()> {
        let mut slots: Vec<Slot> = args
            .iter()
            .map(|a| match a {
                KArg::Buf(b) => Slot::Ptr(b.ptr.cast()),
                KArg::Null => Slot::Ptr(std::ptr::null_mut()),
                KArg::I32(v) => Slot::I32(*v),
                KArg::U32(v) => Slot::U32(*v),
                KArg::I64(v) => Slot::I64(*v),
                KArg::F32(v) => Slot::F32(*v),
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| match s {
                Slot::Ptr(p) => (p as *mut *mut c_void).cast(),
                Slot::I32(v) => (v as *mut i32).cast(),
                Slot::U32(v) => (v as *mut u32).cast(),
                Slot::I64(v) => (v as *mut i64).cast(),
                Slot::F32(v) => (v as *mut f32).cast(),
            })
            .collect();
        let name = match self.variant {
            Some(v) => format!("{v}/{kernel}"),
            None => kernel.to_string(),
        };
        // SAFETY: each pointer addresses a live slot of the parameter's type (the launch sites
        // in ops/<family>/cuda.rs match the kernels' parameter lists), and every buffer the
        // kernel indexes was sized by the launch site.
        unsafe {
            launch(
                &name,
                cfg.grid,
                cfg.block,
                cfg.shared_bytes,
                &mut ptrs,
                self.order,
            )
        }
        .map_err(|reason| Error::Cuda {
            op: name.clone(),
            reason,
        })?;
        for a in args {
            if let KArg::Buf(b) = a
                && !b.canary_intact()
            {
                return Err(Error::Cuda {
                    op: name,
                    reason: "the kernel wrote past the end of a buffer".into(),
                });
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
