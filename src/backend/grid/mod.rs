//! The GPU-shaped backends. [`Grid<G>`] implements every op family by launching the kernels of
//! kernels/*.cu; a [`GridDevice`] only moves bytes and launches a named kernel. The CUDA driver
//! is one `GridDevice`, the CPU grid emulator (tests) is another, so both run the same launch
//! code with the same argument lists and launch configurations (ops/<family>/cuda.rs).

use std::sync::Arc;

use crate::backend::{Device, Peaks};
use crate::error::{Error, Result};
use crate::tensor::{Shaped, Tensor};

/// A grid and block shape and the dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

/// Threads per block of the element-wise and reduction kernels (FF_BLOCK in common.cuh).
pub const BLOCK: u32 = 256;
/// Grid-stride kernels never need more blocks than this to fill an H200 (132 SMs × 16).
const MAX_STRIDE_BLOCKS: u64 = 2112;

impl LaunchCfg {
    /// A 1-D grid-stride launch over `n` items.
    pub fn stride(n: usize) -> Self {
        let blocks = (n as u64)
            .div_ceil(BLOCK as u64)
            .clamp(1, MAX_STRIDE_BLOCKS);
        LaunchCfg {
            grid: [blocks as u32, 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
        }
    }

    /// One warp per row.
    pub fn warp_per_row(rows: usize) -> Self {
        let blocks = (rows as u64 * 32).div_ceil(BLOCK as u64).max(1);
        LaunchCfg {
            grid: [blocks as u32, 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
        }
    }

    pub fn new(grid: [u32; 3], block: [u32; 3], shared_bytes: u32) -> Self {
        LaunchCfg {
            grid,
            block,
            shared_bytes,
        }
    }
}

/// One kernel argument, in the order of the kernel's parameter list.
#[derive(Debug)]
pub enum KArg<'a, B> {
    /// A device pointer (input or output).
    Buf(&'a B),
    /// A null device pointer (an unused optional buffer, e.g. the missing layers of a shallow MLP).
    Null,
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

/// Bytes in, bytes out, and named kernel launches. Buffers are untyped here; [`GridMat`] and
/// [`GridIdx`] give them their types.
pub trait GridDevice: Send + Sync + 'static {
    type Buf: Send + Sync + std::fmt::Debug;

    fn describe(&self) -> String;
    /// A zero-filled allocation.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf>;
    fn htod(&self, src: &[u8]) -> Result<Self::Buf>;
    fn dtoh(&self, src: &Self::Buf, dst: &mut [u8]) -> Result<()>;
    fn dtod(&self, src: &Self::Buf) -> Result<Self::Buf>;
    fn launch(
        &self,
        kernel: &'static str,
        cfg: LaunchCfg,
        args: &[KArg<'_, Self::Buf>],
    ) -> Result<()>;
    fn synchronize(&self) -> Result<()>;
    /// Peak rates, where the device knows them.
    fn peaks(&self) -> Option<Peaks> {
        None
    }
}

/// A row-major f32 matrix in device memory. Clones share the buffer (ops never write their
/// inputs); the one in-place op (Adam) copies first when the buffer is shared.
pub struct GridMat<G: GridDevice> {
    buf: Arc<G::Buf>,
    rows: usize,
    cols: usize,
}

impl<G: GridDevice> Clone for GridMat<G> {
    fn clone(&self) -> Self {
        GridMat {
            buf: self.buf.clone(),
            rows: self.rows,
            cols: self.cols,
        }
    }
}

impl<G: GridDevice> std::fmt::Debug for GridMat<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GridMat({}x{})", self.rows, self.cols)
    }
}

impl<G: GridDevice> Shaped for GridMat<G> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

impl<G: GridDevice> GridMat<G> {
    pub fn buf(&self) -> &G::Buf {
        &self.buf
    }

