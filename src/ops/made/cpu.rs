//! Reference MADE ops (to be written).
use super::{MadeOps, MadeSpec};
use crate::backend::Cpu;
use crate::error::Result;
use crate::nn::mlp::Mlp;
use crate::ops::Direction;
use crate::tensor::Tensor;

impl MadeOps for Cpu {
    fn ar_parallel(
        &self,
        _spec: &MadeSpec,
        _net: &Mlp<Tensor>,
        _degrees: &[Vec<u32>],
        _input: &Tensor,
        _dir: Direction,
    ) -> Result<(Tensor, Tensor)> {
        todo!()
    }
    fn ar_parallel_backward(
        &self,
        _spec: &MadeSpec,
        _net: &Mlp<Tensor>,
        _degrees: &[Vec<u32>],
        _input: &Tensor,
        _dir: Direction,
        _d_out: &Tensor,
        _d_logdet: &Tensor,
    ) -> Result<(Tensor, Mlp<Tensor>)> {
        todo!()
    }
    fn ar_sequential(
        &self,
        _spec: &MadeSpec,
        _net: &Mlp<Tensor>,
        _degrees: &[Vec<u32>],
        _input: &Tensor,
        _dir: Direction,
    ) -> Result<(Tensor, Tensor)> {
        todo!()
    }
}
