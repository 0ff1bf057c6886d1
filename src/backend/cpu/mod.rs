//! The CPU backend: the reference implementation of every op. Written for clarity first;
//! fast through register-blocked SIMD kernels (`kernel`, on the lanes of `simd`), a general
//! GEMM for other shapes (`gemm`), per-thread scratch buffers (`scratch`) and threads over
//! chunks of the batch.

pub mod cache;
pub mod chunks;
pub mod gemm;
pub mod kernel;
pub mod mlp;
pub mod scratch;
pub mod simd;
pub mod transpose;
pub mod vmath;

use std::mem::MaybeUninit;
use std::ops::Range;

use super::Device;
use crate::error::Result;
use crate::tensor::Tensor;
use chunks::{Handout, run_chunks};

/// Rows per work item when an op splits a batch across threads: big enough to amortise the
/// GEMM set-up, small enough that a chunk's activations stay in L2.
pub const CHUNK_ROWS: usize = 256;

/// The host backend. Stateless: threads come from the current rayon pool (the global one
/// unless the caller runs inside another), with the calling thread working too (`chunks`).
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

/// Frees what the CPU backend keeps between ops: the weights packed for every model it has
/// run (coupling conditioners, MADE plans; each cache holds at most 64 MiB) and this thread's
/// recycled buffers ([`crate::recycle::clear`]). Nothing else changes: the next op packs again.
pub fn clear_caches() {
    crate::ops::coupling::cpu::clear_packed();
    crate::ops::made::cpu::clear_plans();
    crate::recycle::clear();
}

/// Runs `f` on consecutive row ranges of at most `chunk` rows, in parallel, and returns the
/// results in row order (so that reductions over them are deterministic).
pub fn par_row_chunks<T: Send>(
    rows: usize,
    chunk: usize,
    f: impl Fn(Range<usize>) -> T + Sync + Send,
) -> Vec<T> {
    let chunk = chunk.max(1);
    run_chunks(rows.div_ceil(chunk), |i| {
        f(i * chunk..((i + 1) * chunk).min(rows))
    })
}

/// Copies per-chunk row blocks (each `cols` wide) into one rows×cols tensor.
pub fn concat_rows(parts: Vec<Vec<f32>>, rows: usize, cols: usize) -> Tensor {
    let mut data = Vec::with_capacity(rows * cols);
    for p in parts {
        data.extend_from_slice(&p);
    }
    Tensor::from_vec(rows, cols, data).expect("chunks cover the batch exactly")
}

/// New `rows × cols[j]` tensors filled in parallel: `fill(rows, [block of each output])` runs
/// on consecutive blocks of at most `chunk` rows and gets each output's rows of the block,
/// zeroed; the results come back in row order.
///
/// The outputs are not zeroed up front: each block is zeroed by the thread that fills it, just
/// before it does. A large output's first-touch page faults and zeroing then run in parallel
/// and in cache, instead of as a serial `calloc` memset before the parallel section.
pub fn par_fill<const N: usize, T: Send>(
    rows: usize,
    chunk: usize,
    cols: [usize; N],
    fill: impl Fn(Range<usize>, [&mut [f32]; N]) -> T + Sync + Send,
) -> ([Tensor; N], Vec<T>) {
    assert!(cols.iter().all(|&c| c > 0), "par_fill: zero-width output");
    let chunk = chunk.max(1);
    let blocks = rows.div_ceil(chunk);
    let mut bufs: [Vec<MaybeUninit<f32>>; N] = cols.map(|c| uninit(rows * c));
    let slices = bufs.each_mut().map(|b| &mut b[..]);
    let jobs = split_blocks(slices, cols.map(|c| chunk * c), blocks);
    let results = run_chunks(blocks, |i| {
        let block = jobs.take(i).map(zeroed);
        fill(i * chunk..((i + 1) * chunk).min(rows), block)
    });
    // Every value of every output lies in exactly one block, and `zeroed` wrote each block.
    let mut width = cols.iter();
    let tensors = bufs.map(|b| {
        let c = *width.next().expect("one width per output");
        // SAFETY: see above: all `rows · c` values were initialised.
        let data = unsafe { assume_init(b) };
        Tensor::from_vec(rows, c, data).expect("rows · cols values")
    });
    (tensors, results)
}

