//! A fixed permutation of the coordinates between layers (reverse, or fixed random), so that
//! every coordinate is eventually transformed (Fig. 18.2). Volume preserving: log|det| = 0.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::layer::{FlowLayer, LayerConfig, LayerState};
use crate::rng::Rng;
use crate::tensor::Shaped;

pub struct Permutation<B: Backend> {
    perm: Vec<u32>,
    /// x[:, j] = z[:, perm[j]]
    fwd: B::Idx,
    /// z[:, k] = x[:, inv[k]]
    inv: B::Idx,
}

impl<B: Backend> Permutation<B> {
    /// `perm[j]` is the input column that becomes output column j.
    pub fn new(b: &B, perm: Vec<u32>) -> Result<Self> {
        let d = perm.len();
        let mut inv = vec![u32::MAX; d];
        for (j, &p) in perm.iter().enumerate() {
            if p as usize >= d || inv[p as usize] != u32::MAX {
                return Err(Error::invalid(format!(
                    "not a permutation of 0..{d}: {perm:?}"
                )));
            }
            inv[p as usize] = j as u32;
        }
        Ok(Permutation {
            fwd: b.upload_idx(&perm)?,
            inv: b.upload_idx(&inv)?,
            perm,
        })
    }

    pub fn reverse(b: &B, dim: usize) -> Result<Self> {
        Self::new(b, (0..dim as u32).rev().collect())
    }

    pub fn random(b: &B, dim: usize, rng: &mut Rng) -> Result<Self> {
        Self::new(
            b,
            rng.permutation(dim).into_iter().map(|p| p as u32).collect(),
        )
    }

    pub fn from_state(b: &B, state: &LayerState) -> Result<Self> {
        match &state.config {
            LayerConfig::Permute { perm } if state.tensors.is_empty() => Self::new(b, perm.clone()),
            _ => Err(Error::invalid("not a permutation layer config")),
        }
    }

    fn zero_logdet(&self, b: &B, m: &B::Mat) -> Result<B::Mat> {
        b.fill(m.rows(), 1, 0.0)
    }

    fn check(&self, m: &B::Mat) -> Result<()> {
        m.expect_shape("Permutation", m.rows(), self.perm.len())
    }
}

impl<B: Backend> FlowLayer<B> for Permutation<B> {
    fn dim(&self) -> usize {
        self.perm.len()
    }

    fn forward(&self, b: &B, z: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        self.check(z)?;
        Ok((b.gather_cols(z, &self.fwd)?, self.zero_logdet(b, z)?))
    }

    fn inverse(&self, b: &B, x: &B::Mat) -> Result<(B::Mat, B::Mat)> {
        self.check(x)?;
        Ok((b.gather_cols(x, &self.inv)?, self.zero_logdet(b, x)?))
    }

    /// z = P⁻¹x, so dL/dx = P applied to dL/dz.
    fn inverse_backward(
        &self,
        b: &B,
        x: &B::Mat,
        d_z: &B::Mat,
        _d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        self.check(x)?;
        Ok((b.gather_cols(d_z, &self.fwd)?, vec![]))
    }

    fn forward_backward(
        &self,
        b: &B,
        z: &B::Mat,
        d_x: &B::Mat,
        _d_logdet: &B::Mat,
    ) -> Result<(B::Mat, Vec<B::Mat>)> {
        self.check(z)?;
        Ok((b.gather_cols(d_x, &self.inv)?, vec![]))
    }

    fn params(&self) -> Vec<&B::Mat> {
        vec![]
    }

    fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        vec![]
    }

    fn state(&self, _b: &B) -> Result<LayerState> {
        Ok(LayerState {
            config: LayerConfig::Permute {
                perm: self.perm.clone(),
            },
            tensors: vec![],
        })
    }
}
