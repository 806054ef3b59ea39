//! Training PE-CLIP: the optimiser, the learning-rate schedule and the training step.

mod eval;
pub mod loader;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod parallel;
pub mod precision;
pub mod run;
pub mod schedule;
pub mod state;
pub mod step;

pub use eval::evaluate;
pub use loader::{epoch_batches, Loader};
pub use optim::{AdamW, AdamWParams};
pub use parallel::{parallel_step, shard, Reducer, ThreadReducer};
pub use precision::{LossScaler, Precision};
pub use run::{train, train_parallel, Progress, ProgressCallback, TrainJob};
pub use schedule::CosineSchedule;
pub use state::{read_state, EpochRecord, TrainConfig, TrainState, TRAIN_STATE_VERSION};
pub use step::{batch_gradients, cross_entropy, train_step, GradientPlan, Optimizers, Recompute};
