//! Reference vector-field ops: threads over chunks of rows, GEMMs through the `gemm` crate, and
//! parameter gradients summed across chunks in f64 in row order (deterministic).

use super::fastact::Derivs;
use super::pass::{self, Directions, DivBar};
use super::step_cpu::materialise;
use super::{
    DivCotangent, FieldVjp, ParamGrads, Rk45Ops, TraceMode, check_field, check_trace, check_vjp,
};
use crate::backend::Cpu;
use crate::backend::cpu::{CHUNK_ROWS, concat_rows, par_row_chunks};
use crate::error::Result;
use crate::nn::mlp::Mlp;
use crate::tensor::{Shaped, Tensor};

/// The directions of rows `range` for `trace`.
fn directions<'a>(
    trace: &TraceMode<'a, Tensor>,
    range: std::ops::Range<usize>,
    dim: usize,
) -> Directions<'a> {
    match trace {
        TraceMode::Exact => Directions::exact(range.len(), dim),
        TraceMode::Generated { .. } => unreachable!("generated probes are materialised first"),
        TraceMode::Hutchinson(p) => {
            let cols = p.cols();
            Directions::probes(
                &p.data()[range.start * cols..range.end * cols],
                dim,
                cols / dim,
            )
        }
    }
}

fn check_trace_finite(trace: &TraceMode<'_, Tensor>) -> Result<()> {
    match trace {
        TraceMode::Hutchinson(p) => p.check_finite("Hutchinson probes"),
        _ => Ok(()),
    }
}

impl Rk45Ops for Cpu {
    fn field(&self, net: &Mlp<Tensor>, z: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (rows, dim) = check_field("field", net, z, t)?;
        z.check_finite("field: z")?;
        t.check_finite("field: t")?;
        let parts = par_row_chunks(rows, CHUNK_ROWS, |r| {
            let z = &z.data()[r.start * dim..r.end * dim];
            pass::forward(net, z, &t.data()[r.clone()], r.len(), Derivs::None).recycle()
        });
        Ok(concat_rows(parts, rows, dim))
    }

    fn field_div(
        &self,
        net: &Mlp<Tensor>,
        z: &Tensor,
        t: &Tensor,
        trace: TraceMode<'_, Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (rows, dim) = check_field("field_div", net, z, t)?;
        check_trace("field_div", &trace, rows, dim)?;
        let mut store = None;
        let trace = materialise(trace, rows, dim, &mut store)?;
        z.check_finite("field_div: z")?;
        t.check_finite("field_div: t")?;
        check_trace_finite(&trace)?;
        // Shallow fields have a cheaper exact trace than D tangent passes (see `TraceForm`).
        let form = match trace {
            TraceMode::Exact => pass::trace_form(net, dim),
            TraceMode::Hutchinson(_) | TraceMode::Generated { .. } => None,
        };
        let parts = par_row_chunks(rows, CHUNK_ROWS, |r| {
            let zc = &z.data()[r.start * dim..r.end * dim];
            let fwd = pass::forward(net, zc, &t.data()[r.clone()], r.len(), Derivs::First);
            let div = match &form {
                Some(form) => pass::form_div(form, &fwd),
                None => {
                    let dirs = directions(&trace, r, dim);
                    let mut tan = pass::tangents(net, &fwd, &dirs, false);
                    let div = std::mem::take(&mut tan.div);
                    tan.recycle();
                    dirs.recycle();
                    div
                }
            };
            (fwd.recycle(), div)
        });
        let (f, div): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        Ok((concat_rows(f, rows, dim), concat_rows(div, rows, 1)))
    }

    fn field_vjp(
        &self,
        net: &Mlp<Tensor>,
        z: &Tensor,
        t: &Tensor,
        a: &Tensor,
        div: Option<DivCotangent<'_, Tensor>>,
        params: ParamGrads<'_, Tensor>,
    ) -> Result<FieldVjp<Tensor>> {
        let op = "field_vjp";
        let (rows, dim) = check_field(op, net, z, t)?;
        check_vjp(op, net.act, rows, dim, a, div.as_ref(), &params)?;
        let mut store = None;
        let div = match div {
            None => None,
            Some(d) => Some(DivCotangent {
                a_div: d.a_div,
                trace: materialise(d.trace, rows, dim, &mut store)?,
            }),
        };
        z.check_finite("field_vjp: z")?;
        t.check_finite("field_vjp: t")?;
        a.check_finite("field_vjp: a")?;
        if let Some(d) = &div {
            d.a_div.check_finite("field_vjp: a_div")?;
            check_trace_finite(&d.trace)?;
        }
        let weights = match params {
            ParamGrads::Weighted(w) => {
                w.check_finite("field_vjp: row weights")?;
                Some(w)
            }
            _ => None,
        };
        let want_params = !matches!(params, ParamGrads::Skip);
        let derivs = if div.is_some() {
            Derivs::Second
        } else {
            Derivs::First
        };
        let parts = par_row_chunks(rows, CHUNK_ROWS, |r| {
            let (zc, ac) = (
                &z.data()[r.start * dim..r.end * dim],
                &a.data()[r.start * dim..r.end * dim],
            );
            let fwd = pass::forward(net, zc, &t.data()[r.clone()], r.len(), derivs);
            let mut grads = want_params.then(|| net.zeros_like());
            let w = weights.map(|w| &w.data()[r.clone()]);
            let g_z = match &div {
                None => pass::backward(net, &fwd, ac, None, w, grads.as_mut()),
                Some(d) => {
                    let dirs = directions(&d.trace, r.clone(), dim);
                    let tan = pass::tangents(net, &fwd, &dirs, true);
                    let bar = DivBar {
                        c: &d.a_div.data()[r.clone()],
                        tan: &tan,
                        dirs: &dirs,
                    };
                    let g_z = pass::backward(net, &fwd, ac, Some(&bar), w, grads.as_mut());
                    tan.recycle();
                    dirs.recycle();
                    g_z
                }
            };
            (fwd.recycle(), g_z, grads)
        });
        let mut f = Vec::with_capacity(parts.len());
        let mut g_z = Vec::with_capacity(parts.len());
        let mut sums: Option<Vec<Vec<f64>>> = want_params.then(|| {
            net.tensors()
                .iter()
                .map(|t| vec![0.0f64; t.len()])
                .collect()
        });
        for (fc, gc, grads) in parts {
            f.push(fc);
            g_z.push(gc);
            if let (Some(sums), Some(grads)) = (sums.as_mut(), grads) {
                for (s, g) in sums.iter_mut().zip(grads.tensors()) {
                    for (acc, &v) in s.iter_mut().zip(g.data()) {
                        *acc += v as f64;
                    }
                }
            }
        }
        let g_params = match sums {
            None => None,
            Some(sums) => {
                let tensors = net
                    .tensors()
                    .iter()
                    .zip(sums)
                    .map(|(t, s)| {
                        Tensor::from_vec(
                            t.rows(),
                            t.cols(),
                            s.into_iter().map(|v| v as f32).collect(),
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Mlp::from_tensors(net.act, tensors)?)
            }
        };
        Ok(FieldVjp {
            f: concat_rows(f, rows, dim),
            g_z: concat_rows(g_z, rows, dim),
            g_params,
        })
    }
}
