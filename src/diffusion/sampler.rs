//! The reverse process: start from `x_T ~ N(0, I)` and apply the model and one fused step
//! kernel per timestep.
//!
//! - DDPM (Algorithm 2 of Ho et al. 2020): the posterior step from each timestep of the
//!   sequence to the next (`x_t -> x_{t-1}` over all T of them by default).
//! - DDIM (Song et al. 2021): `x_t -> x_{t'}` with `t' = t - T / n` as diffusers steps,
//!   deterministic at `eta = 0`.
//! - DPM-Solver++ (`dpm_solver.rs`): the multistep solver of the probability-flow ODE,
//!   carrying the previous step's `x0_hat`.
//! - The reverse SDE by Euler–Maruyama and the probability-flow ODE by Heun
//!   (`continuous.rs`); Heun evaluates the model twice per step but the last.
//!
//! Timestep sequences follow diffusers' `timestep_spacing` so that the same model, steps and
//! spacing visit the same timesteps as diffusers' schedulers. Image `j` of `N` draws the noise
//! of step `i` at element offset `((i + 1) N + j) * numel(image)` of the seed's stream (its
//! `x_T` at `j * numel(image)`): a seed fixes every image, whatever the batches.

use crate::backend::Backend;
use crate::diffusion::continuous::{ode_step, sde_step};
use crate::diffusion::{Denoiser, DpmSolver, NoiseSchedule, PredictionType, VarianceType};
use crate::error::{Error, Result};
use crate::ops::conv2d::with_filter_cache;
use crate::ops::solver_step::SolverStepInputs;
use crate::tensor::Tensor;

/// How inference timesteps are spread over `0 .. T` (diffusers' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `k * (T / n)` for `k = n-1 .. 0`, plus `steps_offset`.
    Leading,
    /// `round(T - k T / n) - 1` for `k = 0 .. n-1`: always starts at `T - 1`.
    Trailing,
    /// `round(linspace(0, T - 1, n))`, descending.
    Linspace,
}

impl TimestepSpacing {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            "linspace" => Ok(TimestepSpacing::Linspace),
            other => Err(Error::invalid(
                "timestep_spacing",
                format!("unknown timestep spacing {other:?}; use leading, trailing or linspace"),
            )),
        }
    }
}

/// The descending timesteps of `n` inference steps over `T` training timesteps.
pub fn inference_timesteps(
    t_max: usize,
    n: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    if n == 0 || n > t_max {
        return Err(Error::invalid(
            "sampling",
            format!("steps = {n} must be between 1 and the {t_max} training timesteps"),
        ));
    }
    let ts: Vec<usize> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = t_max / n;
            (0..n).rev().map(|k| k * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t_max as f64 / n as f64;
            (0..n)
                .map(|k| ((t_max as f64 - k as f64 * ratio).round() as usize).saturating_sub(1))
                .collect()
        }
        TimestepSpacing::Linspace => {
            let last = (t_max - 1) as f64;
            (0..n)
                .rev()
                .map(|k| {
                    let v = if n == 1 {
                        0.0
                    } else {
                        k as f64 * last / (n - 1) as f64
                    };
                    v.round() as usize
                })
                .collect()
        }
    };
    within_schedule(ts, t_max)
}

/// `ts` if every timestep is one of the schedule's `t_max`.
pub(crate) fn within_schedule(ts: Vec<usize>, t_max: usize) -> Result<Vec<usize>> {
    if let Some(&t) = ts.iter().find(|&&t| t >= t_max) {
        return Err(Error::invalid(
            "sampling",
            format!("timestep {t} is past the schedule's {t_max} steps; lower steps_offset"),
        ));
    }
    Ok(ts)
}

/// Which reverse process to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    Ddpm {
        variance_type: VarianceType,
        /// Clip `x0_hat` to `[-r, r]`.
        clip_sample: Option<f32>,
    },
    Ddim {
        eta: f32,
        clip_sample: Option<f32>,
    },
    /// DPM-Solver++ over timesteps from `DpmSolver::timesteps`.
    DpmSolver(DpmSolver),
    /// The reverse VP-SDE by Euler–Maruyama.
    Sde,
    /// The probability-flow ODE by Heun's method.
    Ode,
}

/// One step of the reverse process, as the sampler reports it.
pub struct StepView<'a> {
    /// 0-based index of the step, of `total`.
    pub index: usize,
    pub total: usize,
    pub t: usize,
    /// The state before the step.
    pub x_t: &'a Tensor,
    /// The model's output at `(x_t, t)`.
    pub model_output: &'a Tensor,
}

/// Where a batch's random numbers come from: images `first .. first + B` of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseStream {
    pub seed: u64,
    pub first: usize,
    pub total: usize,
}

