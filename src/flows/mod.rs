//! Flow layers and the flow itself.

pub mod actnorm;
pub mod autoregressive;
pub mod coupling;
pub mod flow;
pub mod layer;
pub mod permutation;

pub use flow::Flow;
pub use layer::{ArKind, FlowLayer, LayerConfig, LayerState};
