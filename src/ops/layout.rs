//! Data movement on NCHW tensors: channel concat and split, nearest-neighbour upsampling by 2
//! and its backward, and the batched transpose.
//!
//!   concat:    y[b, c] = a[b, c] for c < Ca, b[b, c - Ca] otherwise   (torch.cat(dim=1))
//!   split:     the inverse of concat, and its backward
//!   upsample:  y[b, c, i, j] = x[b, c, i / 2, j / 2]
//!   backward:  dx[b, c, i, j] = sum_{di, dj in {0, 1}} dy[b, c, 2i + di, 2j + dj]
//!   transpose: y[b, n, m] = x[b, m, n]   (its own backward)

use bytemuck::{Pod, Zeroable};

use super::check_rank;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The uniform of every layout kernel; each names what its fields mean.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    /// Elements the kernel's invocations range over.
    n: u32,
    /// concat/split: `Ca * H * W`; upsample and its backward: input width; transpose: `M`.
    d0: u32,
    /// concat/split: `Cb * H * W`; transpose: `N`; unused by the upsampling kernels.
    d1: u32,
}

/// Checks `a [B, Ca, H, W]` and `b [B, Cb, H, W]`; returns the output shape.
fn concat_shape(a: &Tensor, b: &Tensor) -> Result<[usize; 4]> {
    const OP: &str = "concat_channels";
    check_rank(OP, "a", a, 4)?;
    check_rank(OP, "b", b, 4)?;
    let (sa, sb) = (a.shape(), b.shape());
    if sa[0] != sb[0] || sa[2..] != sb[2..] {
        return Err(Error::shape(
            OP,
            format!("b of shape [{}, _, {}, {}]", sa[0], sa[2], sa[3]),
            sb,
        ));
    }
    Ok([sa[0], sa[1] + sb[1], sa[2], sa[3]])
}

/// Checks `y [B, C, H, W]` and `ca <= C`; returns the two output shapes.
fn split_shapes(y: &Tensor, ca: usize) -> Result<([usize; 4], [usize; 4])> {
    const OP: &str = "split_channels";
    check_rank(OP, "y", y, 4)?;
    let s = y.shape();
    if ca > s[1] {
        return Err(Error::invalid(
            OP,
            format!(
                "cannot take the first {ca} channels of a tensor with {} channels",
                s[1]
            ),
        ));
    }
    Ok(([s[0], ca, s[2], s[3]], [s[0], s[1] - ca, s[2], s[3]]))
}

fn upsample_shape(x: &Tensor) -> Result<[usize; 4]> {
    check_rank("upsample_nearest2x", "x", x, 4)?;
    let s = x.shape();
    Ok([s[0], s[1], 2 * s[2], 2 * s[3]])
}

fn upsample_backward_shape(dy: &Tensor) -> Result<[usize; 4]> {
    const OP: &str = "upsample_nearest2x_backward";
    check_rank(OP, "dy", dy, 4)?;
    let s = dy.shape();
    if !s[2].is_multiple_of(2) || !s[3].is_multiple_of(2) {
        return Err(Error::shape(OP, "dy with even height and width", s));
    }
    Ok([s[0], s[1], s[2] / 2, s[3] / 2])
}

fn transpose_shape(x: &Tensor) -> Result<[usize; 3]> {
    check_rank("transpose", "x", x, 3)?;
    let s = x.shape();
    Ok([s[0], s[2], s[1]])
}

pub(crate) mod cpu {
    use std::mem::MaybeUninit;

    use rayon::prelude::*;

    use super::*;

