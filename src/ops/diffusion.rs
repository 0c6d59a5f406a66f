//! The fused diffusion kernels, one pass over the elements each:
//!
//! - `q_sample`: the closed-form forward process `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`
//!   with one timestep per sample (DDPM, eq. 4).
//! - `ddpm_step`: the ancestral step `x_{t-1} = c0 x0_hat + ct x_t + sigma_t z` (DDPM, eq. 7).
//! - `ddim_step`: `x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_hat
//!   + sigma z` (DDIM, eq. 12).
//!
//! Both steps first recover `x0_hat` from the model output by its prediction type:
//! epsilon `(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`, v `sqrt(abar_t) x_t - sqrt(1 - abar_t) v`,
//! sample the output itself; then optionally clip it to `[-r, r]`. The per-step scalars come
//! from `NoiseSchedule::ddpm_coefficients` / `ddim_coefficients` (computed in f64 on the host).

use bytemuck::{Pod, Zeroable};

use super::{check_rank, check_same_shape};
use crate::diffusion::schedule::PredictionType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Per-step scalars of a DDPM ancestral step (computed on the host from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpmStepCoefficients {
    pub prediction_type: PredictionType,
    /// `sqrt(abar_t)`.
    pub sqrt_abar_t: f32,
    /// `sqrt(1 - abar_t)`.
    pub sqrt_one_minus_abar_t: f32,
    /// Clip `x0_hat` to `[-r, r]` (diffusers' `clip_sample_range`), or not.
    pub clip_sample: Option<f32>,
    /// Weight of `x0_hat` in the posterior mean: `sqrt(abar_{t-1}) beta_t / (1 - abar_t)`.
    pub c0: f32,
    /// Weight of `x_t` in the posterior mean: `sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)`.
    pub ct: f32,
    /// Standard deviation of the added noise (0 at `t = 0`).
    pub sigma: f32,
}

/// Per-step scalars of a DDIM step (computed on the host from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimStepCoefficients {
    pub prediction_type: PredictionType,
    /// `sqrt(abar_t)`.
    pub sqrt_abar_t: f32,
    /// `sqrt(1 - abar_t)`.
    pub sqrt_one_minus_abar_t: f32,
    /// Clip `x0_hat` to `[-r, r]`, or not.
    pub clip_sample: Option<f32>,
    /// Recompute `eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)` from the clipped
    /// `x0_hat` (diffusers' `use_clipped_model_output`).
    pub use_clipped_model_output: bool,
    /// `sqrt(abar_{t'})`.
    pub sqrt_abar_prev: f32,
    /// `sqrt(1 - abar_{t'} - sigma^2)`, the weight of `eps_hat`.
    pub direction: f32,
    /// `eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})`.
    pub sigma: f32,
}

/// The uniform block of `shaders/diffusion.wgsl` for the two step kernels.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct StepParams {
    n: u32,
    /// 0 epsilon, 1 v, 2 sample.
    prediction: u32,
    clip: u32,
    recompute_eps: u32,
    sqrt_abar_t: f32,
    sqrt_one_minus_abar_t: f32,
    clip_range: f32,
    /// `c0` (DDPM) or `sqrt(abar_{t'})` (DDIM).
    coef_x0: f32,
    /// `ct` (DDPM, times `x_t`) or the direction (DDIM, times `eps_hat`).
    coef_second: f32,
    sigma: f32,
}

/// The uniform block of `shaders/diffusion.wgsl` for `q_sample`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct QSampleParams {
    n: u32,
    /// Elements per sample.
    per_sample: u32,
    /// Timesteps in the schedule.
    steps: u32,
}

impl StepParams {
    fn ddpm(n: usize, c: &DdpmStepCoefficients) -> Self {
        Self::new(
            n,
            c.prediction_type,
            c.clip_sample,
            false,
            c.sqrt_abar_t,
            c.sqrt_one_minus_abar_t,
            [c.c0, c.ct, c.sigma],
        )
    }

