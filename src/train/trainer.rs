//! One training step of DDPM (Algorithm 1 of Ho et al. 2020), on any backend:
//!   t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
//!   loss = mean((target - model(x_t, t))^2),  target = eps | v | x_0
//! (with a Min-SNR gamma, the mean over the batch of each sample's mean squared error times
//! its weight, `train::min_snr`), then backward through the tape, global-norm clipping, fused
//! AdamW and the EMA update.
//!
//! The weights, their gradients, AdamW's moments and the EMA weights each live in one flat
//! buffer (`nn::ParamLayout`): the backward pass writes every parameter gradient into the flat
//! gradient buffer with one gather, which also yields the squared global norm, and one fused
//! kernel clips, steps AdamW and updates the EMA over all of them. The host reads back only
//! the loss and the norm, once per step, after the update has been recorded.
//!
//! Every random number of step `k` is a pure function of `(seed, k)`: a run resumed from a
//! checkpoint at step `k` continues exactly as the uninterrupted run would have.
//!
//! A trainer can be one rank of a data-parallel group ([`Trainer::data_parallel`]): it then
//! takes its slice of every global batch, with the random numbers those samples get in one
//! process, and sums its gradient with the other ranks' before the update (see
//! [`crate::parallel`]).

use super::hyper::TrainHyper;
use super::min_snr::min_snr_weights;
use crate::autodiff::Tape;
use crate::backend::Backend;
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::error::{Error, Result};
use crate::nn::{ParamLayout, UNet2D};
use crate::ops::grads::GradPlan;
use crate::ops::optim::{AdamWParams, StepTensors};
use crate::parallel::{Collective, Shard};
use crate::rng;
use crate::tensor::Tensor;
#[cfg(not(target_arch = "wasm32"))]
use std::time::Instant;
#[cfg(target_arch = "wasm32")]
use web_time::Instant;

/// Independent random streams of one run.
const TIMESTEP_STREAM: u64 = 1;
const NOISE_STREAM: u64 = 2;
const DROPOUT_STREAM: u64 = 3;
const CLASS_DROPOUT_STREAM: u64 = 4;

/// The seed of one random stream of a run.
pub fn stream_seed(seed: u64, stream: u64) -> u64 {
    seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    /// The global L2 norm of the gradient before clipping.
    pub grad_norm: f32,
    pub lr: f32,
    /// Host time spent issuing the step's ops, not waiting for the loss: on the GPU the time
    /// to record the step's dispatches, on the CPU the computation itself.
    pub host_time: std::time::Duration,
}

/// The loss of one step and the gradient of every parameter, before the update.
pub struct StepGradients {
    /// Shape `[1]`, on the backend.
    pub loss: Tensor,
    /// Every parameter's gradient in the flat layout of the trainer's state. It is the
    /// trainer's gradient buffer: the next step overwrites it.
    pub grads: Tensor,
    /// The squared global norm of the gradient, `[1]`.
    pub norm2: Tensor,
    /// Host time spent issuing the forward and backward passes.
    host_time: std::time::Duration,
}

/// One vector per parameter, in the model's order, of each part of a training state: what a
/// checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    pub params: Vec<Vec<f32>>,
    pub adam_m: Vec<Vec<f32>>,
    pub adam_v: Vec<Vec<f32>>,
    pub ema: Vec<Vec<f32>>,
    /// Optimizer steps taken.
    pub step: u64,
}

/// The weights, the AdamW moments and the EMA weights of a model on one backend, each one flat
/// buffer in the model's [`ParamLayout`].
pub struct TrainState {
    pub layout: ParamLayout,
    pub params: Tensor,
    pub adam_m: Tensor,
    pub adam_v: Tensor,
    pub ema: Tensor,
    /// Optimizer steps taken.
    pub step: u64,
}

