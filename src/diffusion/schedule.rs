//! Noise schedules (`betas`, `alphas`, `alphas_cumprod`) as diffusers' `DDPMScheduler` builds
//! them, and the host-side scalars of one DDPM or DDIM step that the fused step kernels take.
//!
//! Everything is computed in f64 and stored in f32. The step coefficients are derived from
//! the stored f32 `alphas_cumprod` (the table `q_sample` reads), so that sampling and training
//! see one and the same schedule.

use crate::error::{Error, Result};
use crate::ops::diffusion::{DdimStepCoefficients, DdpmStepCoefficients};

/// How `betas` are spaced over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// Evenly from `beta_start` to `beta_end`.
    Linear,
    /// Squares of evenly spaced values from `sqrt(beta_start)` to `sqrt(beta_end)`.
    ScaledLinear,
    /// The cosine schedule of Nichol and Dhariwal (2021), each beta capped at 0.999.
    SquaredCosCapV2,
}

/// What the model predicts: the noise, the velocity `v`, or the clean sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PredictionType {
    #[default]
    Epsilon,
    /// `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0` (Salimans and Ho, 2022).
    VPrediction,
    Sample,
}

/// The variance of the DDPM reverse step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VarianceType {
    /// The posterior variance `beta_t (1 - abar_{t-1}) / (1 - abar_t)`.
    #[default]
    FixedSmall,
    /// `beta_t` itself.
    FixedLarge,
}

macro_rules! named {
    ($ty:ident, $what:literal, $($variant:ident = $name:literal),+) => {
        impl $ty {
            /// The name diffusers' configuration files use.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            /// Parses the name diffusers' configuration files use.
            pub fn from_name(name: &str) -> Result<Self> {
                match name {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(Error::invalid(
                        $what,
                        format!("unknown {} {name:?}; expected one of {}", $what,
                            [$($name),+].join(", ")),
                    )),
                }
            }
        }
    };
}

named!(
    BetaSchedule,
    "beta_schedule",
    Linear = "linear",
    ScaledLinear = "scaled_linear",
    SquaredCosCapV2 = "squaredcos_cap_v2"
);
named!(
    PredictionType,
    "prediction_type",
    Epsilon = "epsilon",
    VPrediction = "v_prediction",
    Sample = "sample"
);
named!(
    VarianceType,
    "variance_type",
    FixedSmall = "fixed_small",
    FixedLarge = "fixed_large"
);

/// The largest beta of the cosine schedule.
const COSINE_MAX_BETA: f64 = 0.999;

/// `abar(s) = cos(((s + 0.008) / 1.008) pi / 2)^2`, the cosine schedule's `alphas_cumprod` at
/// the fraction `s` of the way through the process.
fn cosine_alpha_bar(s: f64) -> f64 {
    (((s + 0.008) / 1.008) * std::f64::consts::FRAC_PI_2)
        .cos()
        .powi(2)
}

/// A noise schedule over `T` training timesteps `0 .. T`.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    /// `alpha_t = 1 - beta_t`.
    pub alphas: Vec<f32>,
    /// `abar_t = prod_{i <= t} alpha_i`.
    pub alphas_cumprod: Vec<f32>,
    /// `abar` after the last DDIM step (at `t' < 0`): 1 (diffusers' `set_alpha_to_one`), or
    /// set it to `alphas_cumprod[0]`.
    pub final_alpha_cumprod: f32,
}

