//! The CPU backend: the reference implementation of every op, and the fallback where no GPU
//! exists. Plain Rust, multithreaded with rayon, matrix products through the `gemm` crate.

use super::Backend;
use crate::error::Result;
use crate::ops::attention::{self, AttentionOutput};
use crate::ops::conv2d::{self, Conv2dEpilogue, Conv2dParams};
use crate::ops::diffusion::{self, DdimStepCoefficients, DdpmStepCoefficients};
use crate::ops::embedding::{self, TimestepEmbeddingParams};
use crate::ops::grads::{self, GradPlan, Partials};
use crate::ops::group_norm::{self, GroupNormOutput, GroupNormParams};
use crate::ops::linear;
use crate::ops::optim::{self, AdamWParams, StepTensors};
use crate::ops::solver_step::{self, SolverStepCoefficients, SolverStepInputs};
use crate::ops::{broadcast, class_embedding, elementwise, guidance, layout, random, reduce};
use crate::tensor::{Device, Tensor};

/// The CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// Keeps the memory of freed tensors in the process, once, before the first tensor is made.
///
/// glibc hands a freed block over its mmap threshold (128 KiB at first) back to the kernel,
/// and trims the heap's top above 128 KiB, so each training step's activations came back as
/// fresh pages, each faulted in and zeroed by the kernel one at a time: about 200,000 faults
/// a mnist/64 step. With the threshold at its largest (32 MiB) and no trimming, a step
/// reuses the blocks the last one freed. The worker threads allocate from heaps of their
/// own, which glibc unmaps as soon as one falls empty: that still cost 16,000 faults a step
/// until each heap kept 64 MiB of padding above its top.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_TOP_PAD: i32 = -2;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only changes the allocator's tuning; the values are in range.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, i32::MAX);
                mallopt(M_TOP_PAD, 64 << 20);
            }
        });
    }
}

