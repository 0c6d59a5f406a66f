//! Reductions of a whole tensor to one value, and the MSE loss.
//!
//!   sum(x) = sum_i x_i,  mean(x) = sum(x) / N,  sum_squares(x) = sum_i x_i^2,
//!   mse_loss(p, t) = (1/N) sum_i (p_i - t_i)^2,  d p_i = d_loss * 2 (p_i - t_i) / N.
//!
//! The per-sample weighted MSE loss of a batch of `B` samples of `M = N / B` elements each,
//! with sample `b(i) = floor(i / M)` of element `i` and one weight `w_b` per sample (the loss
//! weighting of Min-SNR-gamma, Hang et al. 2023):
//!   loss = (1/B) sum_b w_b (1/M) sum_{i in b} (p_i - t_i)^2 = (1/N) sum_i w_b(i) (p_i - t_i)^2,
//!   d p_i = d_loss * 2 w_b(i) (p_i - t_i) / N.
//!
//! `mse_loss_with_grad` and `weighted_mse_loss_with_grad` give the loss and its gradient `d p`
//! together: on the GPU one pass over `p` and `t` writes `d p` and the first partial sums of
//! the (weighted) squared errors, which the summing passes then reduce like any other.
//!
//! CPU: the elements are cut into chunks of `CPU_CHUNK`, each chunk is summed in f64 (in
//! parallel for large tensors) and the chunk sums are added in f64; only the result is rounded
//! to f32, so the CPU value is the f32 rounding of an almost exact sum.
//!
//! GPU: a tree. Pass 1 gives each workgroup a contiguous chunk of `GPU_CHUNK` elements; each of
//! its 256 invocations adds 16 of them (strided by 256, so the loads are coalesced) and the 256
//! values are summed by a tree in workgroup memory, giving one partial sum per workgroup. Later
//! passes sum the partials the same way until one value remains. All in f32: the error bound is
//! that of pairwise summation, about `(16 + log2 N) * eps_f32 * sum_i |x_i|`.

use bytemuck::{Pod, Zeroable};

use super::{check_rank, check_same_shape};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    /// Elements this pass reads.
    n: u32,
    /// Factor applied to every sum written (`1/N` on the last pass of a mean, 1 otherwise).
    scale: f32,
    /// Factor of the gradient `mse_loss_with_grad` writes: `2 d_loss / N`.
    grad_scale: f32,
    /// Elements per sample `M` of the weighted MSE loss (0 for the other passes).
    sample_len: u32,
}

