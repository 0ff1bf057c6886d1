//! Self-tests of the CUDA grid emulator (tests/emu): run with `cargo test --features emu --test
//! emu_selftest`. The kernels live in tests/emu/selftest.cu; "planted_*/..." names are builds of
//! the same source with a known bug planted (build/emu.rs, VARIANTS), which these tests must catch.
#![cfg(feature = "emu")]

use std::ffi::c_void;
use std::time::Instant;

use flowfuse::Rng;
use flowfuse::backend::emu::{self, ContextSwitch, ThreadOrder, arg};
use half::{bf16, f16};

const ORDERS: [ThreadOrder; 4] = [
    ThreadOrder::Forward,
    ThreadOrder::Reverse,
    ThreadOrder::Shuffle(1),
    ThreadOrder::Shuffle(0x5eed_1234),
];

macro_rules! args {
    ($($a:expr),* $(,)?) => { [$(arg(&mut $a)),*] };
}

fn run(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
    args: &mut [*mut c_void],
    order: ThreadOrder,
) -> Result<(), String> {
    // SAFETY: every test passes pointers to live locals and buffers sized for the kernel.
    unsafe { emu::launch(kernel, grid, block, smem, args, order) }
}

fn random_normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut v = vec![0.0f32; n];
    rng.fill_normal(&mut v);
    v
}

// ---- block reduction: correct everywhere, planted bugs caught ----

/// Per-block sums of x computed by `kernel`; Err(message) when a block is wrong.
fn check_block_sum(kernel: &str, x: &[f32], block: u32, order: ThreadOrder) -> Result<(), String> {
    let n = x.len();
    let blocks = n.div_ceil(block as usize);
    let mut out = vec![0.0f32; blocks];
    let (mut px, mut po, mut nn) = (x.as_ptr(), out.as_mut_ptr(), n as i32);
    run(
        kernel,
        [blocks as u32, 1, 1],
        [block, 1, 1],
        0,
        &mut args![px, po, nn],
        order,
    )?;
    for (b, got) in out.iter().enumerate() {
        let lo = b * block as usize;
        let want: f64 = x[lo..(lo + block as usize).min(n)]
            .iter()
            .map(|&v| v as f64)
            .sum();
        let ok = (*got as f64 - want).abs() <= 1e-4 + 1e-5 * want.abs();
        if !ok {
            return Err(format!(
                "{kernel} {order:?}: block {b} sum {got}, expected {want}"
            ));
        }
    }
    Ok(())
}

#[test]
fn block_reduction_is_correct_under_every_order_and_shape() {
    let x = random_normal(1000, 7);
    for order in ORDERS {
        for block in [256, 96, 64, 32] {
            check_block_sum("emu_selftest_block_sum", &x, block, order).unwrap();
        }
    }
}

#[test]
fn missing_barrier_is_caught() {
    let x = random_normal(1000, 8);
    let mut caught = Vec::new();
    for order in ORDERS {
        let r = check_block_sum("planted_no_barrier/emu_selftest_block_sum", &x, 256, order);
        eprintln!(
            "no barrier, {order:?}: {}",
            r.as_ref()
                .err()
                .map_or("not caught".to_string(), |e| format!("caught ({e})"))
        );
        caught.push(r.is_err());
    }
    // Forward order runs warp 0 before the other warps' lane 0 has written its total, so warp 0
    // reads poisoned shared memory; reverse order happens to write everything first.
    assert_eq!(
        caught[..2],
        [true, false],
        "forward must catch it; reverse is expected to miss it"
    );
    assert!(caught[2] || caught[3], "a shuffled order must catch it");
}

#[test]
fn wrong_shuffle_lane_is_caught_under_every_order() {
    let x = random_normal(1000, 9);
    for order in ORDERS {
        let r = check_block_sum(
            "planted_wrong_shuffle/emu_selftest_block_sum",
            &x,
            256,
            order,
        );
        assert!(r.is_err(), "{order:?}: xor 15 instead of 16 went unnoticed");
    }
}

