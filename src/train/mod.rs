//! Training: hyperparameters and their schedules, and the training step.

pub mod hyper;
pub mod trainer;

pub use hyper::{LrSchedule, TrainHyper};
pub use trainer::{HostState, StepGradients, StepStats, TrainState, Trainer};