impl NoiseStream {
    /// One batch that is the whole set.
    pub fn single(seed: u64, n: usize) -> Self {
        NoiseStream {
            seed,
            first: 0,
            total: n,
        }
    }

    /// The batch's `x_T ~ N(0, I)` of `shape [B, C, H, W]`.
    pub fn initial(&self, be: &dyn Backend, shape: &[usize]) -> Result<Tensor> {
        let per_image: usize = shape[1..].iter().product();
        be.randn(shape, self.seed, (self.first * per_image) as u64)
    }

    /// The batch's `z` of step `i`.
    fn step(&self, be: &dyn Backend, shape: &[usize], i: usize) -> Result<Tensor> {
        let per_image: usize = shape[1..].iter().product();
        let image = (i + 1) * self.total + self.first;
        be.randn(shape, self.seed, (image * per_image) as u64)
    }
}

/// Runs the reverse process of `model` from `x_T`; returns `x_0`. `on_step` sees each step's
/// state and model output once the step is taken. The CPU's convolutions transform their
/// filters once for all the steps (`with_filter_cache`).
#[allow(clippy::too_many_arguments)]
pub fn sample(
    be: &dyn Backend,
    model: &dyn Denoiser,
    schedule: &NoiseSchedule,
    prediction_type: PredictionType,
    sampler: &Sampler,
    timesteps: &[usize],
    x_t: Tensor,
    noise: NoiseStream,
    on_step: &mut dyn FnMut(&StepView) -> Result<()>,
) -> Result<Tensor> {
    let mut run = ReverseProcess::new(
        model,
        schedule,
        prediction_type,
        sampler,
        timesteps,
        x_t,
        noise,
    )?;
    with_filter_cache(|| {
        while !run.is_done() {
            let step = run.step(be, model, schedule)?;
            on_step(&step.view())?;
        }
        Ok(run.into_x())
    })
}

/// The reverse process taken one step at a time, for a caller that shows the denoising as it
/// goes or must return to an event loop between steps; [`sample`] runs it to the end. It owns
/// the process's state; each step is given the backend, the model and the schedule.
pub struct ReverseProcess {
    prediction_type: PredictionType,
    sampler: Sampler,
    timesteps: Vec<usize>,
    noise: NoiseStream,
    /// The state after the steps taken: `x_T` at first, `x_0` at the end.
    x: Tensor,
    /// Steps taken.
    index: usize,
    /// The noise of a step without noise (sigma = 0), made once.
    no_noise: Option<Tensor>,
    /// DPM-Solver++'s log-SNR sigmas of `timesteps`.
    sigmas: Vec<f32>,
    /// DPM-Solver++'s x0_hat of the previous step.
    history: Option<Tensor>,
}

/// One step taken: the state it started from and the model's output there.
pub struct TakenStep {
    pub index: usize,
    pub total: usize,
    pub t: usize,
    pub x_t: Tensor,
    pub model_output: Tensor,
}

impl TakenStep {
    pub fn view(&self) -> StepView<'_> {
        StepView {
            index: self.index,
            total: self.total,
            t: self.t,
            x_t: &self.x_t,
            model_output: &self.model_output,
        }
    }
}

impl ReverseProcess {
    /// The process of `model` over `timesteps` from `x_t` (`[N, C, H, W]`).
    pub fn new(
        model: &dyn Denoiser,
        schedule: &NoiseSchedule,
        prediction_type: PredictionType,
        sampler: &Sampler,
        timesteps: &[usize],
        x_t: Tensor,
        noise: NoiseStream,
    ) -> Result<Self> {
        let [c, h, w] = model.image_shape();
        let n = x_t.shape().first().copied().unwrap_or(0);
        if x_t.shape() != [n, c, h, w] || n == 0 {
            return Err(Error::shape(
                "sample",
                format!("x_T of shape [N, {c}, {h}, {w}]"),
                x_t.shape(),
            ));
        }
        let sigmas = match sampler {
            Sampler::DpmSolver(s) => s.sigmas(schedule, timesteps)?,
            _ => Vec::new(),
        };
        Ok(ReverseProcess {
            prediction_type,
            sampler: sampler.clone(),
            timesteps: timesteps.to_vec(),
            noise,
            x: x_t,
            index: 0,
            no_noise: None,
            sigmas,
            history: None,
        })
    }

    /// The state after the steps taken so far.
    pub fn x(&self) -> &Tensor {
        &self.x
    }

    /// Steps taken, of [`Self::total`].
    pub fn steps_taken(&self) -> usize {
        self.index
    }

