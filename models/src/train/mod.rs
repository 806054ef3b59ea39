//! Training PE-CLIP: the optimiser, the learning-rate schedule and the training step.

mod eval;
mod loader;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod state;
pub mod step;

pub use eval::evaluate;
pub use optim::{AdamW, AdamWParams};
pub use run::{train, Progress, ProgressCallback, TrainJob};
pub use schedule::CosineSchedule;
pub use state::{read_state, EpochRecord, TrainConfig, TrainState, TRAIN_STATE_VERSION};
pub use step::{batch_gradients, cross_entropy, train_step, GradientPlan, Optimizers, Recompute};
