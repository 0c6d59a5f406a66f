//! The continuous-time view (Song et al. 2021, "Score-Based Generative Modeling through
//! Stochastic Differential Equations"): the forward process is the VP-SDE
//! `dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`, whose marginals are DDPM's
//! `q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`, and the network's noise estimate gives
//! the score `grad log q_t(x) = -eps_hat(x, t) / sqrt(1 - abar_t)`. Two samplers integrate the
//! reverse process over a grid of training timesteps `t > t'` (past the last one `abar = 1`):
//!
//! - `sde`: the reverse SDE `dx = [-1/2 beta x - beta score] dt + sqrt(beta) dw_bar` by
//!   Euler–Maruyama, in the clock `rho = -log abar` (so `beta dt = d rho`, exact for any
//!   schedule and grid): with `B = log(abar_{t'} / abar_t)`,
//!   `x_{t'} = (1 + B / 2) x_t - B / sqrt(1 - abar_t) eps_hat + sqrt(B) z`, and no noise in the
//!   last step (Song et al.'s final denoising step).
//! - `ode`: the probability-flow ODE `dx = -1/2 beta (x + score) dt` by Heun's method, in the
//!   variables of Karras et al. (2022) where it reads `dy / dsigma = eps_hat` with
//!   `y = x / sqrt(abar)` and `sigma = sqrt((1 - abar) / abar)`: an Euler predictor
//!   `y~ = y + (sigma' - sigma) eps_hat(x, t)`, then the trapezoidal corrector
//!   `y' = y + (sigma' - sigma) (eps_hat(x, t) + eps_hat(x~, t')) / 2`; the last step, to
//!   `sigma = 0` where the network is not defined, is the Euler step alone.

use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::error::{Error, Result};
use crate::ops::solver_step::{SolverStepCoefficients, SolverTarget};

/// `abar` at `t` and at the next timestep (`None`: past the end, 1).
fn abar_pair(
    schedule: &NoiseSchedule,
    op: &'static str,
    t: usize,
    t_next: Option<usize>,
) -> Result<(f64, f64)> {
    let abar = |t: usize| {
        schedule
            .alphas_cumprod
            .get(t)
            .map(|&a| a as f64)
            .ok_or_else(|| Error::invalid(op, format!("timestep {t} is past the schedule")))
    };
    let next = match t_next {
        None => 1.0,
        Some(tn) if tn < t => abar(tn)?,
        Some(tn) => {
            return Err(Error::invalid(
                op,
                format!("the next timestep {tn} must be smaller than {t}"),
            ))
        }
    };
    Ok((abar(t)?, next))
}

/// The Euler–Maruyama step of the reverse VP-SDE from `t` to `t_next`.
pub fn sde_step(
    schedule: &NoiseSchedule,
    t: usize,
    t_next: Option<usize>,
    prediction_type: PredictionType,
) -> Result<SolverStepCoefficients> {
    let (abar, abar_next) = abar_pair(schedule, "sde_step", t, t_next)?;
    let b = (abar_next / abar).ln();
    Ok(SolverStepCoefficients {
        prediction_type,
        target: SolverTarget::Epsilon,
        sqrt_abar: abar.sqrt() as f32,
        sqrt_one_minus_abar: (1.0 - abar).sqrt() as f32,
        a: (1.0 + b / 2.0) as f32,
        b: (-b / (1.0 - abar).sqrt()) as f32,
        c: 0.0,
        sigma: if t_next.is_some() {
            b.sqrt() as f32
        } else {
            0.0
        },
    })
}

/// The two halves of a Heun step of the probability-flow ODE from `t` to `t_next`.
pub struct HeunStep {
    /// `x~ = sqrt(abar' / abar) x + sqrt(abar') (sigma' - sigma) eps_hat(x, t)`.
    pub predictor: SolverStepCoefficients,
    /// `x' = sqrt(abar' / abar) x + sqrt(abar') (sigma' - sigma) (eps_hat(x~, t') + prev) / 2`
    /// with `prev = eps_hat(x, t)`; `None` on the last step.
    pub corrector: Option<SolverStepCoefficients>,
}

/// The Heun step of the probability-flow ODE from `t` to `t_next`.
pub fn ode_step(
    schedule: &NoiseSchedule,
    t: usize,
    t_next: Option<usize>,
    prediction_type: PredictionType,
) -> Result<HeunStep> {
    let (abar, abar_next) = abar_pair(schedule, "ode_step", t, t_next)?;
    let sigma = |a: f64| ((1.0 - a) / a).sqrt();
    let delta = sigma(abar_next) - sigma(abar);
    let a = (abar_next / abar).sqrt();
    let euler = abar_next.sqrt() * delta;
    let at = |abar: f64, b: f64, c: f64| SolverStepCoefficients {
        prediction_type,
        target: SolverTarget::Epsilon,
        sqrt_abar: abar.sqrt() as f32,
        sqrt_one_minus_abar: (1.0 - abar).sqrt() as f32,
        a: a as f32,
        b: b as f32,
        c: c as f32,
        sigma: 0.0,
    };
    Ok(HeunStep {
        predictor: at(abar, euler, 0.0),
        corrector: t_next.map(|_| at(abar_next, euler / 2.0, euler / 2.0)),
    })
}