    pub fn total(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_done(&self) -> bool {
        self.index >= self.timesteps.len()
    }

    /// The final state (`x_0` once every step is taken).
    pub fn into_x(self) -> Tensor {
        self.x
    }

    /// The noise of step `i`, or zeros when the step adds none.
    fn noise_or_zeros(&mut self, be: &dyn Backend, sigma: f32, i: usize) -> Result<Tensor> {
        let shape = self.x.shape().to_vec();
        if sigma > 0.0 {
            return self.noise.step(be, &shape, i);
        }
        if let Some(z) = &self.no_noise {
            return Ok(z.clone());
        }
        let z = be.zeros(&shape)?;
        self.no_noise = Some(z.clone());
        Ok(z)
    }

    /// Takes the next step with `model` (the one the process was made for) on `be`; an error
    /// once every step is taken.
    pub fn step(
        &mut self,
        be: &dyn Backend,
        model: &dyn Denoiser,
        schedule: &NoiseSchedule,
    ) -> Result<TakenStep> {
        let prediction_type = self.prediction_type;
        let i = self.index;
        let Some(&t) = self.timesteps.get(i) else {
            return Err(Error::invalid(
                "sample",
                format!("all {} steps are taken", self.timesteps.len()),
            ));
        };
        let n = self.x.shape()[0];
        let t_prev = self.timesteps.get(i + 1).copied();
        let x = self.x.clone();
        let out = model.predict(be, &x, &vec![t as f64; n])?;
        let at_x = |prev, noise| SolverStepInputs {
            x_eval: &x,
            model_output: &out,
            x_base: &x,
            prev,
            noise,
        };
        let next = match &self.sampler {
            Sampler::Ddpm {
                variance_type,
                clip_sample,
            } => {
                let k = schedule.ddpm_coefficients_to(
                    t,
                    t_prev,
                    *variance_type,
                    prediction_type,
                    *clip_sample,
                )?;
                let z = self.noise_or_zeros(be, k.sigma, i)?;
                be.ddpm_step(&x, &out, &z, &k)?
            }
            Sampler::Ddim { eta, clip_sample } => {
                // diffusers' DDIMScheduler steps back by T / n whatever the spacing.
                let stride = schedule.num_train_timesteps() / self.timesteps.len();
                let t_prev = t.checked_sub(stride);
                let k =
                    schedule.ddim_coefficients(t, t_prev, *eta, prediction_type, *clip_sample)?;
                let z = self.noise_or_zeros(be, k.sigma, i)?;
                be.ddim_step(&x, &out, &z, &k)?
            }
            Sampler::DpmSolver(solver) => {
                let k = solver.step(&self.sigmas, i, prediction_type)?;
                let (next, x0) = be.solver_step(&at_x(self.history.as_ref(), None), &k)?;
                self.history = Some(x0);
                next
            }
            Sampler::Sde => {
                let k = sde_step(schedule, t, t_prev, prediction_type)?;
                let z = match t_prev {
                    Some(_) => Some(self.noise.step(be, x.shape(), i)?),
                    None => None,
                };
                be.solver_step(&at_x(None, z.as_ref()), &k)?.0
            }
            Sampler::Ode => {
                let heun = ode_step(schedule, t, t_prev, prediction_type)?;
                let (predicted, eps) = be.solver_step(&at_x(None, None), &heun.predictor)?;
                match (heun.corrector, t_prev) {
                    (Some(k), Some(t_prev)) => {
                        let out = model.predict(be, &predicted, &vec![t_prev as f64; n])?;
                        let corrector = SolverStepInputs {
                            x_eval: &predicted,
                            model_output: &out,
                            x_base: &x,
                            prev: Some(&eps),
                            noise: None,
                        };
                        be.solver_step(&corrector, &k)?.0
                    }
                    _ => predicted,
                }
            }
        };
        self.x = next;
        self.index += 1;
        Ok(TakenStep {
            index: i,
            total: self.timesteps.len(),
            t,
            x_t: x,
            model_output: out,
        })
    }
}

/// The model's estimate of the clean image at timestep `t` (host side, for pictures of the
/// reverse process): `x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)` for an epsilon
/// model, `sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat` for a v model, the output itself for a
/// sample model.
pub fn predicted_x0(
    schedule: &NoiseSchedule,
    prediction_type: PredictionType,
    t: usize,
    x_t: &[f32],
    model_output: &[f32],
) -> Result<Vec<f32>> {
    let abar = *schedule.alphas_cumprod.get(t).ok_or_else(|| {
        Error::invalid("predicted_x0", format!("timestep {t} is past the schedule"))
    })? as f64;
    let (a, s) = (abar.sqrt(), (1.0 - abar).sqrt());
    Ok(x_t
        .iter()
        .zip(model_output)
        .map(|(&x, &o)| {
            let (x, o) = (x as f64, o as f64);
            (match prediction_type {
                PredictionType::Epsilon => (x - s * o) / a,
                PredictionType::VPrediction => a * x - s * o,
                PredictionType::Sample => o,
            }) as f32
        })
        .collect())
}
