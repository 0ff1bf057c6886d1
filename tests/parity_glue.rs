//! Parity of the log-det, reduction, element-wise and optimiser kernels with the CPU reference:
//! |kernel - reference| <= atol + rtol·|reference|, first mismatches reported. Sizes cover
//! partial blocks, several blocks and masked-off threads.

mod common;

use flowfuse::backend::Cpu;
use flowfuse::ops::optim::AdamHyper;
use flowfuse::ops::prelude::*;
use flowfuse::testing::assert_close;
use flowfuse::{Direction, Rng, Tensor};

/// The op families these kernels implement (a grid backend has them before it is a full Backend).
trait Glue: LogdetOps + ElementOps + OptimOps {}
impl<T: LogdetOps + ElementOps + OptimOps> Glue for T {}

/// (rows, cols) pairs: one row, a partial warp, several blocks with a ragged tail.
const SHAPES: [(usize, usize); 5] = [(1, 1), (3, 5), (37, 2), (300, 33), (1029, 7)];

fn pair<B: Glue>(b: &B, t: &Tensor) -> (B::Mat, Tensor) {
    (b.upload(t).unwrap(), t.clone())
}

fn check_reductions<B: Glue>(b: &B) {
    let cpu = Cpu;
    let mut rng = Rng::new(1);
    for (r, c) in SHAPES {
        let x = Tensor::randn(r, c, &mut rng);
        let (xd, xh) = pair(b, &x);
        let what = format!("{r}x{c}");
        assert_close(
            &format!("row_sum {what}"),
            &b.download(&b.row_sum(&xd).unwrap()).unwrap(),
            &cpu.row_sum(&xh).unwrap(),
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("gaussian_log_prob {what}"),
            &b.download(&b.gaussian_log_prob(&xd).unwrap()).unwrap(),
            &cpu.gaussian_log_prob(&xh).unwrap(),
            1e-5,
            1e-5,
        );
        let (s, sh) = (b.sum(&xd).unwrap(), cpu.sum(&xh).unwrap());
        assert!(
            (s - sh).abs() <= 1e-4 + 1e-5 * sh.abs(),
            "sum {what}: {s} vs {sh}"
        );
        let y = Tensor::randn(c, r, &mut rng);
        let yd = b.upload(&y).unwrap();
        let (q, qh) = (
            b.sq_norm(&[&xd, &yd]).unwrap(),
            cpu.sq_norm(&[&xh, &y]).unwrap(),
        );
        assert!(
            (q - qh).abs() <= 1e-4 + 1e-5 * qh,
            "sq_norm {what}: {q} vs {qh}"
        );
    }
}

fn check_elementwise<B: Glue>(b: &B) {
    let cpu = Cpu;
    let mut rng = Rng::new(2);
    for (r, c) in SHAPES {
        let x = Tensor::randn(r, c, &mut rng);
        let y = Tensor::randn(r, c, &mut rng);
        let (xd, yd) = (b.upload(&x).unwrap(), b.upload(&y).unwrap());
        let get = |m: &B::Mat| b.download(m).unwrap();
        assert_close(
            "axpby",
            &get(&b.axpby(0.7, &xd, -1.3, &yd).unwrap()),
            &cpu.axpby(0.7, &x, -1.3, &y).unwrap(),
            1e-6,
            1e-6,
        );
        assert_close(
            "mul",
            &get(&b.mul(&xd, &yd).unwrap()),
            &cpu.mul(&x, &y).unwrap(),
            1e-6,
            1e-6,
        );
        assert_close(
            "fill",
            &get(&b.fill(r, c, 2.5).unwrap()),
            &cpu.fill(r, c, 2.5).unwrap(),
            0.0,
            0.0,
        );
        let perm: Vec<u32> = rng.permutation(c).into_iter().map(|p| p as u32).collect();
        assert_close(
            "gather_cols",
            &get(&b.gather_cols(&xd, &b.upload_idx(&perm).unwrap()).unwrap()),
            &cpu.gather_cols(&x, &perm).unwrap(),
            0.0,
            0.0,
        );
        let rows: Vec<u32> = (0..2 * r + 1).map(|_| rng.below(r) as u32).collect();
        assert_close(
            "gather_rows",
            &get(&b.gather_rows(&xd, &b.upload_idx(&rows).unwrap()).unwrap()),
            &cpu.gather_rows(&x, &rows).unwrap(),
            0.0,
            0.0,
        );
        let loc = Tensor::randn(1, c, &mut rng);
        let ls = Tensor::randn(1, c, &mut rng).map(|v| 0.5 * v);
        let (locd, lsd) = (b.upload(&loc).unwrap(), b.upload(&ls).unwrap());
        let g = Tensor::randn(r, c, &mut rng);
        let dld = Tensor::randn(r, 1, &mut rng);
        let (gd, dldd) = (b.upload(&g).unwrap(), b.upload(&dld).unwrap());
        for dir in [Direction::Forward, Direction::Inverse] {
            let (yk, ldk) = b.scale_shift(&xd, &locd, &lsd, dir).unwrap();
            let (yr, ldr) = cpu.scale_shift(&x, &loc, &ls, dir).unwrap();
            assert_close("scale_shift y", &get(&yk), &yr, 1e-5, 1e-5);
            assert_close("scale_shift logdet", &get(&ldk), &ldr, 1e-5, 1e-5);
            let (dx, dloc, dls) = b
                .scale_shift_backward(&xd, &locd, &lsd, dir, &gd, &dldd)
                .unwrap();
            let (dxr, dlocr, dlsr) = cpu
                .scale_shift_backward(&x, &loc, &ls, dir, &g, &dld)
                .unwrap();
            assert_close("scale_shift_backward dx", &get(&dx), &dxr, 1e-5, 1e-5);
            assert_close("scale_shift_backward dloc", &get(&dloc), &dlocr, 1e-4, 1e-4);
            assert_close("scale_shift_backward dls", &get(&dls), &dlsr, 1e-4, 1e-4);
        }
        let (m, s) = b.col_moments(&xd).unwrap();
        let (mr, sr) = cpu.col_moments(&x).unwrap();
        assert_close("col_moments mean", &get(&m), &mr, 1e-5, 1e-4);
        assert_close("col_moments std", &get(&s), &sr, 1e-5, 1e-4);
    }
}

