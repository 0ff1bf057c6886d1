//! Training: data sets and loaders, the trainer, checkpoints.

pub mod checkpoint;
pub mod csv;
pub mod data;
pub mod model;
pub mod npy;
pub mod trainer;
