//! Training hyperparameters with the defaults of diffusers' `train_unconditional.py`, and the
//! two schedules that change over a run: the learning rate (linear warmup, then constant or
//! a cosine decay, as `get_scheduler`) and the EMA decay (`EMAModel` with warmup).

use crate::diffusion::PredictionType;
use crate::error::{Error, Result};

/// How the learning rate moves after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    Constant,
    /// Half a cosine from the peak to zero over the remaining steps.
    Cosine,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainHyper {
    pub batch_size: usize,
    /// Total optimizer steps of the run (the cosine schedule ends here).
    pub steps: u64,
    pub learning_rate: f32,
    pub lr_warmup_steps: u64,
    pub lr_schedule: LrSchedule,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    pub weight_decay: f32,
    /// Clip gradients to this global L2 norm (`None`: no clipping).
    pub max_grad_norm: Option<f32>,
    pub ema_max_decay: f32,
    pub ema_inv_gamma: f32,
    pub ema_power: f32,
    pub prediction_type: PredictionType,
    /// Weight each sample's loss by Min-SNR-gamma with this gamma (`None`: unweighted);
    /// see [`super::min_snr`].
    pub snr_gamma: Option<f32>,
    /// For a class-conditional model: the probability that a label is replaced by the null
    /// class in training (classifier-free guidance needs the unconditional model too).
    pub class_dropout: f32,
    /// Seeds the timesteps and the noise of every step (and the data order, by the caller).
    pub seed: u64,
}

impl Default for TrainHyper {
    fn default() -> Self {
        TrainHyper {
            batch_size: 64,
            steps: 10_000,
            learning_rate: 1e-4,
            lr_warmup_steps: 500,
            lr_schedule: LrSchedule::Cosine,
            adam_beta1: 0.95,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 1e-6,
            max_grad_norm: Some(1.0),
            ema_max_decay: 0.9999,
            ema_inv_gamma: 1.0,
            ema_power: 0.75,
            prediction_type: PredictionType::Epsilon,
            snr_gamma: None,
            class_dropout: 0.1,
            seed: 0,
        }
    }
}

impl TrainHyper {
    /// Checks the settings the optimizer and the loss take as they are: Adam's betas in
    /// [0, 1), its epsilon and the Min-SNR gamma finite and positive, the class dropout a
    /// probability below 1.
    pub fn check(&self) -> Result<()> {
        let invalid = |msg: String| Err(Error::invalid("train", msg));
        for (name, beta) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return invalid(format!("{name} must be in [0, 1), got {beta}"));
            }
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if !positive(self.adam_eps) {
            return invalid(format!(
                "adam_eps must be finite and positive, got {}",
                self.adam_eps
            ));
        }
        if !(0.0..1.0).contains(&self.class_dropout) {
            return invalid(format!(
                "class_dropout must be in [0, 1), got {}",
                self.class_dropout
            ));
        }
        if let Some(gamma) = self.snr_gamma.filter(|&g| !positive(g)) {
            return invalid(format!(
                "snr_gamma must be finite and positive, got {gamma}"
            ));
        }
        Ok(())
    }

    /// The learning rate of optimizer step `k` (0-based), as torch's `LambdaLR` applies
    /// diffusers' warmup schedules: `lr k / warmup` during the warmup, then the decay.
    pub fn lr_at(&self, k: u64) -> f32 {
        let lr = self.learning_rate as f64;
        let warmup = self.lr_warmup_steps;
        let factor = if k < warmup {
            k as f64 / warmup.max(1) as f64
        } else {
            match self.lr_schedule {
                LrSchedule::Constant => 1.0,
                LrSchedule::Cosine => {
                    let progress =
                        (k - warmup) as f64 / (self.steps.saturating_sub(warmup)).max(1) as f64;
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        };
        (lr * factor) as f32
    }

    /// The EMA decay after optimizer step `n` (1-based): `1 - (1 + s / inv_gamma)^-power`
    /// with `s = n - 1`, capped at `ema_max_decay`; 0 on the first step (the EMA starts as a
    /// copy of the trained weights).
    pub fn ema_decay_at(&self, n: u64) -> f32 {
        let s = n.saturating_sub(1);
        if s == 0 {
            return 0.0;
        }
        let warm =
            1.0 - (1.0 + s as f64 / self.ema_inv_gamma as f64).powf(-(self.ema_power as f64));
        warm.clamp(0.0, self.ema_max_decay as f64) as f32
    }
}
