//! Classifier-free guidance (Ho & Salimans 2022, eq. 6): the guided prediction from one
//! batched evaluation of the conditional and the unconditional model,
//!
//!   y = eps_u + w (eps_c - eps_u),  computed as  y = (1 - w) eps_u + w eps_c,
//!
//! where `out [2B, ...]` holds `eps_c` in its first `B` images and `eps_u` in the last `B`.
//! The second form gives `eps_c` exactly at `w = 1` and `eps_u` exactly at `w = 0`.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The uniform block of `shaders/guidance.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    /// Elements of one half (of `y`).
    n: u32,
    w: f32,
}

/// Checks `out [2B, ...]` and `w`; returns the shape of one half.
fn check(op: &'static str, out: &Tensor, w: f32) -> Result<Vec<usize>> {
    let shape = out.shape();
    match shape.first() {
        Some(&n) if n > 0 && n % 2 == 0 => {}
        _ => {
            return Err(Error::shape(
                op,
                "[2B, ...]: the conditional then the unconditional predictions",
                shape,
            ))
        }
    }
    if !w.is_finite() {
        return Err(Error::invalid(
            op,
            format!("guidance scale {w} is not finite"),
        ));
    }
    let mut half = shape.to_vec();
    half[0] /= 2;
    Ok(half)
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    pub fn guidance(out: &Tensor, w: f32) -> Result<Tensor> {
        const OP: &str = "guidance";
        let half = check(OP, out, w)?;
        let x = out.cpu_read(OP)?;
        let (c, u) = x.split_at(x.len() / 2);
        let y = c
            .par_iter()
            .zip(u.par_iter())
            .map(|(&c, &u)| (1.0 - w) * u + w * c)
            .collect();
        Ok(Tensor::from_cpu(&half, y))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const GUIDANCE: Kernel = Kernel {
        shader: "guidance",
        source: include_str!("../../shaders/guidance.wgsl"),
        entry: "guidance",
        params: size_of::<Params>(),
        storage: &[R, W],
        constants: ELEMENTWISE_CONSTANTS,
    };
    pub(crate) const KERNELS: &[Kernel] = &[GUIDANCE];

    /// One invocation per element of `y`.
    pub fn guidance(g: &Gpu, out: &Tensor, w: f32) -> Result<Tensor> {
        const OP: &str = "guidance";
        let half = check(OP, out, w)?;
        let n = out.numel() / 2;
        u32::try_from(out.numel())
            .map_err(|_| Error::invalid(OP, format!("{} elements exceed 2^32", out.numel())))?;
        let y = g.alloc(OP, n)?;
        let p = Params { n: n as u32, w };
        let args = [Arg::read(out.gpu_buffer(OP)?), Arg::write(&y)];
        g.dispatch(&GUIDANCE, &p, &args, elementwise_grid(n))?;
        Ok(Tensor::from_gpu(&half, y))
    }
}
