//! kiln-core: recipes, data, devices, checkpoint io and metrics — everything the rest of kiln
//! stands on that is not a model or a training loop.

pub mod alloc;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod fs;
pub mod hub;
pub mod metrics;
pub mod recipe;
pub mod rng;
pub mod tensorboard;

pub use recipe::{Recipe, RecipeError};

/// kiln's version (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