#[test]
fn off_by_one_bound_is_caught_by_a_canary() {
    const CANARY: f32 = 12345.0;
    let n = 1000usize;
    let x = random_normal(n + 16, 10);
    for (kernel, planted) in [
        ("emu_selftest_scale", false),
        ("planted_off_by_one/emu_selftest_scale", true),
    ] {
        for order in ORDERS {
            let mut y = vec![CANARY; n + 16];
            let (mut px, mut py, mut nn, mut a) = (x.as_ptr(), y.as_mut_ptr(), n as i32, 2.0f32);
            run(
                kernel,
                [4, 1, 1],
                [256, 1, 1],
                0,
                &mut args![px, py, nn, a],
                order,
            )
            .unwrap();
            for i in 0..n {
                assert_eq!(y[i], 2.0 * x[i], "{kernel} element {i}");
            }
            let canary_intact = y[n..].iter().all(|&v| v == CANARY);
            assert_eq!(
                canary_intact, !planted,
                "{kernel} {order:?}: canary after the buffer"
            );
        }
    }
}

// ---- misuse reported as launch errors ----

fn expect_error(kernel: &str, block: u32, smem: u32, args: &mut [*mut c_void], needle: &str) {
    for order in ORDERS {
        let err = run(kernel, [1, 1, 1], [block, 1, 1], smem, args, order).expect_err(kernel);
        assert!(
            err.contains(needle),
            "{kernel} {order:?}: error {err:?} lacks {needle:?}"
        );
        assert!(err.contains(kernel), "the error names the kernel: {err}");
    }
}

#[test]
fn collective_and_barrier_misuse_are_launch_errors() {
    let mut out = vec![0.0f32; 128];
    let mut po = out.as_mut_ptr();
    expect_error(
        "emu_selftest_shfl_reads_outside_mask",
        32,
        0,
        &mut args![po],
        "reads lane 20, which is not in the mask",
    );
    expect_error(
        "emu_selftest_shfl_caller_outside_mask",
        32,
        0,
        &mut args![po],
        "of warp 0, which is not in the mask",
    );
    expect_error(
        "emu_selftest_shfl_lane_exited",
        32,
        0,
        &mut args![po],
        "lane 16 named in the mask exited",
    );
    expect_error(
        "emu_selftest_sync_after_exit",
        128,
        0,
        &mut args![po],
        "can never complete",
    );
    expect_error(
        "emu_selftest_sync_two_sites",
        128,
        0,
        &mut args![po],
        "different barriers",
    );
    expect_error(
        "emu_selftest_warp_vs_barrier",
        64,
        0,
        &mut args![po],
        "deadlock",
    );
    expect_error("emu_selftest_trap", 64, 0, &mut args![po], "__trap");
    let mut n = 16i32;
    expect_error(
        "emu_selftest_dynamic_overflow",
        64,
        64,
        &mut args![n],
        "write past the end of dynamic shared memory",
    );
    // The emulator is usable again after failed launches.
    check_block_sum(
        "emu_selftest_block_sum",
        &random_normal(300, 1),
        128,
        ThreadOrder::Shuffle(3),
    )
    .unwrap();
}

#[test]
fn launch_limits_are_enforced() {
    let mut out = vec![0.0f32; 2048];
    let mut po = out.as_mut_ptr();
    let bounded = |block: [u32; 3], grid: [u32; 3], po: &mut *mut f32| {
        run(
            "emu_selftest_bounded",
            grid,
            block,
            0,
            &mut args![*po],
            ThreadOrder::Forward,
        )
    };
    assert!(bounded([64, 1, 1], [1, 1, 1], &mut po).is_ok());
    assert!(
        bounded([128, 1, 1], [1, 1, 1], &mut po)
            .unwrap_err()
            .contains("__launch_bounds__ maximum of 64")
    );
    assert!(
        bounded([1025, 1, 1], [1, 1, 1], &mut po)
            .unwrap_err()
            .contains("exceeds")
    );
    assert!(
        bounded([1, 1, 65], [1, 1, 1], &mut po)
            .unwrap_err()
            .contains("exceeds")
    );
    assert!(
        bounded([0, 1, 1], [1, 1, 1], &mut po)
            .unwrap_err()
            .contains("empty")
    );
    assert!(
        bounded([1, 1, 1], [0, 1, 1], &mut po)
            .unwrap_err()
            .contains("empty")
    );
    assert!(
        bounded([1, 1, 1], [1, 65536, 1], &mut po)
            .unwrap_err()
            .contains("grid")
    );
    assert!(
        bounded([1, 1, 1], [1, 1, 65536], &mut po)
            .unwrap_err()
            .contains("grid")
    );

    let big = |smem: u32, po: &mut *mut f32| {
        run(
            "emu_selftest_big_static",
            [1, 1, 1],
            [64, 1, 1],
            smem,
            &mut args![*po],
            ThreadOrder::Forward,
        )
    };
    assert!(big(170 * 1024, &mut po).is_ok());
    assert!(
        big(180 * 1024, &mut po)
            .unwrap_err()
            .contains("static plus")
    );
    assert!(
        bounded_smem(227 * 1024 + 1, &mut po)
            .unwrap_err()
            .contains("dynamic shared memory exceed")
    );
    assert!(bounded_smem(227 * 1024, &mut po).is_ok());

    let e = run(
        "no_such_kernel",
        [1, 1, 1],
        [1, 1, 1],
        0,
        &mut [],
        ThreadOrder::Forward,
    )
    .unwrap_err();
    assert!(e.contains("unknown kernel"), "{e}");
    let e = run(
        "emu_selftest_bounded",
        [1, 1, 1],
        [1, 1, 1],
        0,
        &mut [],
        ThreadOrder::Forward,
    )
    .unwrap_err();
    assert!(e.contains("takes 1 arguments, 0 given"), "{e}");

    let info = emu::kernel_info("emu_selftest_big_static").unwrap();
    assert_eq!(
        (info.arity, info.max_threads, info.static_smem),
        (1, Some(64), 49152)
    );
    assert_eq!(
        emu::kernel_info("emu_selftest_block_sum")
            .unwrap()
            .static_smem,
        128
    );
    assert_eq!(
        emu::kernel_info("emu_selftest_bounded")
            .unwrap()
            .static_smem,
        0
    );
}

