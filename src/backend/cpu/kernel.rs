//! The register-blocked product behind the CPU conditioner MLPs (coupling and MADE):
//!
//!   C (m × n) = post(A·B + init)
//!
//! A is read one scalar at a time and broadcast, so it may have any strides (a row-major
//! activation tile, a transposed one, a packed weight tile); B is read as vectors along its
//! rows, and `n` is a multiple of [`PAD`] (callers pad widths with zero columns, so there are no
//! tails to mask). A block of `MR` rows × `NV` vectors of C stays in registers over the whole
//! inner dimension; the bias (or C's old value) is added and the activation applied on the
//! store, so a layer of a small MLP is one pass with no zeroing, no packing and no second sweep.
//! Unlike a general GEMM (the `gemm` crate, which `gemm::matmul` keeps for the other shapes),
//! nothing is packed or allocated per call, which is what dominates at the sizes of a
//! conditioner (k = 1..4 inputs, 2..64 outputs, 64..256 hidden).
//!
//! Each entry of C is a chain of fused multiply-adds from zero over k = 0, 1, ... in order,
//! then `+ init`, on every instruction set, so all paths agree bit for bit with [`reference`]
//! (see `simd`).

use super::simd::{Isa, Lanes, scalar};

/// Widths handed to [`gemm`] are multiples of this (one AVX-512 vector, two AVX2 ones).
pub const PAD: usize = 16;

/// `n` rounded up to a multiple of [`PAD`].
pub fn padded(n: usize) -> usize {
    n.next_multiple_of(PAD)
}

/// The operands of one product. A[i, k] = `a[i·a_rs + k·a_cs]`, B[k, j] = `b[k·ldb + j]`.
#[derive(Clone, Copy)]
pub struct Operands<'a> {
    pub a: &'a [f32],
    pub a_rs: usize,
    pub a_cs: usize,
    pub b: &'a [f32],
    pub ldb: usize,
    pub m: usize,
    pub k: usize,
    /// A multiple of [`PAD`].
    pub n: usize,
}

/// What is added to each entry of A·B (after the products, as a GEMM followed by a bias).
#[derive(Clone, Copy)]
pub enum Init<'a> {
    Zero,
    /// C's current value (C += A·B).
    Accumulate,
    /// `bias[j]` for column j (a layer on row-major activations), at least `n` long.
    ColBias(&'a [f32]),
    /// `bias[i]` for row i (a layer on feature-major activations), at least `m` long.
    RowBias(&'a [f32]),
}

/// What is applied to each entry before it is stored.
#[derive(Clone, Copy)]
pub enum Post<'a> {
    Linear,
    Relu,
    /// The backward of a ReLU: the entry where `gate[i·ld + j]` > 0, else 0.
    ReluGrad {
        gate: &'a [f32],
        ld: usize,
    },
}

/// Checks that every index the product reaches lies inside the slices. A failure is a bug in
/// the crate (the ops check user shapes first), hence a panic.
fn check(o: &Operands, init: Init, post: Post, c: &[f32], ldc: usize) {
    assert!(o.n.is_multiple_of(PAD), "kernel: n = {} is not padded", o.n);
    assert!(ldc >= o.n && o.ldb >= o.n, "kernel: leading dimensions");
    if o.m == 0 {
        return;
    }
    assert!(c.len() >= (o.m - 1) * ldc + o.n, "kernel: C too small");
    if o.k > 0 {
        assert!(
            o.a.len() > (o.m - 1) * o.a_rs + (o.k - 1) * o.a_cs,
            "kernel: A too small"
        );
        assert!(o.b.len() >= (o.k - 1) * o.ldb + o.n, "kernel: B too small");
    }
    match init {
        Init::ColBias(b) => assert!(b.len() >= o.n, "kernel: column bias too short"),
        Init::RowBias(b) => assert!(b.len() >= o.m, "kernel: row bias too short"),
        Init::Zero | Init::Accumulate => {}
    }
    if let Post::ReluGrad { gate, ld } = post {
        assert!(
            ld >= o.n && gate.len() >= (o.m - 1) * ld + o.n,
            "kernel: gate too small"
        );
    }
}

