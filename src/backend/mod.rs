//! The `Backend` trait: one method per op, forward and backward. `Cpu` and `Gpu` implement it
//! by calling the op modules in `ops/`, which hold the math, the reference loops and the
//! kernel launchers side by side. The trait is object safe, so code can take `&dyn Backend`.
//!
//! Conventions: inputs are never modified, except by the in-place optimizer op that takes
//! `&mut Tensor`; backward methods return fresh gradient tensors for activations (the caller
//! sums them where a tensor has several consumers) and write parameter gradients as partial
//! sums into a step's arena (`ops/grads.rs`), which `gather_grads` assembles for every
//! parameter at once; every shape is checked before any work is done.

use crate::error::Result;
use crate::ops::attention::AttentionOutput;
use crate::ops::conv2d::{Conv2dEpilogue, Conv2dGrads, Conv2dParams};
use crate::ops::diffusion::{DdimStepCoefficients, DdpmStepCoefficients};
use crate::ops::embedding::TimestepEmbeddingParams;
use crate::ops::grads::{GradPlan, Partials};
use crate::ops::group_norm::{GroupNormGrads, GroupNormOutput, GroupNormParams};
use crate::ops::linear::LinearGrads;
use crate::ops::optim::{AdamWParams, StepTensors};
use crate::ops::solver_step::{SolverStepCoefficients, SolverStepInputs};
use crate::tensor::{Device, Tensor};
use std::future::Future;
use std::pin::Pin;

/// A tensor's host copy, once the device has it ([`Backend::to_vec_async`]).
pub type HostRead<'a> = Pin<Box<dyn Future<Output = Result<Vec<f32>>> + 'a>>;

pub trait Backend: Send + Sync {
    /// Which kind of storage this backend's tensors have.
    fn device(&self) -> Device;
    /// A human-readable description (the adapter name on the GPU).
    fn name(&self) -> String;

    // ---- tensors -------------------------------------------------------------------------
    fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Tensor>;
    fn zeros(&self, shape: &[usize]) -> Result<Tensor>;
    /// Reads a tensor back to the host (on the GPU: submits and waits).
    fn to_vec(&self, t: &Tensor) -> Result<Vec<f32>>;
    /// Reads a tensor back to the host without blocking the thread: what a web page, which
    /// may not wait, uses instead of [`Self::to_vec`]. On the CPU it is ready at once.
    fn to_vec_async<'a>(&'a self, t: &'a Tensor) -> HostRead<'a> {
        Box::pin(std::future::ready(self.to_vec(t)))
    }
    /// Waits until all recorded work is done (a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    /// The most f32 values one tensor can hold (the GPU binds no larger buffer).
    fn max_tensor_len(&self) -> usize;

    // ---- elementwise (ops/elementwise.rs) --------------------------------------------------
    /// `a + b`, same shapes.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// `s * x`.
    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor>;
    /// `x * sigmoid(x)`.
    fn silu(&self, x: &Tensor) -> Result<Tensor>;
    /// `dx = dy * silu'(x)`.
    fn silu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor>;
    /// Inverted dropout with the uniforms `u` (same shape as `x`): `x / (1 - p)` where
    /// `u >= p`, else 0. With the same `u` it is its own backward (pass `dy` as `x`).
    fn dropout(&self, x: &Tensor, u: &Tensor, p: f32) -> Result<Tensor>;

