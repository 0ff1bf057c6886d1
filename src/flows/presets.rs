//! Ready-made flows by family name: the models the CLI trains. Each is a stack of the layers in
//! this module, built on the host with a seeded generator and uploaded to the backend.

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::Flow;
use crate::flows::actnorm::ActNorm;
use crate::flows::autoregressive::AutoregressiveLayer;
use crate::flows::coupling::CouplingLayer;
use crate::flows::layer::{ArKind, FlowLayer};
use crate::flows::permutation::Permutation;
use crate::nn::made::Order;
use crate::nn::mlp::Activation;
use crate::ops::coupling::{CouplingKind, CouplingSpec, Half};
use crate::rng::Rng;

/// The discrete flow families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Affine coupling (RealNVP, eq. 18.10–18.14).
    RealNvp,
    /// Additive coupling (NICE) followed by a learned diagonal scaling.
    Nice,
    /// Rational-quadratic spline coupling (Neural Spline Flows).
    Spline,
    /// Masked autoregressive flow (eq. 18.17).
    Maf,
    /// Inverse autoregressive flow (eq. 18.19).
    Iaf,
}

impl Family {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "realnvp" => Ok(Family::RealNvp),
            "nice" => Ok(Family::Nice),
            "spline" => Ok(Family::Spline),
            "maf" => Ok(Family::Maf),
            "iaf" => Ok(Family::Iaf),
            _ => Err(Error::invalid(format!(
                "unknown flow '{s}' (realnvp, nice, spline, maf, iaf)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::RealNvp => "realnvp",
            Family::Nice => "nice",
            Family::Spline => "spline",
            Family::Maf => "maf",
            Family::Iaf => "iaf",
        }
    }
}

/// Architecture knobs shared by the families.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowSpec {
    pub family: Family,
    pub dim: usize,
    /// Number of coupling / autoregressive layers.
    pub layers: usize,
    /// Hidden widths of each conditioner (or MADE).
    pub hidden: Vec<usize>,
    pub act: Activation,
    /// Soft clamp of the log-scales.
    pub clamp: f32,
    /// An ActNorm before every coupling / autoregressive layer.
    pub actnorm: bool,
    /// Spline bins and bound (spline family only).
    pub bins: usize,
    pub bound: f32,
}

impl FlowSpec {
    /// The defaults of `flowfuse train` for a family.
    pub fn new(family: Family, dim: usize) -> Self {
        FlowSpec {
            family,
            dim,
            layers: if matches!(family, Family::Maf | Family::Iaf) {
                5
            } else {
                8
            },
            hidden: vec![64, 64],
            act: Activation::Relu,
            clamp: 3.0,
            actnorm: true,
            bins: 8,
            bound: 4.0,
        }
    }
}

/// Builds an untrained flow. Layer 0 acts on the base sample; coupling layers alternate which
/// half they copy (Fig. 18.2), autoregressive layers alternate natural and reversed orders,
/// and for D > 2 a fixed random permutation mixes coordinates between layers.
pub fn build<B: Backend>(b: &B, spec: &FlowSpec, rng: &mut Rng) -> Result<Flow<B>> {
    if spec.layers == 0 {
        return Err(Error::invalid("a flow needs at least one layer"));
    }
    if spec.dim < 2 {
        return Err(Error::invalid(format!(
            "the {} family needs data of dimension >= 2, got {}",
            spec.family.name(),
            spec.dim
        )));
    }
    let d = spec.dim;
    let mut layers: Vec<Box<dyn FlowLayer<B>>> = Vec::new();
    for i in 0..spec.layers {
        if spec.actnorm {
            layers.push(Box::new(ActNorm::new(b, d)?));
        }
        let copied = if i % 2 == 0 { Half::Lower } else { Half::Upper };
        let order = if i % 2 == 0 {
            Order::Natural
        } else {
            Order::Reversed
        };
        let coupling = |kind| CouplingSpec {
            dim: d,
            copied,
            kind,
        };
        let layer: Box<dyn FlowLayer<B>> = match spec.family {
            Family::RealNvp => Box::new(CouplingLayer::new(
                b,
                coupling(CouplingKind::Affine { clamp: spec.clamp }),
                &spec.hidden,
                spec.act,
                rng,
            )?),
            Family::Nice => Box::new(CouplingLayer::new(
                b,
                coupling(CouplingKind::Additive),
                &spec.hidden,
                spec.act,
                rng,
            )?),
            Family::Spline => Box::new(CouplingLayer::new(
                b,
                coupling(CouplingKind::Spline {
                    bins: spec.bins,
                    bound: spec.bound,
                }),
                &spec.hidden,
                spec.act,
                rng,
            )?),
            Family::Maf => Box::new(AutoregressiveLayer::new(
                b,
                ArKind::Maf,
                d,
                &spec.hidden,
                spec.act,
                order,
                spec.clamp,
                rng,
            )?),
            Family::Iaf => Box::new(AutoregressiveLayer::new(
                b,
                ArKind::Iaf,
                d,
                &spec.hidden,
                spec.act,
                order,
                spec.clamp,
                rng,
            )?),
        };
        layers.push(layer);
        if d > 2 && i + 1 < spec.layers {
            layers.push(Box::new(Permutation::random(b, d, rng)?));
        }
    }
    if spec.family == Family::Nice {
        // NICE's coupling layers preserve volume; the final diagonal scaling is what lets the
        // model change density at all (Dinh et al. 2014, section 3.3).
        layers.push(Box::new(ActNorm::new(b, d)?));
    }
    Flow::new(d, layers)
}