impl TrainState {
    /// A fresh state: the given initial weights, zero moments, the EMA a copy of the weights.
    pub fn new(be: &dyn Backend, model: &UNet2D, values: &[Vec<f32>]) -> Result<Self> {
        let zeros: Vec<Vec<f32>> = values.iter().map(|v| vec![0.0; v.len()]).collect();
        Self::from_host(
            be,
            model,
            &HostState {
                params: values.to_vec(),
                adam_m: zeros.clone(),
                adam_v: zeros,
                ema: values.to_vec(),
                step: 0,
            },
        )
    }

    /// Uploads a state, each part flattened into one buffer.
    pub fn from_host(be: &dyn Backend, model: &UNet2D, host: &HostState) -> Result<Self> {
        let layout = model.params.layout();
        let upload = |vs: &[Vec<f32>]| be.upload(&[layout.total], &layout.flatten(vs)?);
        Ok(TrainState {
            params: upload(&host.params)?,
            adam_m: upload(&host.adam_m)?,
            adam_v: upload(&host.adam_v)?,
            ema: upload(&host.ema)?,
            step: host.step,
            layout,
        })
    }

    /// Reads the state back, one readback per part.
    pub fn to_host(&self, be: &dyn Backend) -> Result<HostState> {
        let read = |t: &Tensor| -> Result<Vec<Vec<f32>>> { Ok(self.layout.split(&be.to_vec(t)?)) };
        Ok(HostState {
            params: read(&self.params)?,
            adam_m: read(&self.adam_m)?,
            adam_v: read(&self.adam_v)?,
            ema: read(&self.ema)?,
            step: self.step,
        })
    }

    /// Every parameter, a view of the flat weights.
    pub fn param_views(&self) -> Result<Vec<Tensor>> {
        self.layout.views(&self.params)
    }

    /// Every EMA weight, a view of the flat EMA buffer (what sampling uses).
    pub fn ema_views(&self) -> Result<Vec<Tensor>> {
        self.layout.views(&self.ema)
    }
}

/// Trains a model on one backend.
pub struct Trainer<'b> {
    be: &'b dyn Backend,
    pub model: UNet2D,
    pub schedule: NoiseSchedule,
    pub hyper: TrainHyper,
    pub state: TrainState,
    alphas_cumprod: Tensor,
    /// The flat gradient buffer, zeros between the parameters.
    grads: Tensor,
    /// Where the backward pass puts each parameter's partial gradients, kept across steps.
    plan: Option<GradPlan>,
    /// The data-parallel group this trainer is a rank of, if any, and its slice of a batch.
    group: Option<&'b dyn Collective>,
    shard: Shard,
}

impl<'b> Trainer<'b> {
    pub fn new(
        be: &'b dyn Backend,
        model: UNet2D,
        schedule: NoiseSchedule,
        hyper: TrainHyper,
        state: TrainState,
    ) -> Result<Self> {
        if hyper.batch_size == 0 {
            return Err(Error::invalid("train", "batch size must be at least 1"));
        }
        hyper.check()?;
        if state.layout != model.params.layout() {
            return Err(Error::invalid(
                "train",
                "the training state was made for another model",
            ));
        }
        let alphas_cumprod =
            be.upload(&[schedule.num_train_timesteps()], &schedule.alphas_cumprod)?;
        let grads = be.zeros(&[state.layout.total])?;
        Ok(Trainer {
            be,
            model,
            schedule,
            hyper,
            state,
            alphas_cumprod,
            grads,
            plan: None,
            group: None,
            shard: Shard::WHOLE,
        })
    }

    /// Makes this trainer one rank of a data-parallel group: `hyper.batch_size` is then the
    /// global batch, which must split evenly over the ranks; each step takes this rank's
    /// slice of it and sums the gradient over the group before the update. Every rank must
    /// start from the same state.
    pub fn data_parallel(mut self, group: &'b dyn Collective) -> Result<Self> {
        let shard = Shard::of(group);
        shard.local_batch(self.hyper.batch_size)?;
        self.shard = shard;
        self.group = Some(group);
        Ok(self)
    }

