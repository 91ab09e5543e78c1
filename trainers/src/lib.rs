//! kiln-trainers: the training loop, optimizers, learning-rate schedules and tasks.

pub mod amp;
pub mod bench;
pub mod distributed;
pub mod export;
pub mod generate;
pub mod history;
pub mod infer;
pub mod memory;
pub mod nccl;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod report;
pub mod run;
pub mod runs;
pub mod schedule;
pub mod step;
pub mod task;
pub mod trainer;
pub mod verify;
pub mod weights;

pub use trainer::{train, TrainOptions, TrainOutcome};
