//! The scheduler configuration: the keys of diffusers' `DDPMScheduler`
//! `scheduler_config.json`, with the same defaults. `DDIMScheduler` configs read too (they add
//! `set_alpha_to_one`), and `DPMSolverMultistepScheduler` configs (their solver keys are in
//! `dpm_solver_config.rs`); unknown keys are ignored. Options diffwgpu does not implement are
//! accepted only at their "off" value and refused otherwise, naming the key.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dpm_solver_config::{python_json_in, python_json_out, DpmSolverKeys};
use super::pipeline::DIFFUSERS_VERSION;
use crate::diffusion::{BetaSchedule, DpmSolver, NoiseSchedule, PredictionType, VarianceType};
use crate::error::{Error, Result};

/// The scheduler classes whose configs describe a schedule diffwgpu builds.
const SCHEDULERS: [&str; 3] = ["DDPMScheduler", "DDIMScheduler", DPM_SOLVER_SCHEDULER];

/// The class name of DPM-Solver++'s scheduler.
pub const DPM_SOLVER_SCHEDULER: &str = "DPMSolverMultistepScheduler";

/// The ways diffusers spaces the inference timesteps.
const TIMESTEP_SPACINGS: [&str; 3] = ["leading", "trailing", "linspace"];

/// `DDPMScheduler`'s (or `DDIMScheduler`'s) configuration. Missing keys take diffusers'
/// defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(rename = "_diffusers_version")]
    pub diffusers_version: String,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    /// An explicit list of betas; only `null` is supported.
    pub trained_betas: Option<Value>,
    /// `null` in `DPMSolverMultistepScheduler` configs: `fixed_small` for DDPM steps.
    pub variance_type: Option<String>,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub prediction_type: String,
    /// Dynamic thresholding (Imagen); only `false` is supported.
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    /// Rescaling the betas to zero terminal SNR; only `false` is supported.
    pub rescale_betas_zero_snr: bool,
    /// `DDIMScheduler` only: whether `abar` past the last step is 1 (absent: true), or
    /// `alphas_cumprod[0]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    /// `DPMSolverMultistepScheduler` only: the solver's options.
    #[serde(flatten)]
    pub dpm: DpmSolverKeys,
}

impl Default for SchedulerConfig {
    /// diffusers' defaults for `DDPMScheduler`.
    fn default() -> Self {
        SchedulerConfig {
            class_name: "DDPMScheduler".into(),
            diffusers_version: DIFFUSERS_VERSION.into(),
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            variance_type: Some("fixed_small".into()),
            clip_sample: true,
            clip_sample_range: 1.0,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            set_alpha_to_one: None,
            dpm: DpmSolverKeys::default(),
        }
    }
}

/// A scheduler config error; the pipeline loader replaces the file name with the full path.
fn bad(msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: "scheduler_config.json".into(),
        msg: msg.into(),
    }
}

