//! The diffusion process: noise schedules and the per-step coefficients of the samplers.

pub mod schedule;

pub use schedule::{BetaSchedule, NoiseSchedule, PredictionType, VarianceType};
