//! The diffusion process: noise schedules, the per-step coefficients of the samplers, and the
//! reverse process that turns noise into images.

pub mod continuous;
pub mod denoiser;
pub mod dpm_solver;
pub mod sampler;
pub mod schedule;

pub use denoiser::{ClassGuidance, Denoiser, GaussianDenoiser, UNetDenoiser};
pub use dpm_solver::{DpmSolver, DpmSolverType, FinalSigmas};
pub use sampler::{
    inference_timesteps, predicted_x0, sample, NoiseStream, ReverseProcess, Sampler, StepView,
    TakenStep, TimestepSpacing,
};
pub use schedule::{BetaSchedule, NoiseSchedule, PredictionType, VarianceType};
