//! DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
//! Probabilistic Models"), the multistep solver of the probability-flow ODE in its data
//! prediction form, as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"` runs it.
//!
//! With `alpha_t = sqrt(abar_t)`, `sigma_t = sqrt(1 - abar_t)` and the half log-SNR
//! `lambda_t = log(alpha_t / sigma_t)`, a step from `s` to `t` with `h = lambda_t - lambda_s`
//! and the data estimate `D_s = x0_hat(x_s, s)` is
//!
//! - first order (Lu et al. eq. 9, DDIM): `x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s`;
//! - second order multistep (Algorithm 2), with the previous step's estimate `D_{s1}` and
//!   `r = h_prev / h`: `D1 = (D_s - D_{s1}) / r` and
//!   midpoint: `x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (D_s + D1 / 2)`,
//!   heun: `x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s + alpha_t ((e^{-h} - 1) / h + 1) D1`.
//!
//! diffusers keeps the schedule as `sigma = sqrt((1 - abar) / abar)` in float32 and derives
//! `alpha_t = 1 / sqrt(sigma^2 + 1)`, `sigma_t = sigma alpha_t` from it; so does this module
//! (in f64 from those float32 values), so that the steps are diffusers' to rounding.

use crate::diffusion::sampler::within_schedule;
use crate::diffusion::{NoiseSchedule, PredictionType, TimestepSpacing};
use crate::error::{Error, Result};
use crate::ops::solver_step::{SolverStepCoefficients, SolverTarget};

/// The second-order update's form (diffusers' `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmSolverType {
    Midpoint,
    Heun,
}

/// What the last step goes to (diffusers' `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    /// `sigma = 0`: the last step lands on the data estimate.
    Zero,
    /// `sigma` of the first training timestep.
    SigmaMin,
}

/// The solver's options, with diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpmSolver {
    /// 1 (DDIM-like) or 2.
    pub solver_order: usize,
    pub solver_type: DpmSolverType,
    /// First order at the last step when there are fewer than 15.
    pub lower_order_final: bool,
    /// First order at the last step whatever the number of steps.
    pub euler_at_final: bool,
    pub final_sigmas: FinalSigmas,
    /// Timesteps whose `lambda` is below this are left out (diffusers' `lambda_min_clipped`).
    pub lambda_min_clipped: f64,
}

impl Default for DpmSolver {
    fn default() -> Self {
        DpmSolver {
            solver_order: 2,
            solver_type: DpmSolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            final_sigmas: FinalSigmas::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }
}

/// `sigma = sqrt((1 - abar) / abar)` in float32, as diffusers tabulates it.
fn sigma_of(abar: f32) -> f32 {
    ((1.0 - abar) / abar).sqrt()
}

/// `(alpha_t, sigma_t, lambda_t)` of a float32 `sigma`, in f64.
fn alpha_sigma_lambda(sigma: f32) -> (f64, f64, f64) {
    let sigma = sigma as f64;
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

/// numpy's `linspace(start, stop, num)`: `start + k step`, the last value exactly `stop`.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let div = num.saturating_sub(1).max(1) as f64;
    let step = (stop - start) / div;
    let mut v: Vec<f64> = (0..num).map(|k| start + k as f64 * step).collect();
    if num > 1 {
        v[num - 1] = stop;
    }
    v
}

impl DpmSolver {
    /// Checks the options diffwgpu implements.
    pub fn validate(&self) -> Result<()> {
        if !(1..=2).contains(&self.solver_order) {
            return Err(Error::invalid(
                "dpm-solver++",
                format!(
                    "solver_order = {} is not supported; use 1 or 2 (2 is the one for \
                     unconditional sampling)",
                    self.solver_order
                ),
            ));
        }
        if self.lambda_min_clipped.is_nan() {
            return Err(Error::invalid("dpm-solver++", "lambda_min_clipped is NaN"));
        }
        Ok(())
    }

