//! Multi-head scaled dot-product self-attention over packed projections.
//!
//! `qkv [B, L, 3C]` holds each token's query, key and value side by side, the output of one
//! matrix product: row = q (C values) | k (C) | v (C), with `C = heads * d`; head `h` owns
//! columns `h d .. (h + 1) d` of each of the three. Per (batch, head), with `Q, K, V [L, d]`
//! that head's columns:
//!   S = Q K^T / sqrt(d),   lse_i = log sum_m exp(S_im),   P = exp(S - lse),   O = P V,
//! and `out [B, L, C]` holds the heads' `O` side by side. Backward, for `dO [B, L, C]`:
//!   dV = P^T dO,   dP = dO V^T,   D_i = sum_j dO_ij O_ij,   dS = P * (dP - D),
//!   dQ = dS K / sqrt(d),   dK = dS^T Q / sqrt(d),
//! returned packed as qkv is, `d_qkv = dQ | dK | dV [B, L, 3C]`, so that the backward of the
//! product that made qkv takes it whole. The softmax is rebuilt from the saved `lse`, never
//! stored.

use bytemuck::{Pod, Zeroable};

use super::{check_rank, expf};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The output `[B, L, C]` and the row log-sum-exp of the scaled scores `[B, heads, L]`
/// that the backward uses to rebuild the softmax.
pub struct AttentionOutput {
    pub out: Tensor,
    pub lse: Tensor,
}

/// Sizes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    len: usize,
    /// `C`: the width of each of q, k and v, and of the output.
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

    /// `[B, L, C]`: the output, its gradient and each of q, k, v.
    fn out_shape(&self) -> [usize; 3] {
        [self.batch, self.len, self.channels]
    }

    /// `[B, heads, L]`.
    fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.heads, self.len]
    }
}

fn check_forward(op: &'static str, qkv: &Tensor, heads: usize) -> Result<Dims> {
    check_rank(op, "qkv [B, L, 3C]", qkv, 3)?;
    let (batch, len, width) = (qkv.shape()[0], qkv.shape()[1], qkv.shape()[2]);
    if heads == 0 || width == 0 || width % (3 * heads) != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "qkv of width {width} is not q | k | v of {heads} heads of width d >= 1 \
                 (a width of 3 heads d)"
            ),
        ));
    }
    let channels = width / 3;
    Ok(Dims {
        batch,
        len,
        channels,
        heads,
        head_dim: channels / heads,
    })
}