/// C = post(A·B + init) on the given instruction set (which the CPU must support).
pub fn gemm(isa: Isa, o: &Operands, init: Init, post: Post, c: &mut [f32], ldc: usize) {
    check(o, init, post, c, ldc);
    let job = Job {
        o: *o,
        init,
        post,
        c_off: 0,
    };
    drive(isa, &[job], o.n, c, ldc);
}

/// Rows `rows` of C computed from their own A (A[i, k] = `a[i·a_rs + k·a_cs]`) over their own
/// inner length `k`, with a bias per row: a tile of a masked layer, whose units see only a
/// prefix of the layer input.
pub struct Band<'a> {
    pub a: &'a [f32],
    pub a_rs: usize,
    pub a_cs: usize,
    pub k: usize,
    pub rows: std::ops::Range<usize>,
    pub bias: &'a [f32],
}

/// C[band rows] = post(A_band · B[..k_band] + bias) for every band, all sharing B (row
/// stride `ldb`, `n` columns). Column blocks are the outer loop, so the block of B they read
/// stays in L1 across the bands.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bands(
    isa: Isa,
    bands: &[Band],
    b: &[f32],
    ldb: usize,
    n: usize,
    post: Post,
    c: &mut [f32],
    ldc: usize,
) {
    let jobs: Vec<Job> = bands
        .iter()
        .map(|band| {
            let c_off = band.rows.start * ldc;
            let job = Job {
                o: Operands {
                    a: band.a,
                    a_rs: band.a_rs,
                    a_cs: band.a_cs,
                    b,
                    ldb,
                    m: band.rows.len(),
                    k: band.k,
                    n,
                },
                init: Init::RowBias(band.bias),
                post: post.offset(c_off),
                c_off,
            };
            check(
                &job.o,
                job.init,
                job.post,
                c.get(c_off..).unwrap_or(&[]),
                ldc,
            );
            job
        })
        .collect();
    drive(isa, &jobs, n, c, ldc);
}

impl<'a> Post<'a> {
    /// The same post-operation for a C that starts `off` values further on.
    fn offset(self, off: usize) -> Post<'a> {
        match self {
            Post::ReluGrad { gate, ld } => Post::ReluGrad {
                gate: gate.get(off..).unwrap_or(&[]),
                ld,
            },
            p => p,
        }
    }
}

/// One product into C starting at `c_off` (bounds already checked).
struct Job<'a> {
    o: Operands<'a>,
    init: Init<'a>,
    post: Post<'a>,
    c_off: usize,
}

/// Runs checked jobs on an instruction set the CPU must support.
fn drive(isa: Isa, jobs: &[Job], n: usize, c: &mut [f32], ldc: usize) {
    assert!(isa.is_supported(), "kernel: {isa:?} is not supported here");
    if n == 0 {
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every job passed `check` and the CPU has AVX-512 (asserted).
        Isa::Avx512 => unsafe { drive_avx512(jobs, n, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX2 and FMA.
        Isa::Avx2 => unsafe { drive_avx2(jobs, n, c, ldc) },
        // SAFETY: every job passed `check`.
        _ => unsafe { drive_portable(jobs, n, c, ldc) },
    }
}

/// AVX-512: blocks of 6 rows × 4 vectors (64 columns), narrower column tails with more rows,
/// so that about 24 of the 32 registers hold accumulators.
///
/// # Safety
/// Every job passed [`check`] and the CPU has AVX-512 F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn drive_avx512(jobs: &[Job], n: usize, c: &mut [f32], ldc: usize) {
    use super::simd::V16;
    let mut j0 = 0;
    while j0 < n {
        let nv = ((n - j0) / 16).min(4);
        for job in jobs {
            let (o, c) = (&job.o, &mut c[job.c_off..]);
            // SAFETY: the job passed `check`; AVX-512 is enabled on this function.
            unsafe {
                match nv {
                    4 => rows::<V16, 6, 4>(o, job.init, job.post, c, ldc, j0),
                    3 => rows::<V16, 8, 3>(o, job.init, job.post, c, ldc, j0),
                    2 => rows::<V16, 12, 2>(o, job.init, job.post, c, ldc, j0),
                    _ => rows::<V16, 12, 1>(o, job.init, job.post, c, ldc, j0),
                }
            }
        }
        j0 += nv * 16;
    }
}

/// AVX2: blocks of 6 rows × 2 vectors (16 columns): 12 accumulators of 16 registers.
///
/// # Safety
/// Every job passed [`check`] and the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn drive_avx2(jobs: &[Job], n: usize, c: &mut [f32], ldc: usize) {
    use super::simd::V8;
    for j0 in (0..n).step_by(16) {
        for job in jobs {
            let c = &mut c[job.c_off..];
            // SAFETY: the job passed `check`; AVX2 and FMA are enabled on this function.
            unsafe { rows::<V8, 6, 2>(&job.o, job.init, job.post, c, ldc, j0) };
        }
    }
}

