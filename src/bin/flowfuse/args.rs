//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "flowfuse",
    version,
    about = "Normalizing flows with hand-written CUDA kernels and a CPU reference path"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a flow and write the model, metrics and (for 2-D data) figures.
    Train(Box<TrainArgs>),
    /// Print the negative log-likelihood of a saved model on a data set, as JSON.
    Eval(EvalArgs),
    /// Draw samples from a saved model into a .npy or .csv file.
    Sample(SampleArgs),
    /// Print the version, the available backends, and whether a GPU is usable.
    Info,
    /// Time every op family on a device; one JSON line per case, with fractions of the peak.
    Bench(BenchArgs),
    /// Print how the kernels were compiled and each kernel's registers, shared memory and spills.
    Kernels,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// realnvp | nice | spline | maf | iaf | cnf
    #[arg(long, default_value = "realnvp")]
    pub model: String,
    /// moons | circles | 8gaussians | checkerboard | pinwheel | swissroll | PATH.npy | PATH.csv
    #[arg(long, default_value = "moons")]
    pub data: String,
    /// Coupling / autoregressive layers (or CNF hidden layers).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden width of each conditioner layer; "64" or a list "128,128".
    #[arg(long)]
    pub hidden: Option<String>,
    /// Optimisation steps (default: 3000 for the discrete flows, 2000 for IAF, 120000 for a
    /// flow-matching CNF, 1000 for a maximum-likelihood CNF).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu | cuda | auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Output folder (created if missing).
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Points drawn from a built-in data set.
    #[arg(long, default_value_t = 20000)]
    pub samples: usize,
    /// Fraction of the data held out for the test NLL.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Train on the raw data instead of standardising it (the model always reports
    /// log-densities in the data's own units).
    #[arg(long)]
    pub no_standardize: bool,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 100.0)]
    pub clip: f32,
    /// Hidden activation: relu | tanh | silu | softplus.
    #[arg(long)]
    pub activation: Option<String>,
    /// CNF objective: mle (maximum likelihood through the adjoint) | fm (flow matching).
    #[arg(long, default_value = "fm")]
    pub objective: String,
    /// CNF trace: exact | hutchinson.
    #[arg(long, default_value = "exact")]
    pub trace: String,
    /// Hutchinson probes per sample.
    #[arg(long, default_value_t = 1)]
    pub probes: usize,
    #[arg(long, default_value_t = 1e-5)]
    pub rtol: f64,
    #[arg(long, default_value_t = 1e-5)]
    pub atol: f64,
    /// Evaluate the test NLL every this many steps.
    #[arg(long, default_value_t = 500)]
    pub eval_every: usize,
    /// Skip the PNG figures.
    #[arg(long)]
    pub no_figures: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A model.safetensors written by `flowfuse train`.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value_t = 20000)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(short = 'n', long = "num", default_value_t = 1000)]
    pub n: usize,
    /// FILE.npy or FILE.csv
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Shorter timing per case.
    #[arg(long)]
    pub quick: bool,
    /// Rows of the large batches (default: 2^20 on a GPU, 4096 on the CPU).
    #[arg(long)]
    pub batch: Option<usize>,
}
