//! Fused AdamW and the EMA update, both in place and one pass over the elements.
//!
//! AdamW (Loshchilov and Hutter 2019) with the semantics of `torch.optim.AdamW`, on the gradient
//! scaled by `c` (global-norm clipping, `torch.nn.utils.clip_grad_norm_`, folded in):
//!   g <- c g
//!   p <- p - lr wd p                          (decoupled weight decay)
//!   m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
//!   p <- p - (lr / (1 - b1^k)) m / (sqrt(v) / sqrt(1 - b2^k) + eps)     (step k >= 1)
//! The bias corrections are computed on the host in f64. EMA: `ema <- d ema + (1 - d) p`.

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
    /// Factor applied to the gradient first (1 without clipping).
    pub grad_scale: f32,
}

/// The per-step scalars of AdamW, the uniform block of `adamw_step` in `shaders/optim.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamWScalars {
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
    grad_scale: f32,
}

/// The uniform block of `ema_update`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmaParams {
    n: u32,
    decay: f32,
    one_minus_decay: f32,
}

impl AdamWScalars {
    /// Checks the hyperparameters and folds them into the per-step scalars (f64 on the host).
    fn new(n: usize, h: &AdamWParams) -> Result<Self> {
        const OP: &str = "adamw_step";
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
        if !(h.eps > 0.0
            && h.lr >= 0.0
            && h.weight_decay >= 0.0
            && h.lr.is_finite()
            && h.weight_decay.is_finite()
            && h.grad_scale.is_finite())
        {
            return Err(Error::invalid(
                OP,
                format!(
                    "need eps > 0, lr >= 0, weight_decay >= 0 and a finite grad_scale, \
                     got {}, {}, {} and {}",
                    h.eps, h.lr, h.weight_decay, h.grad_scale
                ),
            ));
        }
        let (lr, b1, b2) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64);
        let step = h.step as i32;
        Ok(AdamWScalars {
            n: n as u32,
            beta1: h.beta1,
            beta2: h.beta2,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: h.eps,
            decay_factor: (1.0 - lr * h.weight_decay as f64) as f32,
            step_size: (lr / (1.0 - b1.powi(step))) as f32,
            sqrt_bias_correction2: (1.0 - b2.powi(step)).sqrt() as f32,
            grad_scale: h.grad_scale,
        })
    }

    /// One element of the fused update; returns the new `(p, m, v)`.
    fn update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let g = g * self.grad_scale;
        let p = p * self.decay_factor;
        let m = self.beta1 * m + self.one_minus_beta1 * g;
        let v = self.beta2 * v + self.one_minus_beta2 * g * g;
        let p = p - self.step_size * m / (v.sqrt() / self.sqrt_bias_correction2 + self.eps);
        (p, m, v)
    }
}

fn ema_params(n: usize, decay: f32) -> Result<EmaParams> {
    if !(0.0..=1.0).contains(&decay) {
        return Err(Error::invalid(
            "ema_update",
            format!("decay must be in [0, 1], got {decay}"),
        ));
    }
    Ok(EmaParams {
        n: n as u32,
        decay,
        one_minus_decay: 1.0 - decay,
    })
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

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// Elements per rayon task at least: optimizer steps touch many small tensors.
    const MIN_LEN: usize = 1 << 12;

    pub fn adamw_step(
        p: &mut Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        h: &AdamWParams,
    ) -> Result<()> {
        const OP: &str = "adamw_step";
        check_distinct(OP, &[("param", p), ("grad", g), ("m", m), ("v", v)])?;
        let s = AdamWScalars::new(p.numel(), h)?;
        let g = g.cpu_read(OP)?;
        let (mut p, mut m, mut v) = (p.cpu_write(OP)?, m.cpu_write(OP)?, v.cpu_write(OP)?);
        p.par_iter_mut()
            .zip(m.par_iter_mut())
            .zip(v.par_iter_mut())
            .zip(g.par_iter())
            .with_min_len(MIN_LEN)
            .for_each(|(((p, m), v), &g)| (*p, *m, *v) = s.update(*p, g, *m, *v));
        Ok(())
    }

    pub fn ema_update(ema: &mut Tensor, p: &Tensor, decay: f32) -> Result<()> {
        const OP: &str = "ema_update";
        check_distinct(OP, &[("ema", ema), ("param", p)])?;
        let e = ema_params(p.numel(), decay)?;
        let p = p.cpu_read(OP)?;
        let mut ema = ema.cpu_write(OP)?;
        ema.par_iter_mut()
            .zip(p.par_iter())
            .with_min_len(MIN_LEN)
            .for_each(|(a, &x)| *a = e.decay * *a + e.one_minus_decay * x);
        Ok(())
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const SOURCE: &str = include_str!("../../shaders/optim.wgsl");

    const ADAMW_STEP: Kernel = Kernel {
        shader: "optim",
        source: SOURCE,
        entry: "adamw_step",
        params: size_of::<AdamWScalars>(),
        storage: &[W, R, W, W],
        constants: ELEMENTWISE_CONSTANTS,
    };
    const EMA_UPDATE: Kernel = Kernel {
        shader: "optim",
        source: SOURCE,
        entry: "ema_update",
        params: size_of::<EmaParams>(),
        storage: &[W, R],
        constants: ELEMENTWISE_CONSTANTS,
    };
    pub(crate) const KERNELS: &[Kernel] = &[ADAMW_STEP, EMA_UPDATE];

    /// One thread per element; `param`, `m` and `v` are bound read-write and updated in place.
    pub fn adamw_step(
        g: &Gpu,
        p: &mut Tensor,
        gr: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        h: &AdamWParams,
    ) -> Result<()> {
        const OP: &str = "adamw_step";
        check_distinct(OP, &[("param", p), ("grad", gr), ("m", m), ("v", v)])?;
        let n = p.numel();
        let s = AdamWScalars::new(n, h)?;
        let args = [
            Arg::write(p.gpu_buffer(OP)?),
            Arg::read(gr.gpu_buffer(OP)?),
            Arg::write(m.gpu_buffer(OP)?),
            Arg::write(v.gpu_buffer(OP)?),
        ];
        g.dispatch(&ADAMW_STEP, &s, &args, elementwise_grid(n))
    }

    pub fn ema_update(g: &Gpu, ema: &mut Tensor, p: &Tensor, decay: f32) -> Result<()> {
        const OP: &str = "ema_update";
        check_distinct(OP, &[("ema", ema), ("param", p)])?;
        let n = p.numel();
        let e = ema_params(n, decay)?;
        let args = [
            Arg::write(ema.gpu_buffer(OP)?),
            Arg::read(p.gpu_buffer(OP)?),
        ];
        g.dispatch(&EMA_UPDATE, &e, &args, elementwise_grid(n))
    }
}