fn check_backward(
    qkv: &Tensor,
    saved: &AttentionOutput,
    d_out: &Tensor,
    heads: usize,
) -> Result<Dims> {
    let op = "attention_backward";
    let dims = check_forward(op, qkv, heads)?;
    let out_shape = dims.out_shape();
    for (name, t) in [("saved out", &saved.out), ("d_out", d_out)] {
        if t.shape() != out_shape {
            return Err(Error::shape(
                op,
                format!("{name} [B, L, C] = {out_shape:?}"),
                t.shape(),
            ));
        }
    }
    let lse_shape = dims.lse_shape();
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
    use crate::ops::simd::{copy_row, max, simd, sum, Kernel};

    /// Where the values of one `[B, L, C]` operand lie: in rows of `width` values, from column
    /// `col` (head `h` then from `col + h d`).
    #[derive(Clone, Copy)]
    struct Cols {
        width: usize,
        col: usize,
    }

    /// The column blocks of q, k and v in qkv (and of dQ, dK and dV in d_qkv).
    const Q: usize = 0;
    const K: usize = 1;
    const V: usize = 2;

    /// Block `part` of a packed `[B, L, 3C]` tensor: rows of 3C values, from column `part C`.
    fn packed(dims: &Dims, part: usize) -> Cols {
        Cols {
            width: 3 * dims.channels,
            col: part * dims.channels,
        }
    }

    /// O and dO `[B, L, C]`.
    fn unpacked(dims: &Dims) -> Cols {
        Cols {
            width: dims.channels,
            col: 0,
        }
    }

    /// One head's `[L, d]` rows, read in place.
    fn head_rows(c: Cols) -> Strided {
        Strided { rs: c.width, cs: 1 }
    }

    /// The transpose `[d, L]` of one head's rows, read in place.
    fn head_rows_t(c: Cols) -> Strided {
        Strided { rs: 1, cs: c.width }
    }

    /// The `(b, head)` slice of an operand at `c`: from its element (0, 0) to the end of batch
    /// `b`. Needs `L >= 1`.
    fn head_slice<'a>(data: &'a [f32], dims: &Dims, bh: usize, c: Cols) -> &'a [f32] {
        let (b, h) = (bh / dims.heads, bh % dims.heads);
        let batch = dims.len * c.width;
        &data[b * batch + c.col + h * dims.head_dim..(b + 1) * batch]
    }

    /// This `(b, head)`'s q, k and v, read in place from qkv.
    fn qkv_heads<'a>(qkv: &'a [f32], dims: &Dims, bh: usize) -> [&'a [f32]; 3] {
        [Q, K, V].map(|part| head_slice(qkv, dims, bh, packed(dims, part)))
    }

    /// (batch, head) pairs to compute: none without rows, which also leaves no head to slice.
    fn tasks(dims: &Dims) -> usize {
        if dims.len == 0 {
            0
        } else {
            dims.batch * dims.heads
        }
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

    /// `X Y^T [L, L]` of one (batch, head), for head slices `x` at `xc` and `y` at `yc`.
    fn product_t(
        (x, xc): (&[f32], Cols),
        (y, yc): (&[f32], Cols),
        dims: &Dims,
        threads: usize,
    ) -> Vec<f32> {
        let l = dims.len;
        let mut s = vec![0.0; l * l];
        matmul(
            (l, dims.head_dim, l),
            x,
            head_rows(xc),
            y,
            head_rows_t(yc),
            &mut s,
            l,
            false,
            threads,
        );
        s
    }

    /// `S = Q K^T / sqrt(d)` `[L, L]` of one (batch, head).
    fn scores(q: &[f32], k: &[f32], dims: &Dims, threads: usize) -> Vec<f32> {
        let mut s = product_t((q, packed(dims, Q)), (k, packed(dims, K)), dims, threads);
        let scale = dims.scale();
        s.iter_mut().for_each(|v| *v *= scale);
        s
    }

    /// The row softmax of scores `s [L, L]` in place, made stable by subtracting the row max;
    /// each row's `lse_i = max_i + log sum_m exp(S_im - max_i)`. The max, the exponentials
    /// and the sum are three passes, so that each runs in SIMD lanes.
    struct Softmax<'a> {
        s: &'a mut [f32],
        len: usize,
    }

    impl Kernel for Softmax<'_> {
        /// `lse [L]`.
        type Output = Vec<f32>;
        const AVX512: bool = true;

        #[inline(always)]
        fn run(self) -> Vec<f32> {
            let mut lse = Vec::with_capacity(self.len);
            for row in self.s.chunks_exact_mut(self.len) {
                let max = max(row);
                row.iter_mut().for_each(|s| *s = expf::exp(*s - max));
                let sum = sum(row);
                row.iter_mut().for_each(|s| *s /= sum);
                lse.push(max + sum.ln());
            }
            lse
        }
    }

    /// `P = exp(S - lse)` in place: the softmax rebuilt from the saved `lse [L]`.
    struct SoftmaxAgain<'a> {
        s: &'a mut [f32],
        lse: &'a [f32],
    }

    impl Kernel for SoftmaxAgain<'_> {
        type Output = ();
        const AVX512: bool = true;

        #[inline(always)]
        fn run(self) {
            let len = self.lse.len();
            for (row, &lse_i) in self.s.chunks_exact_mut(len).zip(self.lse) {
                row.iter_mut().for_each(|s| *s = expf::exp(*s - lse_i));
            }
        }
    }

    /// Writes the `[L, d]` block of every (batch, head), in `bh` order, to its place at `c`
    /// in `dst`.
    fn scatter_heads<'a>(
        dst: &mut [f32],
        blocks: impl IntoIterator<Item = &'a [f32]>,
        dims: &Dims,
        c: Cols,
    ) {
        let (l, d) = (dims.len, dims.head_dim);
        for (bh, block) in blocks.into_iter().enumerate() {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            for (i, row) in block.chunks_exact(d).enumerate() {
                let at = (b * l + i) * c.width + c.col + h * d;
                copy_row(&mut dst[at..at + d], row);
            }
        }
    }

    /// Per (batch, head), in parallel: S, then its row [`Softmax`], then `O = P V`.
    pub fn forward(qkv: &Tensor, heads: usize) -> Result<AttentionOutput> {
        let op = "attention";
        let dims = check_forward(op, qkv, heads)?;
        let data = qkv.cpu_read(op)?;
        let (l, d) = (dims.len, dims.head_dim);
        let tasks = tasks(&dims);
        let threads = threads_per_task(tasks);
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..tasks)
            .into_par_iter()
            .map(|bh| {
                let [q, k, v] = qkv_heads(&data, &dims, bh);
                let mut p = scores(q, k, &dims, threads);
                let lse = simd(Softmax { s: &mut p, len: l });
                let mut o = vec![0.0; l * d];
                matmul(
                    (l, l, d),
                    &p,
                    row_major(l),
                    v,
                    head_rows(packed(&dims, V)),
                    &mut o,
                    d,
                    false,
                    threads,
                );
                (o, lse)
            })
            .collect();
        let (o_blocks, lse_blocks): (Vec<_>, Vec<_>) = per_head.into_iter().unzip();
        let out_shape = dims.out_shape();
        let mut out = vec![0.0; out_shape.iter().product()];
        scatter_heads(
            &mut out,
            o_blocks.iter().map(Vec::as_slice),
            &dims,
            unpacked(&dims),
        );
        Ok(AttentionOutput {
            out: Tensor::from_cpu(&out_shape, out),
            lse: Tensor::from_cpu(&dims.lse_shape(), lse_blocks.concat()),
        })
    }

    /// Per (batch, head), in parallel: `P = exp(S - lse)` rebuilt from the saved lse, then
    /// dV, dP, D, dS, dQ and dK as in the module doc, scattered into d_qkv.
    pub fn backward(
        qkv: &Tensor,
        saved: &AttentionOutput,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        let op = "attention_backward";
        let dims = check_backward(qkv, saved, d_out, heads)?;
        let data = qkv.cpu_read(op)?;
        let (od, lsed, dod) = (
            saved.out.cpu_read(op)?,
            saved.lse.cpu_read(op)?,
            d_out.cpu_read(op)?,
        );
        let (l, d) = (dims.len, dims.head_dim);
        let tasks = tasks(&dims);
        let threads = threads_per_task(tasks);
        let scale = dims.scale();
        let (qc, kc, vc, oc) = (
            packed(&dims, Q),
            packed(&dims, K),
            packed(&dims, V),
            unpacked(&dims),
        );
        let per_head: Vec<[Vec<f32>; 3]> = (0..tasks)
            .into_par_iter()
            .map(|bh| {
                let [qh, kh, vh] = qkv_heads(&data, &dims, bh);
                let (oh, doh) = (
                    head_slice(&od, &dims, bh, oc),
                    head_slice(&dod, &dims, bh, oc),
                );
                let lse = &lsed[bh * l..(bh + 1) * l];
                let mut p = scores(qh, kh, &dims, threads);
                simd(SoftmaxAgain { s: &mut p, lse });
                let mut dv = vec![0.0; l * d];
                matmul(
                    (l, l, d),
                    &p,
                    transposed(l),
                    doh,
                    head_rows(oc),
                    &mut dv,
                    d,
                    false,
                    threads,
                );
                let mut ds = product_t((doh, oc), (vh, vc), &dims, threads);
                for (i, (ds_row, p_row)) in
                    ds.chunks_exact_mut(l).zip(p.chunks_exact(l)).enumerate()
                {
                    let row = i * oc.width..i * oc.width + d;
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
                    head_rows(kc),
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
                    head_rows(qc),
                    &mut dk,
                    d,
                    false,
                    threads,
                );
                [dq, dk, dv]
            })
            .collect();
        let mut d_qkv = vec![0.0; qkv.numel()];
        for (part, c) in [qc, kc, vc].into_iter().enumerate() {
            scatter_heads(
                &mut d_qkv,
                per_head.iter().map(|g| g[part].as_slice()),
                &dims,
                c,
            );
        }
        Ok(Tensor::from_cpu(qkv.shape(), d_qkv))
    }
}