fn bounded_smem(smem: u32, po: &mut *mut f32) -> Result<(), String> {
    run(
        "emu_selftest_bounded",
        [1, 1, 1],
        [64, 1, 1],
        smem,
        &mut args![*po],
        ThreadOrder::Forward,
    )
}

// ---- votes, matches, reductions ----

#[test]
fn votes_and_block_reductions_match_the_host() {
    let n = 300usize;
    let x = random_normal(n, 11);
    let (blocks, block) = (3usize, 128usize);
    let warps = blocks * block / 32;
    for order in ORDERS {
        let mut ballots = vec![0u32; warps];
        let mut alls = vec![0i32; warps];
        let mut anys = vec![0i32; warps];
        let mut halves = vec![0u32; warps];
        let mut counts = vec![0i32; 3 * blocks];
        let (mut px, mut nn) = (x.as_ptr(), n as i32);
        let (mut pb, mut pa, mut pn, mut ph, mut pc) = (
            ballots.as_mut_ptr(),
            alls.as_mut_ptr(),
            anys.as_mut_ptr(),
            halves.as_mut_ptr(),
            counts.as_mut_ptr(),
        );
        run(
            "emu_selftest_votes",
            [blocks as u32, 1, 1],
            [block as u32, 1, 1],
            0,
            &mut args![px, nn, pb, pa, pn, ph, pc],
            order,
        )
        .unwrap();
        let pred = |i: usize| i < n && x[i] > 0.0;
        for w in 0..warps {
            let want: u32 = (0..32)
                .filter(|&l| pred(w * 32 + l))
                .map(|l| 1u32 << l)
                .sum();
            assert_eq!(ballots[w], want, "ballot of warp {w}");
            assert_eq!(alls[w], (want == u32::MAX) as i32);
            assert_eq!(anys[w], (want != 0) as i32);
            assert_eq!(halves[w], want & 0xffff, "16-lane ballot of warp {w}");
        }
        for b in 0..blocks {
            let c = (b * block..(b + 1) * block).filter(|&i| pred(i)).count() as i32;
            assert_eq!(
                counts[3 * b..3 * b + 3],
                [c, (c == block as i32) as i32, (c > 0) as i32],
                "block {b}"
            );
        }
    }
}

#[test]
fn match_and_warp_reduce_match_the_host() {
    let mut rng = Rng::new(12);
    let keys: Vec<u32> = (0..32).map(|_| 100 + rng.below(4) as u32).collect();
    let mut matches = vec![0u32; 32];
    let mut sums = vec![0u32; 32];
    let mut mins = vec![0u32; 32];
    let mut imaxs = vec![0i32; 32];
    let (mut pk, mut pm, mut ps, mut pn, mut pi) = (
        keys.as_ptr(),
        matches.as_mut_ptr(),
        sums.as_mut_ptr(),
        mins.as_mut_ptr(),
        imaxs.as_mut_ptr(),
    );
    run(
        "emu_selftest_match_reduce",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &mut args![pk, pm, ps, pn, pi],
        ThreadOrder::Shuffle(5),
    )
    .unwrap();
    for l in 0..32 {
        let same: u32 = (0..32)
            .filter(|&j| keys[j] == keys[l])
            .map(|j| 1u32 << j)
            .sum();
        assert_eq!(matches[l], same);
        assert_eq!(sums[l], keys.iter().sum::<u32>());
        assert_eq!(mins[l], *keys.iter().min().unwrap());
        assert_eq!(imaxs[l], *keys.iter().max().unwrap() as i32 - 100);
    }
}

