//! What the samplers and the likelihood evaluate: a network that predicts, at a noisy `x_t` and
//! a timestep `t`, the noise, the velocity or the clean image. The U-Net is one; the other is
//! the exact denoiser of Gaussian data, whose every answer is known in closed form, so that
//! samplers and likelihoods can be checked against the truth rather than against themselves.

use crate::autodiff::{Tape, Var};
use crate::backend::Backend;
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::error::{Error, Result};
use crate::nn::UNet2D;
use crate::tensor::Tensor;

/// A model of the reverse process.
pub trait Denoiser {
    /// The model output at `x [N, C, H, W]`, image `i` at timestep `t[i]` (a fraction between
    /// training timesteps where the caller needs one).
    fn predict(&self, be: &dyn Backend, x: &Tensor, t: &[f64]) -> Result<Tensor>;

    /// The output as `predict` gives it, and the vector-Jacobian product `v^T d output / d x`
    /// (per image, since images do not interact), `v` of the shape of `x`.
    fn predict_vjp(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        t: &[f64],
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)>;

    /// The shape `[C, H, W]` of one image.
    fn image_shape(&self) -> [usize; 3];
}

/// Checks one timestep per image of `x`.
fn check_times(op: &'static str, x: &Tensor, t: &[f64]) -> Result<usize> {
    let n = x.shape().first().copied().unwrap_or(0);
    if t.len() != n {
        return Err(Error::invalid(
            op,
            format!("{} timesteps for a batch of {n} images", t.len()),
        ));
    }
    Ok(n)
}

/// What a class-conditional U-Net is asked for: a class per image and the scale `w` of
/// classifier-free guidance (Ho & Salimans 2022): `w = 1` is the conditional model alone,
/// `w = 0` the unconditional one (the null class), anything else both, combined.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassGuidance {
    pub labels: Vec<u32>,
    /// The class the unconditional model was trained under (needed unless `w = 1`).
    pub null_class: Option<u32>,
    pub scale: f32,
}

impl ClassGuidance {
    /// The null class, which every scale but 1 needs.
    fn null(&self) -> Result<u32> {
        self.null_class.ok_or_else(|| {
            Error::invalid(
                "guidance",
                format!(
                    "guidance scale {} needs the unconditional model, and this model has no \
                     null class; use guidance 1 (the conditional model alone)",
                    self.scale
                ),
            )
        })
    }
}

/// The U-Net with its weights on a backend, and the classes it draws if it is conditional.
pub struct UNetDenoiser<'a> {
    pub model: &'a UNet2D,
    pub params: &'a [Tensor],
    pub classes: Option<&'a ClassGuidance>,
}

impl UNetDenoiser<'_> {
    /// The forward pass on `tape`: its input and output variables.
    fn forward(
        &self,
        tape: &mut Tape,
        x: &Tensor,
        t: &[f64],
        labels: Option<&[u32]>,
        grad: bool,
    ) -> Result<(Var, Var)> {
        let n = check_times("unet", x, t)?;
        let times: Vec<f32> = t.iter().map(|&t| t as f32).collect();
        let tt = tape.backend().upload(&[n], &times)?;
        let p = tape.leaves(self.params, false);
        let xv = tape.leaf(x.clone(), grad);
        let out = self.model.forward(tape, &p, xv, &tt, labels)?;
        Ok((xv, out))
    }

    /// The labels of a single evaluation: the classes at `w = 1`, the null class at `w = 0`;
    /// `None` when both are needed (or the model is unconditional).
    fn single_pass_labels(&self, n: usize) -> Result<Option<Vec<u32>>> {
        match self.classes {
            Some(c) if c.scale == 1.0 => Ok(Some(c.labels.clone())),
            Some(c) if c.scale == 0.0 => Ok(Some(vec![c.null()?; n])),
            _ => Ok(None),
        }
    }
}