/// Checks the operands of the weighted MSE loss (`pred` and `target` of one shape `[B, ...]`,
/// `weights [B]`) and returns the elements per sample `M`.
fn check_weighted(
    op: &'static str,
    pred: &Tensor,
    target: &Tensor,
    weights: &Tensor,
) -> Result<usize> {
    check_same_shape(op, pred, target)?;
    check_rank(op, "weights", weights, 1)?;
    let batch = pred.shape().first().copied().unwrap_or(0);
    if pred.shape().is_empty() || weights.numel() != batch {
        return Err(Error::shape(
            op,
            format!(
                "weights [{batch}], one per sample of a batch {:?}",
                pred.shape()
            ),
            weights.shape(),
        ));
    }
    Ok(pred.numel() / batch.max(1))
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// Elements summed sequentially (in f64) per task.
    const CPU_CHUNK: usize = 1 << 14;

    /// `sum_i f(i, a_i, b_i)` accumulated in f64 per chunk, chunks in parallel.
    fn sum_f64_indexed(a: &[f32], b: &[f32], f: impl Fn(usize, f32, f32) -> f64 + Sync) -> f64 {
        let chunk = |(c, (ca, cb)): (usize, (&[f32], &[f32]))| -> f64 {
            let start = c * CPU_CHUNK;
            ca.iter()
                .zip(cb)
                .enumerate()
                .map(|(j, (&x, &y))| f(start + j, x, y))
                .sum()
        };
        if a.len() <= CPU_CHUNK {
            chunk((0, (a, b)))
        } else {
            a.par_chunks(CPU_CHUNK)
                .zip(b.par_chunks(CPU_CHUNK))
                .enumerate()
                .map(chunk)
                .sum()
        }
    }

    /// `sum_i f(a_i, b_i)` accumulated in f64 per chunk, chunks in parallel.
    fn sum_f64(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64 + Sync) -> f64 {
        sum_f64_indexed(a, b, |_, x, y| f(x, y))
    }

    fn scalar(v: f64) -> Tensor {
        Tensor::from_cpu(&[1], vec![v as f32])
    }

    pub fn sum(x: &Tensor) -> Result<Tensor> {
        let x = x.cpu_read("sum")?;
        Ok(scalar(sum_f64(&x, &x, |v, _| v as f64)))
    }

    pub fn mean(x: &Tensor) -> Result<Tensor> {
        let x = x.cpu_read("mean")?;
        Ok(scalar(sum_f64(&x, &x, |v, _| v as f64) / x.len() as f64))
    }

    pub fn sum_squares(x: &Tensor) -> Result<Tensor> {
        let x = x.cpu_read("sum_squares")?;
        Ok(scalar(sum_f64(&x, &x, |v, _| (v as f64) * (v as f64))))
    }

    /// `mean((p - t)^2)`, the squared errors summed in f64.
    fn mean_squared_error(p: &[f32], t: &[f32]) -> Tensor {
        let squared_error = sum_f64(p, t, |a, b| {
            let d = a as f64 - b as f64;
            d * d
        });
        scalar(squared_error / p.len() as f64)
    }

    pub fn mse_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let op = "mse_loss";
        check_same_shape(op, pred, target)?;
        Ok(mean_squared_error(
            &pred.cpu_read(op)?,
            &target.cpu_read(op)?,
        ))
    }

    /// The loss, and `d pred_i = d_loss * 2 (pred_i - target_i) / N`.
    pub fn mse_loss_with_grad(
        pred: &Tensor,
        target: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)> {
        let op = "mse_loss_with_grad";
        check_same_shape(op, pred, target)?;
        let (p, t) = (pred.cpu_read(op)?, target.cpu_read(op)?);
        let s = 2.0 * d_loss / p.len() as f32;
        let dp = crate::ops::elementwise::cpu::map2(&p, &t, |a, b| s * (a - b));
        Ok((
            mean_squared_error(&p, &t),
            Tensor::from_cpu(pred.shape(), dp),
        ))
    }

    /// `(1/N) sum_i w_b(i) (p_i - t_i)^2` with `b(i) = i / m`, the weighted squared errors
    /// summed in f64 in the chunks of `mean_squared_error` (so that weights of one give its
    /// value exactly).
    fn weighted_mean_squared_error(p: &[f32], t: &[f32], w: &[f32], m: usize) -> Tensor {
        let squared_error = sum_f64_indexed(p, t, |i, a, b| {
            let d = a as f64 - b as f64;
            d * d * w[i / m] as f64
        });
        scalar(squared_error / p.len() as f64)
    }

    /// The weighted loss, and `d pred_i = d_loss * 2 w_b(i) (pred_i - target_i) / N`.
    pub fn weighted_mse_loss_with_grad(
        pred: &Tensor,
        target: &Tensor,
        weights: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)> {
        let op = "weighted_mse_loss_with_grad";
        let m = check_weighted(op, pred, target, weights)?;
        let (p, t, w) = (
            pred.cpu_read(op)?,
            target.cpu_read(op)?,
            weights.cpu_read(op)?,
        );
        let s = 2.0 * d_loss / p.len() as f32;
        let dp: Vec<f32> = p
            .par_iter()
            .zip(&t[..])
            .enumerate()
            .map(|(i, (&a, &b))| s * (w[i / m] * (a - b)))
            .collect();
        Ok((
            weighted_mean_squared_error(&p, &t, &w, m),
            Tensor::from_cpu(pred.shape(), dp),
        ))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{grid, Access, Arg, Gpu, GpuBuffer, GpuSlice, Kernel};
    use crate::ops::ELEMENTWISE_WG;

    const SOURCE: &str = include_str!("../../shaders/reduce.wgsl");

    /// Elements each invocation of a reduction pass adds.
    const ITEMS: usize = 16;
    /// Elements one workgroup reduces.
    const GPU_CHUNK: usize = ELEMENTWISE_WG as usize * ITEMS;
    const CONSTANTS: &[(&str, f64)] = &[("WG", ELEMENTWISE_WG as f64), ("ITEMS", ITEMS as f64)];

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "reduce",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: CONSTANTS,
        }
    }

    const SUM_PARTIALS: Kernel = kernel("sum_partials", &[R, W]);
    const SUM_SQUARES_PARTIALS: Kernel = kernel("sum_squares_partials", &[R, W]);
    const SQUARED_ERROR_PARTIALS: Kernel = kernel("squared_error_partials", &[R, R, W]);
    /// pred, target; partials, d_pred.
    const MSE_LOSS_WITH_GRAD: Kernel = kernel("mse_loss_with_grad", &[R, R, W, W]);
    /// pred, target; partials, d_pred; weights.
    const WEIGHTED_MSE_LOSS_WITH_GRAD: Kernel =
        kernel("weighted_mse_loss_with_grad", &[R, R, W, W, R]);
    pub(crate) const KERNELS: &[Kernel] = &[
        SUM_PARTIALS,
        SUM_SQUARES_PARTIALS,
        SQUARED_ERROR_PARTIALS,
        MSE_LOSS_WITH_GRAD,
        WEIGHTED_MSE_LOSS_WITH_GRAD,
    ];

    fn params(n: usize, scale: f32) -> Params {
        Params {
            n: n as u32,
            scale,
            grad_scale: 0.0,
            sample_len: 0,
        }
    }

    /// What the first pass of an MSE loss with its gradient also binds: the gradient buffer
    /// and its factor `2 d_loss / N`, and for the weighted loss the weights `[B]` with the
    /// elements per sample.
    struct GradPass<'a> {
        d_pred: &'a GpuBuffer,
        grad_scale: f32,
        weights: Option<(GpuSlice<'a>, usize)>,
    }

    /// Reduces `inputs` to shape `[1]`: pass 1 runs `first` (sum of `x`, of `x^2`, or of
    /// `(a - b)^2`, weighted or not) into per-workgroup partials, then `sum_partials` passes
    /// follow until one value remains. The last pass multiplies by `scale`. With `grad`,
    /// pass 1 also writes the MSE gradient into its buffer.
    fn reduce(
        g: &Gpu,
        first: &Kernel,
        inputs: &[&Tensor],
        grad: Option<GradPass<'_>>,
        scale: f32,
    ) -> Result<Tensor> {
        let entry = first.entry;
        let n = inputs[0].numel();
        let workgroups = n.div_ceil(GPU_CHUNK).max(1);
        let last_scale = |wg: usize| if wg == 1 { scale } else { 1.0 };
        let partials = g.alloc(entry, workgroups)?;
        let mut args: Vec<Arg> = Vec::with_capacity(5);
        for t in inputs {
            args.push(Arg::read(t.gpu_buffer(entry)?));
        }
        args.push(Arg::write(&partials));
        let mut p = params(n, last_scale(workgroups));
        if let Some(pass) = grad {
            args.push(Arg::write(pass.d_pred));
            p.grad_scale = pass.grad_scale;
            if let Some((weights, m)) = pass.weights {
                args.push(Arg::read(weights));
                p.sample_len = m as u32;
            }
        }
        g.dispatch(first, &p, &args, grid(workgroups as u32))?;
        sum_to_one(g, entry, partials, workgroups, scale)
    }

    /// `scale * sum(partials[..n])` as shape `[1]`, by `sum_partials` passes (none when `n`
    /// is 1: the partial is then the result, already scaled by the pass that wrote it).
    pub(crate) fn sum_to_one(
        g: &Gpu,
        op: &'static str,
        mut partials: GpuBuffer,
        mut n: usize,
        scale: f32,
    ) -> Result<Tensor> {
        while n > 1 {
            let workgroups = n.div_ceil(GPU_CHUNK);
            let pass_scale = if workgroups == 1 { scale } else { 1.0 };
            let next: GpuBuffer = g.alloc(op, workgroups)?;
            g.dispatch(
                &SUM_PARTIALS,
                &params(n, pass_scale),
                &[Arg::read(&partials), Arg::write(&next)],
                grid(workgroups as u32),
            )?;
            partials = next;
            n = workgroups;
        }
        Ok(Tensor::from_gpu(&[1], partials))
    }

    pub fn sum(g: &Gpu, x: &Tensor) -> Result<Tensor> {
        reduce(g, &SUM_PARTIALS, &[x], None, 1.0)
    }

    pub fn mean(g: &Gpu, x: &Tensor) -> Result<Tensor> {
        reduce(g, &SUM_PARTIALS, &[x], None, 1.0 / x.numel() as f32)
    }

    pub fn sum_squares(g: &Gpu, x: &Tensor) -> Result<Tensor> {
        reduce(g, &SUM_SQUARES_PARTIALS, &[x], None, 1.0)
    }

    pub fn mse_loss(g: &Gpu, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        check_same_shape("mse_loss", pred, target)?;
        reduce(
            g,
            &SQUARED_ERROR_PARTIALS,
            &[pred, target],
            None,
            1.0 / pred.numel() as f32,
        )
    }

    /// One pass writes `d_pred` and the partial sums of the squared errors; the summing
    /// passes give the loss.
    pub fn mse_loss_with_grad(
        g: &Gpu,
        pred: &Tensor,
        target: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "mse_loss_with_grad";
        check_same_shape(OP, pred, target)?;
        let n = pred.numel();
        let d_pred = g.alloc(OP, n)?;
        let pass = GradPass {
            d_pred: &d_pred,
            grad_scale: 2.0 * d_loss / n as f32,
            weights: None,
        };
        let loss = reduce(
            g,
            &MSE_LOSS_WITH_GRAD,
            &[pred, target],
            Some(pass),
            1.0 / n as f32,
        )?;
        Ok((loss, Tensor::from_gpu(pred.shape(), d_pred)))
    }

    /// As `mse_loss_with_grad`, each element's squared error and gradient times its sample's
    /// weight, in the same single pass.
    pub fn weighted_mse_loss_with_grad(
        g: &Gpu,
        pred: &Tensor,
        target: &Tensor,
        weights: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "weighted_mse_loss_with_grad";
        let m = check_weighted(OP, pred, target, weights)?;
        let weights = weights.gpu_buffer(OP)?;
        let n = pred.numel();
        let d_pred = g.alloc(OP, n)?;
        let pass = GradPass {
            d_pred: &d_pred,
            grad_scale: 2.0 * d_loss / n as f32,
            weights: Some((weights, m)),
        };
        let loss = reduce(
            g,
            &WEIGHTED_MSE_LOSS_WITH_GRAD,
            &[pred, target],
            Some(pass),
            1.0 / n as f32,
        )?;
        Ok((loss, Tensor::from_gpu(pred.shape(), d_pred)))
    }
}
