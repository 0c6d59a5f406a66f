//! What the samplers and the likelihood evaluate: a network that predicts, at a noisy `x_t` and
//! a timestep `t`, the noise, the velocity or the clean image. The U-Net is one; the other is
//! the exact denoiser of Gaussian data, whose every answer is known in closed form, so that
//! samplers and likelihoods can be checked against the truth rather than against themselves.

use crate::autodiff::Tape;
use crate::backend::Backend;
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::error::{Error, Result};
use crate::nn::UNet2D;
use crate::tensor::Tensor;

/// A model of the reverse process.
pub trait Denoiser {
    /// The model output at `x [N, C, H, W]` and timestep `t` (the same for every image; a
    /// fraction between training timesteps where the caller needs one).
    fn predict(&self, be: &dyn Backend, x: &Tensor, t: f64) -> Result<Tensor>;

    /// The shape `[C, H, W]` of one image.
    fn image_shape(&self) -> [usize; 3];
}

/// The U-Net with its weights on a backend.
pub struct UNetDenoiser<'a> {
    pub model: &'a UNet2D,
    pub params: &'a [Tensor],
}

impl Denoiser for UNetDenoiser<'_> {
    fn predict(&self, be: &dyn Backend, x: &Tensor, t: f64) -> Result<Tensor> {
        let n = x.shape().first().copied().unwrap_or(0);
        let tt = be.upload(&[n], &vec![t as f32; n])?;
        let mut tape = Tape::inference(be);
        let p = tape.leaves(self.params, false);
        let xv = tape.leaf(x.clone(), false);
        let out = self.model.forward(&mut tape, &p, xv, &tt)?;
        Ok(tape.value(out).clone())
    }

    fn image_shape(&self) -> [usize; 3] {
        let c = &self.model.config;
        [c.in_channels, c.size(), c.size()]
    }
}

/// The optimal denoiser of data `x_0 ~ N(mean, std^2 I)`: `x_t ~ N(sqrt(abar) mean, v I)` with
/// `v = abar std^2 + 1 - abar`, so `E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mean) / v`
/// and `E[x_0 | x_t] = mean + sqrt(abar) std^2 (x_t - sqrt(abar) mean) / v`. Evaluated on the
/// host in f64; `abar` at a fraction of a timestep is the schedule's `alpha_bar_at`.
pub struct GaussianDenoiser {
    pub schedule: NoiseSchedule,
    pub prediction_type: PredictionType,
    pub mean: f64,
    pub std: f64,
    pub image: [usize; 3],
}

impl GaussianDenoiser {
    /// `log N(x; mean, std^2 I)` summed over the elements of each image of `x`, in nats.
    pub fn log_density(&self, x: &[f32]) -> Vec<f64> {
        let per_image: usize = self.image.iter().product();
        let norm = -0.5 * (2.0 * std::f64::consts::PI * self.std * self.std).ln();
        x.chunks(per_image)
            .map(|img| {
                img.iter()
                    .map(|&v| {
                        let z = (v as f64 - self.mean) / self.std;
                        norm - 0.5 * z * z
                    })
                    .sum()
            })
            .collect()
    }
}

impl Denoiser for GaussianDenoiser {
    fn predict(&self, be: &dyn Backend, x: &Tensor, t: f64) -> Result<Tensor> {
        if self.std.is_nan() || self.std <= 0.0 {
            return Err(Error::invalid(
                "gaussian denoiser",
                format!("std must be positive, got {}", self.std),
            ));
        }
        let abar = self.schedule.alpha_bar_at(t)?;
        let (a, s) = (abar.sqrt(), (1.0 - abar).sqrt());
        let v = abar * self.std * self.std + 1.0 - abar;
        let out: Vec<f32> = be
            .to_vec(x)?
            .iter()
            .map(|&x| {
                let r = x as f64 - a * self.mean;
                let eps = s * r / v;
                let x0 = self.mean + a * self.std * self.std * r / v;
                (match self.prediction_type {
                    PredictionType::Epsilon => eps,
                    PredictionType::Sample => x0,
                    PredictionType::VPrediction => a * eps - s * x0,
                }) as f32
            })
            .collect();
        be.upload(x.shape(), &out)
    }

    fn image_shape(&self) -> [usize; 3] {
        self.image
    }
}