/// A refusal from the schedule code (an unknown name, betas out of range) as a scheduler
/// config error.
fn config_error(e: Error) -> Error {
    match e {
        Error::Invalid { msg, .. } => bad(msg),
        other => other,
    }
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json` and checks that diffwgpu can build it.
    /// Python's `-Infinity` and friends are read as the floats they are.
    pub fn from_json(text: &str) -> Result<Self> {
        let invalid = |e: serde_json::Error| bad(format!("not a valid scheduler config: {e}"));
        let value: Value = serde_json::from_str(&python_json_in(text)).map_err(invalid)?;
        let mut config: SchedulerConfig = serde_json::from_value(value.clone()).map_err(invalid)?;
        if config.class_name == DPM_SOLVER_SCHEDULER && value.get("timestep_spacing").is_none() {
            config.timestep_spacing = "linspace".into();
        }
        config.validate()?;
        Ok(config)
    }

    /// The config as diffusers writes it (pretty JSON, keys sorted, non-finite floats as
    /// Python writes them).
    pub fn to_json(&self) -> String {
        let value = serde_json::to_value(self).expect("a scheduler config always serializes");
        python_json_out(
            &serde_json::to_string_pretty(&value).expect("a JSON value always serializes"),
        )
    }

    /// A `DPMSolverMultistepScheduler` config of this schedule running `solver`: the beta,
    /// prediction and spacing keys kept, as `DPMSolverMultistepScheduler.from_config` keeps
    /// them.
    pub fn with_dpm_solver(&self, solver: &DpmSolver) -> Self {
        SchedulerConfig {
            class_name: DPM_SOLVER_SCHEDULER.into(),
            variance_type: None,
            set_alpha_to_one: None,
            dpm: DpmSolverKeys::from_solver(solver),
            ..self.clone()
        }
    }

    /// The DPM-Solver++ options of this config (diffusers' defaults for keys it lacks).
    pub fn dpm_solver(&self) -> Result<DpmSolver> {
        self.dpm.solver().map_err(bad)
    }

    /// Checks every key diffwgpu depends on; the error names the key and the fix.
    pub fn validate(&self) -> Result<()> {
        if !SCHEDULERS.contains(&self.class_name.as_str()) {
            return Err(bad(format!(
                "unsupported _class_name = {:?}; diffwgpu reads {} configs, so write one with \
                 the same beta keys",
                self.class_name,
                SCHEDULERS.join(" and ")
            )));
        }
        let refuse = |key: &str| {
            Err(bad(format!(
                "unsupported {key} = true; diffwgpu implements only {key} = false, so set it to \
                 false"
            )))
        };
        if self.thresholding {
            return refuse("thresholding");
        }
        if self.rescale_betas_zero_snr {
            return refuse("rescale_betas_zero_snr");
        }
        if !TIMESTEP_SPACINGS.contains(&self.timestep_spacing.as_str()) {
            return Err(bad(format!(
                "unknown timestep_spacing {:?}; expected one of {}",
                self.timestep_spacing,
                TIMESTEP_SPACINGS.join(", ")
            )));
        }
        if self.clip_sample && !(self.clip_sample_range > 0.0 && self.clip_sample_range.is_finite())
        {
            return Err(bad(format!(
                "clip_sample_range = {} must be positive and finite",
                self.clip_sample_range
            )));
        }
        self.prediction_type()?;
        self.variance_type()?;
        if self.class_name == DPM_SOLVER_SCHEDULER {
            self.dpm_solver()?;
        }
        self.schedule()?;
        Ok(())
    }

    /// The training noise schedule these keys describe.
    pub fn schedule(&self) -> Result<NoiseSchedule> {
        if let Some(betas) = &self.trained_betas {
            if !betas.is_null() {
                return Err(bad(
                    "unsupported trained_betas (an explicit list of betas); diffwgpu builds the \
                     schedule from beta_schedule, beta_start and beta_end, so set trained_betas \
                     to null",
                ));
            }
        }
        let kind = BetaSchedule::from_name(&self.beta_schedule).map_err(config_error)?;
        let steps = self.num_train_timesteps;
        let mut schedule = match kind {
            BetaSchedule::Linear => NoiseSchedule::linear(steps, self.beta_start, self.beta_end),
            BetaSchedule::ScaledLinear => {
                NoiseSchedule::scaled_linear(steps, self.beta_start, self.beta_end)
            }
            BetaSchedule::SquaredCosCapV2 => NoiseSchedule::squaredcos_cap_v2(steps),
        }
        .map_err(config_error)?;
        if self.set_alpha_to_one == Some(false) {
            schedule.final_alpha_cumprod = schedule.alphas_cumprod[0];
        }
        Ok(schedule)
    }

    /// What the model predicts.
    pub fn prediction_type(&self) -> Result<PredictionType> {
        PredictionType::from_name(&self.prediction_type).map_err(config_error)
    }

    /// The variance of the DDPM step: `fixed_small` or `fixed_large`.
    pub fn variance_type(&self) -> Result<VarianceType> {
        let Some(name) = &self.variance_type else {
            return Ok(VarianceType::FixedSmall);
        };
        VarianceType::from_name(name).map_err(|_| {
            bad(format!(
                "unsupported variance_type = {:?}; diffwgpu samples with fixed_small or \
                 fixed_large (a learned variance needs a model that predicts it), so set one \
                 of those",
                name
            ))
        })
    }

    /// The range `x0_hat` is clipped to, `None` when `clip_sample` is off.
    pub fn clip(&self) -> Option<f32> {
        self.clip_sample.then_some(self.clip_sample_range as f32)
    }
}