    /// Per sample: `a`'s `Ca H W` values, then `b`'s `Cb H W` values.
    pub fn concat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "concat_channels";
        let shape = concat_shape(a, b)?;
        let (xa, xb) = (a.cpu_read(OP)?, b.cpu_read(OP)?);
        let (la, lb) = (xa.len() / shape[0].max(1), xb.len() / shape[0].max(1));
        let len = xa.len() + xb.len();
        // Not zero-filled: each sample's chunk is written whole.
        let mut y: Vec<f32> = Vec::with_capacity(len);
        if la + lb > 0 {
            let copy = |dst: &mut [MaybeUninit<f32>], src: &[f32]| {
                dst.iter_mut().zip(src).for_each(|(d, &v)| {
                    d.write(v);
                })
            };
            y.spare_capacity_mut()[..len]
                .par_chunks_mut(la + lb)
                .enumerate()
                .for_each(|(n, ys)| {
                    let (ya, yb) = ys.split_at_mut(la);
                    copy(ya, &xa[n * la..(n + 1) * la]);
                    copy(yb, &xb[n * lb..(n + 1) * lb]);
                });
        }
        // SAFETY: the chunks cover `0..len` (none when `la + lb == 0`, and then `len == 0`),
        // each written whole.
        unsafe { y.set_len(len) };
        Ok(Tensor::from_cpu(&shape, y))
    }

    /// Per sample: the first `ca H W` values to `a`, the rest to `b`.
    pub fn split_channels(y: &Tensor, ca: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "split_channels";
        let (shape_a, shape_b) = split_shapes(y, ca)?;
        let ys = y.cpu_read(OP)?;
        let la: usize = shape_a[1..].iter().product();
        let lb: usize = shape_b[1..].iter().product();
        let mut a = Vec::with_capacity(la * shape_a[0]);
        let mut b = Vec::with_capacity(lb * shape_b[0]);
        if la + lb > 0 {
            for sample in ys.chunks(la + lb) {
                a.extend_from_slice(&sample[..la]);
                b.extend_from_slice(&sample[la..]);
            }
        }
        Ok((Tensor::from_cpu(&shape_a, a), Tensor::from_cpu(&shape_b, b)))
    }

    /// Each output row `i` of a plane repeats input row `i / 2` with every value doubled.
    pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
        let shape = upsample_shape(x)?;
        let xs = x.cpu_read("upsample_nearest2x")?;
        let (w_in, w_out) = (shape[3] / 2, shape[3]);
        let mut y = vec![0.0; xs.len() * 4];
        if w_out > 0 {
            y.par_chunks_mut(w_out).enumerate().for_each(|(row, yr)| {
                let xr = &xs[(row / 2) * w_in..(row / 2 + 1) * w_in];
                for (j, o) in yr.iter_mut().enumerate() {
                    *o = xr[j / 2];
                }
            });
        }
        Ok(Tensor::from_cpu(&shape, y))
    }

    /// `dx[r, j] = dy[2r, 2j] + dy[2r, 2j+1] + dy[2r+1, 2j] + dy[2r+1, 2j+1]` over the
    /// `B C H` input rows `r`.
    pub fn upsample_nearest2x_backward(dy: &Tensor) -> Result<Tensor> {
        let shape = upsample_backward_shape(dy)?;
        let d = dy.cpu_read("upsample_nearest2x_backward")?;
        let (w_in, w_out) = (shape[3], 2 * shape[3]);
        let mut dx = vec![0.0; d.len() / 4];
        if w_in > 0 {
            dx.par_chunks_mut(w_in).enumerate().for_each(|(r, dxr)| {
                let top = &d[2 * r * w_out..(2 * r + 1) * w_out];
                let bottom = &d[(2 * r + 1) * w_out..(2 * r + 2) * w_out];
                for (j, o) in dxr.iter_mut().enumerate() {
                    *o = (top[2 * j] + top[2 * j + 1]) + (bottom[2 * j] + bottom[2 * j + 1]);
                }
            });
        }
        Ok(Tensor::from_cpu(&shape, dx))
    }

    /// Side of the square blocks the CPU transpose walks, so that both the rows read and the
    /// rows written stay in cache.
    const BLOCK: usize = 32;

    /// `y[b, n, m] = x[b, m, n]`: per sample, tasks of BLOCK output rows, each walked in
    /// BLOCK x BLOCK blocks.
    pub fn transpose(x: &Tensor) -> Result<Tensor> {
        let shape = transpose_shape(x)?;
        let xs = x.cpu_read("transpose")?;
        let (n_dim, m_dim) = (shape[1], shape[2]);
        let mut y = vec![0.0; xs.len()];
        if n_dim * m_dim > 0 {
            y.par_chunks_mut(m_dim * n_dim)
                .zip(xs.par_chunks(m_dim * n_dim))
                .for_each(|(ys, xb)| {
                    ys.par_chunks_mut(m_dim * BLOCK)
                        .enumerate()
                        .for_each(|(task, y_rows)| {
                            let n0 = task * BLOCK;
                            for m0 in (0..m_dim).step_by(BLOCK) {
                                for (dn, yr) in y_rows.chunks_mut(m_dim).enumerate() {
                                    for m in m0..(m0 + BLOCK).min(m_dim) {
                                        yr[m] = xb[m * n_dim + n0 + dn];
                                    }
                                }
                            }
                        });
                });
        }
        Ok(Tensor::from_cpu(&shape, y))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Access, Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_WG};

    const SOURCE: &str = include_str!("../../shaders/layout.wgsl");

    /// Transpose tile: TILE x TILE values moved by a TILE x ROWS workgroup.
    const TILE: usize = 32;
    const ROWS: usize = 8;
    const CONSTANTS: &[(&str, f64)] = &[
        ("WG", ELEMENTWISE_WG as f64),
        ("TILE", TILE as f64),
        ("ROWS", ROWS as f64),
    ];

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "layout",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: CONSTANTS,
        }
    }

    const CONCAT_CHANNELS: Kernel = kernel("concat_channels", &[R, R, W]);
    const SPLIT_CHANNELS: Kernel = kernel("split_channels", &[R, W, W]);
    const UPSAMPLE: Kernel = kernel("upsample_nearest2x", &[R, W]);
    const UPSAMPLE_BACKWARD: Kernel = kernel("upsample_nearest2x_backward", &[R, W]);
    const TRANSPOSE: Kernel = kernel("transpose", &[R, W]);
    pub(crate) const KERNELS: &[Kernel] = &[
        CONCAT_CHANNELS,
        SPLIT_CHANNELS,
        UPSAMPLE,
        UPSAMPLE_BACKWARD,
        TRANSPOSE,
    ];

    fn params(n: usize, d0: usize, d1: usize) -> Params {
        Params {
            n: n as u32,
            d0: d0 as u32,
            d1: d1 as u32,
        }
    }

    /// One invocation per output element.
    pub fn concat_channels(g: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "concat_channels";
        let shape = concat_shape(a, b)?;
        let n = a.numel() + b.numel();
        let batch = shape[0].max(1);
        let y = g.alloc(OP, n)?;
        g.dispatch(
            &CONCAT_CHANNELS,
            &params(n, a.numel() / batch, b.numel() / batch),
            &[
                Arg::read(a.gpu_buffer(OP)?),
                Arg::read(b.gpu_buffer(OP)?),
                Arg::write(&y),
            ],
            elementwise_grid(n),
        )?;
        Ok(Tensor::from_gpu(&shape, y))
    }

    /// One invocation per input element, writing it to `a` or to `b`.
    pub fn split_channels(g: &Gpu, y: &Tensor, ca: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "split_channels";
        let (shape_a, shape_b) = split_shapes(y, ca)?;
        let n = y.numel();
        let la: usize = shape_a[1..].iter().product();
        let lb: usize = shape_b[1..].iter().product();
        let a = g.alloc(OP, la * shape_a[0])?;
        let b = g.alloc(OP, lb * shape_b[0])?;
        g.dispatch(
            &SPLIT_CHANNELS,
            &params(n, la, lb),
            &[Arg::read(y.gpu_buffer(OP)?), Arg::write(&a), Arg::write(&b)],
            elementwise_grid(n),
        )?;
        Ok((Tensor::from_gpu(&shape_a, a), Tensor::from_gpu(&shape_b, b)))
    }

    /// One invocation per output element.
    pub fn upsample_nearest2x(g: &Gpu, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "upsample_nearest2x";
        let shape = upsample_shape(x)?;
        let n = x.numel() * 4;
        let y = g.alloc(OP, n)?;
        g.dispatch(
            &UPSAMPLE,
            &params(n, shape[3] / 2, 0),
            &[Arg::read(x.gpu_buffer(OP)?), Arg::write(&y)],
            elementwise_grid(n),
        )?;
        Ok(Tensor::from_gpu(&shape, y))
    }

    /// One invocation per input-gradient element, summing its 2x2 block.
    pub fn upsample_nearest2x_backward(g: &Gpu, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "upsample_nearest2x_backward";
        let shape = upsample_backward_shape(dy)?;
        let n = dy.numel() / 4;
        let dx = g.alloc(OP, n)?;
        g.dispatch(
            &UPSAMPLE_BACKWARD,
            &params(n, shape[3], 0),
            &[Arg::read(dy.gpu_buffer(OP)?), Arg::write(&dx)],
            elementwise_grid(n),
        )?;
        Ok(Tensor::from_gpu(&shape, dx))
    }

    /// One workgroup per TILE x TILE tile of one sample: grid (N / TILE, M / TILE, B).
    pub fn transpose(g: &Gpu, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "transpose";
        let shape = transpose_shape(x)?;
        let (batch, m, n) = (shape[0], shape[2], shape[1]);
        let xb = x.gpu_buffer(OP)?;
        let y = g.alloc(OP, x.numel())?;
        if x.numel() == 0 {
            return Ok(Tensor::from_gpu(&shape, y));
        }
        let workgroups = [
            n.div_ceil(TILE).max(1) as u32,
            m.div_ceil(TILE).max(1) as u32,
            batch.max(1) as u32,
        ];
        g.dispatch(
            &TRANSPOSE,
            &params(x.numel(), m, n),
            &[Arg::read(xb), Arg::write(&y)],
            workgroups,
        )?;
        Ok(Tensor::from_gpu(&shape, y))
    }
}