/// The CUDA programming guide's description of each shuffle, written out for one lane.
fn shfl_expected(mode: usize, lane: usize, width: usize, x: &[i32]) -> i32 {
    let seg = lane / width * width;
    let src = match mode {
        0 => Some(seg + (lane * 7 + 3) % width),
        1 => (lane % width >= 3).then(|| lane - 3),
        2 => (lane % width + 5 < width).then_some(lane + 5),
        _ => Some(lane ^ 6).filter(|&t| t < seg + width),
    };
    x[src.unwrap_or(lane)]
}

#[test]
fn shuffle_modes_follow_cuda_semantics_for_every_width() {
    let x: Vec<i32> = (0..32).map(|l| 1000 + l * 17).collect();
    for width in [32i32, 16, 8, 4, 2, 1] {
        let mut out = vec![0i32; 128];
        let (mut px, mut po, mut w) = (x.as_ptr(), out.as_mut_ptr(), width);
        run(
            "emu_selftest_shfl_modes",
            [1, 1, 1],
            [32, 1, 1],
            0,
            &mut args![px, po, w],
            ThreadOrder::Reverse,
        )
        .unwrap();
        for mode in 0..4 {
            for lane in 0..32 {
                assert_eq!(
                    out[mode * 32 + lane],
                    shfl_expected(mode, lane, width as usize, &x),
                    "mode {mode} lane {lane} width {width}"
                );
            }
        }
    }
}

// ---- atomics ----