    /// Which slice of every global batch this trainer takes.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    pub fn backend(&self) -> &'b dyn Backend {
        self.be
    }

    /// The shape of the batch a step of this trainer takes, `[B, C, S, S]`: on a rank of a
    /// data-parallel group, its slice of the global batch.
    pub fn batch_shape(&self) -> [usize; 4] {
        let c = &self.model.config;
        let local = self.hyper.batch_size / self.shard.ranks;
        [local, c.in_channels, c.size(), c.size()]
    }

    /// The timesteps of step `k`, one per sample of this trainer's batch.
    pub fn timesteps(&self, k: u64) -> Vec<f32> {
        let b = self.hyper.batch_size as u64;
        let t_max = self.schedule.num_train_timesteps();
        let seed = stream_seed(self.hyper.seed, TIMESTEP_STREAM);
        let [local, ..] = self.batch_shape();
        let first = (self.shard.rank * local) as u64;
        (first..first + local as u64)
            .map(|i| {
                let u = rng::uniform(seed, k * b + i);
                ((u * t_max as f32) as usize).min(t_max - 1) as f32
            })
            .collect()
    }

    /// One optimizer step on the clean batch `x0` (`[B, C, S, S]` in [-1, 1], host memory)
    /// with its class labels for a class-conditional model: [`Self::gradients`] then
    /// [`Self::apply`].
    /// On a rank of a data-parallel group, `x0` and the labels are its slice of the batch,
    /// and the gradients are summed over the group in between.
    pub fn step(&mut self, x0: &[f32], labels: Option<&[u32]>) -> Result<StepStats> {
        let mut g = self.gradients(x0, labels).map_err(|e| self.for_batch(e))?;
        if let Some(group) = self.group {
            g = self.all_reduce(g, group)?;
        }
        self.apply(g).map_err(|e| self.for_batch(e))
    }

    /// [`Self::step`] for a caller that must not block, such as a web page: the same step,
    /// with the loss and the norm read by [`Backend::to_vec_async`]. Not for a rank of a
    /// data-parallel group.
    pub async fn step_async(&mut self, x0: &[f32], labels: Option<&[u32]>) -> Result<StepStats> {
        if self.group.is_some() {
            return Err(Error::invalid(
                "train step",
                "a rank of a data-parallel group steps with Trainer::step",
            ));
        }
        let g = self.gradients(x0, labels).map_err(|e| self.for_batch(e))?;
        let update = self.record_update(g).map_err(|e| self.for_batch(e))?;
        let scalars = self.be.to_vec_async(&update.scalars).await?;
        self.finish(update, &scalars)
    }

    /// The loss and gradient of the whole global batch from each rank's own: the sum over
    /// the group, divided by the number of ranks (each rank's loss is the mean over an equal
    /// slice of the batch, so the mean of theirs is the batch's), in one all-reduce of the
    /// flat gradient and the loss together; then the squared norm of the sum.
    fn all_reduce(&self, g: StepGradients, group: &dyn Collective) -> Result<StepGradients> {
        let be = self.be;
        let mut flat = be.to_vec(&g.grads)?;
        flat.extend(be.to_vec(&g.loss)?);
        group.all_reduce_sum(&mut flat)?;
        let loss = flat.pop().unwrap_or(f32::NAN) / group.size() as f32;
        let scale = 1.0 / group.size() as f32;
        flat.iter_mut().for_each(|v| *v *= scale);
        let norm2: f64 = flat.iter().map(|&v| v as f64 * v as f64).sum();
        Ok(StepGradients {
            loss: be.upload(&[1], &[loss])?,
            grads: be.upload(&[flat.len()], &flat)?,
            norm2: be.upload(&[1], &[norm2 as f32])?,
            host_time: g.host_time,
        })
    }

    /// An out-of-memory error told which batch size needed the memory.
    fn for_batch(&self, e: Error) -> Error {
        match e {
            Error::OutOfMemory {
                op,
                bytes,
                limit,
                msg,
            } => Error::OutOfMemory {
                op,
                bytes,
                limit,
                msg: format!(
                    "a training step of batch size {} needs it ({msg})",
                    self.hyper.batch_size
                ),
            },
            e => e,
        }
    }

    /// The labels step `k` trains with: each replaced by the null class (the table's last
    /// row) with probability `class_dropout`, so that one network learns the conditional and
    /// the unconditional prediction (classifier-free guidance, Ho & Salimans 2022). `labels`
    /// are this trainer's slice of the batch.
    pub fn step_labels(&self, k: u64, labels: &[u32]) -> Vec<u32> {
        let p = self.hyper.class_dropout;
        let null = self.model.config.class_count().saturating_sub(1) as u32;
        let seed = stream_seed(self.hyper.seed, CLASS_DROPOUT_STREAM);
        let b = (labels.len() * self.shard.ranks) as u64;
        let first = (self.shard.rank * labels.len()) as u64;
        labels
            .iter()
            .zip(first..)
            .map(|(&l, i)| {
                if p > 0.0 && rng::uniform(seed, k * b + i) < p {
                    null
                } else {
                    l
                }
            })
            .collect()
    }

    /// The loss and the parameter gradients of the next step on the clean batch `x0` (and its
    /// labels); the state does not change. On a rank of a data-parallel group they are its
    /// slice's alone: [`Self::step`] sums them over the group.
    pub fn gradients(&mut self, x0: &[f32], labels: Option<&[u32]>) -> Result<StepGradients> {
        let be = self.be;
        let shape = self.batch_shape();
        let numel: usize = shape.iter().product();
        if x0.len() != numel {
            return Err(Error::shape(
                "train step",
                format!("a batch of {shape:?}"),
                &[x0.len()],
            ));
        }
        let k = self.state.step;
        let started = Instant::now();
        let x0 = be.upload(&shape, x0)?;
        let timesteps = self.timesteps(k);
        let t = be.upload(&[shape[0]], &timesteps)?;
        // This batch's noise is elements first..first + numel of the global batch's.
        let noise_seed = stream_seed(self.hyper.seed, NOISE_STREAM);
        let first = (k * self.shard.ranks as u64 + self.shard.rank as u64) * numel as u64;
        let eps = be.randn(&shape, noise_seed, first)?;
        let x_t = be.q_sample(&x0, &eps, &t, &self.alphas_cumprod)?;
        let target = match self.hyper.prediction_type {
            PredictionType::Epsilon => eps,
            PredictionType::Sample => x0,
            // v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0: the noising kernel with the roles
            // of x_0 and eps exchanged and x_0 negated.
            PredictionType::VPrediction => {
                let minus_x0 = be.scale(&x0, -1.0)?;
                be.q_sample(&eps, &minus_x0, &t, &self.alphas_cumprod)?
            }
        };

        let dropout_seed = stream_seed(stream_seed(self.hyper.seed, DROPOUT_STREAM), k);
        let mut tape = Tape::new(be).with_dropout(dropout_seed).sharded(self.shard);
        let p = tape.params(&self.state.param_views()?);
        let x = tape.leaf(x_t, false);
        let labels = labels.map(|l| self.step_labels(k, l));
        let out = self
            .model
            .forward(&mut tape, &p, x, &t, labels.as_deref())?;
        let (loss, d_out) = self.loss_with_grad(tape.value(out), &target, &timesteps)?;
        let layout = &self.state.layout;
        let norm2 = tape.backward_params(out, d_out, layout, &mut self.plan, &mut self.grads)?;
        Ok(StepGradients {
            loss,
            grads: self.grads.clone(),
            norm2,
            host_time: started.elapsed(),
        })
    }

    /// The loss of a step and its gradient w.r.t. the model's output: the mean squared error,
    /// or with a Min-SNR gamma each sample's weighted by its timestep's weight.
    fn loss_with_grad(
        &self,
        pred: &Tensor,
        target: &Tensor,
        timesteps: &[f32],
    ) -> Result<(Tensor, Tensor)> {
        let be = self.be;
        let Some(gamma) = self.hyper.snr_gamma else {
            return be.mse_loss_with_grad(pred, target, 1.0);
        };
        let ac = &self.schedule.alphas_cumprod;
        let weights = min_snr_weights(ac, timesteps, gamma, self.hyper.prediction_type)?;
        let weights = be.upload(&[weights.len()], &weights)?;
        be.weighted_mse_loss_with_grad(pred, target, &weights, 1.0)
    }

    /// The update of one step from its gradients: clipping by the global norm, fused AdamW at
    /// the step's learning rate and the EMA at the step's decay, in one kernel; then one
    /// readback of the loss and the norm.
    pub fn apply(&mut self, g: StepGradients) -> Result<StepStats> {
        let update = self.record_update(g)?;
        let scalars = self.be.to_vec(&update.scalars)?;
        self.finish(update, &scalars)
    }

    /// Records the fused update of [`Self::apply`]; [`Self::finish`] completes the step from
    /// the host copy of the returned scalars.
    fn record_update(&mut self, g: StepGradients) -> Result<RecordedUpdate> {
        let be = self.be;
        let k = self.state.step;
        let started = Instant::now();
        let StepGradients {
            loss,
            grads,
            norm2,
            host_time: recording,
        } = g;
        let lr = self.hyper.lr_at(k);
        let h = AdamWParams {
            lr,
            beta1: self.hyper.adam_beta1,
            beta2: self.hyper.adam_beta2,
            eps: self.hyper.adam_eps,
            weight_decay: self.hyper.weight_decay,
            step: (k + 1) as u32,
            max_grad_norm: self.hyper.max_grad_norm,
        };
        let s = &mut self.state;
        let tensors = StepTensors {
            params: &mut s.params,
            grads: &grads,
            adam_m: &mut s.adam_m,
            adam_v: &mut s.adam_v,
            ema: &mut s.ema,
            norm2: &norm2,
        };
        be.adamw_ema_step(tensors, &h, self.hyper.ema_decay_at(k + 1))?;
        // One readback (one wait on the GPU) for both scalars: [loss, |g|^2].
        let scalar = |t: &Tensor| t.reshape(&[1, 1, 1, 1]);
        let scalars = be.concat_channels(&scalar(&loss)?, &scalar(&norm2)?)?;
        Ok(RecordedUpdate {
            scalars,
            lr,
            host_time: recording + started.elapsed(),
        })
    }

    /// Ends the step whose update was recorded, given `[loss, |g|^2]` read back.
    fn finish(&mut self, update: RecordedUpdate, scalars: &[f32]) -> Result<StepStats> {
        let k = self.state.step;
        let (loss, grad_norm) = (scalars[0], scalars[1].sqrt());
        if !loss.is_finite() || !grad_norm.is_finite() {
            // The update kernel skips a step whose norm is not finite: the state is unchanged.
            return Err(Error::invalid(
                "train step",
                format!(
                    "the loss ({loss}) or the gradient norm ({grad_norm}) is not finite at step \
                     {k}; lower the learning rate or keep gradient clipping on"
                ),
            ));
        }
        self.state.step += 1;
        Ok(StepStats {
            loss,
            grad_norm,
            lr: update.lr,
            host_time: update.host_time,
        })
    }
}

/// An update recorded on the backend whose scalars are still to be read.
struct RecordedUpdate {
    /// `[loss, |g|^2]`, shape `[1, 2, 1, 1]`.
    scalars: Tensor,
    lr: f32,
    host_time: std::time::Duration,
}
