//! The CPU reference of the step ops (see `step.rs` for the contracts): one row at a time, the
//! controller and the starting-step heuristic by the very functions of `ode::controller` and
//! `ode::initial_step`. Sums that the kernels form with fused multiply-adds are written with
//! `mul_add` here, in the same order, so that the emulated kernels agree to the last bit where
//! no library function (pow, sqrt of a different sum) intervenes.

use super::step::{
    Dense, OdeStepOps, OdeSummary, OdeSystem, Phase, RowStatus, STATE_COLS, ShareMode, StepControl,
    check_dense, check_state, check_step_end, col,
};
use super::{DivCotangent, ParamGrads, ProbeKind, Rk45Ops, TraceMode, generated_probes};
use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::nn::mlp::Mlp;
use crate::ode::initial_step;
use crate::ode::tableau::{A, C, E, P, STAGES};
use crate::ode::{StepController, StepMemory};
use crate::tensor::{Shaped, Tensor};

/// The spacing of f32 values at t towards `dir` (the smallest normal f32 at t = 0).
pub(crate) fn spacing_f32(t: f32, dir: f32) -> f64 {
    if t == 0.0 {
        return f32::MIN_POSITIVE as f64;
    }
    let a = t.abs();
    let bits = a.to_bits();
    if (t > 0.0) == (dir > 0.0) {
        f32::from_bits(bits + 1) as f64 - a as f64
    } else {
        a as f64 - f32::from_bits(bits - 1) as f64
    }
}

/// The smallest step a row may take at t.
pub(crate) fn min_step(t: f32, dir: f32, h_min: f64) -> f64 {
    h_min.max(10.0 * spacing_f32(t, dir))
}

/// Shampine's dense-output weights b_s(σ) by Horner's rule with fused multiply-adds (the
/// kernels' arithmetic; `tableau::dense_weights` up to rounding).
pub(crate) fn dense_weights_fma(sigma: f64) -> [f64; STAGES] {
    let mut w = [0.0; STAGES];
    for (ws, ps) in w.iter_mut().zip(&P) {
        let q = ps[3].mul_add(sigma, ps[2]);
        let q = q.mul_add(sigma, ps[1]);
        let q = q.mul_add(sigma, ps[0]);
        *ws = q * sigma;
    }
    w
}

fn status(s: &[f32]) -> Option<RowStatus> {
    RowStatus::from_code(s[col::STATUS])
}

fn active(s: &[f32]) -> bool {
    status(s) == Some(RowStatus::Active)
}

/// The proposal of the next attempt of one active row (`ode_propose`).
pub(crate) fn propose_row(s: &mut [f32], ctl: &StepControl) {
    let (t, dir) = (s[col::T], s[col::DIR]);
    let mut h_abs = (s[col::H_ABS] as f64).min(ctl.h_max);
    if s[col::LAST_REJECTED] == 0.0 {
        h_abs = h_abs.max(min_step(t, dir, ctl.h_min));
    }
    let mut t_new = (h_abs.mul_add(dir as f64, t as f64)) as f32;
    if dir * (t_new - s[col::T_END]) > 0.0 {
        t_new = s[col::T_END];
    }
    s[col::T_NEW] = t_new;
    s[col::H] = (t_new as f64 - t as f64) as f32;
}

/// The controller's verdict on one active row's attempt (`Phase::DECIDE`).
fn decide_row(s: &mut [f32], ctl: &StepControl) {
    let err = s[col::ERR] as f64;
    let mut memory = StepMemory {
        last_rejected: s[col::LAST_REJECTED] != 0.0,
        prev_err: s[col::PREV_ERR] as f64,
    };
    let d = ctl.controller.decide(err, &mut memory);
    let h_abs = (s[col::H] as f64).abs() * d.factor;
    s[col::H_ABS] = h_abs as f32;
    s[col::LAST_REJECTED] = memory.last_rejected as u8 as f32;
    s[col::PREV_ERR] = memory.prev_err as f32;
    if d.accept {
        s[col::VERDICT] = 1.0;
        s[col::ACCEPTED] += 1.0;
        if s[col::T_NEW] == s[col::T_END] {
            s[col::STATUS] = RowStatus::Done.code();
        }
    } else {
        s[col::VERDICT] = 0.0;
        s[col::REJECTED] += 1.0;
        if (s[col::H_ABS] as f64) < min_step(s[col::T], s[col::DIR], ctl.h_min) {
            s[col::STATUS] = RowStatus::Underflow.code();
        }
    }
    if active(s) && (s[col::ACCEPTED] + s[col::REJECTED]) as usize >= ctl.max_steps {
        s[col::STATUS] = RowStatus::MaxSteps.code();
    }
}

