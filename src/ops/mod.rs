//! Op families, one folder each: `mod.rs` states the op trait and its contract, `cpu.rs` is the
//! reference implementation, and the kernel of `kernels/<family>.cu` is launched by the grid
//! backends (CUDA and the emulated grid) from the shared launch code.

pub mod coupling;
pub mod elementwise;
pub mod logdet;
pub mod made;
pub mod optim;
pub mod rk45;

use serde::{Deserialize, Serialize};

/// Which way a layer is applied. Forward maps base to data (z -> x, sampling); Inverse maps
/// data to base (x -> z, density evaluation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    Forward,
    Inverse,
}

impl Direction {
    /// The kernel argument: 0 forward, 1 inverse.
    pub fn code(self) -> i32 {
        match self {
            Direction::Forward => 0,
            Direction::Inverse => 1,
        }
    }

    pub fn reversed(self) -> Self {
        match self {
            Direction::Forward => Direction::Inverse,
            Direction::Inverse => Direction::Forward,
        }
    }
}

/// Every op trait, for `use flowfuse::ops::prelude::*`.
pub mod prelude {
    pub use super::coupling::CouplingOps;
    pub use super::elementwise::ElementOps;
    pub use super::logdet::LogdetOps;
    pub use super::made::MadeOps;
    pub use super::optim::OptimOps;
    pub use super::rk45::Rk45Ops;
}