fn check_adam<B: Glue>(b: &B) {
    let cpu = Cpu;
    let mut rng = Rng::new(3);
    let h = AdamHyper {
        lr: 1e-2,
        weight_decay: 0.1,
        ..AdamHyper::default()
    };
    for (r, c) in SHAPES {
        let mut p = Tensor::randn(r, c, &mut rng);
        let mut m = Tensor::zeros(r, c);
        let mut v = Tensor::zeros(r, c);
        let (mut pd, mut md, mut vd) = (
            b.upload(&p).unwrap(),
            b.upload(&m).unwrap(),
            b.upload(&v).unwrap(),
        );
        for t in 1..=3 {
            let g = Tensor::randn(r, c, &mut rng);
            b.adam_step(
                &mut pd,
                &b.upload(&g).unwrap(),
                &mut md,
                &mut vd,
                &h,
                t,
                0.5,
            )
            .unwrap();
            cpu.adam_step(&mut p, &g, &mut m, &mut v, &h, t, 0.5)
                .unwrap();
        }
        assert_close("adam p", &b.download(&pd).unwrap(), &p, 1e-6, 1e-5);
        assert_close("adam m", &b.download(&md).unwrap(), &m, 1e-6, 1e-5);
        assert_close("adam v", &b.download(&vd).unwrap(), &v, 1e-7, 1e-5);
    }
}

/// Adam writes its parameter in place: a clone taken before must keep the old values.
fn check_adam_copy_on_write<B: Glue>(b: &B) {
    let p0 = Tensor::full(2, 3, 1.0);
    let mut p = b.upload(&p0).unwrap();
    let before = p.clone();
    let (mut m, mut v) = (b.zeros(2, 3).unwrap(), b.zeros(2, 3).unwrap());
    b.adam_step(
        &mut p,
        &b.fill(2, 3, 1.0).unwrap(),
        &mut m,
        &mut v,
        &AdamHyper::default(),
        1,
        1.0,
    )
    .unwrap();
    assert_eq!(b.download(&before).unwrap(), p0);
    assert_ne!(b.download(&p).unwrap(), p0);
}

on_grid_backends!(reductions, super::check_reductions);
on_grid_backends!(elementwise, super::check_elementwise);
on_grid_backends!(adam, super::check_adam);
on_grid_backends!(adam_copy_on_write, super::check_adam_copy_on_write);

/// Planted bugs (build/emu.rs `VARIANTS`, `#ifdef FF_PLANT_*` in kernels/logdet.cu and
/// kernels/elementwise.cu) must make the very parity bodies above fail. Returns, per thread
/// order, whether the body failed.
fn caught_by(variant: &'static str, body: fn(&flowfuse::backend::emu::Emu)) -> Vec<(String, bool)> {
    use flowfuse::backend::emu::{Emu, ThreadOrder};
    [
        ThreadOrder::Forward,
        ThreadOrder::Reverse,
        ThreadOrder::Shuffle(1),
        ThreadOrder::Shuffle(2),
    ]
    .into_iter()
    .map(|order| {
        let b = Emu::planted(order, variant);
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&b))).is_err();
        (format!("{order:?}"), failed)
    })
    .collect()
}

#[test]
fn planted_off_by_one_is_caught() {
    let caught = caught_by("planted_off_by_one", check_reductions);
    assert!(
        caught.iter().all(|(_, c)| *c),
        "an off-by-one bound slipped through: {caught:?}"
    );
}

#[test]
fn planted_wrong_shuffle_lane_is_caught() {
    let caught = caught_by("planted_wrong_shuffle", check_reductions);
    assert!(
        caught.iter().all(|(_, c)| *c),
        "a wrong shuffle lane slipped through: {caught:?}"
    );
}

#[test]
fn planted_missing_barrier_is_caught_by_a_thread_order() {
    let caught = caught_by("planted_no_barrier", check_elementwise);
    eprintln!("missing barrier in elem_col_stats_f32, caught per order: {caught:?}");
    // Whether an order exposes a race depends on which thread reaches the shared read first;
    // the reversed and shuffled orders exist so that one of them does.
    assert!(
        caught
            .iter()
            .filter(|(o, _)| o != "Forward")
            .any(|(_, c)| *c),
        "a missing barrier slipped through every non-forward order: {caught:?}"
    );
    assert!(caught.iter().any(|(_, c)| *c));
}
