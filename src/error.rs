//! One error type for the whole crate. User input never panics: every bad shape, non-finite
//! value, empty data set, corrupt file or missing GPU comes back as one of these.

use std::path::PathBuf;

/// Why an adaptive ODE solve stopped early.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OdeFailure {
    #[error("non-finite state at t = {t} (row {row})")]
    NonFinite { row: usize, t: f64 },
    #[error("step size underflow at t = {t} (row {row}, h = {h:e})")]
    StepUnderflow { row: usize, t: f64, h: f64 },
    #[error("more than {max_steps} steps (row {row} reached t = {t})")]
    MaxSteps {
        row: usize,
        t: f64,
        max_steps: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        expected: String,
        got: String,
    },
    #[error("non-finite value in {what} at row {row}, column {col}")]
    NonFinite {
        what: String,
        row: usize,
        col: usize,
    },
    #[error("empty data: {0}")]
    Empty(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot read data file {path}: {reason}")]
    Data { path: PathBuf, reason: String },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ODE solver: {0}")]
    Ode(#[from] OdeFailure),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("no kernel image loads on this GPU: {0}")]
    NoKernelImage(String),
    #[error("kernel compilation failed: {0}")]
    Compile(String),
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("CUDA error in {op}: {reason}")]
    Cuda { op: String, reason: String },
    #[error("{op} is not supported by the {backend} backend")]
    Unsupported { op: &'static str, backend: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, expected: impl ToString, got: impl ToString) -> Self {
        Error::Shape {
            op,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
