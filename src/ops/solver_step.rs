//! The fused step of the linear samplers: DPM-Solver++ (Lu et al. 2022), the reverse SDE by
//! Euler–Maruyama and the probability-flow ODE by Heun (Song et al. 2021). Each of their steps
//! is, elementwise,
//!
//! `d = convert(x_eval, m)`, `x_next = a x_base + b d + c prev + sigma z`,
//!
//! where `m` is the model output at `x_eval`, `convert` turns it into the noise estimate
//! `eps_hat` or the data estimate `x0_hat` by the model's prediction type, `prev` is an
//! earlier step's `d` (the multistep history of DPM-Solver++, the predictor's slope of Heun)
//! and `z` the step's noise. The step also writes `d`, for the next step to use as `prev`.
//! The scalars come from `crate::diffusion::continuous` and `crate::diffusion::dpm_solver`.

use bytemuck::{Pod, Zeroable};

use super::check_same_shape;
use crate::diffusion::schedule::PredictionType;
use crate::error::Result;
use crate::tensor::Tensor;

/// What the model output is turned into before the step combines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverTarget {
    /// `eps_hat`: epsilon `m`, v `sqrt(abar) m + sqrt(1 - abar) x`, sample
    /// `(x - sqrt(abar) m) / sqrt(1 - abar)`.
    Epsilon,
    /// `x0_hat`: epsilon `(x - sqrt(1 - abar) m) / sqrt(abar)`, v `sqrt(abar) x - sqrt(1 - abar) m`,
    /// sample `m`.
    Sample,
}

/// Per-step scalars of a solver step (computed on the host in f64).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolverStepCoefficients {
    pub prediction_type: PredictionType,
    pub target: SolverTarget,
    /// `sqrt(abar)` and `sqrt(1 - abar)` at the timestep where the model was evaluated.
    pub sqrt_abar: f32,
    pub sqrt_one_minus_abar: f32,
    /// Weights of `x_base`, `d` and `prev`.
    pub a: f32,
    pub b: f32,
    pub c: f32,
    /// Weight of the noise `z`.
    pub sigma: f32,
}

/// The tensors of one solver step; `prev` and `noise` may be absent (weight 0).
pub struct SolverStepInputs<'a> {
    /// Where the model was evaluated.
    pub x_eval: &'a Tensor,
    pub model_output: &'a Tensor,
    /// Where the step starts (`x_eval` except in Heun's corrector).
    pub x_base: &'a Tensor,
    pub prev: Option<&'a Tensor>,
    pub noise: Option<&'a Tensor>,
}

impl SolverStepInputs<'_> {
    /// Every tensor has the shape of `x_base`.
    fn check(&self, op: &'static str) -> Result<()> {
        check_same_shape(op, self.x_base, self.x_eval)?;
        check_same_shape(op, self.x_base, self.model_output)?;
        for t in [self.prev, self.noise].into_iter().flatten() {
            check_same_shape(op, self.x_base, t)?;
        }
        Ok(())
    }

    /// The weights of `prev` and `z`: 0 where the tensor is absent.
    fn weights(&self, k: &SolverStepCoefficients) -> (f32, f32) {
        (
            if self.prev.is_some() { k.c } else { 0.0 },
            if self.noise.is_some() { k.sigma } else { 0.0 },
        )
    }
}

/// `d = convert(x, m)`.
fn convert(k: &SolverStepCoefficients, x: f32, m: f32) -> f32 {
    let (s0, s1) = (k.sqrt_abar, k.sqrt_one_minus_abar);
    match (k.target, k.prediction_type) {
        (SolverTarget::Epsilon, PredictionType::Epsilon) => m,
        (SolverTarget::Epsilon, PredictionType::VPrediction) => s0 * m + s1 * x,
        (SolverTarget::Epsilon, PredictionType::Sample) => (x - s0 * m) / s1,
        (SolverTarget::Sample, PredictionType::Epsilon) => (x - s1 * m) / s0,
        (SolverTarget::Sample, PredictionType::VPrediction) => s0 * x - s1 * m,
        (SolverTarget::Sample, PredictionType::Sample) => m,
    }
}