#[test]
fn atomics_across_blocks_and_threads() {
    let n = 1000usize;
    let mut rng = Rng::new(13);
    let keys: Vec<i32> = (0..n).map(|_| rng.below(1000) as i32).collect();
    let vals = random_normal(n, 14);
    for order in ORDERS {
        let mut hist = vec![0u32; 16];
        let (mut sum, mut imax, mut umax, mut fmax, mut last) =
            (0.0f32, i32::MIN, 0u32, f32::NEG_INFINITY, -1i32);
        let mut prev = vec![0i32; n];
        let mut fmax_helper = f32::NEG_INFINITY;
        let mut pfh = &mut fmax_helper as *mut f32;
        let (mut pk, mut pv, mut nn, mut ph) =
            (keys.as_ptr(), vals.as_ptr(), n as i32, hist.as_mut_ptr());
        let (mut ps, mut pi, mut pu, mut pf, mut pl, mut pp) = (
            &mut sum as *mut f32,
            &mut imax as *mut i32,
            &mut umax as *mut u32,
            &mut fmax as *mut f32,
            &mut last as *mut i32,
            prev.as_mut_ptr(),
        );
        run(
            "emu_selftest_atomics",
            [8, 1, 1],
            [128, 1, 1],
            0,
            &mut args![pk, pv, nn, ph, ps, pi, pu, pf, pl, pp, pfh],
            order,
        )
        .unwrap();
        for (b, h) in hist.iter().enumerate() {
            assert_eq!(
                *h as usize,
                keys.iter().filter(|&&k| k as usize % 16 == b).count()
            );
        }
        let want: f64 = vals.iter().map(|&v| v as f64).sum();
        assert!((sum as f64 - want).abs() < 1e-3, "{sum} vs {want}");
        assert_eq!(imax, keys.iter().max().unwrap() - 500);
        assert_eq!(umax, *keys.iter().max().unwrap() as u32);
        assert_eq!(fmax, vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(fmax_helper, fmax);
        // atomicExch hands each previous holder on exactly once: {prev} + {last} = {-1, 0..n}.
        let mut chain: Vec<i32> = prev.clone();
        chain.push(last);
        chain.sort_unstable();
        assert_eq!(chain, (-1..n as i32).collect::<Vec<_>>());
    }
}

// ---- shared memory ----

#[test]
fn dynamic_and_static_shared_memory() {
    let n = 1000usize;
    let x = random_normal(n, 15);
    for order in ORDERS {
        let mut y = vec![0.0f32; n];
        let (mut px, mut py, mut nn) = (x.as_ptr(), y.as_mut_ptr(), n as i32);
        run(
            "emu_selftest_shared_mix",
            [4, 1, 1],
            [256, 1, 1],
            256 * 4,
            &mut args![px, py, nn],
            order,
        )
        .unwrap();
        for (i, got) in y.iter().enumerate() {
            let (b, t) = (i / 256, i % 256);
            let m = b * 256 + 255 - t;
            let want = if m < n { x[m] } else { 0.0 } + b as f32;
            assert_eq!(*got, want, "element {i}");
        }
    }
    // Too little dynamic shared memory for the block: the writes past it are reported.
    let mut y = vec![0.0f32; n];
    let (mut px, mut py, mut nn) = (x.as_ptr(), y.as_mut_ptr(), n as i32);
    let e = run(
        "emu_selftest_shared_mix",
        [4, 1, 1],
        [256, 1, 1],
        128 * 4,
        &mut args![px, py, nn],
        ThreadOrder::Forward,
    )
    .unwrap_err();
    assert!(
        e.contains("write past the end of dynamic shared memory"),
        "{e}"
    );
}

#[test]
fn shared_memory_is_poisoned_at_every_block_start() {
    let (blocks, block) = (3usize, 64usize);
    let mut stat = vec![0u32; blocks * block];
    let mut dynm = vec![0u32; blocks * block];
    let (mut ps, mut pd) = (stat.as_mut_ptr(), dynm.as_mut_ptr());
    run(
        "emu_selftest_read_before_write",
        [blocks as u32, 1, 1],
        [block as u32, 1, 1],
        256,
        &mut args![ps, pd],
        ThreadOrder::Forward,
    )
    .unwrap();
    assert!(
        stat.iter().all(|&v| v == u32::MAX),
        "static shared memory not poisoned: {stat:?}"
    );
    assert!(
        dynm.iter().all(|&v| v == u32::MAX),
        "dynamic shared memory not poisoned: {dynm:?}"
    );
    assert!(f32::from_bits(dynm[0]).is_nan());
}

// ---- launch geometry and order ----

fn check_index_map(grid: [u32; 3], block: [u32; 3], dims: [i32; 3], order: ThreadOrder) {
    let [nx, ny, nz] = dims.map(|d| d as usize);
    let mut hits = vec![0u32; nx * ny * nz];
    let mut who = vec![0u32; 2 * nx * ny * nz];
    let (mut ph, mut pw) = (hits.as_mut_ptr(), who.as_mut_ptr());
    let [mut dx, mut dy, mut dz] = dims;
    run(
        "emu_selftest_index_map",
        grid,
        block,
        0,
        &mut args![ph, pw, dx, dy, dz],
        order,
    )
    .unwrap();
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let c = (z * ny + y) * nx + x;
                assert_eq!(hits[c], 1, "cell ({x},{y},{z}) written {} times", hits[c]);
                let (b, t) = (who[2 * c], who[2 * c + 1]);
                let unpack = |v: u32| [v & 1023, (v >> 10) & 1023, v >> 20];
                let (b, t) = (unpack(b), unpack(t));
                for (axis, coord) in [x, y, z].into_iter().enumerate() {
                    assert_eq!(
                        (b[axis] * block[axis] + t[axis]) as usize,
                        coord,
                        "axis {axis} of cell ({x},{y},{z})"
                    );
                }
            }
        }
    }
}

#[test]
fn multi_dimensional_grids_with_partial_blocks() {
    for order in ORDERS {
        check_index_map([5, 4, 3], [8, 4, 2], [37, 13, 5], order);
        check_index_map([3, 2, 1], [16, 16, 1], [40, 20, 1], order);
        check_index_map([2, 1, 1], [512, 1, 1], [700, 1, 1], order);
        check_index_map([1, 1, 7], [1, 1, 64], [1, 1, 400], order);
    }
}

fn tickets(order: ThreadOrder) -> (Vec<u32>, Vec<u32>) {
    let mut before = vec![0u32; 64];
    let mut after = vec![0u32; 64];
    let mut counter = 0u32;
    let (mut pb, mut pa, mut pc) = (
        before.as_mut_ptr(),
        after.as_mut_ptr(),
        &mut counter as *mut u32,
    );
    run(
        "emu_selftest_order",
        [1, 1, 1],
        [64, 1, 1],
        0,
        &mut args![pb, pa, pc],
        order,
    )
    .unwrap();
    (before, after)
}