    // ---- broadcast and layout (ops/broadcast.rs, ops/layout.rs) ---------------------------
    /// `y[b, c, h, w] = x[b, c, h, w] + v[b, c]` (time-embedding injection).
    fn add_per_channel(&self, x: &Tensor, v: &Tensor) -> Result<Tensor>;
    /// Gradient of `add_per_channel` w.r.t. `v`: `dv[b, c] = sum_hw dy[b, c, h, w]`
    /// (the gradient w.r.t. `x` is `dy` itself).
    fn add_per_channel_backward(&self, dy: &Tensor) -> Result<Tensor>;
    /// `[B, Ca, H, W] ++ [B, Cb, H, W] -> [B, Ca + Cb, H, W]`.
    fn concat_channels(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// The inverse of `concat_channels` (and its backward): the first `ca` channels, the rest.
    fn split_channels(&self, y: &Tensor, ca: usize) -> Result<(Tensor, Tensor)>;
    /// Nearest-neighbour upsampling by 2: `[B, C, H, W] -> [B, C, 2H, 2W]`.
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor>;
    /// Its backward: each input pixel's gradient is the sum of its 2x2 block.
    fn upsample_nearest2x_backward(&self, dy: &Tensor) -> Result<Tensor>;
    /// `[B, M, N] -> [B, N, M]` (NCHW feature maps to token rows and back; its own backward).
    fn transpose(&self, x: &Tensor) -> Result<Tensor>;

    // ---- conv2d (ops/conv2d.rs) -------------------------------------------------------------
    /// `x [B, Cin, H, W]`, `w [Cout, Cin, KH, KW]`, optional `b [Cout]`.
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
    ) -> Result<Tensor> {
        self.conv2d_with(x, w, b, p, &Conv2dEpilogue::default())
    }
    /// A convolution that also adds what `e` holds to its output, in the same pass.
    fn conv2d_with(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
        e: &Conv2dEpilogue,
    ) -> Result<Tensor>;
    /// How many parts this backend splits a convolution's weight and bias gradients into.
    fn conv2d_grad_splits(&self, x: &Tensor, w: &Tensor, p: &Conv2dParams) -> Result<usize>;
    /// The gradient w.r.t. the input when `need_dx`; the parts of the weight gradient (and of
    /// the bias gradient) into the arena, `conv2d_grad_splits` of each.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward_into(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: &Conv2dParams,
        need_dx: bool,
        dw: &Partials,
        db: Option<&Partials>,
    ) -> Result<Option<Tensor>>;
    /// Gradients w.r.t. input, weight and (when `with_bias`) bias, each a tensor.
    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: &Conv2dParams,
        with_bias: bool,
    ) -> Result<Conv2dGrads> {
        let splits = self.conv2d_grad_splits(x, w, p)?;
        let (nw, cout) = (w.numel(), w.shape()[0]);
        let arena = self.zeros(&[splits * (nw + cout)])?;
        let part = |offset| Partials {
            arena: &arena,
            offset,
            splits,
        };
        let (dw, db) = (part(0), part(splits * nw));
        let dx = self.conv2d_backward_into(x, w, dy, p, true, &dw, with_bias.then_some(&db))?;
        Ok(Conv2dGrads {
            dx: dx.expect("dx was asked for"),
            dw: self.reduce_partials(&dw, nw)?.reshape(w.shape())?,
            db: if with_bias {
                Some(self.reduce_partials(&db, cout)?)
            } else {
                None
            },
        })
    }

    // ---- linear (ops/linear.rs) -------------------------------------------------------------
    /// `y = x w^T + b`: `x [M, K]`, `w [N, K]`, optional `b [N]`, `y [M, N]`.
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor>;
    /// How many parts this backend splits a linear layer's weight and bias gradients into.
    fn linear_grad_splits(&self, x: &Tensor, w: &Tensor) -> Result<(usize, usize)>;
    /// `dx = dy w + acc` when `need_dx` (`acc`, of x's shape, is the gradient x already has
    /// from other consumers, added as dx is written; none adds nothing); the parts of `dw`
    /// (and `db`) into the arena.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_into(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        acc: Option<&Tensor>,
        dw: &Partials,
        db: Option<&Partials>,
    ) -> Result<Option<Tensor>>;
    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        with_bias: bool,
    ) -> Result<LinearGrads> {
        let (sw, sb) = self.linear_grad_splits(x, w)?;
        let (nw, n) = (w.numel(), w.shape()[0]);
        let arena = self.zeros(&[sw * nw + sb * n])?;
        let dw = Partials {
            arena: &arena,
            offset: 0,
            splits: sw,
        };
        let db = Partials {
            arena: &arena,
            offset: sw * nw,
            splits: sb,
        };
        let dx = self.linear_backward_into(x, w, dy, true, None, &dw, with_bias.then_some(&db))?;
        Ok(LinearGrads {
            dx: dx.expect("dx was asked for"),
            dw: self.reduce_partials(&dw, nw)?.reshape(w.shape())?,
            db: if with_bias {
                Some(self.reduce_partials(&db, n)?)
            } else {
                None
            },
        })
    }

    // ---- group norm (ops/group_norm.rs) -----------------------------------------------------
    /// `x [B, C, H, W]` (any trailing dims), affine `gamma, beta [C]`; SiLU after it when
    /// `p.silu` (the backward recomputes the pre-activation from x, the statistics and beta).
    fn group_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        p: &GroupNormParams,
    ) -> Result<GroupNormOutput>;
    /// How many parts this backend splits dgamma and dbeta into.
    fn group_norm_grad_splits(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        p: &GroupNormParams,
    ) -> Result<usize>;
    /// `dx + acc` when `need_dx` (`acc`, of x's shape, is the gradient x already has from
    /// other readers; none adds nothing); the parts of dgamma and dbeta into one arena.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<Option<Tensor>>;
    fn group_norm_backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        saved: &GroupNormOutput,
        dy: &Tensor,
        p: &GroupNormParams,
    ) -> Result<GroupNormGrads> {
        let splits = self.group_norm_grad_splits(x, gamma, p)?;
        let c = gamma.numel();
        let arena = self.zeros(&[2 * splits * c])?;
        let part = |offset| Partials {
            arena: &arena,
            offset,
            splits,
        };
        let (dgamma, dbeta) = (part(0), part(splits * c));
        let dx = self
            .group_norm_backward_into(x, gamma, beta, saved, dy, p, true, None, &dgamma, &dbeta)?;
        Ok(GroupNormGrads {
            dx: dx.expect("dx was asked for"),
            dgamma: self.reduce_partials(&dgamma, c)?,
            dbeta: self.reduce_partials(&dbeta, c)?,
        })
    }

    // ---- attention (ops/attention.rs) -------------------------------------------------------
    /// `softmax(q k^T / sqrt(d)) v` per head over packed projections: `qkv [B, L, 3C]`, each
    /// row q | k | v with `C = heads * d`; the output is `[B, L, C]`.
    fn attention(&self, qkv: &Tensor, heads: usize) -> Result<AttentionOutput>;
    /// `d_qkv [B, L, 3C] = dq | dk | dv`, packed as `qkv`, for `d_out [B, L, C]`.
    fn attention_backward(
        &self,
        qkv: &Tensor,
        saved: &AttentionOutput,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<Tensor>;

    // ---- timestep embedding (ops/embedding.rs), forward only ---------------------------------
    /// `t [B]` (timesteps as f32) -> `[B, dim]`, as diffusers' `get_timestep_embedding`.
    fn timestep_embedding(&self, t: &Tensor, p: &TimestepEmbeddingParams) -> Result<Tensor>;

    /// The rows of `table [K, D]` that `labels` name (each below `K`) -> `[B, D]`
    /// (`nn.Embedding`).
    fn embedding(&self, table: &Tensor, labels: &[u32]) -> Result<Tensor>;

    /// The gradient of a `[classes, D]` table from `dy [B, D]`, `dW[k] = sum_{l_b = k} dy[b]`,
    /// written as the first part of `dw` (the others zero).
    fn embedding_backward_into(
        &self,
        labels: &[u32],
        dy: &Tensor,
        classes: usize,
        dw: &Partials,
    ) -> Result<()>;

    /// Classifier-free guidance: `out [2B, ...]` (conditional, then unconditional) ->
    /// `(1 - w) eps_u + w eps_c`, `[B, ...]`.
    fn guidance(&self, out: &Tensor, w: f32) -> Result<Tensor>;

    // ---- reductions and loss (ops/reduce.rs) ------------------------------------------------
    /// Sum of all elements, shape `[1]`.
    fn sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Mean of all elements, shape `[1]`.
    fn mean(&self, x: &Tensor) -> Result<Tensor>;
    /// Sum of squares of all elements, shape `[1]` (global gradient norms).
    fn sum_squares(&self, x: &Tensor) -> Result<Tensor>;
    /// `mean((pred - target)^2)`, shape `[1]`.
    fn mse_loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor>;
    /// The loss `mse_loss(pred, target)` and its gradient
    /// `d pred = d_loss * 2 (pred - target) / N`, made together.
    fn mse_loss_with_grad(
        &self,
        pred: &Tensor,
        target: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)>;
    /// The per-sample weighted loss `(1/B) sum_b weights_b mean_i (pred_bi - target_bi)^2`
    /// (`pred [B, ...]`, `weights [B]`) and its gradient
    /// `d pred_bi = d_loss * 2 weights_b (pred_bi - target_bi) / N`, made together.
    fn weighted_mse_loss_with_grad(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weights: &Tensor,
        d_loss: f32,
    ) -> Result<(Tensor, Tensor)>;

    // ---- diffusion (ops/diffusion.rs) -------------------------------------------------------
    /// `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, `t [B]` one timestep per sample,
    /// `alphas_cumprod [T]`.
    fn q_sample(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        t: &Tensor,
        alphas_cumprod: &Tensor,
    ) -> Result<Tensor>;
    /// One DDPM ancestral step `x_t -> x_{t-1}` (posterior mean plus `sigma_t z`).
    fn ddpm_step(
        &self,
        x_t: &Tensor,
        model_output: &Tensor,
        noise: &Tensor,
        c: &DdpmStepCoefficients,
    ) -> Result<Tensor>;
    /// One DDIM step `x_t -> x_{t'}`.
    fn ddim_step(
        &self,
        x_t: &Tensor,
        model_output: &Tensor,
        noise: &Tensor,
        c: &DdimStepCoefficients,
    ) -> Result<Tensor>;
    /// One step of a linear sampler (DPM-Solver++, Euler–Maruyama, Heun):
    /// `d = convert(x_eval, model_output)`, `x_next = a x_base + b d + c prev + sigma z`;
    /// returns `(x_next, d)`.
    fn solver_step(
        &self,
        inputs: &SolverStepInputs,
        c: &SolverStepCoefficients,
    ) -> Result<(Tensor, Tensor)>;

    // ---- parameter gradients (ops/grads.rs) -------------------------------------------------
    /// The sum of the `p.splits` parts of a gradient of `n` values, shape `[n]`.
    fn reduce_partials(&self, p: &Partials, n: usize) -> Result<Tensor>;
    /// Every gradient of `plan` summed from its parts into its region of `grads`; returns the
    /// squared norm of all of them, shape `[1]`.
    fn gather_grads(&self, arena: &Tensor, plan: &GradPlan, grads: &mut Tensor) -> Result<Tensor>;

    // ---- optimizer (ops/optim.rs), in place --------------------------------------------------
    /// Clipping by the global norm, AdamW and the EMA update in one pass.
    fn adamw_ema_step(&self, t: StepTensors, h: &AdamWParams, ema_decay: f32) -> Result<()>;

    // ---- random numbers (ops/random.rs, src/rng.rs) -----------------------------------------
    /// Standard normal values; element `i` depends only on `(seed, offset + i)`.
    fn randn(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor>;
    /// Uniform values in [0, 1); element `i` depends only on `(seed, offset + i)`.
    fn rand_uniform(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor>;
}

mod cpu;
mod gpu;

pub use cpu::Cpu;
