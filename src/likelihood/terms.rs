//! The terms of DDPM's variational bound on `-log p(x_0)` (Ho et al. 2020, eq. 5), per image
//! and in nats, evaluated on the host in f64:
//!
//! `L = L_T + sum_{t >= 1} L_t + L_0` with
//! - the prior term `L_T = KL(q(x_T | x_0) || N(0, I))`,
//! - `L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`: the posterior
//!   `N(mu~(x_t, x_0), beta~_t I)` (eq. 7) against the model's `N(mu~(x_t, x0_hat), sigma_t^2 I)`,
//! - the decoder `L_0 = -log p(x_0 | x_1)` with the model's Gaussian at the first timestep,
//!   over the 8-bit bins of the data (eq. 13) or as a density.
//!
//! Timesteps are diffusers' indices `0 .. T-1`: index `t` is the paper's `t + 1`, and index 0
//! holds the decoder. The model's variance is the scheduler config's: `beta~_t`
//! (`fixed_small`) or `beta_t` (`fixed_large`), and at index 0, where `beta~` is 0, `beta~` of
//! index 1 for both (as Nichol & Dhariwal's code does).

use std::f64::consts::{LN_2, PI, SQRT_2};

use crate::diffusion::{NoiseSchedule, PredictionType, VarianceType};
use crate::error::{Error, Result};

/// `KL(N(mean1, e^log_var1) || N(mean2, e^log_var2))` of one dimension, in nats.
pub fn normal_kl(mean1: f64, log_var1: f64, mean2: f64, log_var2: f64) -> f64 {
    0.5 * (-1.0 + log_var2 - log_var1
        + (log_var1 - log_var2).exp()
        + (mean1 - mean2).powi(2) * (-log_var2).exp())
}

/// `log P(Z > z)` of a standard normal, accurate far into its upper tail: by `erfc` until it
/// nears underflow, then by the asymptotic series `phi(z) / z (1 - 1/z^2 + 3/z^4)`.
fn log_upper_tail(z: f64) -> f64 {
    if z < 25.0 {
        return (0.5 * libm::erfc(z / SQRT_2)).ln();
    }
    let z2 = z * z;
    -z2 / 2.0 - z.ln() - 0.5 * (2.0 * PI).ln() + (1.0 - 1.0 / z2 + 3.0 / (z2 * z2)).ln()
}

/// `log(P(Z > a) - P(Z > b))` for `a < b`, from the log-tails.
fn log_tail_difference(a: f64, b: f64) -> f64 {
    let (la, lb) = (log_upper_tail(a), log_upper_tail(b));
    la + (-(lb - la).exp()).ln_1p()
}

/// The log-probability that `N(mean, e^(2 log_scale))` gives to the 8-bit bin of `x` in
/// [-1, 1]: the bins are `2 / 255` wide around the levels `2 k / 255 - 1`, the outermost open
/// to -inf and +inf (Ho et al. 2020, eq. 13). Each probability is taken in the tail where it is
/// accurate, in logs where it would underflow.
pub fn discretized_gaussian_log_likelihood(x: f64, mean: f64, log_scale: f64) -> f64 {
    let inv_scale = (-log_scale).exp();
    let lower = inv_scale * (x - mean - 1.0 / 255.0);
    let upper = inv_scale * (x - mean + 1.0 / 255.0);
    if x < -0.999 {
        log_upper_tail(-upper)
    } else if x > 0.999 {
        log_upper_tail(lower)
    } else if lower > 0.0 {
        log_tail_difference(lower, upper)
    } else if upper < 0.0 {
        log_tail_difference(-upper, -lower)
    } else {
        (1.0 - (log_upper_tail(upper).exp() + log_upper_tail(-lower).exp())).ln()
    }
}

/// `log N(x; mean, e^log_var)` of one dimension.
pub fn gaussian_log_density(x: f64, mean: f64, log_var: f64) -> f64 {
    -0.5 * ((2.0 * PI).ln() + log_var + (x - mean).powi(2) * (-log_var).exp())
}

/// How the decoder `p(x_0 | x_1)` scores the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// Probability of the 8-bit bin (images); the bound is then on the discrete data.
    Discretized,
    /// Density (continuous data).
    Continuous,
}

/// Everything the terms need from the model besides its outputs.
#[derive(Debug, Clone)]
pub struct VariationalBound {
    pub schedule: NoiseSchedule,
    pub prediction_type: PredictionType,
    pub variance_type: VarianceType,
    /// Clip `x0_hat` to `[-r, r]` before it makes the model's mean.
    pub clip_sample: Option<f32>,
    pub decoder: Decoder,
}

