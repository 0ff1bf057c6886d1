//! Reference coupling op (to be written).
use super::{CouplingOps, CouplingSpec};
use crate::backend::Cpu;
use crate::error::Result;
use crate::nn::mlp::Mlp;
use crate::ops::Direction;
use crate::tensor::Tensor;

impl CouplingOps for Cpu {
    fn coupling(
        &self,
        _spec: &CouplingSpec,
        _net: &Mlp<Tensor>,
        _input: &Tensor,
        _dir: Direction,
    ) -> Result<(Tensor, Tensor)> {
        todo!()
    }
    fn coupling_backward(
        &self,
        _spec: &CouplingSpec,
        _net: &Mlp<Tensor>,
        _input: &Tensor,
        _dir: Direction,
        _d_out: &Tensor,
        _d_logdet: &Tensor,
    ) -> Result<(Tensor, Mlp<Tensor>)> {
        todo!()
    }
}
