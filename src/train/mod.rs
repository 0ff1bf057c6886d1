//! Training: data sets and loaders, the trainer, checkpoints.
pub mod trainer;
