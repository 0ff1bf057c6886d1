//! flowfuse: normalizing flows (Bishop & Bishop, *Deep Learning*, ch. 18) with hand-written
//! CUDA kernels and a CPU reference path for every kernel.
//!
//! - [`flows`]: coupling (RealNVP, NICE, spline), autoregressive (MAF, IAF), ActNorm and
//!   permutation layers, and [`flows::Flow`] = standard-normal base + layers.
//! - [`backend`]: the seam every op goes through; [`backend::Cpu`] is the reference.
//! - [`cnf`]: continuous flows (neural ODE, trace estimators, adjoint, flow matching).
//! - [`train`]: data sets, the trainer, checkpoints.

pub mod backend;
pub mod cnf;
pub mod error;
pub mod flows;
pub mod nn;
pub mod ode;
pub mod ops;
pub mod plot;
pub mod recycle;
pub mod rng;
pub mod tensor;
#[doc(hidden)]
pub mod testing;
pub mod train;

pub use backend::{Backend, Cpu, Device};
pub use error::{Error, Result};
pub use ops::Direction;
pub use rng::Rng;
pub use tensor::{Shaped, Tensor};
