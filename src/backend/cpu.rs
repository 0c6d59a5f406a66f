//! The CPU backend: the reference implementation of every op, and the fallback where no GPU
//! exists. Plain Rust, multithreaded with rayon, matrix products through the `gemm` crate.

use super::Backend;
use crate::error::Result;
use crate::ops::attention::{self, AttentionGrads, AttentionOutput};
use crate::ops::conv2d::{self, Conv2dGrads, Conv2dParams};
use crate::ops::diffusion::{self, DdimStepCoefficients, DdpmStepCoefficients};
use crate::ops::embedding::{self, TimestepEmbeddingParams};
use crate::ops::group_norm::{self, GroupNormGrads, GroupNormOutput, GroupNormParams};
use crate::ops::linear::{self, LinearGrads};
use crate::ops::optim::{self, AdamWParams};
use crate::ops::{broadcast, elementwise, layout, random, reduce};
use crate::tensor::{Device, Tensor};

/// The CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Backend for Cpu {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
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
        Ok(Tensor::from_cpu(shape, vec![0.0; shape.iter().product()]))
    }

    fn to_vec(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.cpu_read("to_vec")?.clone())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
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

    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
    ) -> Result<Tensor> {
        conv2d::cpu::forward(x, w, b, p)
    }

    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: &Conv2dParams,
        with_bias: bool,
    ) -> Result<Conv2dGrads> {
        conv2d::cpu::backward(x, w, dy, p, with_bias)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        linear::cpu::forward(x, w, b)
    }

    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        with_bias: bool,
    ) -> Result<LinearGrads> {
        linear::cpu::backward(x, w, dy, with_bias)
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

    fn group_norm_backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        saved: &GroupNormOutput,
        dy: &Tensor,
        p: &GroupNormParams,
    ) -> Result<GroupNormGrads> {
        group_norm::cpu::backward(x, gamma, saved, dy, p)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> Result<AttentionOutput> {
        attention::cpu::forward(q, k, v, heads)
    }

    fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        saved: &AttentionOutput,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<AttentionGrads> {
        attention::cpu::backward(q, k, v, saved, d_out, heads)
    }

    fn timestep_embedding(&self, t: &Tensor, p: &TimestepEmbeddingParams) -> Result<Tensor> {
        embedding::cpu::timestep_embedding(t, p)
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

    fn mse_loss_backward(&self, pred: &Tensor, target: &Tensor, d_loss: f32) -> Result<Tensor> {
        reduce::cpu::mse_loss_backward(pred, target, d_loss)
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

    fn adamw_step(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        h: &AdamWParams,
    ) -> Result<()> {
        optim::cpu::adamw_step(param, grad, m, v, h)
    }

    fn ema_update(&self, ema: &mut Tensor, param: &Tensor, decay: f32) -> Result<()> {
        optim::cpu::ema_update(ema, param, decay)
    }

    fn randn(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        random::cpu::randn(shape, seed, offset)
    }

    fn rand_uniform(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        random::cpu::rand_uniform(shape, seed, offset)
    }
}
