//! Flow layers and the flow itself.

pub mod actnorm;
pub mod autoregressive;
pub mod coupling;
pub mod flow;
pub mod layer;
pub mod permutation;

pub use flow::Flow;
pub use layer::{ArKind, FlowLayer, LayerConfig, LayerState};
pub mod presets;

use crate::backend::Backend;
use crate::error::Result;

/// Rebuilds a layer from its host state (checkpoints, moving a flow between backends).
pub fn layer_from_state<B: Backend>(b: &B, state: &LayerState) -> Result<Box<dyn FlowLayer<B>>> {
    Ok(match state.config {
        LayerConfig::Coupling { .. } => Box::new(coupling::CouplingLayer::from_state(b, state)?),
        LayerConfig::Autoregressive { .. } => {
            Box::new(autoregressive::AutoregressiveLayer::from_state(b, state)?)
        }
        LayerConfig::ActNorm { .. } => Box::new(actnorm::ActNorm::from_state(b, state)?),
        LayerConfig::Permute { .. } => Box::new(permutation::Permutation::from_state(b, state)?),
    })
}