impl NoiseSchedule {
    /// The schedule `kind` over `num_train_timesteps` steps (`beta_start` and `beta_end` are
    /// unused by the cosine schedule).
    pub fn new(
        kind: BetaSchedule,
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    ) -> Result<Self> {
        const OP: &str = "noise schedule";
        let steps = num_train_timesteps;
        if steps == 0 {
            return Err(Error::invalid(OP, "num_train_timesteps must be at least 1"));
        }
        if kind != BetaSchedule::SquaredCosCapV2
            && !(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0)
        {
            return Err(Error::invalid(
                OP,
                format!("betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}"),
            ));
        }
        // Fraction of the way from the first step to the last (torch.linspace).
        let frac = |t: usize| {
            if steps == 1 {
                0.0
            } else {
                t as f64 / (steps - 1) as f64
            }
        };
        let betas: Vec<f64> = (0..steps)
            .map(|t| match kind {
                BetaSchedule::Linear => beta_start + (beta_end - beta_start) * frac(t),
                BetaSchedule::ScaledLinear => {
                    let (s, e) = (beta_start.sqrt(), beta_end.sqrt());
                    (s + (e - s) * frac(t)).powi(2)
                }
                BetaSchedule::SquaredCosCapV2 => {
                    let abar = |t: usize| cosine_alpha_bar(t as f64 / steps as f64);
                    (1.0 - abar(t + 1) / abar(t)).min(COSINE_MAX_BETA)
                }
            })
            .collect();
        let mut abar = 1.0;
        let mut alphas_cumprod = Vec::with_capacity(steps);
        for beta in &betas {
            abar *= 1.0 - beta;
            alphas_cumprod.push(abar as f32);
        }
        Ok(NoiseSchedule {
            alphas: betas.iter().map(|b| (1.0 - b) as f32).collect(),
            betas: betas.iter().map(|&b| b as f32).collect(),
            alphas_cumprod,
            final_alpha_cumprod: 1.0,
        })
    }

    /// `linear` from `beta_start` to `beta_end`.
    pub fn linear(num_train_timesteps: usize, beta_start: f64, beta_end: f64) -> Result<Self> {
        Self::new(
            BetaSchedule::Linear,
            num_train_timesteps,
            beta_start,
            beta_end,
        )
    }

    /// `scaled_linear` from `beta_start` to `beta_end`.
    pub fn scaled_linear(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    ) -> Result<Self> {
        Self::new(
            BetaSchedule::ScaledLinear,
            num_train_timesteps,
            beta_start,
            beta_end,
        )
    }

    /// `squaredcos_cap_v2`, the cosine schedule.
    pub fn squaredcos_cap_v2(num_train_timesteps: usize) -> Result<Self> {
        Self::new(BetaSchedule::SquaredCosCapV2, num_train_timesteps, 0.0, 0.0)
    }

    /// `T`.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `abar` at a point `t` of `[0, T - 1]` in f64: the table at whole timesteps, and
    /// between them `log abar` interpolated linearly (the continuous time of the ODE
    /// likelihood; the network's timestep embedding takes fractions as they are).
    pub fn alpha_bar_at(&self, t: f64) -> Result<f64> {
        let last = self.num_train_timesteps() - 1;
        if !(0.0..=last as f64).contains(&t) {
            return Err(Error::invalid(
                "alpha_bar_at",
                format!("time {t} is outside the schedule's [0, {last}]"),
            ));
        }
        let (i, f) = (t.floor() as usize, t.fract());
        let at = |i: usize| self.alphas_cumprod[i] as f64;
        if f == 0.0 {
            return Ok(at(i));
        }
        Ok((at(i).ln() * (1.0 - f) + at(i + 1).ln() * f).exp())
    }

    /// The inverse of [`Self::alpha_bar_at`]: the time in `[0, T - 1]` where `abar` is reached.
    pub fn time_at_alpha_bar(&self, abar: f64) -> Result<f64> {
        let ac = &self.alphas_cumprod;
        let log = |i: usize| (ac[i] as f64).ln();
        let last = ac.len() - 1;
        let target = abar.ln();
        if !(log(last)..=log(0)).contains(&target) {
            return Err(Error::invalid(
                "time_at_alpha_bar",
                format!(
                    "alpha_bar {abar} is outside the schedule's [{}, {}]",
                    ac[last], ac[0]
                ),
            ));
        }
        // The first timestep at or below the target; the table decreases.
        let i = ac.partition_point(|&a| (a as f64).ln() > target);
        if i == 0 || log(i) == target {
            return Ok(i as f64);
        }
        Ok((i - 1) as f64 + (log(i - 1) - target) / (log(i - 1) - log(i)))
    }

