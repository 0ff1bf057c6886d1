//! The CPU backend: the reference implementation of every op. Written for clarity first;
//! fast through register-blocked SIMD kernels (`kernel`, on the lanes of `simd`), a general
//! GEMM for other shapes (`gemm`), per-thread scratch buffers (`scratch`) and threads over
//! chunks of the batch.

pub mod gemm;
pub mod kernel;
pub mod mlp;
pub mod scratch;
pub mod simd;
pub mod vmath;

use std::ops::Range;

use rayon::prelude::*;

use super::Device;
use crate::error::Result;
use crate::tensor::Tensor;

/// Rows per work item when an op splits a batch across threads: big enough to amortise the
/// GEMM set-up, small enough that a chunk's activations stay in L2.
pub const CHUNK_ROWS: usize = 256;

/// The host backend. Stateless: threads come from rayon's global pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

impl Device for Cpu {
    type Mat = Tensor;
    type Idx = Vec<u32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn download(&self, m: &Tensor) -> Result<Tensor> {
        Ok(m.clone())
    }

    fn upload_idx(&self, v: &[u32]) -> Result<Vec<u32>> {
        Ok(v.to_vec())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Tensor> {
        Ok(Tensor::zeros(rows, cols))
    }
}

/// Runs `f` on consecutive row ranges of at most `chunk` rows, in parallel, and returns the
/// results in row order (so that reductions over them are deterministic).
pub fn par_row_chunks<T: Send>(
    rows: usize,
    chunk: usize,
    f: impl Fn(Range<usize>) -> T + Sync + Send,
) -> Vec<T> {
    let chunk = chunk.max(1);
    let n = rows.div_ceil(chunk);
    (0..n)
        .into_par_iter()
        .map(|i| f(i * chunk..((i + 1) * chunk).min(rows)))
        .collect()
}

/// Copies per-chunk row blocks (each `cols` wide) into one rows×cols tensor.
pub fn concat_rows(parts: Vec<Vec<f32>>, rows: usize, cols: usize) -> Tensor {
    let mut data = Vec::with_capacity(rows * cols);
    for p in parts {
        data.extend_from_slice(&p);
    }
    Tensor::from_vec(rows, cols, data).expect("chunks cover the batch exactly")
}
