//! Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
//! Weighting Strategy", Sections 3.4 and 4.2), as diffusers' training examples apply it with
//! `--snr_gamma`. The signal-to-noise ratio of timestep `t` is
//!   snr(t) = abar_t / (1 - abar_t),
//! and the x_0 objective of a sample at `t` is weighted by `min(snr, gamma)`: the timesteps of
//! little noise, whose easy gradients would otherwise dominate, count at most `gamma`. The
//! squared error of an epsilon prediction is `snr` times that of the x_0 it implies, and of a
//! v prediction `snr + 1` times, so the weight of each prediction target's own loss is
//!   epsilon: min(snr, gamma) / snr,   v: min(snr, gamma) / (snr + 1),   x_0: min(snr, gamma).

use crate::diffusion::PredictionType;
use crate::error::{Error, Result};

/// `snr = abar / (1 - abar)`, in f64.
pub fn snr(alpha_cumprod: f32) -> f64 {
    let abar = alpha_cumprod as f64;
    abar / (1.0 - abar)
}

/// The Min-SNR-gamma weight of the loss of one sample whose timestep has `alpha_cumprod`.
pub fn min_snr_weight(alpha_cumprod: f32, gamma: f32, prediction: PredictionType) -> f32 {
    let (snr, gamma) = (snr(alpha_cumprod), gamma as f64);
    let weight = match prediction {
        // min(snr, gamma) / snr, written to stay finite (1) at snr = 0.
        PredictionType::Epsilon => (gamma / snr).min(1.0),
        PredictionType::VPrediction => snr.min(gamma) / (snr + 1.0),
        PredictionType::Sample => snr.min(gamma),
    };
    weight as f32
}

/// One weight per sample of a batch with timesteps `t` (as f32, as the trainer holds them).
pub fn min_snr_weights(
    alphas_cumprod: &[f32],
    t: &[f32],
    gamma: f32,
    prediction: PredictionType,
) -> Result<Vec<f32>> {
    t.iter()
        .map(|&t| match alphas_cumprod.get(t as usize) {
            Some(&abar) => Ok(min_snr_weight(abar, gamma, prediction)),
            None => Err(Error::invalid(
                "min_snr_weights",
                format!(
                    "timestep {t} is outside the schedule's {} steps",
                    alphas_cumprod.len()
                ),
            )),
        })
        .collect()
}