/// The caller's row of working-set row r.
fn row_id(ids: &Tensor, r: usize, total: usize) -> Result<usize> {
    let v = ids.data()[r];
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && (v as usize) < total {
        Ok(v as usize)
    } else {
        Err(Error::invalid(format!(
            "ode: row index {v} of working row {r} is not a row of the {total}-row batch"
        )))
    }
}

/// Writes the solution at the dense-output times inside row r's accepted step (t, t_new].
#[allow(clippy::too_many_arguments)]
fn dense_row(
    d: &mut Dense<'_, Tensor>,
    r: usize,
    s: &mut [f32],
    y: &[f32],
    y_new: &[f32],
    k: &[&[f32]; STAGES],
    width: usize,
) -> Result<()> {
    let n = d.t_eval.cols();
    let id = row_id(d.ids, r, d.rows_total)?;
    let (t, t_new, h, dir) = (s[col::T], s[col::T_NEW], s[col::H], s[col::DIR]);
    while (s[col::NEXT_EVAL] as usize) < n {
        let e = s[col::NEXT_EVAL] as usize;
        let te = d.t_eval.data()[e];
        if dir * (te - t_new) > 0.0 {
            break;
        }
        let out = (e * d.rows_total + id) * width;
        let dst = &mut d.y_eval.data_mut()[out..out + width];
        if te == t_new {
            dst.copy_from_slice(y_new);
        } else {
            let w = dense_weights_fma((te as f64 - t as f64) / h as f64);
            for (j, o) in dst.iter_mut().enumerate() {
                let mut acc = 0.0f64;
                for (ks, &ws) in k.iter().zip(&w) {
                    acc = ws.mul_add(ks[j] as f64, acc);
                }
                *o = (h as f64).mul_add(acc, y[j] as f64) as f32;
            }
        }
        s[col::NEXT_EVAL] += 1.0;
    }
    Ok(())
}

/// Rows of `m` replaced by zeros where `bad` says so.
fn zero_rows(m: &Tensor, bad: &[bool]) -> Tensor {
    let mut out = m.clone();
    let c = m.cols();
    for (r, &b) in bad.iter().enumerate() {
        if b {
            out.data_mut()[r * c..(r + 1) * c].fill(0.0);
        }
    }
    out
}

fn row_not_finite(m: &Tensor, r: usize) -> bool {
    m.row(r).iter().any(|v| !v.is_finite())
}

/// Columns `cols` of every row of `m`.
fn cols_of(m: &Tensor, cols: std::ops::Range<usize>) -> Tensor {
    Tensor::from_fn(m.rows(), cols.len(), |r, c| m.get(r, cols.start + c))
}

/// A generated trace as uploaded probes (the reference materialises them).
pub(super) fn materialise<'a>(
    trace: TraceMode<'a, Tensor>,
    rows: usize,
    dim: usize,
    store: &'a mut Option<Tensor>,
) -> Result<TraceMode<'a, Tensor>> {
    match trace {
        TraceMode::Generated {
            m,
            kind,
            seed,
            rows: ids,
        } => {
            *store = Some(generated_probes(rows, dim, m, kind, seed, ids)?);
            Ok(TraceMode::Hutchinson(store.as_ref().expect("just stored")))
        }
        other => Ok(other),
    }
}

impl OdeStepOps for Cpu {
    type ParamAcc = Vec<Vec<f64>>;

    fn generate_probes(
        &self,
        rows: usize,
        dim: usize,
        m: usize,
        kind: ProbeKind,
        seed: u64,
        ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        generated_probes(rows, dim, m, kind, seed, ids)
    }