#[test]
fn thread_orders_are_forward_reverse_and_seeded_shuffles() {
    let (b, a) = tickets(ThreadOrder::Forward);
    assert_eq!(b, (0..64).collect::<Vec<_>>());
    assert_eq!(a, (64..128).collect::<Vec<_>>());
    let (b, a) = tickets(ThreadOrder::Reverse);
    assert_eq!(b, (0..64).rev().collect::<Vec<_>>());
    assert_eq!(a, (64..128).rev().collect::<Vec<_>>());
    let (b1, a1) = tickets(ThreadOrder::Shuffle(42));
    let (b2, a2) = tickets(ThreadOrder::Shuffle(42));
    let (b3, _) = tickets(ThreadOrder::Shuffle(43));
    assert_eq!((&b1, &a1), (&b2, &a2), "same seed, same schedule");
    assert_ne!(b1, b3, "another seed, another schedule");
    let mut s = b1.clone();
    s.sort_unstable();
    assert_eq!(s, (0..64).collect::<Vec<_>>());
    assert_ne!(b1, (0..64).collect::<Vec<_>>());
    // Re-drawn at every phase: the order after the barrier is not the one before it.
    let rank_after: Vec<u32> = a1.iter().map(|t| t - 64).collect();
    assert_ne!(rank_after, b1);
}

// ---- tensor-core wrapper ----

#[test]
fn mma_wrapper_matches_a_plain_matmul() {
    let mut rng = Rng::new(16);
    for _trial in 0..4 {
        let a: Vec<bf16> = (0..16 * 16).map(|_| bf16::from_f64(rng.normal())).collect();
        let b: Vec<bf16> = (0..16 * 8).map(|_| bf16::from_f64(rng.normal())).collect();
        let c: Vec<f32> = (0..16 * 8).map(|_| rng.normal() as f32).collect();
        let ab: Vec<u16> = a.iter().map(|v| v.to_bits()).collect();
        let bb: Vec<u16> = b.iter().map(|v| v.to_bits()).collect();
        let mut d = vec![0.0f32; 16 * 8];
        let (mut pa, mut pb, mut pc, mut pd) =
            (ab.as_ptr(), bb.as_ptr(), c.as_ptr(), d.as_mut_ptr());
        run(
            "emu_selftest_mma",
            [1, 1, 1],
            [32, 1, 1],
            0,
            &mut args![pa, pb, pc, pd],
            ThreadOrder::Shuffle(9),
        )
        .unwrap();
        for m in 0..16 {
            for n in 0..8 {
                let want: f64 = c[m * 8 + n] as f64
                    + (0..16)
                        .map(|k| a[m * 16 + k].to_f64() * b[k * 8 + n].to_f64())
                        .sum::<f64>();
                let got = d[m * 8 + n] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "D[{m}][{n}] = {got}, expected {want}"
                );
            }
        }
    }
    // A partial warp cannot issue the warp-collective mma.
    let z = vec![0u16; 256];
    let zf = vec![0.0f32; 128];
    let mut d = vec![0.0f32; 128];
    let (mut pa, mut pb, mut pc, mut pd) = (z.as_ptr(), z.as_ptr(), zf.as_ptr(), d.as_mut_ptr());
    let e = run(
        "emu_selftest_mma",
        [1, 1, 1],
        [16, 1, 1],
        0,
        &mut args![pa, pb, pc, pd],
        ThreadOrder::Forward,
    )
    .unwrap_err();
    assert!(e.contains("names lane 16"), "{e}");
}

// ---- 16-bit conversions and math ----

