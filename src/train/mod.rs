//! Training: hyperparameters and their schedules, the Min-SNR-gamma loss weights, and the
//! training step.

pub mod hyper;
pub mod min_snr;
pub mod trainer;

pub use hyper::{LrSchedule, TrainHyper};
pub use trainer::{HostState, StepGradients, StepStats, TrainState, Trainer};
