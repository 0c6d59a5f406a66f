//! The exact likelihood of the probability-flow ODE (Song et al. 2021, appendix D.2): carry
//! each image from the first timestep to the last along the ODE and add up the change in its
//! log-density, `log p_0(x_0) = log p_T(x_T) + int div f dt`.
//!
//! With `sigma = sqrt((1 - abar) / abar)` as the clock and `u = log sigma`, the ODE reads
//! `dx / du = sigma sqrt(abar) eps_hat(x, t) - (1 - abar) x` (Karras et al.'s
//! `dy / dsigma = eps_hat` for `y = x / sqrt(abar)`, carried back to `x`, which stays of order
//! one where `y` grows like `sigma`). Heun's method takes even steps in `u`, and the
//! trapezoidal rule of the same steps integrates the divergence
//! `sigma sqrt(abar) div_x eps_hat - (1 - abar) D`, its first part estimated by
//! Hutchinson's `v^T (d eps_hat / d x) v` with one Rademacher probe `v` per image, fixed along
//! its path, and the vector-Jacobian product through the model. At the end `x_T ~ N(0, I)`.
//! The data is taken as `x` at the first timestep, so the result is the log-density of that
//! timestep's marginal, as Song et al. start at `t = 1e-5`.

use crate::backend::Backend;
use crate::diffusion::{Denoiser, NoiseSchedule, PredictionType};
use crate::error::{Error, Result};
use crate::likelihood::image_count;
use crate::likelihood::terms::gaussian_log_density;
use crate::ops::conv2d::with_filter_cache;
use crate::rng;

/// `eps_hat` at `x` from the model output `m`, and the divergence of `eps_hat` from `v^T dm/dx v`,
/// `|v|^2` and the scalars at `abar`, per element / per image.
struct EpsConversion {
    s0: f64,
    s1: f64,
    prediction_type: PredictionType,
}

impl EpsConversion {
    fn eps(&self, x: f64, m: f64) -> f64 {
        match self.prediction_type {
            PredictionType::Epsilon => m,
            PredictionType::VPrediction => self.s0 * m + self.s1 * x,
            PredictionType::Sample => (x - self.s0 * m) / self.s1,
        }
    }

    fn divergence(&self, v_jm_v: f64, v_v: f64) -> f64 {
        match self.prediction_type {
            PredictionType::Epsilon => v_jm_v,
            PredictionType::VPrediction => self.s0 * v_jm_v + self.s1 * v_v,
            PredictionType::Sample => (v_v - self.s0 * v_jm_v) / self.s1,
        }
    }
}

/// `log p(x)` in nats of each image of `images` (NCHW, image after image) under the
/// probability-flow ODE of `model`, by `steps` Heun steps; `batch` images per model
/// evaluation. Each step evaluates the model and its vector-Jacobian product twice;
/// `progress` hears the images of each evaluation.
#[allow(clippy::too_many_arguments)]
pub fn ode_log_likelihood(
    be: &dyn Backend,
    model: &dyn Denoiser,
    schedule: &NoiseSchedule,
    prediction_type: PredictionType,
    images: &[f32],
    steps: usize,
    seed: u64,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f64>> {
    let (shape, dims, n) = image_count("ode likelihood", model, images)?;
    let last = schedule.num_train_timesteps() - 1;
    if steps == 0 || last == 0 {
        return Err(Error::invalid(
            "ode likelihood",
            format!(
                "{steps} steps over {} timesteps; both must be at least 1",
                last + 1
            ),
        ));
    }
    let sigma_of = |abar: f64| ((1.0 - abar) / abar).sqrt();
    let (abar_first, abar_last) = (
        schedule.alphas_cumprod[0] as f64,
        schedule.alphas_cumprod[last] as f64,
    );
    let (lo, hi) = (sigma_of(abar_first).ln(), sigma_of(abar_last).ln());
    // (sigma, abar, t) of each point of the grid; the ends are the timesteps themselves.
    let grid = (0..=steps)
        .map(|k| {
            if k == 0 {
                return Ok((sigma_of(abar_first), abar_first, 0.0));
            }
            if k == steps {
                return Ok((sigma_of(abar_last), abar_last, last as f64));
            }
            let sigma = (lo + (hi - lo) * k as f64 / steps as f64).exp();
            let abar = 1.0 / (1.0 + sigma * sigma);
            Ok((sigma, abar, schedule.time_at_alpha_bar(abar)?))
        })
        .collect::<Result<Vec<(f64, f64, f64)>>>()?;

    let batch = batch.clamp(1, n);
    let mut log_p = Vec::with_capacity(n);
    with_filter_cache(|| -> Result<()> {
        for first in (0..n).step_by(batch) {
            let b = batch.min(n - first);
            let tensor_shape = [b, shape[0], shape[1], shape[2]];
            // The Rademacher probes of this batch's images.
            let probe: Vec<f32> = (0..b * dims)
                .map(|j| {
                    let u = rng::uniform(seed, (first * dims + j) as u64);
                    if u < 0.5 {
                        -1.0
                    } else {
                        1.0
                    }
                })
                .collect();
            let v = be.upload(&tensor_shape, &probe)?;
            // dx/du and its divergence per image, at x and grid point k.
            let mut slope = |x: &[f64], k: usize| -> Result<(Vec<f64>, Vec<f64>)> {
                let (sigma, abar, t) = grid[k];
                let a = abar.sqrt();
                let x32: Vec<f32> = x.iter().map(|&x| x as f32).collect();
                let xt = be.upload(&tensor_shape, &x32)?;
                let (m, vjp) = model.predict_vjp(be, &xt, &vec![t; b], &v)?;
                let (m, vjp) = (be.to_vec(&m)?, be.to_vec(&vjp)?);
                let conv = EpsConversion {
                    s0: a,
                    s1: (1.0 - abar).sqrt(),
                    prediction_type,
                };
                let f = x
                    .iter()
                    .zip(&m)
                    .map(|(&x, &m)| sigma * a * conv.eps(x, m as f64) - (1.0 - abar) * x);
                let div = (0..b)
                    .map(|i| {
                        let at = i * dims..(i + 1) * dims;
                        let v_jm_v: f64 = probe[at.clone()]
                            .iter()
                            .zip(&vjp[at])
                            .map(|(&p, &g)| p as f64 * g as f64)
                            .sum();
                        sigma * a * conv.divergence(v_jm_v, dims as f64)
                            - (1.0 - abar) * dims as f64
                    })
                    .collect();
                progress(b);
                Ok((f.collect(), div))
            };
            let mut x: Vec<f64> = images[first * dims..(first + b) * dims]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let mut integral = vec![0.0f64; b];
            let h = (hi - lo) / steps as f64;
            for k in 0..steps {
                let (f0, d0) = slope(&x, k)?;
                let predicted: Vec<f64> = x.iter().zip(&f0).map(|(x, f)| x + h * f).collect();
                let (f1, d1) = slope(&predicted, k + 1)?;
                for ((x, f0), f1) in x.iter_mut().zip(&f0).zip(&f1) {
                    *x += h * (f0 + f1) / 2.0;
                }
                for ((acc, d0), d1) in integral.iter_mut().zip(&d0).zip(&d1) {
                    *acc += h * (d0 + d1) / 2.0;
                }
            }
            for (i, acc) in integral.iter().enumerate() {
                let prior: f64 = x[i * dims..(i + 1) * dims]
                    .iter()
                    .map(|&x| gaussian_log_density(x, 0.0, 0.0))
                    .sum();
                log_p.push(prior + acc);
            }
        }
        Ok(())
    })?;
    Ok(log_p)
}