#[test]
fn half_and_bfloat16_conversions_round_to_nearest_even() {
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        1.0 + 2f32.powi(-11),       // f16 tie -> 1.0 (even)
        1.0 + 3.0 * 2f32.powi(-11), // f16 tie -> 1 + 2^-9 (even)
        1.0 + 2f32.powi(-8),        // bf16 tie -> 1.0
        1.0 + 3.0 * 2f32.powi(-8),  // bf16 tie -> 1 + 2^-6
        65504.0,
        65519.99,
        65520.0,
        1e6,
        -1e6,
        2f32.powi(-24),
        2f32.powi(-25),
        1.5 * 2f32.powi(-25),
        2.5 * 2f32.powi(-24),
        2f32.powi(-14),
        0.999 * 2f32.powi(-14),
        f32::MIN_POSITIVE,
        1e-40,
        -1e-40,
        f32::from_bits(1),
        f32::MAX,
        -f32::MAX,
        3.0e38,
    ];
    let mut rng = Rng::new(17);
    x.extend((0..4000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    x.extend((0..2000).map(|_| (rng.normal() * 10f64.powi(rng.below(12) as i32 - 6)) as f32));
    let n = x.len();
    let (mut h, mut b) = (vec![0u16; n], vec![0u16; n]);
    let (mut hb, mut bb) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut px, mut ph, mut pb, mut phb, mut pbb, mut nn) = (
        x.as_ptr(),
        h.as_mut_ptr(),
        b.as_mut_ptr(),
        hb.as_mut_ptr(),
        bb.as_mut_ptr(),
        n as i32,
    );
    run(
        "emu_selftest_convert",
        [n.div_ceil(256) as u32, 1, 1],
        [256, 1, 1],
        0,
        &mut args![px, ph, pb, phb, pbb, nn],
        ThreadOrder::Forward,
    )
    .unwrap();
    for i in 0..n {
        let (wh, wb) = (f16::from_f32(x[i]), bf16::from_f32(x[i]));
        if x[i].is_nan() {
            assert!(
                f16::from_bits(h[i]).is_nan()
                    && bf16::from_bits(b[i]).is_nan()
                    && hb[i].is_nan()
                    && bb[i].is_nan()
            );
            continue;
        }
        assert_eq!(
            h[i],
            wh.to_bits(),
            "f16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            b[i],
            wb.to_bits(),
            "bf16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            hb[i].to_bits(),
            wh.to_f32().to_bits(),
            "f16 -> f32 of {:#x}",
            h[i]
        );
        assert_eq!(
            bb[i].to_bits(),
            wb.to_f32().to_bits(),
            "bf16 -> f32 of {:#x}",
            b[i]
        );
    }
    // The ties above, spelled out.
    assert_eq!(h[8], f16::from_f32(1.0).to_bits());
    assert_eq!(f16::from_bits(h[9]).to_f32(), 1.0 + 2f32.powi(-9));
    assert_eq!(b[10], bf16::from_f32(1.0).to_bits());
    assert_eq!(bf16::from_bits(b[11]).to_f32(), 1.0 + 2f32.powi(-6));
    assert_eq!(h[18], 0, "2^-25 ties to zero");
    assert_eq!(h[19], 1, "1.5 * 2^-25 rounds up to the smallest subnormal");
    assert_eq!(h[20], 2, "2.5 * 2^-24 ties to the even subnormal 2 * 2^-24");
}

#[test]
fn math_intrinsics_are_close_to_the_host() {
    let mut x = random_normal(1000, 18);
    for v in x.iter_mut().step_by(3) {
        *v *= 8.0;
    }
    x.extend([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30]);
    let n = x.len();
    let mut out = vec![0.0f32; 9 * n];
    let mut iout = vec![0i32; 4 * n];
    let (mut px, mut po, mut pi, mut nn) =
        (x.as_ptr(), out.as_mut_ptr(), iout.as_mut_ptr(), n as i32);
    run(
        "emu_selftest_math",
        [n.div_ceil(256) as u32, 1, 1],
        [256, 1, 1],
        0,
        &mut args![px, po, pi, nn],
        ThreadOrder::Reverse,
    )
    .unwrap();
    let close = |got: f32, want: f64, rel: f64, what: &str, v: f32| {
        assert!(
            (got as f64 - want).abs() <= rel * want.abs() + 1e-30,
            "{what}({v}) = {got}, expected {want}"
        );
    };
    for i in 0..n {
        let v = x[i];
        let p = (v.abs() + 1.0) as f64; // the kernel rounds |x| + 1 to f32 too
        let o = &out[9 * i..9 * i + 9];
        close(o[0], (v as f64).exp(), 3e-7, "expf", v);
        // __expf rounds x * log2(e) in f32 first: relative error grows like |x| * 2^-24.
        close(
            o[1],
            (v as f64).exp(),
            3e-7 + v.abs() as f64 * 1.2e-7,
            "__expf",
            v,
        );
        close(o[2], p.ln(), 3e-7, "logf", v);
        close(o[3], p.ln(), 5e-7, "__logf", v);
        close(o[4], v as f64 / 3.0, 3e-7, "__fdividef", v);
        close(o[5], 1.0 / p.sqrt(), 3e-7, "rsqrtf", v);
        assert_eq!(o[6], v.clamp(0.0, 1.0), "__saturatef({v})");
        close(o[7], (v as f64).tanh(), 3e-7, "tanhf", v);
        close(o[8], (v.abs() as f64).ln_1p(), 3e-7, "log1pf", v);
        let bits = v.to_bits();
        assert_eq!(iout[4 * i], bits.count_ones() as i32);
        assert_eq!(iout[4 * i + 1], bits.leading_zeros() as i32);
        assert_eq!(
            iout[4 * i + 2],
            if bits == 0 {
                0
            } else {
                bits.trailing_zeros() as i32 + 1
            }
        );
        assert_eq!(
            iout[4 * i + 3],
            (v * 10.0).round_ties_even() as i32 + (i as i32).min(3)
        );
    }
}