    /// `abar_t` in f64, checking that `t` is a timestep of the schedule.
    fn abar(&self, op: &'static str, t: usize) -> Result<f64> {
        self.alphas_cumprod
            .get(t)
            .map(|&a| a as f64)
            .ok_or_else(|| {
                Error::invalid(
                    op,
                    format!(
                        "timestep {t} out of range 0..{}",
                        self.num_train_timesteps()
                    ),
                )
            })
    }

    /// `abar_{t'}` for a previous timestep `t' < t`; `None` is the step past the end.
    fn abar_prev(
        &self,
        op: &'static str,
        t: usize,
        t_prev: Option<usize>,
        last: f64,
    ) -> Result<f64> {
        match t_prev {
            None => Ok(last),
            Some(tp) if tp < t => self.abar(op, tp),
            Some(tp) => Err(Error::invalid(
                op,
                format!("the previous timestep {tp} must be smaller than the timestep {t}"),
            )),
        }
    }

    /// The DDPM step `x_t -> x_{t-1}` (`t = 0` is the last step, to `abar_{-1} = 1`).
    pub fn ddpm_coefficients(
        &self,
        t: usize,
        variance_type: VarianceType,
        prediction_type: PredictionType,
        clip_sample: Option<f32>,
    ) -> Result<DdpmStepCoefficients> {
        let t_prev = t.checked_sub(1);
        self.ddpm_coefficients_to(t, t_prev, variance_type, prediction_type, clip_sample)
    }

    /// The DDPM step from `t` to an earlier `t_prev` (diffusers' strided sampling with fewer
    /// inference steps; `None` past the end, where `abar = 1`). With `abar_p = abar_{t_prev}`,
    /// `alpha = abar_t / abar_p`, `beta = 1 - alpha`:
    /// `c0 = sqrt(abar_p) beta / (1 - abar_t)`, `ct = sqrt(alpha) (1 - abar_p) / (1 - abar_t)`,
    /// `sigma^2 = beta (1 - abar_p) / (1 - abar_t)` (fixed_small) or `beta` (fixed_large),
    /// and `sigma = 0` at `t = 0`. `clip_sample` clips `x0_hat` to `[-r, r]`.
    pub fn ddpm_coefficients_to(
        &self,
        t: usize,
        t_prev: Option<usize>,
        variance_type: VarianceType,
        prediction_type: PredictionType,
        clip_sample: Option<f32>,
    ) -> Result<DdpmStepCoefficients> {
        const OP: &str = "ddpm_coefficients";
        check_clip(OP, clip_sample)?;
        let abar_t = self.abar(OP, t)?;
        let abar_p = self.abar_prev(OP, t, t_prev, 1.0)?;
        let alpha = abar_t / abar_p;
        let beta = 1.0 - alpha;
        let variance = match variance_type {
            VarianceType::FixedSmall => (beta * (1.0 - abar_p) / (1.0 - abar_t)).max(1e-20),
            VarianceType::FixedLarge => beta,
        };
        Ok(DdpmStepCoefficients {
            prediction_type,
            sqrt_abar_t: abar_t.sqrt() as f32,
            sqrt_one_minus_abar_t: (1.0 - abar_t).sqrt() as f32,
            clip_sample,
            c0: (abar_p.sqrt() * beta / (1.0 - abar_t)) as f32,
            ct: (alpha.sqrt() * (1.0 - abar_p) / (1.0 - abar_t)) as f32,
            sigma: if t > 0 { variance.sqrt() as f32 } else { 0.0 },
        })
    }

