//! One training step of DDPM (Algorithm 1 of Ho et al. 2020), on any backend:
//!   t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
//!   loss = mean((target - model(x_t, t))^2),  target = eps | v | x_0
//! then backward through the tape, global-norm clipping, fused AdamW and the EMA update.
//!
//! Every random number of step `k` is a pure function of `(seed, k)`: a run resumed from a
//! checkpoint at step `k` continues exactly as the uninterrupted run would have.

use super::hyper::TrainHyper;
use crate::autodiff::Tape;
use crate::backend::Backend;
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::error::{Error, Result};
use crate::nn::UNet2D;
use crate::ops::optim::AdamWParams;
use crate::rng;
use crate::tensor::Tensor;

/// Independent random streams of one run.
const TIMESTEP_STREAM: u64 = 1;
const NOISE_STREAM: u64 = 2;
const DROPOUT_STREAM: u64 = 3;

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
    /// One per parameter, in the model's order.
    pub grads: Vec<Tensor>,
    /// Host time spent issuing the forward and backward passes.
    host_time: std::time::Duration,
}

/// The weights, the AdamW moments and the EMA weights of a model on one backend.
pub struct TrainState {
    pub params: Vec<Tensor>,
    pub adam_m: Vec<Tensor>,
    pub adam_v: Vec<Tensor>,
    pub ema: Vec<Tensor>,
    /// Optimizer steps taken.
    pub step: u64,
}

impl TrainState {
    /// A fresh state: the given initial weights, zero moments, the EMA a copy of the weights.
    pub fn new(be: &dyn Backend, model: &UNet2D, values: &[Vec<f32>]) -> Result<Self> {
        let specs = &model.params.specs;
        if values.len() != specs.len() {
            return Err(Error::invalid(
                "TrainState::new",
                format!("{} tensors for {} parameters", values.len(), specs.len()),
            ));
        }
        let upload = |vs: &[Vec<f32>]| -> Result<Vec<Tensor>> {
            specs
                .iter()
                .zip(vs)
                .map(|(s, v)| be.upload(&s.shape, v))
                .collect()
        };
        let zeros =
            || -> Result<Vec<Tensor>> { specs.iter().map(|s| be.zeros(&s.shape)).collect() };
        Ok(TrainState {
            params: upload(values)?,
            adam_m: zeros()?,
            adam_v: zeros()?,
            ema: upload(values)?,
            step: 0,
        })
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
        let alphas_cumprod =
            be.upload(&[schedule.num_train_timesteps()], &schedule.alphas_cumprod)?;
        Ok(Trainer {
            be,
            model,
            schedule,
            hyper,
            state,
            alphas_cumprod,
        })
    }

    pub fn backend(&self) -> &'b dyn Backend {
        self.be
    }

    /// The shape of one batch, `[B, C, S, S]`.
    pub fn batch_shape(&self) -> [usize; 4] {
        let c = &self.model.config;
        [self.hyper.batch_size, c.in_channels, c.size(), c.size()]
    }

    /// The timesteps of step `k`, one per sample.
    pub fn timesteps(&self, k: u64) -> Vec<f32> {
        let b = self.hyper.batch_size as u64;
        let t_max = self.schedule.num_train_timesteps();
        let seed = stream_seed(self.hyper.seed, TIMESTEP_STREAM);
        (0..b)
            .map(|i| {
                let u = rng::uniform(seed, k * b + i);
                ((u * t_max as f32) as usize).min(t_max - 1) as f32
            })
            .collect()
    }

    /// One optimizer step on the clean batch `x0` (`[B, C, S, S]` in [-1, 1], host memory):
    /// [`Self::gradients`] then [`Self::apply`].
    pub fn step(&mut self, x0: &[f32]) -> Result<StepStats> {
        let g = self.gradients(x0)?;
        self.apply(g)
    }

    /// The loss and the parameter gradients of the next step on the clean batch `x0`; the
    /// state does not change.
    pub fn gradients(&self, x0: &[f32]) -> Result<StepGradients> {
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
        let started = std::time::Instant::now();
        let x0 = be.upload(&shape, x0)?;
        let t = be.upload(&[shape[0]], &self.timesteps(k))?;
        let noise_seed = stream_seed(self.hyper.seed, NOISE_STREAM);
        let eps = be.randn(&shape, noise_seed, k * numel as u64)?;
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
        let mut tape = Tape::new(be).with_dropout(dropout_seed);
        let p = tape.leaves(&self.state.params, true);
        let x = tape.leaf(x_t, false);
        let out = self.model.forward(&mut tape, &p, x, &t)?;
        let loss = be.mse_loss(tape.value(out), &target)?;
        let d_out = be.mse_loss_backward(tape.value(out), &target, 1.0)?;
        let mut grads = tape.backward(out, d_out)?;
        let grads: Vec<Tensor> = p
            .iter()
            .map(|&v| {
                grads
                    .take(v)
                    .ok_or_else(|| Error::invalid("train step", "a parameter got no gradient"))
            })
            .collect::<Result<_>>()?;
        Ok(StepGradients {
            loss,
            grads,
            host_time: started.elapsed(),
        })
    }

    /// The update of one step from its gradients: the global gradient norm, clipping, fused
    /// AdamW at the step's learning rate and the EMA at the step's decay.
    pub fn apply(&mut self, g: StepGradients) -> Result<StepStats> {
        let be = self.be;
        let k = self.state.step;
        let started = std::time::Instant::now();
        let StepGradients {
            loss,
            grads,
            host_time: recording,
        } = g;
        let mut norm2 = be.sum_squares(&grads[0])?;
        for g in &grads[1..] {
            norm2 = be.add(&norm2, &be.sum_squares(g)?)?;
        }
        // One readback (one wait on the GPU) for both scalars: [loss, |g|^2].
        let scalar = |t: &Tensor| t.reshape(&[1, 1, 1, 1]);
        let both = be.concat_channels(&scalar(&loss)?, &scalar(&norm2)?)?;
        let mut host_time = recording + started.elapsed();
        let both = be.to_vec(&both)?;
        let (loss, grad_norm) = (both[0], both[1].sqrt());
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::invalid(
                "train step",
                format!(
                    "the loss ({loss}) or the gradient norm ({grad_norm}) is not finite at step \
                     {k}; lower the learning rate or keep gradient clipping on"
                ),
            ));
        }
        let grad_scale = match self.hyper.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let lr = self.hyper.lr_at(k);
        let h = AdamWParams {
            lr,
            beta1: self.hyper.adam_beta1,
            beta2: self.hyper.adam_beta2,
            eps: self.hyper.adam_eps,
            weight_decay: self.hyper.weight_decay,
            step: (k + 1) as u32,
            grad_scale,
        };
        let decay = self.hyper.ema_decay_at(k + 1);
        let optimizer_started = std::time::Instant::now();
        let s = &mut self.state;
        for (i, g) in grads.iter().enumerate() {
            be.adamw_step(&mut s.params[i], g, &mut s.adam_m[i], &mut s.adam_v[i], &h)?;
            be.ema_update(&mut s.ema[i], &s.params[i], decay)?;
        }
        s.step += 1;
        host_time += optimizer_started.elapsed();
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            host_time,
        })
    }
}
