//! The vector-field ops on a grid device (CUDA or the emulator): not written yet. They will
//! launch kernels/rk45.cu (the field MLP with its JVPs on the probes in one pass, the VJP of the
//! augmented dynamics, and the stage and step-control kernels of a device-resident RK45).
//! Until then every op says so with [`Error::Unsupported`], so that `Grid` still satisfies
//! `Backend` and everything but continuous flows runs on it.

use super::{DivCotangent, FieldVjp, ParamGrads, Rk45Ops, TraceMode};
use crate::backend::Device;
use crate::backend::grid::{Grid, GridDevice, GridMat};
use crate::error::{Error, Result};
use crate::nn::mlp::Mlp;

fn unsupported<G: GridDevice, T>(b: &Grid<G>, op: &'static str) -> Result<T> {
    Err(Error::Unsupported {
        op,
        backend: b.name(),
    })
}

impl<G: GridDevice> Rk45Ops for Grid<G> {
    fn field(
        &self,
        _net: &Mlp<GridMat<G>>,
        _z: &GridMat<G>,
        _t: &GridMat<G>,
    ) -> Result<GridMat<G>> {
        unsupported(self, "field")
    }

    fn field_div(
        &self,
        _net: &Mlp<GridMat<G>>,
        _z: &GridMat<G>,
        _t: &GridMat<G>,
        _trace: TraceMode<'_, GridMat<G>>,
    ) -> Result<(GridMat<G>, GridMat<G>)> {
        unsupported(self, "field_div")
    }

    fn field_vjp(
        &self,
        _net: &Mlp<GridMat<G>>,
        _z: &GridMat<G>,
        _t: &GridMat<G>,
        _a: &GridMat<G>,
        _div: Option<DivCotangent<'_, GridMat<G>>>,
        _params: ParamGrads<'_, GridMat<G>>,
    ) -> Result<FieldVjp<GridMat<G>>> {
        unsupported(self, "field_vjp")
    }
}
