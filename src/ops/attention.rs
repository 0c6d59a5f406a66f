//! Multi-head scaled dot-product self-attention.
//!
//! `q, k, v [B, L, C]` with `C = heads * d`; head `h` owns columns `h d .. (h + 1) d`. Per
//! (batch, head), with `Q, K, V [L, d]` that head's columns:
//!   S = Q K^T / sqrt(d),   lse_i = log sum_m exp(S_im),   P = exp(S - lse),   O = P V.
//! Backward, for `dO`:
//!   dV = P^T dO,   dP = dO V^T,   D_i = sum_j dO_ij O_ij,   dS = P * (dP - D),
//!   dQ = dS K / sqrt(d),   dK = dS^T Q / sqrt(d).
//! The softmax is rebuilt from the saved `lse`, never stored.

use bytemuck::{Pod, Zeroable};

use super::check_rank;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The output `[B, L, C]` and the row log-sum-exp of the scaled scores `[B, heads, L]`
/// that the backward uses to rebuild the softmax.
pub struct AttentionOutput {
    pub out: Tensor,
    pub lse: Tensor,
}

pub struct AttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Sizes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    len: usize,
    channels: usize,
    heads: usize,
    /// Head width `d = C / heads`.
    head_dim: usize,
}

impl Dims {
    /// `1 / sqrt(d)`.
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

fn check_forward(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Dims> {
    check_rank(op, "q [B, L, C]", q, 3)?;
    for (name, t) in [("k", k), ("v", v)] {
        if t.shape() != q.shape() {
            return Err(Error::shape(
                op,
                format!("{name} of the shape of q {:?}", q.shape()),
                t.shape(),
            ));
        }
    }
    let (batch, len, channels) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    if heads == 0 || channels == 0 || channels % heads != 0 {
        return Err(Error::invalid(
            op,
            format!("{heads} heads do not divide C = {channels} into heads of width d >= 1"),
        ));
    }
    Ok(Dims {
        batch,
        len,
        channels,
        heads,
        head_dim: channels / heads,
    })
}

fn check_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    saved: &AttentionOutput,
    d_out: &Tensor,
    heads: usize,
) -> Result<Dims> {
    let op = "attention_backward";
    let dims = check_forward(op, q, k, v, heads)?;
    for (name, t) in [("saved out", &saved.out), ("d_out", d_out)] {
        if t.shape() != q.shape() {
            return Err(Error::shape(
                op,
                format!("{name} of the shape of q {:?}", q.shape()),
                t.shape(),
            ));
        }
    }
    let lse_shape = [dims.batch, heads, dims.len];
    if saved.lse.shape() != lse_shape {
        return Err(Error::shape(
            op,
            format!("saved lse {lse_shape:?}"),
            saved.lse.shape(),
        ));
    }
    Ok(dims)
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;
    use crate::ops::linear::cpu::matmul;
    use crate::ops::linear::{row_major, transposed, Strided};

    /// One head's `[L, d]` columns inside a `[L, C]` batch slice: row stride C.
    fn head_cols(dims: &Dims) -> Strided {
        Strided {
            rs: dims.channels,
            cs: 1,
        }
    }

    /// `K^T [d, L]` of one head, read in place.
    fn head_cols_t(dims: &Dims) -> Strided {
        Strided {
            rs: 1,
            cs: dims.channels,
        }
    }

    /// The `(b, head)` slice of a `[B, L, C]` tensor, starting at element (0, head d).
    fn head_slice<'a>(data: &'a [f32], dims: &Dims, bh: usize) -> &'a [f32] {
        let (b, h) = (bh / dims.heads, bh % dims.heads);
        let start = b * dims.len * dims.channels + h * dims.head_dim;
        &data[start..(b + 1) * dims.len * dims.channels]
    }

    /// gemm threads per task: the tasks already fill the pool when there are enough of them.
    fn threads_per_task(tasks: usize) -> usize {
        let threads = rayon::current_num_threads();
        if tasks >= threads {
            1
        } else {
            threads
        }
    }

    /// `S = Q K^T / sqrt(d)` `[L, L]` of one (batch, head).
    fn scores(q: &[f32], k: &[f32], dims: &Dims, threads: usize) -> Vec<f32> {
        let l = dims.len;
        let mut s = vec![0.0; l * l];
        matmul(
            (l, dims.head_dim, l),
            q,
            head_cols(dims),
            k,
            head_cols_t(dims),
            &mut s,
            l,
            false,
            threads,
        );
        let scale = dims.scale();
        s.iter_mut().for_each(|v| *v *= scale);
        s
    }

    /// Writes the `[L, d]` blocks of every (batch, head), in `bh` order, into a `[B, L, C]`.
    fn gather_heads<'a>(blocks: impl IntoIterator<Item = &'a [f32]>, dims: &Dims) -> Vec<f32> {
        let (l, c, d) = (dims.len, dims.channels, dims.head_dim);
        let mut out = vec![0.0; dims.batch * l * c];
        for (bh, block) in blocks.into_iter().enumerate() {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            for (i, row) in block.chunks_exact(d.max(1)).enumerate() {
                let at = (b * l + i) * c + h * d;
                out[at..at + d].copy_from_slice(row);
            }
        }
        out
    }

    /// Per (batch, head), in parallel: S, then a row softmax made stable by subtracting the
    /// row max (`lse_i = max_i + log sum_m exp(S_im - max_i)`), then `O = P V`.
    pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<AttentionOutput> {
        let op = "attention";
        let dims = check_forward(op, q, k, v, heads)?;
        let (qd, kd, vd) = (q.cpu_read(op)?, k.cpu_read(op)?, v.cpu_read(op)?);
        let (l, d) = (dims.len, dims.head_dim);
        let tasks = dims.batch * heads;
        let threads = threads_per_task(tasks);
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..tasks)
            .into_par_iter()
            .map(|bh| {
                let mut p = scores(
                    head_slice(&qd, &dims, bh),
                    head_slice(&kd, &dims, bh),
                    &dims,
                    threads,
                );
                let mut lse = Vec::with_capacity(l);
                for row in p.chunks_exact_mut(l.max(1)) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    row.iter_mut().for_each(|s| *s /= sum);
                    lse.push(max + sum.ln());
                }
                let mut o = vec![0.0; l * d];
                let vh = head_slice(&vd, &dims, bh);
                matmul(
                    (l, l, d),
                    &p,
                    row_major(l),
                    vh,
                    head_cols(&dims),
                    &mut o,
                    d,
                    false,
                    threads,
                );
                (o, lse)
            })
            .collect();
        let (o_blocks, lse_blocks): (Vec<_>, Vec<_>) = per_head.into_iter().unzip();
        Ok(AttentionOutput {
            out: Tensor::from_cpu(
                q.shape(),
                gather_heads(o_blocks.iter().map(Vec::as_slice), &dims),
            ),
            lse: Tensor::from_cpu(&[dims.batch, heads, l], lse_blocks.concat()),
        })
    }

    /// Per (batch, head), in parallel: `P = exp(S - lse)` rebuilt from the saved lse, then
    /// dV, dP, D, dS, dQ and dK as in the module doc.
    pub fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        saved: &AttentionOutput,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<AttentionGrads> {
        let op = "attention_backward";
        let dims = check_backward(q, k, v, saved, d_out, heads)?;
        let (qd, kd, vd) = (q.cpu_read(op)?, k.cpu_read(op)?, v.cpu_read(op)?);
        let (od, lsed, dod) = (
            saved.out.cpu_read(op)?,
            saved.lse.cpu_read(op)?,
            d_out.cpu_read(op)?,
        );
        let (l, d) = (dims.len, dims.head_dim);
        let tasks = dims.batch * heads;
        let threads = threads_per_task(tasks);
        let scale = dims.scale();
        let per_head: Vec<[Vec<f32>; 3]> = (0..tasks)
            .into_par_iter()
            .map(|bh| {
                let (qh, kh, vh) = (
                    head_slice(&qd, &dims, bh),
                    head_slice(&kd, &dims, bh),
                    head_slice(&vd, &dims, bh),
                );
                let (oh, doh) = (head_slice(&od, &dims, bh), head_slice(&dod, &dims, bh));
                let lse = &lsed[bh * l..(bh + 1) * l];
                let mut p = scores(qh, kh, &dims, threads);
                for (row, &lse_i) in p.chunks_exact_mut(l.max(1)).zip(lse) {
                    row.iter_mut().for_each(|s| *s = (*s - lse_i).exp());
                }
                let mut dv = vec![0.0; l * d];
                matmul(
                    (l, l, d),
                    &p,
                    transposed(l),
                    doh,
                    head_cols(&dims),
                    &mut dv,
                    d,
                    false,
                    threads,
                );
                let mut ds = vec![0.0; l * l];
                matmul(
                    (l, d, l),
                    doh,
                    head_cols(&dims),
                    vh,
                    head_cols_t(&dims),
                    &mut ds,
                    l,
                    false,
                    threads,
                );
                for (i, (ds_row, p_row)) in ds
                    .chunks_exact_mut(l.max(1))
                    .zip(p.chunks_exact(l.max(1)))
                    .enumerate()
                {
                    let row = i * dims.channels..i * dims.channels + d;
                    let delta: f32 = doh[row.clone()]
                        .iter()
                        .zip(&oh[row])
                        .map(|(a, b)| a * b)
                        .sum();
                    // dS / sqrt(d): the scale of both dQ and dK, applied once here.
                    for (ds, &p) in ds_row.iter_mut().zip(p_row) {
                        *ds = p * (*ds - delta) * scale;
                    }
                }
                let mut dq = vec![0.0; l * d];
                matmul(
                    (l, l, d),
                    &ds,
                    row_major(l),
                    kh,
                    head_cols(&dims),
                    &mut dq,
                    d,
                    false,
                    threads,
                );
                let mut dk = vec![0.0; l * d];
                matmul(
                    (l, l, d),
                    &ds,
                    transposed(l),
                    qh,
                    head_cols(&dims),
                    &mut dk,
                    d,
                    false,
                    threads,
                );
                [dq, dk, dv]
            })
            .collect();
        let part = |i: usize| gather_heads(per_head.iter().map(|g| g[i].as_slice()), &dims);
        Ok(AttentionGrads {
            dq: Tensor::from_cpu(q.shape(), part(0)),
            dk: Tensor::from_cpu(q.shape(), part(1)),
            dv: Tensor::from_cpu(q.shape(), part(2)),
        })
    }
}