/// Plain Rust: blocks of 4 rows × 2 arrays of 8.
///
/// # Safety
/// Every job passed [`check`].
unsafe fn drive_portable(jobs: &[Job], n: usize, c: &mut [f32], ldc: usize) {
    use super::simd::Portable;
    for j0 in (0..n).step_by(16) {
        for job in jobs {
            let c = &mut c[job.c_off..];
            // SAFETY: the job passed `check`.
            unsafe { rows::<Portable, 4, 2>(&job.o, job.init, job.post, c, ldc, j0) };
        }
    }
}

/// Columns `j0 .. j0 + NV·N` of C, all rows: blocks of `MR` rows, then the rest in blocks of
/// 4 or 2 (so a short tile wastes at most one row of work).
///
/// # Safety
/// The bounds of [`check`] hold, `j0 + NV·N <= n`, and the CPU supports `S`.
#[inline(always)]
unsafe fn rows<S: Lanes, const MR: usize, const NV: usize>(
    o: &Operands,
    init: Init,
    post: Post,
    c: &mut [f32],
    ldc: usize,
    j0: usize,
) {
    let mut i0 = 0;
    while i0 < o.m {
        let rest = o.m - i0;
        // SAFETY: forwarded from the caller; each block lies in rows i0 .. i0 + mr <= m.
        let mr = unsafe {
            if rest >= MR {
                block::<S, MR, NV>(o, init, post, c, ldc, i0, MR, j0);
                MR
            } else if rest > 2 {
                let mr = rest.min(4);
                block::<S, 4, NV>(o, init, post, c, ldc, i0, mr, j0);
                mr
            } else {
                block::<S, 2, NV>(o, init, post, c, ldc, i0, rest, j0);
                rest
            }
        };
        i0 += mr;
    }
}

