//! The GPU backend: every op is a hand-written WGSL kernel recorded into the shared command
//! encoder (see `crate::gpu`).

use super::{Backend, HostRead};
use crate::error::Result;
use crate::gpu::Gpu;
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

impl Backend for Gpu {
    fn device(&self) -> Device {
        Device::Gpu
    }

    fn name(&self) -> String {
        let info = self.adapter_info();
        format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Gpu::upload(self, shape, data)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        let numel = shape.iter().product();
        Ok(Tensor::from_gpu(shape, self.alloc_zeros("zeros", numel)?))
    }

    fn to_vec(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.read(t)
    }

    fn to_vec_async<'a>(&'a self, t: &'a Tensor) -> HostRead<'a> {
        Box::pin(self.read_async(t))
    }

    fn synchronize(&self) -> Result<()> {
        Gpu::synchronize(self)
    }

    fn max_tensor_len(&self) -> usize {
        Gpu::max_tensor_len(self)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise::gpu::add(self, a, b)
    }

    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        elementwise::gpu::scale(self, x, s)
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        elementwise::gpu::silu(self, x)
    }

    fn silu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        elementwise::gpu::silu_backward(self, x, dy)
    }

    fn dropout(&self, x: &Tensor, u: &Tensor, p: f32) -> Result<Tensor> {
        elementwise::gpu::dropout(self, x, u, p)
    }

    fn add_per_channel(&self, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        broadcast::gpu::add_per_channel(self, x, v)
    }

    fn add_per_channel_backward(&self, dy: &Tensor) -> Result<Tensor> {
        broadcast::gpu::add_per_channel_backward(self, dy)
    }

    fn concat_channels(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        layout::gpu::concat_channels(self, a, b)
    }

    fn split_channels(&self, y: &Tensor, ca: usize) -> Result<(Tensor, Tensor)> {
        layout::gpu::split_channels(self, y, ca)
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        layout::gpu::upsample_nearest2x(self, x)
    }

    fn upsample_nearest2x_backward(&self, dy: &Tensor) -> Result<Tensor> {
        layout::gpu::upsample_nearest2x_backward(self, dy)
    }

    fn transpose(&self, x: &Tensor) -> Result<Tensor> {
        layout::gpu::transpose(self, x)
    }

    fn conv2d_with(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
        e: &Conv2dEpilogue,
    ) -> Result<Tensor> {
        conv2d::gpu::forward(self, x, w, b, p, e)
    }

    fn conv2d_grad_splits(&self, x: &Tensor, w: &Tensor, p: &Conv2dParams) -> Result<usize> {
        conv2d::gpu::grad_splits(x, w, p)
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
        conv2d::gpu::backward_into(self, x, w, dy, p, need_dx, dw, db)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        linear::gpu::forward(self, x, w, b)
    }

    fn linear_grad_splits(&self, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
        linear::gpu::grad_splits(x, w)
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
        linear::gpu::backward_into(self, x, w, dy, need_dx, acc, dw, db)
    }

    fn group_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        p: &GroupNormParams,
    ) -> Result<GroupNormOutput> {
        group_norm::gpu::forward(self, x, gamma, beta, p)
    }

    fn group_norm_grad_splits(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        p: &GroupNormParams,
    ) -> Result<usize> {
        group_norm::gpu::grad_splits(x, gamma, p)
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
        group_norm::gpu::backward_into(
            self, x, gamma, beta, saved, dy, p, need_dx, acc, dgamma, dbeta,
        )
    }

    fn attention(&self, qkv: &Tensor, heads: usize) -> Result<AttentionOutput> {
        attention::gpu::forward(self, qkv, heads)
    }

    fn attention_backward(
        &self,
        qkv: &Tensor,
        saved: &AttentionOutput,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        attention::gpu::backward(self, qkv, saved, d_out, heads)
    }

    fn timestep_embedding(&self, t: &Tensor, p: &TimestepEmbeddingParams) -> Result<Tensor> {
        embedding::gpu::timestep_embedding(self, t, p)
    }

    fn embedding(&self, table: &Tensor, labels: &[u32]) -> Result<Tensor> {
        class_embedding::gpu::embedding(self, table, labels)
    }

    fn embedding_backward_into(
        &self,
        labels: &[u32],
        dy: &Tensor,
        classes: usize,
        dw: &Partials,
    ) -> Result<()> {
        class_embedding::gpu::embedding_backward_into(self, labels, dy, classes, dw)
    }

    fn guidance(&self, out: &Tensor, w: f32) -> Result<Tensor> {
        guidance::gpu::guidance(self, out, w)
    }

    fn sum(&self, x: &Tensor) -> Result<Tensor> {
        reduce::gpu::sum(self, x)
    }

    fn mean(&self, x: &Tensor) -> Result<Tensor> {
        reduce::gpu::mean(self, x)
    }

    fn sum_squares(&self, x: &Tensor) -> Result<Tensor> {
        reduce::gpu::sum_squares(self, x)
    }

    fn mse_loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        reduce::gpu::mse_loss(self, pred, target)
    }

    fn mse_loss_with_grad(
        &self,
        pred: &Tensor,
        target: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)> {
        reduce::gpu::mse_loss_with_grad(self, pred, target, d_loss)
    }

    fn weighted_mse_loss_with_grad(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weights: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)> {
        reduce::gpu::weighted_mse_loss_with_grad(self, pred, target, weights, d_loss)
    }

    fn q_sample(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        t: &Tensor,
        alphas_cumprod: &Tensor,
    ) -> Result<Tensor> {
        diffusion::gpu::q_sample(self, x0, eps, t, alphas_cumprod)
    }

    fn ddpm_step(
        &self,
        x_t: &Tensor,
        model_output: &Tensor,
        noise: &Tensor,
        c: &DdpmStepCoefficients,
    ) -> Result<Tensor> {
        diffusion::gpu::ddpm_step(self, x_t, model_output, noise, c)
    }

    fn ddim_step(
        &self,
        x_t: &Tensor,
        model_output: &Tensor,
        noise: &Tensor,
        c: &DdimStepCoefficients,
    ) -> Result<Tensor> {
        diffusion::gpu::ddim_step(self, x_t, model_output, noise, c)
    }

    fn solver_step(
        &self,
        inputs: &SolverStepInputs,
        c: &SolverStepCoefficients,
    ) -> Result<(Tensor, Tensor)> {
        solver_step::gpu::solver_step(self, inputs, c)
    }

    fn reduce_partials(&self, p: &Partials, n: usize) -> Result<Tensor> {
        grads::gpu::reduce_partials(self, p, n)
    }

    fn gather_grads(&self, arena: &Tensor, plan: &GradPlan, grads: &mut Tensor) -> Result<Tensor> {
        grads::gpu::gather_grads(self, arena, plan, grads)
    }

    fn adamw_ema_step(&self, t: StepTensors, h: &AdamWParams, ema_decay: f32) -> Result<()> {
        optim::gpu::adamw_ema_step(self, t, h, ema_decay)
    }

    fn randn(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        random::gpu::randn(self, shape, seed, offset)
    }

    fn rand_uniform(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        random::gpu::rand_uniform(self, shape, seed, offset)
    }
}
