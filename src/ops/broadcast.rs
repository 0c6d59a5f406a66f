//! Broadcast add of a per-(sample, channel) vector over H x W (the time-embedding injection of
//! a ResNet block), and its backward.
//!
//!   y[b, c, h, w] = x[b, c, h, w] + v[b, c]
//!   dx = dy,  dv[b, c] = sum_{h, w} dy[b, c, h, w]
//!
//! In memory `x` is `B * C` contiguous rows of `H * W` values and row `r = b * C + c` adds
//! `v[r]`, so the forward is `y_i = x_i + v[i / (H W)]` and the backward is a row sum.

use bytemuck::{Pod, Zeroable};

use super::check_rank;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    /// Elements of `x`.
    n: u32,
    /// `B * C`, the number of rows.
    rows: u32,
    /// `H * W`, the length of a row.
    row_len: u32,
}

/// Checks `x [B, C, H, W]` and `v [B, C]`; returns (rows, row length).
fn check_forward(op: &'static str, x: &Tensor, v: &Tensor) -> Result<(usize, usize)> {
    check_rank(op, "x", x, 4)?;
    let s = x.shape();
    if v.shape() != [s[0], s[1]] {
        return Err(Error::shape(
            op,
            format!("v of shape [{}, {}]", s[0], s[1]),
            v.shape(),
        ));
    }
    Ok((s[0] * s[1], s[2] * s[3]))
}

/// Checks `dy [B, C, H, W]`; returns (rows, row length).
fn check_backward(op: &'static str, dy: &Tensor) -> Result<(usize, usize)> {
    check_rank(op, "dy", dy, 4)?;
    let s = dy.shape();
    Ok((s[0] * s[1], s[2] * s[3]))
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// `y[r, s] = x[r, s] + v[r]`, rows in parallel.
    pub fn add_per_channel(x: &Tensor, v: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_per_channel";
        let (_, row_len) = check_forward(OP, x, v)?;
        let xs = x.cpu_read(OP)?;
        let vs = v.cpu_read(OP)?;
        let mut y = vec![0.0; xs.len()];
        if row_len > 0 {
            y.par_chunks_mut(row_len)
                .zip(xs.par_chunks(row_len))
                .zip(vs.par_iter())
                .for_each(|((yr, xr), &vr)| {
                    for (o, &i) in yr.iter_mut().zip(xr) {
                        *o = i + vr;
                    }
                });
        }
        Ok(Tensor::from_cpu(x.shape(), y))
    }

    /// `dv[r] = sum_s dy[r, s]`, each row summed in f64.
    pub fn add_per_channel_backward(dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_per_channel_backward";
        let (rows, row_len) = check_backward(OP, dy)?;
        let d = dy.cpu_read(OP)?;
        let dv: Vec<f32> = if row_len == 0 {
            vec![0.0; rows]
        } else {
            d.par_chunks(row_len)
                .map(|r| r.iter().map(|&g| g as f64).sum::<f64>() as f32)
                .collect()
        };
        let s = dy.shape();
        Ok(Tensor::from_cpu(&[s[0], s[1]], dv))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{grid, Access, Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const SOURCE: &str = include_str!("../../shaders/broadcast.wgsl");

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "broadcast",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: ELEMENTWISE_CONSTANTS,
        }
    }

    const ADD_PER_CHANNEL: Kernel = kernel("add_per_channel", &[R, R, W]);
    const ADD_PER_CHANNEL_BACKWARD: Kernel = kernel("add_per_channel_backward", &[R, W]);
    pub(crate) const KERNELS: &[Kernel] = &[ADD_PER_CHANNEL, ADD_PER_CHANNEL_BACKWARD];

    fn params(n: usize, rows: usize, row_len: usize) -> Params {
        Params {
            n: n as u32,
            rows: rows as u32,
            row_len: row_len as u32,
        }
    }

    /// One invocation per element of `y`.
    pub fn add_per_channel(g: &Gpu, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_per_channel";
        let (rows, row_len) = check_forward(OP, x, v)?;
        let n = x.numel();
        let y = g.alloc(OP, n)?;
        g.dispatch(
            &ADD_PER_CHANNEL,
            &params(n, rows, row_len),
            &[
                Arg::read(x.gpu_buffer(OP)?),
                Arg::read(v.gpu_buffer(OP)?),
                Arg::write(&y),
            ],
            elementwise_grid(n),
        )?;
        Ok(Tensor::from_gpu(x.shape(), y))
    }

    /// One workgroup per row `(b, c)`, a tree sum in workgroup memory.
    pub fn add_per_channel_backward(g: &Gpu, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_per_channel_backward";
        let (rows, row_len) = check_backward(OP, dy)?;
        let dv = g.alloc(OP, rows)?;
        g.dispatch(
            &ADD_PER_CHANNEL_BACKWARD,
            &params(dy.numel(), rows, row_len),
            &[Arg::read(dy.gpu_buffer(OP)?), Arg::write(&dv)],
            grid(rows as u32),
        )?;
        let s = dy.shape();
        Ok(Tensor::from_gpu(&[s[0], s[1]], dv))
    }
}