/// The uniform block of `shaders/solver_step.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SolverParams {
    n: u32,
    /// 0 epsilon, 1 v, 2 sample.
    prediction: u32,
    /// 0 `eps_hat`, 1 `x0_hat`.
    convert_to: u32,
    /// 1 when the step adds noise.
    noisy: u32,
    sqrt_abar: f32,
    sqrt_one_minus_abar: f32,
    a: f32,
    b: f32,
    c: f32,
    sigma: f32,
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// Below this many elements a loop beats spawning rayon tasks.
    const PAR_MIN: usize = 1 << 14;

    /// Returns `(x_next, d)`.
    pub fn solver_step(
        s: &SolverStepInputs,
        k: &SolverStepCoefficients,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "solver_step";
        s.check(OP)?;
        let (c, sigma) = s.weights(k);
        let xe = s.x_eval.cpu_read(OP)?;
        let m = s.model_output.cpu_read(OP)?;
        let xb = s.x_base.cpu_read(OP)?;
        let prev = s.prev.map(|t| t.cpu_read(OP)).transpose()?;
        let z = s.noise.map(|t| t.cpu_read(OP)).transpose()?;
        let n = xb.len();
        let (mut next, mut d) = (vec![0.0; n], vec![0.0; n]);
        let body = |i: usize, next: &mut f32, d: &mut f32| {
            let di = convert(k, xe[i], m[i]);
            let mut y = k.a * xb[i] + k.b * di;
            if let Some(p) = &prev {
                y += c * p[i];
            }
            if let Some(z) = &z {
                y += sigma * z[i];
            }
            *next = y;
            *d = di;
        };
        if n < PAR_MIN {
            for (i, (y, d)) in next.iter_mut().zip(&mut d).enumerate() {
                body(i, y, d);
            }
        } else {
            next.par_iter_mut()
                .zip(&mut d)
                .enumerate()
                .for_each(|(i, (y, d))| body(i, y, d));
        }
        let shape = s.x_base.shape();
        Ok((Tensor::from_cpu(shape, next), Tensor::from_cpu(shape, d)))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const SOLVER_STEP: Kernel = Kernel {
        shader: "solver_step",
        source: include_str!("../../shaders/solver_step.wgsl"),
        entry: "solver_step",
        params: size_of::<SolverParams>(),
        storage: &[R, R, R, R, R, W, W],
        constants: ELEMENTWISE_CONSTANTS,
    };
    pub(crate) const KERNELS: &[Kernel] = &[SOLVER_STEP];

    /// One thread per element; an absent `prev` or `z` binds `x_base` with weight 0.
    pub fn solver_step(
        g: &Gpu,
        s: &SolverStepInputs,
        k: &SolverStepCoefficients,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "solver_step";
        s.check(OP)?;
        let (c, sigma) = s.weights(k);
        let n = s.x_base.numel();
        let next = g.alloc(OP, n)?;
        let d = g.alloc(OP, n)?;
        let params = SolverParams {
            n: n as u32,
            prediction: match k.prediction_type {
                PredictionType::Epsilon => 0,
                PredictionType::VPrediction => 1,
                PredictionType::Sample => 2,
            },
            convert_to: match k.target {
                SolverTarget::Epsilon => 0,
                SolverTarget::Sample => 1,
            },
            noisy: s.noise.is_some() as u32,
            sqrt_abar: k.sqrt_abar,
            sqrt_one_minus_abar: k.sqrt_one_minus_abar,
            a: k.a,
            b: k.b,
            c,
            sigma,
        };
        let args = [
            Arg::read(s.x_eval.gpu_buffer(OP)?),
            Arg::read(s.model_output.gpu_buffer(OP)?),
            Arg::read(s.x_base.gpu_buffer(OP)?),
            Arg::read(s.prev.unwrap_or(s.x_base).gpu_buffer(OP)?),
            Arg::read(s.noise.unwrap_or(s.x_base).gpu_buffer(OP)?),
            Arg::write(&next),
            Arg::write(&d),
        ];
        g.dispatch(&SOLVER_STEP, &params, &args, elementwise_grid(n))?;
        let shape = s.x_base.shape();
        Ok((Tensor::from_gpu(shape, next), Tensor::from_gpu(shape, d)))
    }
}