/// Runs `f(start, blocks)` on consecutive blocks of at most `chunk` values of `N` slices of
/// one length, in parallel; `start` is the blocks' offset in the slices. (Element-wise
/// updates in place, such as an optimiser step.) The results come back in block order.
pub fn par_blocks<const N: usize, T: Send>(
    slices: [&mut [f32]; N],
    chunk: usize,
    f: impl Fn(usize, [&mut [f32]; N]) -> T + Sync + Send,
) -> Vec<T> {
    let len = slices.first().map_or(0, |s| s.len());
    assert!(
        slices.iter().all(|s| s.len() == len),
        "par_blocks: lengths differ"
    );
    let chunk = chunk.max(1);
    let n = len.div_ceil(chunk);
    let blocks = split_blocks(slices, [chunk; N], n);
    run_chunks(n, |i| f(i * chunk, blocks.take(i)))
}

/// `N` slices cut into `n` consecutive blocks of `sizes[j]` values each (the last block may be
/// shorter), handed out by block index: block i of every slice goes to chunk i.
fn split_blocks<T, const N: usize>(
    slices: [&mut [T]; N],
    sizes: [usize; N],
    n: usize,
) -> Handout<[&mut [T]; N]> {
    let mut size = sizes.iter();
    let mut parts = slices.map(|s| s.chunks_mut(*size.next().expect("one size per slice")));
    Handout::new((0..n).map(|_| {
        parts
            .each_mut()
            .map(|p| p.next().expect("one block per slice"))
    }))
}

/// `len` values of uninitialised memory, in a recycled buffer when one fits.
fn uninit(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = std::mem::ManuallyDrop::new(crate::recycle::take(len));
    let (ptr, cap) = (v.as_mut_ptr() as *mut MaybeUninit<f32>, v.capacity());
    // SAFETY: the same allocation, capacity >= len, and `MaybeUninit<f32>` has the layout of
    // `f32` and needs no initialisation.
    unsafe { Vec::from_raw_parts(ptr, len, cap) }
}

/// Zeroes a block and returns it as initialised values.
fn zeroed(block: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for v in block.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every value was just written; `MaybeUninit<f32>` has the layout of `f32`.
    unsafe { &mut *(block as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The vector as initialised values.
///
/// # Safety
/// Every value must have been written.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, length and capacity; `MaybeUninit<f32>` has the layout of
    // `f32`, and the caller guarantees every value is initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Shaped;

    #[test]
    fn par_blocks_visits_every_value_once_at_its_offset() {
        for len in [0usize, 1, 2047, 2048, 5000] {
            let mut a = vec![0.0f32; len];
            let mut b = vec![1.0f32; len];
            par_blocks([&mut a, &mut b], 2048, |start, [a, b]| {
                for (i, (x, y)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                    *x += (start + i) as f32;
                    *y += 1.0;
                }
            });
            assert!(a.iter().enumerate().all(|(i, &x)| x == i as f32));
            assert!(b.iter().all(|&y| y == 2.0));
        }
    }

    #[test]
    fn par_fill_covers_every_row_once_in_order() {
        for rows in [1usize, 7, 256, 1000] {
            let ([a, b], firsts) = par_fill(rows, 256, [3, 1], |r, [a, b]| {
                assert!(a.iter().chain(b.iter()).all(|&v| v == 0.0));
                for (i, row) in a.chunks_exact_mut(3).enumerate() {
                    row.fill((r.start + i) as f32);
                }
                b.iter_mut()
                    .zip(r.clone())
                    .for_each(|(v, i)| *v = -(i as f32));
                r.start
            });
            assert_eq!(a.shape(), (rows, 3));
            assert_eq!(b.shape(), (rows, 1));
            assert!((0..rows).all(|i| a.row(i) == [i as f32; 3] && b.get(i, 0) == -(i as f32)));
            assert_eq!(
                firsts,
                (0..rows.div_ceil(256)).map(|i| i * 256).collect::<Vec<_>>()
            );
        }
    }
}
