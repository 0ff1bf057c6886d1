//! The backend seam. A model is written once against [`Backend`]; the CPU reference, the CUDA
//! backend and the emulated grid (tests only) each implement every op family, so the same test
//! body runs on all of them.

pub mod cpu;
pub mod cuda;
#[cfg(feature = "emu")]
pub mod emu;
pub mod grid;

pub use cpu::Cpu;

use crate::error::Result;
use crate::ops::{
    coupling::CouplingOps, elementwise::ElementOps, logdet::LogdetOps, made::MadeOps,
    optim::OptimOps, rk45::Rk45Ops,
};
use crate::tensor::{Shaped, Tensor};

/// Storage and transfers. Data stays on the device until a caller asks for it.
pub trait Device: Send + Sync + 'static {
    /// A row-major f32 matrix living on this device.
    type Mat: Shaped + Clone + Send + Sync + std::fmt::Debug;
    /// A vector of u32 indices (permutations, MADE degrees) living on this device.
    type Idx: Clone + Send + Sync + std::fmt::Debug;

    /// A short name, e.g. "cpu" or "cuda:0 (NVIDIA H200)".
    fn name(&self) -> String;
    fn upload(&self, t: &Tensor) -> Result<Self::Mat>;
    fn download(&self, m: &Self::Mat) -> Result<Tensor>;
    fn upload_idx(&self, v: &[u32]) -> Result<Self::Idx>;
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Mat>;
    /// Waits for queued work; a no-op where work is synchronous.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// The device's peak rates, where known (the yardsticks of `flowfuse bench`).
    fn peaks(&self) -> Option<Peaks> {
        None
    }
}

/// What a device can do at most.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Peaks {
    pub fp32_tflops: f64,
    /// Dense bf16 tensor-core throughput (f32 accumulation).
    pub bf16_tflops: f64,
    pub memory_gbs: f64,
}

/// Every op family together: what a flow needs from a device.
pub trait Backend:
    Device + CouplingOps + MadeOps + LogdetOps + ElementOps + OptimOps + Rk45Ops
{
}

impl<T: Device + CouplingOps + MadeOps + LogdetOps + ElementOps + OptimOps + Rk45Ops> Backend
    for T
{
}
