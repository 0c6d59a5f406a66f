//! The optimizer step: global-norm clipping, AdamW and the EMA update, fused into one pass over
//! the elements, in place. Run over a model's flat buffers it updates every parameter at once.
//!
//! With `n2 = |g|^2` the squared global gradient norm (computed on the device, so the host never
//! waits for it) and `c = min(1, max_norm / (sqrt(n2) + 1e-6))` the clipping factor of
//! `torch.nn.utils.clip_grad_norm_` (`c = 1` without clipping), AdamW (Loshchilov and Hutter
//! 2019) with the semantics of `torch.optim.AdamW`, then the EMA of the weights:
//!   g <- c g
//!   p <- p - lr wd p                          (decoupled weight decay)
//!   m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
//!   p <- p - (lr / (1 - b1^k)) m / (sqrt(v) / sqrt(1 - b2^k) + eps)     (step k >= 1)
//!   ema <- d ema + (1 - d) p
//! The bias corrections are computed on the host in f64. When `n2` is not finite (an overflow
//! or a NaN anywhere in the gradients) the step changes nothing: the caller sees the norm and
//! reports it.

use bytemuck::{Pod, Zeroable};

use super::check_same_shape;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u32,
    /// Clip the gradient to this global L2 norm (`None`: no clipping).
    pub max_grad_norm: Option<f32>,
}

/// The per-step scalars of the fused step, the uniform block of `adamw_ema_step` in
/// `shaders/optim.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct StepScalars {
    n: u32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    /// `1 - lr wd`.
    decay_factor: f32,
    /// `lr / (1 - b1^k)`.
    step_size: f32,
    /// `sqrt(1 - b2^k)`.
    sqrt_bias_correction2: f32,
    /// The clipping norm, 0 without clipping.
    max_grad_norm: f32,
    /// The EMA decay `d`.
    ema_decay: f32,
    one_minus_ema_decay: f32,
}

/// The clipping factor `c` from the squared norm, in f32 as the kernel computes it; `None`
/// when `n2` is not finite (the step is skipped).
pub fn clip_factor(n2: f32, max_grad_norm: Option<f32>) -> Option<f32> {
    if !n2.is_finite() {
        return None;
    }
    Some(match max_grad_norm {
        Some(max) => (max / (n2.sqrt() + 1e-6)).min(1.0),
        None => 1.0,
    })
}

impl StepScalars {
    /// Checks the hyperparameters and folds them into the per-step scalars (f64 on the host).
    fn new(n: usize, h: &AdamWParams, ema_decay: f32) -> Result<Self> {
        const OP: &str = "adamw_ema_step";
        if h.step == 0 {
            return Err(Error::invalid(
                OP,
                "step counts from 1 (bias correction divides by 1 - beta^step)",
            ));
        }
        for (name, beta) in [("beta1", h.beta1), ("beta2", h.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::invalid(
                    OP,
                    format!("{name} must be in [0, 1), got {beta}"),
                ));
            }
        }
        let max_norm = h.max_grad_norm.unwrap_or(0.0);
        if !(h.eps > 0.0
            && h.lr >= 0.0
            && h.weight_decay >= 0.0
            && h.lr.is_finite()
            && h.weight_decay.is_finite()
            && max_norm.is_finite()
            && max_norm >= 0.0
            && h.max_grad_norm != Some(0.0))
        {
            return Err(Error::invalid(
                OP,
                format!(
                    "need eps > 0, lr >= 0, weight_decay >= 0 and a finite positive clipping \
                     norm, got {}, {}, {} and {:?}",
                    h.eps, h.lr, h.weight_decay, h.max_grad_norm
                ),
            ));
        }
        if !(0.0..=1.0).contains(&ema_decay) {
            return Err(Error::invalid(
                OP,
                format!("the EMA decay must be in [0, 1], got {ema_decay}"),
            ));
        }
        let (lr, b1, b2) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64);
        let step = h.step as i32;
        Ok(StepScalars {
            n: u32::try_from(n)
                .map_err(|_| Error::invalid(OP, format!("{n} elements exceed 2^32")))?,
            beta1: h.beta1,
            beta2: h.beta2,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: h.eps,
            decay_factor: (1.0 - lr * h.weight_decay as f64) as f32,
            step_size: (lr / (1.0 - b1.powi(step))) as f32,
            sqrt_bias_correction2: (1.0 - b2.powi(step)).sqrt() as f32,
            max_grad_norm: max_norm,
            ema_decay,
            one_minus_ema_decay: 1.0 - ema_decay,
        })
    }

    /// One element of the fused step with clipping factor `c`; returns `(p, m, v, ema)`.
    fn update(&self, c: f32, p: f32, g: f32, m: f32, v: f32, ema: f32) -> (f32, f32, f32, f32) {
        let g = g * c;
        let p = p * self.decay_factor;
        let m = self.beta1 * m + self.one_minus_beta1 * g;
        let v = self.beta2 * v + self.one_minus_beta2 * g * g;
        let p = p - self.step_size * m / (v.sqrt() / self.sqrt_bias_correction2 + self.eps);
        let ema = self.ema_decay * ema + self.one_minus_ema_decay * p;
        (p, m, v, ema)
    }
}