    /// The DDIM step from `t` to `t_prev` (`None`: past the end, where
    /// `abar = final_alpha_cumprod`): `sigma = eta sqrt((1 - abar_p) / (1 - abar_t))
    /// sqrt(1 - abar_t / abar_p)` and the direction coefficient `sqrt(1 - abar_p - sigma^2)`.
    /// `eps_hat` is recomputed from the clipped `x0_hat` only when the returned
    /// `use_clipped_model_output` is set (false here, as in diffusers' default).
    pub fn ddim_coefficients(
        &self,
        t: usize,
        t_prev: Option<usize>,
        eta: f32,
        prediction_type: PredictionType,
        clip_sample: Option<f32>,
    ) -> Result<DdimStepCoefficients> {
        const OP: &str = "ddim_coefficients";
        check_clip(OP, clip_sample)?;
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid(
                OP,
                format!("eta must be in [0, 1], got {eta}"),
            ));
        }
        let abar_t = self.abar(OP, t)?;
        let abar_p = self.abar_prev(OP, t, t_prev, self.final_alpha_cumprod as f64)?;
        let variance = (1.0 - abar_p) / (1.0 - abar_t) * (1.0 - abar_t / abar_p);
        let sigma = eta as f64 * variance.max(0.0).sqrt();
        Ok(DdimStepCoefficients {
            prediction_type,
            sqrt_abar_t: abar_t.sqrt() as f32,
            sqrt_one_minus_abar_t: (1.0 - abar_t).sqrt() as f32,
            clip_sample,
            use_clipped_model_output: false,
            sqrt_abar_prev: abar_p.sqrt() as f32,
            direction: (1.0 - abar_p - sigma * sigma).max(0.0).sqrt() as f32,
            sigma: sigma as f32,
        })
    }
}