    fn ode_rhs(
        &self,
        net: &Mlp<Tensor>,
        y: &Tensor,
        t: &Tensor,
        system: OdeSystem<'_, Tensor>,
    ) -> Result<Tensor> {
        let op = "ode_rhs";
        let dim = net.out_dim();
        let width = system.width(dim);
        let rows = y.rows();
        y.expect_shape(op, rows, width)?;
        t.expect_shape(op, rows, 1)?;
        // The field ops refuse non-finite input; a row that went non-finite gets a NaN
        // derivative instead, which the step's ERROR phase turns into a row failure.
        let bad: Vec<bool> = (0..rows)
            .map(|r| row_not_finite(y, r) || !t.data()[r].is_finite())
            .collect();
        let (y, t) = if bad.contains(&true) {
            (zero_rows(y, &bad), zero_rows(t, &bad))
        } else {
            (y.clone(), t.clone())
        };
        let z = cols_of(&y, 0..dim);
        let mut k = match system {
            OdeSystem::Field => self.field(net, &z, &t)?,
            OdeSystem::FieldDiv(trace) => {
                let mut store = None;
                let trace = materialise(trace, rows, dim, &mut store)?;
                let (f, div) = self.field_div(net, &z, &t, trace)?;
                Tensor::from_fn(rows, width, |r, c| {
                    if c < dim { f.get(r, c) } else { -div.get(r, 0) }
                })
            }
            OdeSystem::Adjoint(div) => {
                let a = cols_of(&y, dim..2 * dim);
                let mut store = None;
                let div = match div {
                    None => None,
                    Some(d) => Some(DivCotangent {
                        a_div: d.a_div,
                        trace: materialise(d.trace, rows, dim, &mut store)?,
                    }),
                };
                let out = self.field_vjp(net, &z, &t, &a, div, ParamGrads::Skip)?;
                Tensor::from_fn(rows, width, |r, c| {
                    if c < dim {
                        out.f.get(r, c)
                    } else {
                        -out.g_z.get(r, c - dim)
                    }
                })
            }
        };
        for (r, &b) in bad.iter().enumerate() {
            if b {
                k.row_mut(r).fill(f32::NAN);
            }
        }
        Ok(k)
    }

    fn ode_init_state(&self, t0: &Tensor, t1: &Tensor, h0: Option<f64>) -> Result<Tensor> {
        let rows = t0.rows();
        t0.expect_shape("ode_init_state", rows, 1)?;
        t1.expect_shape("ode_init_state", rows, 1)?;
        let mut s = Tensor::zeros(rows, STATE_COLS);
        for r in 0..rows {
            let (a, b) = (t0.data()[r], t1.data()[r]);
            let row = s.row_mut(r);
            row[col::T] = a;
            row[col::T_END] = b;
            row[col::DIR] = if a == b { 0.0 } else { (b - a).signum() };
            row[col::H_ABS] = h0.map_or(0.0, |h| h as f32);
            row[col::PREV_ERR] = 1.0;
            row[col::STATUS] = if a == b {
                RowStatus::Done
            } else {
                RowStatus::Active
            }
            .code();
        }
        Ok(s)
    }

    fn ode_initial_probe(
        &self,
        y0: &Tensor,
        f0: &Tensor,
        state: &mut Tensor,
        ctl: &StepControl,
    ) -> Result<(Tensor, Tensor)> {
        let (rows, width) = y0.shape();
        f0.expect_shape("ode_initial_probe", rows, width)?;
        check_state("ode_initial_probe", state, rows)?;
        let mut yp = y0.clone();
        let mut tp = Tensor::zeros(rows, 1);
        for r in 0..rows {
            let s = state.row_mut(r);
            tp.data_mut()[r] = s[col::T];
            if !active(s) {
                continue;
            }
            if row_not_finite(f0, r) {
                s[col::STATUS] = RowStatus::NonFinite.code();
                continue;
            }
            let y: Vec<f64> = y0.row(r).iter().map(|&v| v as f64).collect();
            let f: Vec<f64> = f0.row(r).iter().map(|&v| v as f64).collect();
            let interval = (s[col::T_END] as f64 - s[col::T] as f64).abs();
            let h0 = initial_step::first_guess(&y, &f, ctl.rtol, ctl.atol, interval) as f32;
            s[col::H_ABS] = h0;
            let step = h0 as f64 * s[col::DIR] as f64;
            tp.data_mut()[r] = (s[col::T] as f64 + step) as f32;
            for (o, (&yj, &fj)) in yp.row_mut(r).iter_mut().zip(y.iter().zip(&f)) {
                *o = (yj + step * fj) as f32;
            }
        }
        Ok((yp, tp))
    }