/// Shapes alike and storages distinct.
fn check_distinct(op: &'static str, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (i, (name_a, a)) in tensors.iter().enumerate() {
        for (name_b, b) in &tensors[i + 1..] {
            check_same_shape(op, a, b)?;
            if a.shares_storage(b) {
                return Err(Error::invalid(
                    op,
                    format!("{name_a} and {name_b} share storage; pass distinct tensors"),
                ));
            }
        }
    }
    Ok(())
}

fn check_norm(op: &'static str, norm2: &Tensor) -> Result<()> {
    if norm2.shape() != [1] {
        return Err(Error::shape(op, "norm2 [1]", norm2.shape()));
    }
    Ok(())
}

/// The arguments of one fused step.
pub struct StepTensors<'a> {
    pub params: &'a mut Tensor,
    pub grads: &'a Tensor,
    pub adam_m: &'a mut Tensor,
    pub adam_v: &'a mut Tensor,
    pub ema: &'a mut Tensor,
    /// The squared global gradient norm, `[1]`.
    pub norm2: &'a Tensor,
}

impl StepTensors<'_> {
    fn check(&self, op: &'static str) -> Result<()> {
        check_norm(op, self.norm2)?;
        check_distinct(
            op,
            &[
                ("param", self.params),
                ("grad", self.grads),
                ("m", self.adam_m),
                ("v", self.adam_v),
                ("ema", self.ema),
            ],
        )
    }
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// Elements per rayon task at least.
    const MIN_LEN: usize = 1 << 12;

    pub fn adamw_ema_step(t: StepTensors, h: &AdamWParams, ema_decay: f32) -> Result<()> {
        const OP: &str = "adamw_ema_step";
        t.check(OP)?;
        let s = StepScalars::new(t.params.numel(), h, ema_decay)?;
        let n2 = t.norm2.cpu_read(OP)?[0];
        let Some(c) = clip_factor(n2, h.max_grad_norm) else {
            return Ok(());
        };
        let g = t.grads.cpu_read(OP)?;
        let mut p = t.params.cpu_write(OP)?;
        let mut m = t.adam_m.cpu_write(OP)?;
        let mut v = t.adam_v.cpu_write(OP)?;
        let mut ema = t.ema.cpu_write(OP)?;
        p.par_iter_mut()
            .zip(m.par_iter_mut())
            .zip(v.par_iter_mut())
            .zip(ema.par_iter_mut())
            .zip(g.par_iter())
            .with_min_len(MIN_LEN)
            .for_each(|((((p, m), v), e), &g)| {
                (*p, *m, *v, *e) = s.update(c, *p, g, *m, *v, *e);
            });
        Ok(())
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const ADAMW_EMA_STEP: Kernel = Kernel {
        shader: "optim",
        source: include_str!("../../shaders/optim.wgsl"),
        entry: "adamw_ema_step",
        params: size_of::<StepScalars>(),
        storage: &[W, R, W, W, W, R],
        constants: ELEMENTWISE_CONSTANTS,
    };
    pub(crate) const KERNELS: &[Kernel] = &[ADAMW_EMA_STEP];

    /// One thread per element; the clipping factor is computed in each thread from `norm2`.
    pub fn adamw_ema_step(g: &Gpu, t: StepTensors, h: &AdamWParams, ema_decay: f32) -> Result<()> {
        const OP: &str = "adamw_ema_step";
        t.check(OP)?;
        let n = t.params.numel();
        let s = StepScalars::new(n, h, ema_decay)?;
        let args = [
            Arg::write(t.params.gpu_buffer(OP)?),
            Arg::read(t.grads.gpu_buffer(OP)?),
            Arg::write(t.adam_m.gpu_buffer(OP)?),
            Arg::write(t.adam_v.gpu_buffer(OP)?),
            Arg::write(t.ema.gpu_buffer(OP)?),
            Arg::read(t.norm2.gpu_buffer(OP)?),
        ];
        g.dispatch(&ADAMW_EMA_STEP, &s, &args, elementwise_grid(n))
    }
}