/// Per-timestep scalars of `L_t`.
struct Step {
    sqrt_abar: f64,
    sqrt_one_minus_abar: f64,
    /// The weight of `x_0` in the posterior mean `c0 x_0 + ct x_t` (eq. 7); the model's mean
    /// puts `x0_hat` in its place, so the `x_t` parts cancel in the KL.
    c0: f64,
    /// `log beta~_t` and the model's log variance.
    log_posterior_var: f64,
    log_model_var: f64,
}

impl VariationalBound {
    /// Number of timesteps `T`; the bound needs at least two.
    pub fn timesteps(&self) -> Result<usize> {
        let t = self.schedule.num_train_timesteps();
        if t < 2 {
            return Err(Error::invalid(
                "variational bound",
                format!("the schedule has {t} timestep; the bound needs at least 2"),
            ));
        }
        Ok(t)
    }

    fn step(&self, t: usize) -> Result<Step> {
        let ac = &self.schedule.alphas_cumprod;
        let total = self.timesteps()?;
        if t >= total {
            return Err(Error::invalid(
                "variational bound",
                format!("timestep {t} is past the schedule's {total}"),
            ));
        }
        let abar_at = |t: usize| ac[t] as f64;
        let posterior_var = |t: usize| {
            let (abar, prev) = (abar_at(t), if t > 0 { abar_at(t - 1) } else { 1.0 });
            (1.0 - abar / prev) * (1.0 - prev) / (1.0 - abar)
        };
        let (abar, prev) = (abar_at(t), if t > 0 { abar_at(t - 1) } else { 1.0 });
        let beta = 1.0 - abar / prev;
        let model_var = match (t, self.variance_type) {
            (0, _) => posterior_var(1),
            (_, VarianceType::FixedSmall) => posterior_var(t),
            (_, VarianceType::FixedLarge) => beta,
        };
        Ok(Step {
            sqrt_abar: abar.sqrt(),
            sqrt_one_minus_abar: (1.0 - abar).sqrt(),
            c0: prev.sqrt() * beta / (1.0 - abar),
            log_posterior_var: posterior_var(t).ln(),
            log_model_var: model_var.ln(),
        })
    }

    /// `x0_hat` from the model output `m` at `x_t`, clipped if asked.
    fn x0_hat(&self, s: &Step, x_t: f64, m: f64) -> f64 {
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => (x_t - s.sqrt_one_minus_abar * m) / s.sqrt_abar,
            PredictionType::VPrediction => s.sqrt_abar * x_t - s.sqrt_one_minus_abar * m,
            PredictionType::Sample => m,
        };
        match self.clip_sample {
            Some(r) => x0.clamp(-r as f64, r as f64),
            None => x0,
        }
    }

    /// `L_T` of one image `x_0`, in nats.
    pub fn prior(&self, x0: &[f32]) -> Result<f64> {
        let last = self.timesteps()? - 1;
        let abar = self.schedule.alphas_cumprod[last] as f64;
        let log_var = (1.0 - abar).ln();
        Ok(x0
            .iter()
            .map(|&x| normal_kl(abar.sqrt() * x as f64, log_var, 0.0, 0.0))
            .sum())
    }

    /// `L_t` of one image (the decoder's `L_0` at `t = 0`), in nats, from `x_0`, the `x_t` the
    /// model saw and its output there.
    pub fn term(&self, t: usize, x0: &[f32], x_t: &[f32], output: &[f32]) -> Result<f64> {
        if x0.len() != x_t.len() || x0.len() != output.len() {
            return Err(Error::invalid(
                "variational bound",
                format!(
                    "x_0, x_t and the model output have {}, {} and {} values",
                    x0.len(),
                    x_t.len(),
                    output.len()
                ),
            ));
        }
        let s = self.step(t)?;
        let values = x0.iter().zip(x_t).zip(output);
        Ok(values
            .map(|((&x0, &xt), &m)| {
                let (x0, x0_hat) = (x0 as f64, self.x0_hat(&s, xt as f64, m as f64));
                if t > 0 {
                    normal_kl(
                        s.c0 * x0,
                        s.log_posterior_var,
                        s.c0 * x0_hat,
                        s.log_model_var,
                    )
                } else {
                    // At t = 0 the posterior mean is x_0 itself (c0 = 1, ct = 0).
                    match self.decoder {
                        Decoder::Discretized => {
                            -discretized_gaussian_log_likelihood(x0, x0_hat, s.log_model_var / 2.0)
                        }
                        Decoder::Continuous => -gaussian_log_density(x0, x0_hat, s.log_model_var),
                    }
                }
            })
            .sum())
    }
}

/// Nats of an image of `dims` values as bits per dimension.
pub fn bits_per_dim(nats: f64, dims: usize) -> f64 {
    nats / (dims as f64 * LN_2)
}