    fn ode_initial_refine(
        &self,
        y0: &Tensor,
        f0: &Tensor,
        f1: &Tensor,
        state: &mut Tensor,
        ctl: &StepControl,
    ) -> Result<()> {
        let (rows, width) = y0.shape();
        f0.expect_shape("ode_initial_refine", rows, width)?;
        f1.expect_shape("ode_initial_refine", rows, width)?;
        check_state("ode_initial_refine", state, rows)?;
        let f64s =
            |m: &Tensor, r: usize| -> Vec<f64> { m.row(r).iter().map(|&v| v as f64).collect() };
        for r in 0..rows {
            let s = state.row_mut(r);
            if !active(s) {
                continue;
            }
            if row_not_finite(f1, r) {
                s[col::STATUS] = RowStatus::NonFinite.code();
                continue;
            }
            let interval = (s[col::T_END] as f64 - s[col::T] as f64).abs();
            let h = initial_step::refine(
                &f64s(y0, r),
                &f64s(f0, r),
                &f64s(f1, r),
                s[col::H_ABS] as f64,
                ctl.rtol,
                ctl.atol,
                interval,
            );
            s[col::H_ABS] = h as f32;
        }
        Ok(())
    }

    fn ode_share(&self, state: &mut Tensor, column: usize, mode: ShareMode) -> Result<()> {
        if state.cols() != STATE_COLS || column >= STATE_COLS {
            return Err(Error::shape(
                "ode_share",
                format!("a state of {STATE_COLS} columns and a column below it"),
                format!("{} columns, column {column}", state.cols()),
            ));
        }
        let mut shared: Option<f32> = None;
        for r in 0..state.rows() {
            let s = state.row(r);
            if !active(s) {
                continue;
            }
            let v = s[column];
            shared = Some(match (shared, mode) {
                (None, _) => v,
                (Some(m), ShareMode::Min) => m.min(v),
                (Some(m), ShareMode::Max) => {
                    if m.is_nan() || (!v.is_nan() && m >= v) {
                        m
                    } else {
                        v
                    }
                }
            });
        }
        if let Some(v) = shared {
            for r in 0..state.rows() {
                let s = state.row_mut(r);
                if active(s) {
                    s[column] = v;
                }
            }
        }
        Ok(())
    }

    fn ode_propose(&self, state: &mut Tensor, ctl: &StepControl) -> Result<()> {
        if state.cols() != STATE_COLS {
            return Err(Error::shape("ode_propose", STATE_COLS, state.cols()));
        }
        for r in 0..state.rows() {
            let s = state.row_mut(r);
            if active(s) {
                propose_row(s, ctl);
            }
        }
        Ok(())
    }

