//! kiln: a deep-learning training framework in Rust, built on candle.
//!
//! This facade re-exports the workspace crates:
//! - [`core`]: recipes, data, devices, checkpoint io, metrics;
//! - [`kernels`]: training ops with a backward pass;
//! - [`models`]: the model zoo;
//! - [`trainers`]: the trainer loop, optimizers, schedules, tasks.

pub use kiln_core as core;
pub use kiln_kernels as kernels;
pub use kiln_models as models;
pub use kiln_trainers as trainers;