    /// The buffer for writing in place: copied first if another handle shares it.
    pub fn buf_mut(&mut self, dev: &G) -> Result<&G::Buf> {
        if Arc::get_mut(&mut self.buf).is_none() {
            self.buf = Arc::new(dev.dtod(&self.buf)?);
        }
        Ok(&self.buf)
    }
}

/// A vector of u32 in device memory.
pub struct GridIdx<G: GridDevice> {
    buf: Arc<G::Buf>,
    len: usize,
}

impl<G: GridDevice> Clone for GridIdx<G> {
    fn clone(&self) -> Self {
        GridIdx {
            buf: self.buf.clone(),
            len: self.len,
        }
    }
}

impl<G: GridDevice> std::fmt::Debug for GridIdx<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GridIdx({})", self.len)
    }
}

impl<G: GridDevice> GridIdx<G> {
    pub fn buf(&self) -> &G::Buf {
        &self.buf
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Storage precision of the matrix products inside the fused kernels. Accumulation, log-dets
/// and everything the ops return stay f32 whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    /// bf16 weights and activations on tensor cores (mma.m16n8k16), f32 accumulation.
    Bf16,
}

/// A backend that runs the kernels on a grid device.
pub struct Grid<G: GridDevice> {
    pub dev: G,
    pub precision: Precision,
}

impl<G: GridDevice> Grid<G> {
    pub fn with_device(dev: G) -> Self {
        Grid {
            dev,
            precision: Precision::F32,
        }
    }

    /// The same device with another matmul precision.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// A fresh zeroed rows×cols matrix.
    pub fn alloc_mat(&self, rows: usize, cols: usize) -> Result<GridMat<G>> {
        Ok(GridMat {
            buf: Arc::new(self.dev.alloc(rows * cols * 4)?),
            rows,
            cols,
        })
    }

    /// A fresh zeroed vector of `len` u32 indices, for kernels that write indices.
    pub fn alloc_idx(&self, len: usize) -> Result<GridIdx<G>> {
        Ok(GridIdx {
            buf: Arc::new(self.dev.alloc(len * 4)?),
            len,
        })
    }

    pub fn launch(
        &self,
        kernel: &'static str,
        cfg: LaunchCfg,
        args: &[KArg<'_, G::Buf>],
    ) -> Result<()> {
        self.dev.launch(kernel, cfg, args)
    }
}

/// Kernel arguments are i32 sizes; larger inputs are refused rather than wrapped.
pub fn dim_i32(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::invalid(format!("{op}: size {v} exceeds the kernels' i32 range")))
}

impl<G: GridDevice> Device for Grid<G> {
    type Mat = GridMat<G>;
    type Idx = GridIdx<G>;

    fn name(&self) -> String {
        self.dev.describe()
    }

    fn upload(&self, t: &Tensor) -> Result<GridMat<G>> {
        let bytes: &[u8] = bytemuck::cast_slice(t.data());
        let buf = if bytes.is_empty() {
            self.dev.alloc(0)?
        } else {
            self.dev.htod(bytes)?
        };
        Ok(GridMat {
            buf: Arc::new(buf),
            rows: t.rows(),
            cols: t.cols(),
        })
    }

    fn download(&self, m: &GridMat<G>) -> Result<Tensor> {
        let mut data = vec![0.0f32; m.rows * m.cols];
        if !data.is_empty() {
            self.dev.dtoh(&m.buf, bytemuck::cast_slice_mut(&mut data))?;
        }
        Tensor::from_vec(m.rows, m.cols, data)
    }

    fn upload_idx(&self, v: &[u32]) -> Result<GridIdx<G>> {
        let bytes: &[u8] = bytemuck::cast_slice(v);
        let buf = if bytes.is_empty() {
            self.dev.alloc(0)?
        } else {
            self.dev.htod(bytes)?
        };
        Ok(GridIdx {
            buf: Arc::new(buf),
            len: v.len(),
        })
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<GridMat<G>> {
        self.alloc_mat(rows, cols)
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn peaks(&self) -> Option<Peaks> {
        self.dev.peaks()
    }
}