    fn ode_stage(
        &self,
        y: &Tensor,
        k: &[&Tensor],
        state: &Tensor,
        stage: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (rows, width) = y.shape();
        if stage >= STAGES || k.len() != stage {
            return Err(Error::invalid(format!(
                "ode_stage: stage {stage} needs {stage} stage derivatives (got {}), stages 0..{STAGES}",
                k.len()
            )));
        }
        for ks in k {
            ks.expect_shape("ode_stage", rows, width)?;
        }
        check_state("ode_stage", state, rows)?;
        let mut ys = y.clone();
        let mut ts = Tensor::zeros(rows, 1);
        for r in 0..rows {
            let s = state.row(r);
            ts.data_mut()[r] = if stage == 0 {
                s[col::T]
            } else if C[stage] == 1.0 {
                s[col::T_NEW]
            } else {
                C[stage].mul_add(s[col::H] as f64, s[col::T] as f64) as f32
            };
            if stage == 0 {
                continue;
            }
            let h = s[col::H];
            for (j, o) in ys.row_mut(r).iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for (ks, &a) in k.iter().zip(&A[stage][..stage]) {
                    acc = (a as f32).mul_add(ks.get(r, j), acc);
                }
                *o = h.mul_add(acc, *o);
            }
        }
        Ok((ys, ts))
    }

    fn ode_step_end(
        &self,
        phase: Phase,
        y: &mut Tensor,
        k0: &mut Tensor,
        ks: [&Tensor; 6],
        y_new: &Tensor,
        state: &mut Tensor,
        ctl: &StepControl,
        mut dense: Option<Dense<'_, Tensor>>,
    ) -> Result<()> {
        let (rows, width) = check_step_end(y, k0, &ks, y_new, state, dense.as_ref())?;
        for r in 0..rows {
            let k0r = k0.row(r).to_vec();
            let kr: [&[f32]; STAGES] =
                std::array::from_fn(|s| if s == 0 { &k0r[..] } else { ks[s - 1].row(r) });
            let s = state.row_mut(r);
            if phase.has(Phase::ERROR) {
                s[col::VERDICT] = 0.0;
                if active(s) {
                    let h = s[col::H] as f64;
                    let (yr, yn) = (y.row(r), y_new.row(r));
                    let mut sum = 0.0f64;
                    let mut finite = true;
                    for j in 0..width {
                        let mut acc = 0.0f64;
                        for (kk, &e) in kr.iter().zip(&E) {
                            finite &= kk[j].is_finite();
                            acc = e.mul_add(kk[j] as f64, acc);
                        }
                        finite &= yn[j].is_finite();
                        let scale = ctl
                            .rtol
                            .mul_add((yr[j].abs().max(yn[j].abs())) as f64, ctl.atol)
                            .max(f64::MIN_POSITIVE);
                        let q = h * acc / scale;
                        sum = q.mul_add(q, sum);
                    }
                    let err = (sum / width as f64).sqrt();
                    s[col::ERR] = err as f32;
                    if !finite || !err.is_finite() {
                        s[col::STATUS] = RowStatus::NonFinite.code();
                    }
                }
            }
            if phase.has(Phase::DECIDE) && active(s) {
                decide_row(s, ctl);
            }
            if phase.has(Phase::UPDATE) {
                let moved = s[col::VERDICT] == 1.0
                    && matches!(status(s), Some(RowStatus::Active | RowStatus::Done));
                if moved {
                    if let Some(d) = dense.as_mut() {
                        dense_row(d, r, s, y.row(r), y_new.row(r), &kr, width)?;
                    }
                    s[col::T] = s[col::T_NEW];
                }
                if active(s) {
                    propose_row(s, ctl);
                }
                if moved {
                    y.row_mut(r).copy_from_slice(y_new.row(r));
                    k0.row_mut(r).copy_from_slice(ks[5].row(r));
                }
            }
        }
        Ok(())
    }

    fn ode_dense_start(
        &self,
        y: &Tensor,
        state: &mut Tensor,
        dense: Dense<'_, Tensor>,
    ) -> Result<()> {
        let (rows, width) = y.shape();
        check_state("ode_dense_start", state, rows)?;
        check_dense("ode_dense_start", &dense, rows, width)?;
        let n = dense.t_eval.cols();
        for r in 0..rows {
            let id = row_id(dense.ids, r, dense.rows_total)?;
            let s = state.row_mut(r);
            while (s[col::NEXT_EVAL] as usize) < n {
                let e = s[col::NEXT_EVAL] as usize;
                if s[col::DIR] * (dense.t_eval.data()[e] - s[col::T]) > 0.0 {
                    break;
                }
                let out = (e * dense.rows_total + id) * width;
                dense.y_eval.data_mut()[out..out + width].copy_from_slice(y.row(r));
                s[col::NEXT_EVAL] += 1.0;
            }
        }
        Ok(())
    }

    fn ode_summary(&self, state: &Tensor) -> Result<OdeSummary> {
        if state.cols() != STATE_COLS {
            return Err(Error::shape("ode_summary", STATE_COLS, state.cols()));
        }
        let mut sum = OdeSummary {
            active: 0,
            failed: 0,
            first_failed: None,
        };
        for r in 0..state.rows() {
            match status(state.row(r)) {
                Some(RowStatus::Active) => sum.active += 1,
                Some(RowStatus::Done) => {}
                _ => {
                    sum.failed += 1;
                    sum.first_failed.get_or_insert(r);
                }
            }
        }
        Ok(sum)
    }

    fn ode_active_rows(&self, state: &Tensor, count: usize) -> Result<Vec<u32>> {
        if state.cols() != STATE_COLS {
            return Err(Error::shape("ode_active_rows", STATE_COLS, state.cols()));
        }
        let idx: Vec<u32> = (0..state.rows())
            .filter(|&r| active(state.row(r)))
            .map(|r| r as u32)
            .collect();
        if idx.len() != count {
            return Err(Error::invalid(format!(
                "ode_active_rows: {} active rows, the caller expected {count}",
                idx.len()
            )));
        }
        Ok(idx)
    }

    fn ode_retire(
        &self,
        y: &Tensor,
        state: &Tensor,
        ids: &Tensor,
        out_y: &mut Tensor,
        out_state: &mut Tensor,
    ) -> Result<()> {
        let (rows, width) = y.shape();
        check_state("ode_retire", state, rows)?;
        ids.expect_shape("ode_retire", rows, 1)?;
        let total = out_y.rows();
        out_y.expect_shape("ode_retire", total, width)?;
        out_state.expect_shape("ode_retire", total, STATE_COLS)?;
        for r in 0..rows {
            if active(state.row(r)) {
                continue;
            }
            let id = row_id(ids, r, total)?;
            out_y.row_mut(id).copy_from_slice(y.row(r));
            out_state.row_mut(id).copy_from_slice(state.row(r));
        }
        Ok(())
    }

    fn ode_quad_new(&self, net: &Mlp<Tensor>) -> Result<Vec<Vec<f64>>> {
        Ok(net.tensors().iter().map(|t| vec![0.0; t.len()]).collect())
    }

    fn ode_quad_add(
        &self,
        acc: &mut Vec<Vec<f64>>,
        net: &Mlp<Tensor>,
        y_s: &Tensor,
        t_s: &Tensor,
        state: &Tensor,
        factor: f64,
        div: Option<DivCotangent<'_, Tensor>>,
    ) -> Result<()> {
        let op = "quad_add";
        let dim = net.out_dim();
        let rows = y_s.rows();
        y_s.expect_shape(op, rows, 2 * dim)?;
        t_s.expect_shape(op, rows, 1)?;
        check_state(op, state, rows)?;
        if acc.len() != net.tensors().len() {
            return Err(Error::invalid(
                "quad_add: an accumulator of another network",
            ));
        }
        let w: Vec<f32> = (0..rows)
            .map(|r| {
                let s = state.row(r);
                (s[col::VERDICT] as f64 * s[col::H] as f64 * factor) as f32
            })
            .collect();
        if w.iter().all(|&v| v == 0.0) {
            return Ok(());
        }
        // Rows with weight zero add nothing, whatever their (possibly non-finite) values.
        let skip: Vec<bool> = w.iter().map(|&v| v == 0.0).collect();
        let y = zero_rows(y_s, &skip);
        let t = zero_rows(t_s, &skip);
        let wm = Tensor::from_vec(rows, 1, w)?;
        let (z, a) = (cols_of(&y, 0..dim), cols_of(&y, dim..2 * dim));
        let mut store = None;
        let a_div_store = div.map(|d| zero_rows(d.a_div, &skip));
        let div = match div {
            None => None,
            Some(d) => Some(DivCotangent {
                a_div: a_div_store.as_ref().expect("stored with the cotangent"),
                trace: materialise(d.trace, rows, dim, &mut store)?,
            }),
        };
        let out = self.field_vjp(net, &z, &t, &a, div, ParamGrads::Weighted(&wm))?;
        let g = out
            .g_params
            .expect("weighted parameter gradients were asked for");
        for (sum, m) in acc.iter_mut().zip(g.tensors()) {
            for (s, &v) in sum.iter_mut().zip(m.data()) {
                *s += v as f64;
            }
        }
        Ok(())
    }

    fn ode_quad_finish(&self, acc: Vec<Vec<f64>>, net: &Mlp<Tensor>) -> Result<Mlp<Tensor>> {
        let tensors = net
            .tensors()
            .iter()
            .zip(acc)
            .map(|(t, s)| {
                Tensor::from_vec(
                    t.rows(),
                    t.cols(),
                    s.into_iter().map(|v| v as f32).collect(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Mlp::from_tensors(net.act, tensors)
    }
}