impl Backend for Cpu {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        keep_freed_memory();
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(crate::Error::shape(
                "upload",
                format!("{numel} values for shape {shape:?}"),
                &[data.len()],
            ));
        }
        Ok(Tensor::from_cpu(shape, data.to_vec()))
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        keep_freed_memory();
        Ok(Tensor::from_cpu(shape, vec![0.0; shape.iter().product()]))
    }

    fn to_vec(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.cpu_read("to_vec")?.to_vec())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn max_tensor_len(&self) -> usize {
        usize::MAX
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise::cpu::add(a, b)
    }

    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        elementwise::cpu::scale(x, s)
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        elementwise::cpu::silu(x)
    }

    fn silu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        elementwise::cpu::silu_backward(x, dy)
    }

    fn dropout(&self, x: &Tensor, u: &Tensor, p: f32) -> Result<Tensor> {
        elementwise::cpu::dropout(x, u, p)
    }

    fn add_per_channel(&self, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        broadcast::cpu::add_per_channel(x, v)
    }

    fn add_per_channel_backward(&self, dy: &Tensor) -> Result<Tensor> {
        broadcast::cpu::add_per_channel_backward(dy)
    }

    fn concat_channels(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        layout::cpu::concat_channels(a, b)
    }

    fn split_channels(&self, y: &Tensor, ca: usize) -> Result<(Tensor, Tensor)> {
        layout::cpu::split_channels(y, ca)
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        layout::cpu::upsample_nearest2x(x)
    }

    fn upsample_nearest2x_backward(&self, dy: &Tensor) -> Result<Tensor> {
        layout::cpu::upsample_nearest2x_backward(dy)
    }

    fn transpose(&self, x: &Tensor) -> Result<Tensor> {
        layout::cpu::transpose(x)
    }

    fn conv2d_with(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
        e: &Conv2dEpilogue,
    ) -> Result<Tensor> {
        conv2d::cpu::forward(x, w, b, p, e)
    }

    fn conv2d_grad_splits(&self, x: &Tensor, w: &Tensor, p: &Conv2dParams) -> Result<usize> {
        conv2d::cpu::grad_splits(x, w, p)
    }

    fn conv2d_backward_into(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: &Conv2dParams,
        need_dx: bool,
        dw: &Partials,
        db: Option<&Partials>,
    ) -> Result<Option<Tensor>> {
        conv2d::cpu::backward_into(x, w, dy, p, need_dx, dw, db)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        linear::cpu::forward(x, w, b)
    }

    fn linear_grad_splits(&self, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
        linear::cpu::grad_splits(x, w)
    }

    fn linear_backward_into(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        acc: Option<&Tensor>,
        dw: &Partials,
        db: Option<&Partials>,
    ) -> Result<Option<Tensor>> {
        linear::cpu::backward_into(x, w, dy, need_dx, acc, dw, db)
    }

    fn group_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        p: &GroupNormParams,
    ) -> Result<GroupNormOutput> {
        group_norm::cpu::forward(x, gamma, beta, p)
    }

    fn group_norm_grad_splits(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        p: &GroupNormParams,
    ) -> Result<usize> {
        group_norm::cpu::grad_splits(x, gamma, p)
    }

    fn group_norm_backward_into(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        saved: &GroupNormOutput,
        dy: &Tensor,
        p: &GroupNormParams,
        need_dx: bool,
        acc: Option<&Tensor>,
        dgamma: &Partials,
        dbeta: &Partials,
    ) -> Result<Option<Tensor>> {
        group_norm::cpu::backward_into(x, gamma, beta, saved, dy, p, need_dx, acc, dgamma, dbeta)
    }

    fn attention(&self, qkv: &Tensor, heads: usize) -> Result<AttentionOutput> {
        attention::cpu::forward(qkv, heads)
    }

    fn attention_backward(
        &self,
        qkv: &Tensor,
        saved: &AttentionOutput,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        attention::cpu::backward(qkv, saved, d_out, heads)
    }

    fn timestep_embedding(&self, t: &Tensor, p: &TimestepEmbeddingParams) -> Result<Tensor> {
        embedding::cpu::timestep_embedding(t, p)
    }

    fn embedding(&self, table: &Tensor, labels: &[u32]) -> Result<Tensor> {
        class_embedding::cpu::embedding(table, labels)
    }

    fn embedding_backward_into(
        &self,
        labels: &[u32],
        dy: &Tensor,
        classes: usize,
        dw: &Partials,
    ) -> Result<()> {
        class_embedding::cpu::embedding_backward_into(labels, dy, classes, dw)
    }

    fn guidance(&self, out: &Tensor, w: f32) -> Result<Tensor> {
        guidance::cpu::guidance(out, w)
    }

    fn sum(&self, x: &Tensor) -> Result<Tensor> {
        reduce::cpu::sum(x)
    }

    fn mean(&self, x: &Tensor) -> Result<Tensor> {
        reduce::cpu::mean(x)
    }

    fn sum_squares(&self, x: &Tensor) -> Result<Tensor> {
        reduce::cpu::sum_squares(x)
    }

    fn mse_loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        reduce::cpu::mse_loss(pred, target)
    }

    fn mse_loss_with_grad(
        &self,
        pred: &Tensor,
        target: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)> {
        reduce::cpu::mse_loss_with_grad(pred, target, d_loss)
    }

    fn weighted_mse_loss_with_grad(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weights: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)> {
        reduce::cpu::weighted_mse_loss_with_grad(pred, target, weights, d_loss)
    }

    fn q_sample(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        t: &Tensor,
        alphas_cumprod: &Tensor,
    ) -> Result<Tensor> {
        diffusion::cpu::q_sample(x0, eps, t, alphas_cumprod)
    }

    fn ddpm_step(
        &self,
        x_t: &Tensor,
        model_output: &Tensor,
        noise: &Tensor,
        c: &DdpmStepCoefficients,
    ) -> Result<Tensor> {
        diffusion::cpu::ddpm_step(x_t, model_output, noise, c)
    }

    fn ddim_step(
        &self,
        x_t: &Tensor,
        model_output: &Tensor,
        noise: &Tensor,
        c: &DdimStepCoefficients,
    ) -> Result<Tensor> {
        diffusion::cpu::ddim_step(x_t, model_output, noise, c)
    }

    fn solver_step(
        &self,
        inputs: &SolverStepInputs,
        c: &SolverStepCoefficients,
    ) -> Result<(Tensor, Tensor)> {
        solver_step::cpu::solver_step(inputs, c)
    }

    fn reduce_partials(&self, p: &Partials, n: usize) -> Result<Tensor> {
        grads::cpu::reduce_partials(p, n)
    }

    fn gather_grads(&self, arena: &Tensor, plan: &GradPlan, grads: &mut Tensor) -> Result<Tensor> {
        grads::cpu::gather_grads(arena, plan, grads)
    }

    fn adamw_ema_step(&self, t: StepTensors, h: &AdamWParams, ema_decay: f32) -> Result<()> {
        optim::cpu::adamw_ema_step(t, h, ema_decay)
    }

    fn randn(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        random::cpu::randn(shape, seed, offset)
    }

    fn rand_uniform(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        random::cpu::rand_uniform(shape, seed, offset)
    }
}
