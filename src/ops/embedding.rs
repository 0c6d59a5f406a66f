//! Sinusoidal timestep embedding (Vaswani et al. 2017, as used by DDPM), exactly diffusers'
//! `get_timestep_embedding`:
//!
//!   half = dim / 2,  freq_k = exp(-ln(max_period) k / (half - downscale_freq_shift)),
//!   arg_{b,k} = scale (t_b freq_k),  emb_b = [sin(arg_b), cos(arg_b)]
//!
//! (`[cos, sin]` when `flip_sin_to_cos`), with one zero column appended when `dim` is odd.
//! The frequencies are computed on the host in f32 in torch's order of operations, and so is
//! the argument on both backends; only `sin` and `cos` differ between devices (see the GPU
//! launcher for how its argument is reduced).

use bytemuck::{Pod, Zeroable};

use super::check_rank;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimestepEmbeddingParams {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f32,
    pub scale: f32,
    pub max_period: f32,
}

/// The uniform block of `shaders/embedding.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    dim: u32,
    half: u32,
    flip: u32,
    scale: f32,
}

/// Checks the arguments and returns the `half` frequencies `freq_k`, in f32 as torch computes
/// them: `exp((-ln(max_period) * k) / (half - shift))`.
fn frequencies(t: &Tensor, p: &TimestepEmbeddingParams) -> Result<Vec<f32>> {
    const OP: &str = "timestep_embedding";
    check_rank(OP, "timesteps", t, 1)?;
    if p.dim == 0 {
        return Err(Error::invalid(
            OP,
            "the embedding dimension must be at least 1",
        ));
    }
    if p.max_period.is_nan() || p.max_period <= 0.0 {
        return Err(Error::invalid(
            OP,
            format!("max_period must be positive, got {}", p.max_period),
        ));
    }
    let half = p.dim / 2;
    let denominator = half as f32 - p.downscale_freq_shift;
    if half > 0 && denominator == 0.0 {
        return Err(Error::invalid(
            OP,
            format!(
                "downscale_freq_shift {} equals dim / 2 = {half}",
                p.downscale_freq_shift
            ),
        ));
    }
    let neg_log_period = -(p.max_period as f64).ln() as f32;
    Ok((0..half)
        .map(|k| ((neg_log_period * k as f32) / denominator).exp())
        .collect())
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// One row per timestep, rows in parallel.
    pub fn timestep_embedding(t: &Tensor, p: &TimestepEmbeddingParams) -> Result<Tensor> {
        let freqs = frequencies(t, p)?;
        let half = freqs.len();
        let t = t.cpu_read("timestep_embedding")?;
        let mut out = vec![0.0; t.len() * p.dim];
        out.par_chunks_mut(p.dim)
            .zip(t.par_iter())
            .for_each(|(row, &tb)| {
                let (first, second) = row[..2 * half].split_at_mut(half);
                for ((a, b), &f) in first.iter_mut().zip(second).zip(&freqs) {
                    let arg = p.scale * (tb * f);
                    let (sin, cos) = arg.sin_cos();
                    (*a, *b) = if p.flip_sin_to_cos {
                        (cos, sin)
                    } else {
                        (sin, cos)
                    };
                }
            });
        Ok(Tensor::from_cpu(&[t.len(), p.dim], out))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const TIMESTEP_EMBEDDING: Kernel = Kernel {
        shader: "embedding",
        source: concat!(
            include_str!("../../shaders/sin_cos.wgsl"),
            include_str!("../../shaders/embedding.wgsl")
        ),
        entry: "timestep_embedding",
        params: size_of::<Params>(),
        storage: &[R, R, W],
        constants: ELEMENTWISE_CONSTANTS,
    };
    pub(crate) const KERNELS: &[Kernel] = &[TIMESTEP_EMBEDDING];

    /// One thread per output element. The frequency table goes up as a small buffer (the
    /// GPU's `exp` is allowed an error of ulps that the argument would multiply by up to
    /// 1000); the argument is reduced to [-pi, pi] in three exact steps before `sin`/`cos`,
    /// whose accuracy drivers only promise there.
    pub fn timestep_embedding(g: &Gpu, t: &Tensor, p: &TimestepEmbeddingParams) -> Result<Tensor> {
        const OP: &str = "timestep_embedding";
        let freqs = frequencies(t, p)?;
        let half = freqs.len();
        let table = g.upload(&[half], &freqs)?;
        let batch = t.numel();
        let n = batch * p.dim;
        let out = g.alloc(OP, n)?;
        let params = Params {
            n: n as u32,
            dim: p.dim as u32,
            half: half as u32,
            flip: p.flip_sin_to_cos as u32,
            scale: p.scale,
        };
        let args = [
            Arg::read(t.gpu_buffer(OP)?),
            Arg::read(table.gpu_buffer(OP)?),
            Arg::write(&out),
        ];
        g.dispatch(&TIMESTEP_EMBEDDING, &params, &args, elementwise_grid(n))?;
        Ok(Tensor::from_gpu(&[batch, p.dim], out))
    }
}
