//! The training loop: seeded mini-batches from a data set resident on the device, a loss and its
//! gradient from the model, Adam with optional clipping and a cosine learning-rate decay,
//! held-out NLL, a progress bar, and metrics as JSON lines.

use std::io::Write;
use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::Flow;
use crate::nn::adam::Adam;
use crate::ops::optim::AdamHyper;
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};
use crate::train::data::Batches;

/// What the trainer needs from a model.
pub trait Trainable<B: Backend> {
    /// The training loss of a batch and its gradient, in `params()` order.
    fn loss_and_grad(&mut self, b: &B, batch: &B::Mat, rng: &mut Rng)
    -> Result<(f64, Vec<B::Mat>)>;
    /// Mean negative log-likelihood of a batch, nats per sample.
    fn nll(&self, b: &B, x: &B::Mat) -> Result<f64>;
    fn params(&self) -> Vec<&B::Mat>;
    fn params_mut(&mut self) -> Vec<&mut B::Mat>;
}

impl<B: Backend> Trainable<B> for Flow<B> {
    fn loss_and_grad(
        &mut self,
        b: &B,
        batch: &B::Mat,
        _rng: &mut Rng,
    ) -> Result<(f64, Vec<B::Mat>)> {
        self.nll_and_grad(b, batch)
    }
    fn nll(&self, b: &B, x: &B::Mat) -> Result<f64> {
        Flow::nll(self, b, x)
    }
    fn params(&self) -> Vec<&B::Mat> {
        Flow::params(self)
    }
    fn params_mut(&mut self) -> Vec<&mut B::Mat> {
        Flow::params_mut(self)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub adam: AdamHyper,
    pub clip_norm: Option<f32>,
    /// Cosine decay of the learning rate to `lr · final_lr_fraction` over the run.
    pub cosine: bool,
    pub final_lr_fraction: f32,
    pub seed: u64,
    /// Evaluate the held-out NLL every this many steps (and at the end).
    pub eval_every: usize,
    /// Rows per evaluation batch (bounds memory on large test sets).
    pub eval_batch: usize,
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 2000,
            batch: 512,
            adam: AdamHyper::default(),
            clip_norm: Some(100.0),
            cosine: true,
            final_lr_fraction: 0.01,
            seed: 0,
            eval_every: 250,
            eval_batch: 8192,
            progress: true,
        }
    }
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_nll: Option<f64>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub train_nll: f64,
    pub test_nll: f64,
    /// Wall time of the optimisation steps (evaluation excluded).
    pub seconds: f64,
    pub samples_per_second: f64,
}

/// Mean NLL over a whole data set, in batches of `eval_batch` rows.
pub fn dataset_nll<B: Backend, M: Trainable<B>>(
    model: &M,
    b: &B,
    data: &Tensor,
    eval_batch: usize,
) -> Result<f64> {
    if data.rows() == 0 {
        return Err(Error::Empty("evaluation data".into()));
    }
    let mut total = 0.0;
    let step = eval_batch.max(1);
    for start in (0..data.rows()).step_by(step) {
        let part = data.slice_rows(start, start + step);
        let nll = model.nll(b, &b.upload(&part)?)?;
        total += nll * part.rows() as f64;
    }
    Ok(total / data.rows() as f64)
}

/// Trains `model` on `train` and reports NLLs on `train` and `test`. Metrics go to `metrics`
/// (one JSON object per line) every `eval_every` steps.
pub fn train<B: Backend, M: Trainable<B>>(
    model: &mut M,
    b: &B,
    train: &Tensor,
    test: &Tensor,
    cfg: &TrainConfig,
    mut metrics: Option<&mut dyn Write>,
) -> Result<TrainReport> {
    if train.rows() == 0 || test.rows() == 0 {
        return Err(Error::Empty(
            "training needs non-empty train and test sets".into(),
        ));
    }
    if cfg.batch == 0 || cfg.steps == 0 {
        return Err(Error::invalid("steps and batch must be positive"));
    }
    let mut rng = Rng::new(cfg.seed);
    let data = b.upload(train)?;
    let mut batches = Batches::new(train.rows(), &mut rng)?;
    let mut adam = Adam::new(b, &model.params(), cfg.adam, cfg.clip_norm)?;
    let bar = progress_bar(cfg);
    let mut elapsed = 0.0;
    let mut recent = RunningMean::default();
    for step in 1..=cfg.steps {
        let started = Instant::now();
        let idx: Vec<u32> = batches
            .next_batch(cfg.batch)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let batch = b.gather_rows(&data, &b.upload_idx(&idx)?)?;
        let (loss, grads) = model.loss_and_grad(b, &batch, &mut rng)?;
        if !loss.is_finite() {
            return Err(Error::Diverged(format!("loss is {loss} at step {step}")));
        }
        let lr = learning_rate(cfg, step);
        let grad_norm = adam
            .step(b, model.params_mut(), &grads, lr)
            .map_err(|e| match e {
                Error::NonFinite { .. } => {
                    Error::Diverged(format!("non-finite gradient at step {step}"))
                }
                other => other,
            })?;
        b.synchronize()?;
        elapsed += started.elapsed().as_secs_f64();
        recent.push(loss);
        if let Some(bar) = &bar {
            bar.set_position(step as u64);
            if step % 10 == 0 {
                bar.set_message(format!("loss {:.4}", recent.mean()));
            }
        }
        let eval_now = step % cfg.eval_every.max(1) == 0 || step == cfg.steps;
        if eval_now {
            let test_nll = dataset_nll(model, b, test, cfg.eval_batch)?;
            if let Some(w) = metrics.as_deref_mut() {
                let m = Metric {
                    step,
                    loss: recent.mean(),
                    grad_norm,
                    lr,
                    test_nll: Some(test_nll),
                    seconds: elapsed,
                };
                writeln!(
                    w,
                    "{}",
                    serde_json::to_string(&m).expect("metrics serialise")
                )
                .map_err(|e| Error::io("metrics", e))?;
            }
            recent = RunningMean::default();
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let train_nll = dataset_nll(model, b, train, cfg.eval_batch)?;
    let test_nll = dataset_nll(model, b, test, cfg.eval_batch)?;
    Ok(TrainReport {
        steps: cfg.steps,
        train_nll,
        test_nll,
        seconds: elapsed,
        samples_per_second: (cfg.steps * cfg.batch) as f64 / elapsed.max(1e-9),
    })
}

fn learning_rate(cfg: &TrainConfig, step: usize) -> f32 {
    if !cfg.cosine {
        return cfg.adam.lr;
    }
    let progress = (step - 1) as f64 / cfg.steps.max(1) as f64;
    let floor = cfg.final_lr_fraction as f64;
    let factor = floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    (cfg.adam.lr as f64 * factor) as f32
}

fn progress_bar(cfg: &TrainConfig) -> Option<indicatif::ProgressBar> {
    if !cfg.progress {
        return None;
    }
    // Draws on stderr and hides itself when stderr is not a terminal.
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
    )
    .expect("static template");
    bar.set_style(style);
    Some(bar)
}

#[derive(Default)]
struct RunningMean {
    sum: f64,
    n: usize,
}

impl RunningMean {
    fn push(&mut self, v: f64) {
        self.sum += v;
        self.n += 1;
    }
    fn mean(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.sum / self.n as f64
        }
    }
}