fn check_clip(op: &'static str, clip_sample: Option<f32>) -> Result<()> {
    match clip_sample {
        Some(r) if !(r > 0.0 && r.is_finite()) => Err(Error::invalid(
            op,
            format!("clip_sample_range must be positive and finite, got {r}"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, rel: f64) -> bool {
        (got - want).abs() <= rel * want.abs()
    }

    #[test]
    fn linear_schedule_endpoints_and_cumprod() {
        let s = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
        assert_eq!(s.betas[0], 1e-4);
        assert_eq!(s.betas[999], 0.02);
        assert!(close(
            s.betas[500] as f64,
            1e-4 + 0.0199 * 500.0 / 999.0,
            1e-6
        ));
        assert_eq!(s.alphas[0], 1.0 - 1e-4);
        assert!(
            close(s.alphas_cumprod[999] as f64, 4.035e-5, 1e-3),
            "{}",
            s.alphas_cumprod[999]
        );
    }

    #[test]
    fn scaled_linear_is_a_square_of_a_line() {
        let s = NoiseSchedule::scaled_linear(1000, 0.00085, 0.012).unwrap();
        assert!(close(s.betas[0] as f64, 0.00085, 1e-6));
        assert!(close(s.betas[999] as f64, 0.012, 1e-6));
        let mid = (0.00085f64.sqrt() + 0.012f64.sqrt()) / 2.0;
        let s2 = NoiseSchedule::scaled_linear(3, 0.00085, 0.012).unwrap();
        assert!(close(s2.betas[1] as f64, mid * mid, 1e-6));
    }

    #[test]
    fn cosine_schedule_first_beta_and_cap() {
        let s = NoiseSchedule::squaredcos_cap_v2(1000).unwrap();
        let f = |x: f64| {
            ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        let first = 1.0 - f(0.001) / f(0.0);
        assert!(
            close(s.betas[0] as f64, first, 1e-6),
            "{} vs {first}",
            s.betas[0]
        );
        assert!(close(first, 4.1284e-5, 1e-3), "{first}");
        assert_eq!(s.betas[999], 0.999);
        assert!(s.betas.iter().all(|&b| b > 0.0 && b <= 0.999));
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn bad_schedules_are_errors() {
        assert!(NoiseSchedule::linear(0, 1e-4, 0.02).is_err());
        assert!(NoiseSchedule::linear(10, 0.02, 1e-4).is_err());
        assert!(NoiseSchedule::linear(10, 1e-4, 1.0).is_err());
        assert!(BetaSchedule::from_name("cosine").is_err());
        assert_eq!(
            BetaSchedule::from_name("squaredcos_cap_v2").unwrap(),
            BetaSchedule::SquaredCosCapV2
        );
        assert_eq!(
            PredictionType::from_name("v_prediction").unwrap().name(),
            "v_prediction"
        );
        assert_eq!(VarianceType::FixedLarge.name(), "fixed_large");
    }

    #[test]
    fn ddpm_coefficients_follow_the_posterior() {
        let s = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
        let t = 500;
        let (a, ap) = (s.alphas_cumprod[t] as f64, s.alphas_cumprod[t - 1] as f64);
        let beta = 1.0 - a / ap;
        let c = s
            .ddpm_coefficients(
                t,
                VarianceType::FixedSmall,
                PredictionType::Epsilon,
                Some(1.0),
            )
            .unwrap();
        assert!(close(c.c0 as f64, ap.sqrt() * beta / (1.0 - a), 1e-6));
        assert!(close(
            c.ct as f64,
            (a / ap).sqrt() * (1.0 - ap) / (1.0 - a),
            1e-6
        ));
        assert!(close(
            c.sigma as f64,
            (beta * (1.0 - ap) / (1.0 - a)).sqrt(),
            1e-6
        ));
        // The beta recovered from the cumulative products is the schedule's beta.
        assert!(close(beta, s.betas[t] as f64, 1e-3));
        let large = s
            .ddpm_coefficients(t, VarianceType::FixedLarge, PredictionType::Epsilon, None)
            .unwrap();
        assert!(close(large.sigma as f64, beta.sqrt(), 1e-6));
        // The last step: abar_{-1} = 1, no noise, and x_{-1} = x0_hat.
        let last = s
            .ddpm_coefficients(0, VarianceType::FixedSmall, PredictionType::Epsilon, None)
            .unwrap();
        assert_eq!(last.sigma, 0.0);
        assert!(close(last.c0 as f64, 1.0, 1e-6));
        assert_eq!(last.ct, 0.0);
        assert!(s
            .ddpm_coefficients(
                1000,
                VarianceType::FixedSmall,
                PredictionType::Epsilon,
                None
            )
            .is_err());
        assert!(s
            .ddpm_coefficients_to(
                5,
                Some(5),
                VarianceType::FixedSmall,
                PredictionType::Epsilon,
                None
            )
            .is_err());
        assert!(s
            .ddpm_coefficients(
                5,
                VarianceType::FixedSmall,
                PredictionType::Epsilon,
                Some(0.0)
            )
            .is_err());
    }

    #[test]
    fn ddim_coefficients() {
        let s = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
        let (a, ap) = (s.alphas_cumprod[980] as f64, s.alphas_cumprod[960] as f64);
        let c = s
            .ddim_coefficients(980, Some(960), 0.0, PredictionType::Epsilon, None)
            .unwrap();
        assert_eq!(c.sigma, 0.0);
        assert!(close(c.sqrt_abar_prev as f64, ap.sqrt(), 1e-6));
        assert!(close(c.direction as f64, (1.0 - ap).sqrt(), 1e-6));
        let c = s
            .ddim_coefficients(980, Some(960), 1.0, PredictionType::Epsilon, None)
            .unwrap();
        let sigma = ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).sqrt();
        assert!(close(c.sigma as f64, sigma, 1e-6));
        assert!(close(
            c.direction as f64,
            (1.0 - ap - sigma * sigma).sqrt(),
            1e-5
        ));
        // Past the end: abar = final_alpha_cumprod = 1, so x_{t'} = x0_hat.
        let last = s
            .ddim_coefficients(20, None, 0.0, PredictionType::Epsilon, None)
            .unwrap();
        assert_eq!((last.sqrt_abar_prev, last.direction), (1.0, 0.0));
        assert!(s
            .ddim_coefficients(20, None, 1.5, PredictionType::Epsilon, None)
            .is_err());
        assert!(s
            .ddim_coefficients(20, Some(30), 0.0, PredictionType::Epsilon, None)
            .is_err());
    }
}