/// Uniform parameters of `shaders/attention.wgsl` (layout must match its `Params`).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len: u32,
    channels: u32,
    heads: u32,
    head_dim: u32,
    scale: f32,
    /// `B * heads * L`.
    rows: u32,
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Access, Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_WG};

    const SOURCE: &str = include_str!("../../shaders/attention.wgsl");

    /// Rows (queries in the forward and dQ, keys in dK/dV) per workgroup: `BR` in the shader.
    const BLOCK_ROWS: usize = 16;
    /// Widest head the kernels take: 16 invocations per row, 16 output columns each.
    pub const MAX_HEAD_DIM: usize = 256;
    const CONSTANTS: &[(&str, f64)] = &[("BR", BLOCK_ROWS as f64), ("WG", ELEMENTWISE_WG as f64)];

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "attention",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: CONSTANTS,
        }
    }

    const FORWARD: Kernel = kernel("attention_fwd", &[R, R, R, W, W]);
    const BACKWARD_DELTA: Kernel = kernel("attention_bwd_delta", &[R, R, W]);
    const BACKWARD_DQ: Kernel = kernel("attention_bwd_dq", &[R, R, R, R, R, R, W]);
    const BACKWARD_DKV: Kernel = kernel("attention_bwd_dkv", &[R, R, R, R, R, R, W, W]);
    pub(crate) const KERNELS: &[Kernel] = &[FORWARD, BACKWARD_DELTA, BACKWARD_DQ, BACKWARD_DKV];

    /// GPU-only limits: the head width, the grid, and u32 indices.
    fn check_gpu(op: &'static str, g: &Gpu, dims: &Dims) -> Result<(Params, [u32; 3])> {
        if dims.head_dim > MAX_HEAD_DIM {
            return Err(Error::invalid(
                op,
                format!(
                    "head width d = C / heads = {} exceeds the GPU kernel's limit of {MAX_HEAD_DIM}; \
                     use more heads",
                    dims.head_dim
                ),
            ));
        }
        let numel = dims.batch * dims.len * dims.channels;
        if u32::try_from(numel).is_err() {
            return Err(Error::invalid(op, format!("{numel} elements exceed 2^32")));
        }
        let grid = [
            dims.len.div_ceil(BLOCK_ROWS).max(1),
            dims.batch * dims.heads,
            1,
        ];
        let max = g.limits().max_compute_workgroups_per_dimension as usize;
        if grid[0] > max || grid[1] > max {
            return Err(Error::invalid(
                op,
                format!("{grid:?} workgroups exceed the adapter's limit of {max} per dimension"),
            ));
        }
        let params = Params {
            len: dims.len as u32,
            channels: dims.channels as u32,
            heads: dims.heads as u32,
            head_dim: dims.head_dim as u32,
            scale: dims.scale(),
            rows: (dims.batch * dims.heads * dims.len) as u32,
        };
        Ok((params, [grid[0] as u32, grid[1].max(1) as u32, 1]))
    }

    /// One fused pass: scores, online softmax and `P V` per block of 16 query rows.
    pub fn forward(
        g: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> Result<AttentionOutput> {
        let op = "attention";
        let dims = check_forward(op, q, k, v, heads)?;
        let (p, grid) = check_gpu(op, g, &dims)?;
        let (qb, kb, vb) = (q.gpu_buffer(op)?, k.gpu_buffer(op)?, v.gpu_buffer(op)?);
        let out = g.alloc(op, q.numel())?;
        let lse = g.alloc(op, dims.batch * heads * dims.len)?;
        let result = AttentionOutput {
            out: Tensor::from_gpu(q.shape(), out.clone()),
            lse: Tensor::from_gpu(&[dims.batch, heads, dims.len], lse.clone()),
        };
        if dims.batch == 0 || dims.len == 0 {
            return Ok(result);
        }
        let args = [
            Arg::read(qb),
            Arg::read(kb),
            Arg::read(vb),
            Arg::write(&out),
            Arg::write(&lse),
        ];
        g.dispatch(&FORWARD, &p, &args, grid)?;
        Ok(result)
    }

    /// Three passes: `D = rowsum(dO * O)`; dQ per block of query rows; dK and dV per block
    /// of key rows. Each rebuilds `P` from the saved lse.
    pub fn backward(
        g: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        saved: &AttentionOutput,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<AttentionGrads> {
        let op = "attention_backward";
        let dims = check_backward(q, k, v, saved, d_out, heads)?;
        let (p, grid) = check_gpu(op, g, &dims)?;
        let (qb, kb, vb) = (q.gpu_buffer(op)?, k.gpu_buffer(op)?, v.gpu_buffer(op)?);
        let (ob, lseb, dob) = (
            saved.out.gpu_buffer(op)?,
            saved.lse.gpu_buffer(op)?,
            d_out.gpu_buffer(op)?,
        );
        if dims.batch == 0 || dims.len == 0 {
            let empty = || -> Result<Tensor> { Ok(Tensor::from_gpu(q.shape(), g.alloc(op, 0)?)) };
            return Ok(AttentionGrads {
                dq: empty()?,
                dk: empty()?,
                dv: empty()?,
            });
        }
        let rows = dims.batch * heads * dims.len;
        let delta = g.alloc(op, rows)?;
        let args = [Arg::read(ob), Arg::read(dob), Arg::write(&delta)];
        g.dispatch(&BACKWARD_DELTA, &p, &args, elementwise_grid(rows))?;
        let dq = g.alloc(op, q.numel())?;
        let args = [
            Arg::read(qb),
            Arg::read(kb),
            Arg::read(dob),
            Arg::read(vb),
            Arg::read(lseb),
            Arg::read(&delta),
            Arg::write(&dq),
        ];
        g.dispatch(&BACKWARD_DQ, &p, &args, grid)?;
        let dk = g.alloc(op, q.numel())?;
        let dv = g.alloc(op, q.numel())?;
        let args = [
            Arg::read(kb),
            Arg::read(qb),
            Arg::read(vb),
            Arg::read(dob),
            Arg::read(lseb),
            Arg::read(&delta),
            Arg::write(&dk),
            Arg::write(&dv),
        ];
        g.dispatch(&BACKWARD_DKV, &p, &args, grid)?;
        Ok(AttentionGrads {
            dq: Tensor::from_gpu(q.shape(), dq),
            dk: Tensor::from_gpu(q.shape(), dk),
            dv: Tensor::from_gpu(q.shape(), dv),
        })
    }
}