/// Uniform parameters of `shaders/attention.wgsl` (layout must match its `Params`).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len: u32,
    /// `C`: qkv rows are `3C` wide, out rows `C`.
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

    /// qkv; out, lse.
    const FORWARD: Kernel = kernel("attention_fwd", &[R, W, W]);
    /// O, dO; D.
    const BACKWARD_DELTA: Kernel = kernel("attention_bwd_delta", &[R, R, W]);
    /// qkv, dO, lse, D; d_qkv, the one writable binding: dQ into its q columns, and dK and
    /// dV into its k and v columns.
    const BACKWARD_DQ: Kernel = kernel("attention_bwd_dq", &[R, R, R, R, W]);
    const BACKWARD_DKV: Kernel = kernel("attention_bwd_dkv", &[R, R, R, R, W]);
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
        let numel = dims.batch * dims.len * 3 * dims.channels;
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
    pub fn forward(g: &Gpu, qkv: &Tensor, heads: usize) -> Result<AttentionOutput> {
        let op = "attention";
        let dims = check_forward(op, qkv, heads)?;
        let (p, grid) = check_gpu(op, g, &dims)?;
        let qkvb = qkv.gpu_buffer(op)?;
        let out_shape = dims.out_shape();
        let out = g.alloc(op, out_shape.iter().product())?;
        let lse = g.alloc(op, dims.batch * heads * dims.len)?;
        let result = AttentionOutput {
            out: Tensor::from_gpu(&out_shape, out.clone()),
            lse: Tensor::from_gpu(&dims.lse_shape(), lse.clone()),
        };
        if dims.batch == 0 || dims.len == 0 {
            return Ok(result);
        }
        let args = [Arg::read(qkvb), Arg::write(&out), Arg::write(&lse)];
        g.dispatch(&FORWARD, &p, &args, grid)?;
        Ok(result)
    }

    /// Three passes: `D = rowsum(dO * O)`; dQ per block of query rows; dK and dV per block
    /// of key rows. Each rebuilds `P` from the saved lse; the last two write disjoint columns
    /// of one d_qkv.
    pub fn backward(
        g: &Gpu,
        qkv: &Tensor,
        saved: &AttentionOutput,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        let op = "attention_backward";
        let dims = check_backward(qkv, saved, d_out, heads)?;
        let (p, grid) = check_gpu(op, g, &dims)?;
        let qkvb = qkv.gpu_buffer(op)?;
        let (ob, lseb, dob) = (
            saved.out.gpu_buffer(op)?,
            saved.lse.gpu_buffer(op)?,
            d_out.gpu_buffer(op)?,
        );
        if dims.batch == 0 || dims.len == 0 {
            return Ok(Tensor::from_gpu(qkv.shape(), g.alloc(op, 0)?));
        }
        let rows = dims.batch * heads * dims.len;
        let delta = g.alloc(op, rows)?;
        let args = [Arg::read(ob), Arg::read(dob), Arg::write(&delta)];
        g.dispatch(&BACKWARD_DELTA, &p, &args, elementwise_grid(rows))?;
        let d_qkv = g.alloc(op, qkv.numel())?;
        let args = [
            Arg::read(qkvb),
            Arg::read(dob),
            Arg::read(lseb),
            Arg::read(&delta),
            Arg::write(&d_qkv),
        ];
        g.dispatch(&BACKWARD_DQ, &p, &args, grid)?;
        g.dispatch(&BACKWARD_DKV, &p, &args, grid)?;
        Ok(Tensor::from_gpu(qkv.shape(), d_qkv))
    }
}