/// One block: rows `i0 .. i0 + mr` (mr <= MR) × columns `j0 .. j0 + NV·N`.
///
/// A short block (mr < MR) repeats its last row in the spare registers rather than needing a
/// kernel per row count; the repeats are computed and not stored.
///
/// # Safety
/// As [`rows`], and 1 <= mr, i0 + mr <= m.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<S: Lanes, const MR: usize, const NV: usize>(
    o: &Operands,
    init: Init,
    post: Post,
    c: &mut [f32],
    ldc: usize,
    i0: usize,
    mr: usize,
    j0: usize,
) {
    // SAFETY (whole body): every row index is below i0 + mr <= m, every column below
    // j0 + NV·N <= n, every k below o.k, so by `check` each pointer stays inside its slice.
    unsafe {
        let row = |i: usize| i0 + i.min(mr - 1);
        let a_rows: [*const f32; MR] = std::array::from_fn(|i| o.a.as_ptr().add(row(i) * o.a_rs));
        let c_ptr = c.as_mut_ptr();
        let mut acc = [[S::zero(); NV]; MR];
        let mut b_ptr = o.b.as_ptr().add(j0);
        let mut a_off = 0;
        for _ in 0..o.k {
            let bv: [S; NV] = std::array::from_fn(|v| S::load(b_ptr.add(v * S::N)));
            for (acc_i, a_row) in acc.iter_mut().zip(&a_rows) {
                let ai = S::splat(*a_row.add(a_off));
                for (x, &b) in acc_i.iter_mut().zip(&bv) {
                    *x = S::mul_add(ai, b, *x);
                }
            }
            b_ptr = b_ptr.add(o.ldb);
            a_off += o.a_cs;
        }
        // A constant trip count with a guard (not `take(mr)`): a loop of unknown length over
        // `acc` would index it at run time and keep it in memory, spilling every update.
        for (i, acc_i) in acc.iter().enumerate() {
            if i >= mr {
                break;
            }
            for (v, &x) in acc_i.iter().enumerate() {
                let at = (i0 + i) * ldc + j0 + v * S::N;
                let x = match init {
                    Init::Zero => x,
                    Init::Accumulate => S::add(x, S::load(c_ptr.add(at))),
                    Init::ColBias(bias) => S::add(x, S::load(bias.as_ptr().add(j0 + v * S::N))),
                    Init::RowBias(bias) => S::add(x, S::splat(*bias.get_unchecked(i0 + i))),
                };
                let y = match post {
                    Post::Linear => x,
                    Post::Relu => x.relu(),
                    Post::ReluGrad { gate, ld } => x.keep_where_positive(S::load(
                        gate.as_ptr().add((i0 + i) * ld + j0 + v * S::N),
                    )),
                };
                y.store(c_ptr.add(at));
            }
        }
    }
}

