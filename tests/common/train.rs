//! Training set-ups shared by the suites that train a model.

use flowfuse::ops::optim::AdamHyper;
use flowfuse::train::trainer::TrainConfig;

/// `steps` Adam steps of `batch` rows at learning rate `lr`, one evaluation at the end and no
/// progress output; everything else as in `TrainConfig::default()`.
pub fn quiet_training(steps: usize, batch: usize, lr: f32) -> TrainConfig {
    TrainConfig {
        steps,
        batch,
        adam: AdamHyper {
            lr,
            ..AdamHyper::default()
        },
        eval_every: steps,
        progress: false,
        ..TrainConfig::default()
    }
}