impl Denoiser for UNetDenoiser<'_> {
    /// With guidance, the conditional and the unconditional prediction come from one batched
    /// evaluation of `[x, x]` under `[labels, null]`, combined by the guidance op.
    fn predict(&self, be: &dyn Backend, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let mut tape = Tape::inference(be);
        let n = check_times("unet", x, t)?;
        let classes = match (self.classes, self.single_pass_labels(n)?) {
            (Some(c), None) => c,
            (_, labels) => {
                let (_, out) = self.forward(&mut tape, x, t, labels.as_deref(), false)?;
                return Ok(tape.value(out).clone());
            }
        };
        let column = x.reshape(&[1, x.numel(), 1, 1])?;
        let mut shape = x.shape().to_vec();
        shape[0] *= 2;
        let both = be.concat_channels(&column, &column)?.reshape(&shape)?;
        let times = [t, t].concat();
        let labels = [classes.labels.clone(), vec![classes.null()?; n]].concat();
        let (_, out) = self.forward(&mut tape, &both, &times, Some(&labels), false)?;
        be.guidance(tape.value(out), classes.scale)
    }

    /// Backpropagates `v` through a recorded forward pass to the input alone.
    fn predict_vjp(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        t: &[f64],
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = check_times("unet", x, t)?;
        let labels = match (self.classes, self.single_pass_labels(n)?) {
            (Some(_), None) => {
                return Err(Error::invalid(
                    "unet",
                    "the input gradient of a guided prediction is not implemented; use \
                     guidance 1 or 0",
                ))
            }
            (_, labels) => labels,
        };
        let mut tape = Tape::new(be);
        let (xv, out) = self.forward(&mut tape, x, t, labels.as_deref(), true)?;
        let y = tape.value(out).clone();
        let mut grads = tape.backward(out, v.clone())?;
        let vjp = grads
            .take(xv)
            .ok_or_else(|| Error::invalid("unet", "no gradient reached the input"))?;
        Ok((y, vjp))
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
    /// `log N(x; sqrt(abar) mean, (abar std^2 + 1 - abar) I)`, the density of `x_t` at `abar`
    /// (the data's own at `abar = 1`), summed over the elements of each image of `x`, in nats.
    pub fn log_density(&self, x: &[f32], abar: f64) -> Vec<f64> {
        let per_image: usize = self.image.iter().product();
        let var = abar * self.std * self.std + 1.0 - abar;
        let norm = -0.5 * (2.0 * std::f64::consts::PI * var).ln();
        x.chunks(per_image)
            .map(|img| {
                img.iter()
                    .map(|&v| {
                        let r = v as f64 - abar.sqrt() * self.mean;
                        norm - 0.5 * r * r / var
                    })
                    .sum()
            })
            .collect()
    }

    /// Per image, `(a, w)` such that the output at `x` is `a + w x` elementwise.
    fn affine(&self, t: &[f64]) -> Result<Vec<(f64, f64)>> {
        if self.std.is_nan() || self.std <= 0.0 {
            return Err(Error::invalid(
                "gaussian denoiser",
                format!("std must be positive, got {}", self.std),
            ));
        }
        t.iter()
            .map(|&t| {
                let abar = self.schedule.alpha_bar_at(t)?;
                let (a, s) = (abar.sqrt(), (1.0 - abar).sqrt());
                let v = abar * self.std * self.std + 1.0 - abar;
                // eps = s (x - a mean) / v and x0 = mean + a std^2 (x - a mean) / v.
                let (eps0, eps1) = (-s * a * self.mean / v, s / v);
                let k = a * self.std * self.std / v;
                let (x00, x01) = (self.mean - k * a * self.mean, k);
                Ok(match self.prediction_type {
                    PredictionType::Epsilon => (eps0, eps1),
                    PredictionType::Sample => (x00, x01),
                    PredictionType::VPrediction => (a * eps0 - s * x00, a * eps1 - s * x01),
                })
            })
            .collect()
    }

    /// `f(x, a, w)` elementwise, image `i` with the `(a, w)` of its timestep.
    fn map(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        t: &[f64],
        f: impl Fn(f64, f64, f64, usize) -> f64,
    ) -> Result<Tensor> {
        check_times("gaussian denoiser", x, t)?;
        let per_image: usize = self.image.iter().product();
        let coefficients = self.affine(t)?;
        let out: Vec<f32> = be
            .to_vec(x)?
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let (a, w) = coefficients[i / per_image];
                f(x as f64, a, w, i) as f32
            })
            .collect();
        be.upload(x.shape(), &out)
    }
}

/// The optimal denoiser is affine in `x` with a diagonal Jacobian `w I`, in f64 on the host.
impl Denoiser for GaussianDenoiser {
    fn predict(&self, be: &dyn Backend, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        self.map(be, x, t, |x, a, w, _| a + w * x)
    }

    fn predict_vjp(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        t: &[f64],
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let vs = be.to_vec(v)?;
        if v.shape() != x.shape() {
            return Err(Error::shape(
                "gaussian denoiser",
                "v of the shape of x",
                v.shape(),
            ));
        }
        let y = self.predict(be, x, t)?;
        let vjp = self.map(be, x, t, |_, _, w, i| w * vs[i] as f64)?;
        Ok((y, vjp))
    }

    fn image_shape(&self) -> [usize; 3] {
        self.image
    }
}