    fn ddim(n: usize, c: &DdimStepCoefficients) -> Self {
        let coefs = [c.sqrt_abar_prev, c.direction, c.sigma];
        let recompute = c.use_clipped_model_output;
        Self::new(
            n,
            c.prediction_type,
            c.clip_sample,
            recompute,
            c.sqrt_abar_t,
            c.sqrt_one_minus_abar_t,
            coefs,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        n: usize,
        prediction: PredictionType,
        clip: Option<f32>,
        recompute_eps: bool,
        sqrt_abar_t: f32,
        sqrt_one_minus_abar_t: f32,
        [coef_x0, coef_second, sigma]: [f32; 3],
    ) -> Self {
        StepParams {
            n: n as u32,
            prediction: match prediction {
                PredictionType::Epsilon => 0,
                PredictionType::VPrediction => 1,
                PredictionType::Sample => 2,
            },
            clip: clip.is_some() as u32,
            recompute_eps: recompute_eps as u32,
            sqrt_abar_t,
            sqrt_one_minus_abar_t,
            clip_range: clip.unwrap_or(0.0),
            coef_x0,
            coef_second,
            sigma,
        }
    }
}

/// `x0_hat` from the model output `m` at `x_t = x`, by prediction type.
fn predict_x0(pred: PredictionType, s0: f32, s1: f32, x: f32, m: f32) -> f32 {
    match pred {
        PredictionType::Epsilon => (x - s1 * m) / s0,
        PredictionType::VPrediction => s0 * x - s1 * m,
        PredictionType::Sample => m,
    }
}

fn clip(x0: f32, range: Option<f32>) -> f32 {
    match range {
        Some(r) => x0.clamp(-r, r),
        None => x0,
    }
}

/// Shape checks of the step kernels: the model output and the noise have the shape of `x_t`.
fn check_step(op: &'static str, x_t: &Tensor, mo: &Tensor, noise: &Tensor) -> Result<()> {
    check_same_shape(op, x_t, mo)?;
    check_same_shape(op, x_t, noise)
}

/// Shape checks of `q_sample`: `x0 [B, ...]`, `eps` like `x0`, `t [B]`, `alphas_cumprod [T]`,
/// `T >= 1`. Returns the elements per sample.
fn check_q_sample(x0: &Tensor, eps: &Tensor, t: &Tensor, ac: &Tensor) -> Result<usize> {
    const OP: &str = "q_sample";
    if x0.shape().is_empty() {
        return Err(Error::shape(OP, "x0 of shape [B, ...]", x0.shape()));
    }
    check_same_shape(OP, x0, eps)?;
    let batch = x0.shape()[0];
    if t.shape() != [batch] {
        return Err(Error::shape(
            OP,
            format!("timesteps of shape [{batch}]"),
            t.shape(),
        ));
    }
    check_rank(OP, "alphas_cumprod", ac, 1)?;
    if ac.numel() == 0 {
        return Err(Error::shape(
            OP,
            "alphas_cumprod of at least one timestep",
            ac.shape(),
        ));
    }
    Ok(x0.shape()[1..].iter().product())
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// Below this many elements a loop beats spawning rayon tasks.
    const PAR_MIN: usize = 1 << 14;

    /// `f(x_t, model_output, noise)` for every element.
    fn map3(x: &[f32], m: &[f32], z: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
        if x.len() < PAR_MIN {
            x.iter()
                .zip(m)
                .zip(z)
                .map(|((&x, &m), &z)| f(x, m, z))
                .collect()
        } else {
            x.par_iter()
                .zip(m)
                .zip(z)
                .map(|((&x, &m), &z)| f(x, m, z))
                .collect()
        }
    }

    /// `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, `t` of each sample checked to be an
    /// integer in `[0, T)`.
    pub fn q_sample(x0: &Tensor, eps: &Tensor, t: &Tensor, ac: &Tensor) -> Result<Tensor> {
        let per_sample = check_q_sample(x0, eps, t, ac)?;
        let ac = ac.cpu_read("q_sample")?;
        let steps = ac.len();
        let abar: Vec<f32> = t
            .cpu_read("q_sample")?
            .iter()
            .map(|&ts| {
                if ts >= 0.0 && ts < steps as f32 && ts.fract() == 0.0 {
                    Ok(ac[ts as usize])
                } else {
                    Err(Error::invalid(
                        "q_sample",
                        format!("timestep {ts} is not an integer in [0, {steps})"),
                    ))
                }
            })
            .collect::<Result<_>>()?;
        let x0v = x0.cpu_read("q_sample")?;
        let epsv = eps.cpu_read("q_sample")?;
        let mut out = vec![0.0; x0v.len()];
        if per_sample > 0 {
            out.par_chunks_mut(per_sample)
                .zip(x0v.par_chunks(per_sample).zip(epsv.par_chunks(per_sample)))
                .zip(&abar)
                .for_each(|((y, (x, e)), &a)| {
                    let (s0, s1) = (a.sqrt(), (1.0 - a).sqrt());
                    for ((y, &x), &e) in y.iter_mut().zip(x).zip(e) {
                        *y = s0 * x + s1 * e;
                    }
                });
        }
        Ok(Tensor::from_cpu(x0.shape(), out))
    }

    /// `x_{t-1} = c0 clip(x0_hat) + ct x_t + sigma z`.
    pub fn ddpm_step(
        x_t: &Tensor,
        mo: &Tensor,
        noise: &Tensor,
        c: &DdpmStepCoefficients,
    ) -> Result<Tensor> {
        const OP: &str = "ddpm_step";
        check_step(OP, x_t, mo, noise)?;
        let c = *c;
        let y = map3(
            &x_t.cpu_read(OP)?,
            &mo.cpu_read(OP)?,
            &noise.cpu_read(OP)?,
            |x, m, z| {
                let x0 = predict_x0(
                    c.prediction_type,
                    c.sqrt_abar_t,
                    c.sqrt_one_minus_abar_t,
                    x,
                    m,
                );
                c.c0 * clip(x0, c.clip_sample) + c.ct * x + c.sigma * z
            },
        );
        Ok(Tensor::from_cpu(x_t.shape(), y))
    }

    /// `x_{t'} = sqrt(abar_{t'}) clip(x0_hat) + direction eps_hat + sigma z`.
    pub fn ddim_step(
        x_t: &Tensor,
        mo: &Tensor,
        noise: &Tensor,
        c: &DdimStepCoefficients,
    ) -> Result<Tensor> {
        const OP: &str = "ddim_step";
        check_step(OP, x_t, mo, noise)?;
        let c = *c;
        let (s0, s1) = (c.sqrt_abar_t, c.sqrt_one_minus_abar_t);
        let y = map3(
            &x_t.cpu_read(OP)?,
            &mo.cpu_read(OP)?,
            &noise.cpu_read(OP)?,
            |x, m, z| {
                let x0 = predict_x0(c.prediction_type, s0, s1, x, m);
                let x0c = clip(x0, c.clip_sample);
                let eps = if c.use_clipped_model_output {
                    (x - s0 * x0c) / s1
                } else {
                    match c.prediction_type {
                        PredictionType::Epsilon => m,
                        PredictionType::VPrediction => s0 * m + s1 * x,
                        PredictionType::Sample => (x - s0 * x0) / s1,
                    }
                };
                c.sqrt_abar_prev * x0c + c.direction * eps + c.sigma * z
            },
        );
        Ok(Tensor::from_cpu(x_t.shape(), y))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const SOURCE: &str = include_str!("../../shaders/diffusion.wgsl");

    const Q_SAMPLE: Kernel = Kernel {
        shader: "diffusion",
        source: SOURCE,
        entry: "q_sample",
        params: size_of::<QSampleParams>(),
        storage: &[R, R, R, R, W],
        constants: ELEMENTWISE_CONSTANTS,
    };

    const fn step_kernel(entry: &'static str) -> Kernel {
        Kernel {
            shader: "diffusion",
            source: SOURCE,
            entry,
            params: size_of::<StepParams>(),
            storage: &[R, R, R, W],
            constants: ELEMENTWISE_CONSTANTS,
        }
    }

    const DDPM_STEP: Kernel = step_kernel("ddpm_step");
    const DDIM_STEP: Kernel = step_kernel("ddim_step");
    pub(crate) const KERNELS: &[Kernel] = &[Q_SAMPLE, DDPM_STEP, DDIM_STEP];

    /// One thread per element. Timesteps stay on the device, so they are not checked here:
    /// they must be integers in `[0, T)`; the kernel clamps the index so that a bad one can
    /// never read outside `alphas_cumprod`.
    pub fn q_sample(g: &Gpu, x0: &Tensor, eps: &Tensor, t: &Tensor, ac: &Tensor) -> Result<Tensor> {
        const OP: &str = "q_sample";
        let per_sample = check_q_sample(x0, eps, t, ac)?;
        let n = x0.numel();
        let out = g.alloc(OP, n)?;
        let params = QSampleParams {
            n: n as u32,
            per_sample: per_sample as u32,
            steps: ac.numel() as u32,
        };
        let args = [
            Arg::read(x0.gpu_buffer(OP)?),
            Arg::read(eps.gpu_buffer(OP)?),
            Arg::read(t.gpu_buffer(OP)?),
            Arg::read(ac.gpu_buffer(OP)?),
            Arg::write(&out),
        ];
        g.dispatch(&Q_SAMPLE, &params, &args, elementwise_grid(n))?;
        Ok(Tensor::from_gpu(x0.shape(), out))
    }

    fn step(
        g: &Gpu,
        kernel: &Kernel,
        x_t: &Tensor,
        mo: &Tensor,
        noise: &Tensor,
        params: &StepParams,
    ) -> Result<Tensor> {
        let op = kernel.entry;
        check_step(op, x_t, mo, noise)?;
        let n = x_t.numel();
        let out = g.alloc(op, n)?;
        let args = [
            Arg::read(x_t.gpu_buffer(op)?),
            Arg::read(mo.gpu_buffer(op)?),
            Arg::read(noise.gpu_buffer(op)?),
            Arg::write(&out),
        ];
        g.dispatch(kernel, params, &args, elementwise_grid(n))?;
        Ok(Tensor::from_gpu(x_t.shape(), out))
    }

    pub fn ddpm_step(
        g: &Gpu,
        x_t: &Tensor,
        mo: &Tensor,
        noise: &Tensor,
        c: &DdpmStepCoefficients,
    ) -> Result<Tensor> {
        step(
            g,
            &DDPM_STEP,
            x_t,
            mo,
            noise,
            &StepParams::ddpm(x_t.numel(), c),
        )
    }

    pub fn ddim_step(
        g: &Gpu,
        x_t: &Tensor,
        mo: &Tensor,
        noise: &Tensor,
        c: &DdimStepCoefficients,
    ) -> Result<Tensor> {
        step(
            g,
            &DDIM_STEP,
            x_t,
            mo,
            noise,
            &StepParams::ddim(x_t.numel(), c),
        )
    }
}
