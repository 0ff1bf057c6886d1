//! Network parameters: plain and masked (MADE) MLPs.

pub mod adam;
pub mod made;
pub mod mlp;

pub use mlp::{Activation, Linear, Mlp};
