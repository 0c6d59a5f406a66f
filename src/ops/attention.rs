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
    use crate::ops::simd::{axpy, dot, max, simd, sum, Kernel};

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

    /// One (batch, head)'s `[L, d]` rows of an operand, read in place.
    #[derive(Clone, Copy)]
    struct HeadRows<'a> {
        data: &'a [f32],
        /// Where row 0 starts.
        start: usize,
        /// From one row to the next.
        width: usize,
        head_dim: usize,
    }

    impl<'a> HeadRows<'a> {
        /// The rows of the `(b, head)` pair `bh` of the operand at `c` in `data`.
        fn new(data: &'a [f32], dims: &Dims, bh: usize, c: Cols) -> Self {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            HeadRows {
                data,
                start: b * dims.len * c.width + c.col + h * dims.head_dim,
                width: c.width,
                head_dim: dims.head_dim,
            }
        }

        /// Row `i`, d values.
        #[inline(always)]
        fn row(&self, i: usize) -> &'a [f32] {
            &self.data[self.start + i * self.width..][..self.head_dim]
        }

        /// The transpose `[d, L]` of the L rows, contiguous.
        fn transposed(&self, len: usize) -> Vec<f32> {
            let mut t = vec![0.0; self.head_dim * len];
            for i in 0..len {
                for (k, &x) in self.row(i).iter().enumerate() {
                    t[k * len + i] = x;
                }
            }
            t
        }
    }

    /// (batch, head) pairs to compute: none without rows, which also leaves no head to slice.
    fn tasks(dims: &Dims) -> usize {
        if dims.len == 0 {
            0
        } else {
            dims.batch * dims.heads
        }
    }

    /// Row `i` of the scaled scores, `s_m = (q_i / sqrt(d)) . k_m` for every key `m`, from
    /// the keys transposed `kt [d, L]`: d passes over the row, each a SIMD sweep across keys.
    #[inline(always)]
    fn scores_row(s: &mut [f32], q_i: &[f32], kt: &[f32], scale: f32) {
        let l = s.len();
        s.fill(0.0);
        for (&q, kt_k) in q_i.iter().zip(kt.chunks_exact(l)) {
            axpy(s, q * scale, kt_k);
        }
    }

    /// Writes the `[L, d]` block of every (batch, head), in `bh` order, to its place at `c`
    /// in `dst`; `transposed` blocks are `[d, L]`.
    fn scatter_heads<'a>(
        dst: &mut [f32],
        blocks: impl IntoIterator<Item = &'a [f32]>,
        dims: &Dims,
        c: Cols,
        transposed: bool,
    ) {
        let (l, d) = (dims.len, dims.head_dim);
        for (bh, block) in blocks.into_iter().enumerate() {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            for i in 0..l {
                let at = (b * l + i) * c.width + c.col + h * d;
                for (k, x) in dst[at..at + d].iter_mut().enumerate() {
                    *x = if transposed {
                        block[k * l + i]
                    } else {
                        block[i * d + k]
                    };
                }
            }
        }
    }

    /// The forward pass of one (batch, head), a query row at a time: its scores, a softmax
    /// made stable by the row max (`lse_i = max_i + log sum_m exp(S_im - max_i)`), and
    /// `O_ik = P_i . V^T_k`. Every loop runs across keys, in SIMD lanes.
    struct ForwardHead<'a> {
        q: HeadRows<'a>,
        /// `[d, L]` each.
        kt: Vec<f32>,
        vt: Vec<f32>,
        len: usize,
        scale: f32,
    }

    impl Kernel for ForwardHead<'_> {
        /// `O [L, d]` and `lse [L]`.
        type Output = (Vec<f32>, Vec<f32>);

        #[inline(always)]
        fn run(self) -> (Vec<f32>, Vec<f32>) {
            let (l, d) = (self.len, self.q.head_dim);
            let mut o = vec![0.0; l * d];
            let mut lse = Vec::with_capacity(l);
            let mut p = vec![0.0; l];
            for (i, o_i) in o.chunks_exact_mut(d).enumerate() {
                scores_row(&mut p, self.q.row(i), &self.kt, self.scale);
                let max = max(&p);
                p.iter_mut().for_each(|s| *s = expf::exp(*s - max));
                let sum = sum(&p);
                for (o, vt_k) in o_i.iter_mut().zip(self.vt.chunks_exact(l)) {
                    *o = dot(&p, vt_k) / sum;
                }
                lse.push(max + sum.ln());
            }
            (o, lse)
        }
    }

    /// Per (batch, head), in parallel: [`ForwardHead`] on the head's rows, with its keys and
    /// values transposed.
    pub fn forward(qkv: &Tensor, heads: usize) -> Result<AttentionOutput> {
        let op = "attention";
        let dims = check_forward(op, qkv, heads)?;
        let data = qkv.cpu_read(op)?;
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..tasks(&dims))
            .into_par_iter()
            .map(|bh| {
                let rows = |part| HeadRows::new(&data, &dims, bh, packed(&dims, part));
                simd(ForwardHead {
                    q: rows(Q),
                    kt: rows(K).transposed(dims.len),
                    vt: rows(V).transposed(dims.len),
                    len: dims.len,
                    scale: dims.scale(),
                })
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
            false,
        );
        Ok(AttentionOutput {
            out: Tensor::from_cpu(&out_shape, out),
            lse: Tensor::from_cpu(&dims.lse_shape(), lse_blocks.concat()),
        })
    }

    /// The backward pass of one (batch, head), a query row `i` at a time: `P_i` rebuilt from
    /// the saved `lse_i`, `dP_im = dO_i . V_m` (from `V^T`), `D_i = dO_i . O_i`,
    /// `dS_i = P_i (dP_i - D_i) / sqrt(d)`, and the row's terms of every gradient:
    /// `dQ_ik = dS_i . K^T_k`, `dV^T_k += dO_ik P_i`, `dK^T_k += Q_ik dS_i`. Every loop runs
    /// across keys, in SIMD lanes.
    struct BackwardHead<'a> {
        q: HeadRows<'a>,
        o: HeadRows<'a>,
        d_o: HeadRows<'a>,
        /// `[d, L]` each.
        kt: Vec<f32>,
        vt: Vec<f32>,
        /// `[L]`.
        lse: &'a [f32],
        scale: f32,
    }

    impl Kernel for BackwardHead<'_> {
        /// `dQ [L, d]`, and `dK^T`, `dV^T [d, L]`.
        type Output = [Vec<f32>; 3];

        #[inline(always)]
        fn run(self) -> [Vec<f32>; 3] {
            let (l, d) = (self.lse.len(), self.q.head_dim);
            let mut dq = vec![0.0; l * d];
            let (mut dkt, mut dvt) = (vec![0.0; d * l], vec![0.0; d * l]);
            let (mut p, mut ds) = (vec![0.0; l], vec![0.0; l]);
            for (i, (dq_i, &lse_i)) in dq.chunks_exact_mut(d).zip(self.lse).enumerate() {
                let (q_i, do_i) = (self.q.row(i), self.d_o.row(i));
                scores_row(&mut p, q_i, &self.kt, self.scale);
                p.iter_mut().for_each(|s| *s = expf::exp(*s - lse_i));
                ds.fill(0.0);
                for (&g, vt_k) in do_i.iter().zip(self.vt.chunks_exact(l)) {
                    axpy(&mut ds, g, vt_k);
                }
                let delta = dot(do_i, self.o.row(i));
                for (ds, &p) in ds.iter_mut().zip(&p) {
                    *ds = p * (*ds - delta) * self.scale;
                }
                let columns = dq_i
                    .iter_mut()
                    .zip(self.kt.chunks_exact(l))
                    .zip(dkt.chunks_exact_mut(l).zip(dvt.chunks_exact_mut(l)))
                    .zip(q_i.iter().zip(do_i));
                for (((dq, kt_k), (dkt_k, dvt_k)), (&q, &g)) in columns {
                    *dq = dot(&ds, kt_k);
                    axpy(dkt_k, q, &ds);
                    axpy(dvt_k, g, &p);
                }
            }
            [dq, dkt, dvt]
        }
    }

    /// Per (batch, head), in parallel: [`BackwardHead`] on the head's rows, with its keys and
    /// values transposed; the gradients scattered into d_qkv.
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
        let l = dims.len;
        let (qc, kc, vc, oc) = (
            packed(&dims, Q),
            packed(&dims, K),
            packed(&dims, V),
            unpacked(&dims),
        );
        let per_head: Vec<[Vec<f32>; 3]> = (0..tasks(&dims))
            .into_par_iter()
            .map(|bh| {
                simd(BackwardHead {
                    q: HeadRows::new(&data, &dims, bh, qc),
                    o: HeadRows::new(&od, &dims, bh, oc),
                    d_o: HeadRows::new(&dod, &dims, bh, oc),
                    kt: HeadRows::new(&data, &dims, bh, kc).transposed(l),
                    vt: HeadRows::new(&data, &dims, bh, vc).transposed(l),
                    lse: &lsed[bh * l..(bh + 1) * l],
                    scale: dims.scale(),
                })
            })
            .collect();
        let mut d_qkv = vec![0.0; qkv.numel()];
        for (part, c) in [qc, kc, vc].into_iter().enumerate() {
            scatter_heads(
                &mut d_qkv,
                per_head.iter().map(|g| g[part].as_slice()),
                &dims,
                c,
                part != Q,
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