// ---- registry ----

#[test]
fn registry_lists_macro_instantiated_namespaced_and_variant_kernels() {
    let names = emu::kernel_names();
    for want in [
        "emu_selftest_axpy_f32",
        "emu_selftest_axpy_bf16",
        "emu_selftest_axpy_f16",
        "emu_selftest_in_namespace",
        "emu_selftest_in_extern_block",
        "planted_off_by_one/emu_selftest_scale",
        "planted_no_barrier/emu_selftest_block_sum",
        "planted_wrong_shuffle/emu_selftest_block_sum",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    assert_eq!(emu::duplicate_kernel(), None);

    let n = 300usize;
    let x = random_normal(n, 19);
    let xb: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let xh: Vec<u16> = x.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
    for (kernel, ptr, decoded) in [
        (
            "emu_selftest_axpy_f32",
            x.as_ptr().cast::<c_void>(),
            x.clone(),
        ),
        (
            "emu_selftest_axpy_bf16",
            xb.as_ptr().cast(),
            xb.iter().map(|&b| bf16::from_bits(b).to_f32()).collect(),
        ),
        (
            "emu_selftest_axpy_f16",
            xh.as_ptr().cast(),
            xh.iter().map(|&b| f16::from_bits(b).to_f32()).collect(),
        ),
    ] {
        let mut y = vec![1.0f32; n];
        let (mut px, mut py, mut a, mut nn) = (ptr, y.as_mut_ptr(), 0.5f32, n as i32);
        run(
            kernel,
            [3, 1, 1],
            [128, 1, 1],
            0,
            &mut args![px, py, a, nn],
            ThreadOrder::Shuffle(2),
        )
        .unwrap();
        for i in 0..n {
            assert_eq!(y[i], 1.0 + 0.5 * decoded[i], "{kernel} element {i}");
        }
    }
    for (kernel, want) in [
        ("emu_selftest_in_namespace", 1),
        ("emu_selftest_in_extern_block", 2),
    ] {
        let mut out = vec![0i32; 32];
        let mut po = out.as_mut_ptr();
        run(
            kernel,
            [1, 1, 1],
            [32, 1, 1],
            0,
            &mut args![po],
            ThreadOrder::Forward,
        )
        .unwrap();
        assert!(out.iter().all(|&v| v == want), "{kernel}");
    }
}

// ---- concurrency and speed ----

#[test]
fn launches_from_many_threads_are_serialised() {
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let x = random_normal(777, 100 + t);
                for k in 0..10 {
                    check_block_sum(
                        "emu_selftest_block_sum",
                        &x,
                        128,
                        ThreadOrder::Shuffle(t * 100 + k),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Prints the fiber switch rate of both switch implementations (a measurement, not a check): small
/// blocks that stay in cache, and full 1024-thread blocks.
#[test]
fn fiber_switch_rate() {
    for (blocks, block, iters) in [(4usize, 64usize, 2000i32), (2, 1024, 256)] {
        for kind in [ContextSwitch::Asm, ContextSwitch::Ucontext] {
            let previous = emu::set_context_switch(kind);
            let mut out = vec![0u32; blocks * block];
            let (mut it, mut po) = (iters, out.as_mut_ptr());
            let s0 = emu::switch_count();
            let t0 = Instant::now();
            let r = run(
                "emu_selftest_spin",
                [blocks as u32, 1, 1],
                [block as u32, 1, 1],
                0,
                &mut args![it, po],
                ThreadOrder::Forward,
            );
            let dt = t0.elapsed().as_secs_f64();
            let switches = emu::switch_count() - s0;
            emu::set_context_switch(previous);
            r.unwrap();
            let want = (0..iters as u32).sum::<u32>();
            assert!(out.iter().all(|&v| v == want));
            eprintln!(
                "{kind:?}, blocks of {block}: {switches} switches in {dt:.3} s = {:.2e} switches/s",
                switches as f64 / dt
            );
        }
    }
}
