//! TODO
pub struct Flow;