/// The definition [`gemm`] implements, one entry at a time (the tests hold every path to it).
pub fn reference(o: &Operands, init: Init, post: Post, c: &mut [f32], ldc: usize) {
    check(o, init, post, c, ldc);
    for i in 0..o.m {
        for j in 0..o.n {
            let mut acc = 0.0f32;
            for k in 0..o.k {
                acc = o.a[i * o.a_rs + k * o.a_cs].mul_add(o.b[k * o.ldb + j], acc);
            }
            let acc = match init {
                Init::Zero => acc,
                Init::Accumulate => acc + c[i * ldc + j],
                Init::ColBias(b) => acc + b[j],
                Init::RowBias(b) => acc + b[i],
            };
            c[i * ldc + j] = match post {
                Post::Linear => acc,
                Post::Relu => scalar::relu(acc),
                Post::ReluGrad { gate, ld } => scalar::keep_where_positive(acc, gate[i * ld + j]),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Every instruction set against the scalar reference, bit for bit: row counts that are
    /// and are not multiples of each block height, every column-block width, strided and
    /// transposed A, each init and post.
    #[test]
    fn every_path_matches_the_reference_exactly() {
        let mut rng = Rng::new(11);
        let shapes = [
            (1, 1, 16),
            (48, 1, 64),
            (48, 64, 64),
            (7, 64, 16),
            (13, 5, 48),
            (25, 33, 32),
            (50, 17, 80),
            (5, 128, 128),
            (37, 0, 16),
        ];
        for (m, k, n) in shapes {
            for transposed_a in [false, true] {
                // A stored row-major with a padded row (stride k + 3), or column-major.
                let (a_rs, a_cs) = if transposed_a { (1, m + 2) } else { (k + 3, 1) };
                let a = random(m.max(1) * (k + 3) + k * (m + 2) + 1, &mut rng);
                let ldb = n + 16;
                let b = random(k * ldb + n, &mut rng);
                let o = Operands {
                    a: &a,
                    a_rs,
                    a_cs,
                    b: &b,
                    ldb,
                    m,
                    k,
                    n,
                };
                let col_bias = random(n, &mut rng);
                let row_bias = random(m, &mut rng);
                let ldc = n + 16;
                let gate = random(m * ldc, &mut rng);
                let start = random(m * ldc, &mut rng);
                let inits = [
                    Init::Zero,
                    Init::Accumulate,
                    Init::ColBias(&col_bias),
                    Init::RowBias(&row_bias),
                ];
                let posts = [
                    Post::Linear,
                    Post::Relu,
                    Post::ReluGrad {
                        gate: &gate,
                        ld: ldc,
                    },
                ];
                for init in inits {
                    for post in posts {
                        let mut want = start.clone();
                        reference(&o, init, post, &mut want, ldc);
                        for isa in Isa::available() {
                            let mut got = start.clone();
                            gemm(isa, &o, init, post, &mut got, ldc);
                            let bad = got
                                .iter()
                                .zip(&want)
                                .position(|(x, y)| x.to_bits() != y.to_bits());
                            assert!(
                                bad.is_none(),
                                "{isa:?} m={m} k={k} n={n} at {:?}: {} vs {}",
                                bad,
                                got[bad.unwrap()],
                                want[bad.unwrap()]
                            );
                        }
                    }
                }
            }
        }
    }

    /// Bands of different heights and inner lengths sharing one B, against the reference
    /// band by band, bit for bit, on every path.
    #[test]
    fn bands_match_the_reference_exactly() {
        let mut rng = Rng::new(12);
        let (rows, n, k_max) = (23, 80, 40);
        let b = random(k_max * n, &mut rng);
        let bias = random(rows, &mut rng);
        // (first row, height, k): heights 6, 6, 4, 5, 2 and a k = 0 band.
        let spec = [(0, 6, 0), (6, 6, 7), (12, 4, 19), (16, 5, 40), (21, 2, 33)];
        let weights: Vec<Vec<f32>> = spec
            .iter()
            .map(|&(_, h, k)| random(h * k, &mut rng))
            .collect();
        // Bands alternate between row-major weights and weights stored input by input.
        let bands: Vec<Band> = spec
            .iter()
            .zip(&weights)
            .enumerate()
            .map(|(i, (&(r0, h, k), w))| Band {
                a: w,
                a_rs: if i % 2 == 0 { k } else { 1 },
                a_cs: if i % 2 == 0 { 1 } else { h },
                k,
                rows: r0..r0 + h,
                bias: &bias[r0..r0 + h],
            })
            .collect();
        for post in [Post::Linear, Post::Relu] {
            let mut want = vec![0.0f32; rows * n];
            for band in &bands {
                let o = Operands {
                    a: band.a,
                    a_rs: band.a_rs,
                    a_cs: band.a_cs,
                    b: &b,
                    ldb: n,
                    m: band.rows.len(),
                    k: band.k,
                    n,
                };
                let c = &mut want[band.rows.start * n..];
                reference(&o, Init::RowBias(band.bias), post, c, n);
            }
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * n];
                gemm_bands(isa, &bands, &b, n, n, post, &mut got, n);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{isa:?}");
            }
        }
    }

    #[test]
    fn the_reference_is_a_matrix_product() {
        // 2×3 · 3×16 with a bias per column, checked against sums in f64.
        let a = [1.0f32, -2.0, 0.5, 3.0, 0.25, -1.0];
        let b: Vec<f32> = (0..48).map(|i| (i as f32 * 0.3).sin()).collect();
        let bias: Vec<f32> = (0..16).map(|j| j as f32 * 0.1).collect();
        let o = Operands {
            a: &a,
            a_rs: 3,
            a_cs: 1,
            b: &b,
            ldb: 16,
            m: 2,
            k: 3,
            n: 16,
        };
        let mut c = vec![0.0; 32];
        reference(&o, Init::ColBias(&bias), Post::Linear, &mut c, 16);
        for i in 0..2 {
            for j in 0..16 {
                let want: f64 = bias[j] as f64
                    + (0..3)
                        .map(|k| a[i * 3 + k] as f64 * b[k * 16 + j] as f64)
                        .sum::<f64>();
                assert!((c[i * 16 + j] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