    /// The descending timesteps of `n` steps, as diffusers' `set_timesteps` spaces them for
    /// this scheduler (which differs from DDPM's and DDIM's: `linspace` takes `n + 1` points
    /// and drops the last, `leading` steps by `T // (n + 1)`). Timesteps whose `lambda` is
    /// below `lambda_min_clipped` are left out of the range, so that `trailing` may give fewer
    /// than `n`.
    pub fn timesteps(
        &self,
        schedule: &NoiseSchedule,
        n: usize,
        spacing: TimestepSpacing,
        steps_offset: usize,
    ) -> Result<Vec<usize>> {
        self.validate()?;
        let t_max = schedule.num_train_timesteps();
        if n == 0 || n > t_max {
            return Err(Error::invalid(
                "sampling",
                format!("steps = {n} must be between 1 and the {t_max} training timesteps"),
            ));
        }
        // The number of timesteps, from the last, whose float32 lambda is below the clip.
        let clipped = schedule
            .alphas_cumprod
            .iter()
            .filter(|&&a| {
                let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                (lambda as f64) < self.lambda_min_clipped
            })
            .count();
        let last = t_max - clipped;
        if last == 0 {
            return Err(Error::invalid(
                "dpm-solver++",
                format!(
                    "lambda_min_clipped = {} leaves no timestep; lower it",
                    self.lambda_min_clipped
                ),
            ));
        }
        let ts: Vec<usize> = match spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (last - 1) as f64, n + 1)
                .into_iter()
                .skip(1)
                .rev()
                .map(|v| v.round_ties_even() as usize)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n).rev().map(|k| k * ratio + steps_offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = t_max as f64 / n as f64;
                (0..)
                    .map(|k| last as f64 - k as f64 * ratio)
                    .take_while(|&v| v > 0.0)
                    .map(|v| (v.round_ties_even() as usize).saturating_sub(1))
                    .collect()
            }
        };
        within_schedule(ts, t_max)
    }

    /// `sigma` at each of `timesteps` and past the last one (diffusers' `sigmas`).
    pub fn sigmas(&self, schedule: &NoiseSchedule, timesteps: &[usize]) -> Result<Vec<f32>> {
        let abar = |t: usize| {
            schedule.alphas_cumprod.get(t).copied().ok_or_else(|| {
                Error::invalid("dpm-solver++", format!("timestep {t} is past the schedule"))
            })
        };
        let mut sigmas = timesteps
            .iter()
            .map(|&t| abar(t).map(sigma_of))
            .collect::<Result<Vec<f32>>>()?;
        sigmas.push(match self.final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => sigma_of(abar(0)?),
        });
        Ok(sigmas)
    }

    /// The order of step `i` of `n`: first at the start and, as diffusers decides, at the
    /// last step (always when the last sigma is 0; below 15 steps with `lower_order_final`).
    pub fn order(&self, i: usize, n: usize) -> usize {
        let lower_final = i + 1 == n
            && (self.euler_at_final
                || (self.lower_order_final && n < 15)
                || self.final_sigmas == FinalSigmas::Zero);
        if self.solver_order == 1 || i == 0 || lower_final {
            1
        } else {
            2
        }
    }

    /// The scalars of step `i` over `sigmas` (from `sigmas`): the model output is converted
    /// to `x0_hat` at `sigmas[i]`; a second-order step weights the previous `x0_hat` by `c`.
    pub fn step(
        &self,
        sigmas: &[f32],
        i: usize,
        prediction_type: PredictionType,
    ) -> Result<SolverStepCoefficients> {
        let n = sigmas.len().saturating_sub(1);
        if i >= n {
            return Err(Error::invalid(
                "dpm-solver++",
                format!("step {i} of {n} steps"),
            ));
        }
        let (alpha_s, sigma_s, lambda_s) = alpha_sigma_lambda(sigmas[i]);
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(sigmas[i + 1]);
        let h = lambda_t - lambda_s;
        // -alpha_t (e^{-h} - 1); at sigma_t = 0 (h = inf) this is alpha_t = 1.
        let weight = -alpha_t * (-h).exp_m1();
        let (b, c) = match self.order(i, n) {
            1 => (weight, 0.0),
            _ => {
                let (_, _, lambda_s1) = alpha_sigma_lambda(sigmas[i - 1]);
                let r = (lambda_s - lambda_s1) / h;
                match self.solver_type {
                    DpmSolverType::Midpoint => (weight * (1.0 + 0.5 / r), -weight * 0.5 / r),
                    DpmSolverType::Heun => {
                        let second = alpha_t * ((-h).exp_m1() / h + 1.0) / r;
                        (weight + second, -second)
                    }
                }
            }
        };
        Ok(SolverStepCoefficients {
            prediction_type,
            target: SolverTarget::Sample,
            sqrt_abar: alpha_s as f32,
            sqrt_one_minus_abar: sigma_s as f32,
            a: (sigma_t / sigma_s) as f32,
            b: b as f32,
            c: c as f32,
            sigma: 0.0,
        })
    }
}
