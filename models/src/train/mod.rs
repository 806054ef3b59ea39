//! Training PE-CLIP: the optimiser, the learning-rate schedule and the training step.

pub mod optim;
pub mod run;
pub mod schedule;
pub mod step;

pub use optim::{AdamW, AdamWParams};
pub use run::{
    read_state, train, EpochRecord, Progress, ProgressCallback, TrainConfig, TrainJob, TrainState,
};
pub use schedule::CosineSchedule;
pub use step::{cross_entropy, train_step, Optimizers};
