//! The likelihood: the bound's terms against a float64 computation by other formulas, the
//! decoder's bins summing to one, the bound and the ODE likelihood of Gaussian data against
//! its true density, sampled timesteps against every timestep, the U-Net's vector-Jacobian
//! product against finite differences, and both backends against each other.

mod common;

use common::*;
use diffwgpu::diffusion::{
    Denoiser, GaussianDenoiser, NoiseSchedule, PredictionType, UNetDenoiser, VarianceType,
};
use diffwgpu::likelihood::terms::discretized_gaussian_log_likelihood;
use diffwgpu::likelihood::{
    bits_per_dim, ode_log_likelihood, variational_bound, Decoder, Terms, VariationalBound,
};
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::{Backend, Cpu, Gpu, Tensor};

const PREDICTIONS: [PredictionType; 3] = [
    PredictionType::Epsilon,
    PredictionType::VPrediction,
    PredictionType::Sample,
];

fn linear() -> NoiseSchedule {
    NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap()
}

fn bound(pred: PredictionType, vt: VarianceType, decoder: Decoder) -> VariationalBound {
    VariationalBound {
        schedule: linear(),
        prediction_type: pred,
        variance_type: vt,
        clip_sample: None,
        decoder,
    }
}

/// `n` values on the 8-bit grid `2 k / 255 - 1`, the ends included.
fn eight_bit(n: usize, seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = seeded(n, seed)
        .iter()
        .map(|u| ((u + 1.0) * 127.5).floor().min(255.0) * 2.0 / 255.0 - 1.0)
        .collect();
    (v[0], v[1]) = (-1.0, 1.0);
    v
}

/// Simpson's rule over [a, b] with `m` (even) intervals.
fn simpson(f: impl Fn(f64) -> f64, a: f64, b: f64, m: usize) -> f64 {
    let h = (b - a) / m as f64;
    let inner: f64 = (1..m)
        .map(|i| f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 })
        .sum();
    (f(a) + f(b) + inner) * h / 3.0
}

/// The bin's probability by integrating the density, the open ends cut 12 standard deviations
/// out.
fn bin_probability(x: f64, mean: f64, std: f64) -> f64 {
    let density = |y: f64| {
        (-(y - mean).powi(2) / (2.0 * std * std)).exp()
            / (std * (2.0 * std::f64::consts::PI).sqrt())
    };
    let lo = if x < -0.999 {
        mean - 12.0 * std
    } else {
        x - 1.0 / 255.0
    };
    let hi = if x > 0.999 {
        mean + 12.0 * std
    } else {
        x + 1.0 / 255.0
    };
    if hi <= lo {
        return 0.0;
    }
    simpson(density, lo, hi, 4000)
}

/// The terms by the paper's other forms: the means by eq. 11, `mu = (x_t - beta_t /
/// sqrt(1 - abar_t) eps) / sqrt(alpha_t)` with the noise that `x_0` (or `x0_hat`) implies, the
/// KL with variances rather than their logs, the decoder's bin by quadrature.
fn term_reference(vb: &VariationalBound, t: usize, x0: &[f32], x_t: &[f32], out: &[f32]) -> f64 {
    let ac: Vec<f64> = vb
        .schedule
        .alphas_cumprod
        .iter()
        .map(|&a| a as f64)
        .collect();
    let (abar, prev) = (ac[t], if t > 0 { ac[t - 1] } else { 1.0 });
    let (alpha, beta) = (abar / prev, 1.0 - abar / prev);
    let posterior_var = |t: usize| {
        let (a, p) = (ac[t], if t > 0 { ac[t - 1] } else { 1.0 });
        (1.0 - a / p) * (1.0 - p) / (1.0 - a)
    };
    let model_var = match (t, vb.variance_type) {
        (0, _) => posterior_var(1),
        (_, VarianceType::FixedSmall) => posterior_var(t),
        (_, VarianceType::FixedLarge) => beta,
    };
    let mean_of = |x0: f64, xt: f64| {
        let eps = (xt - abar.sqrt() * x0) / (1.0 - abar).sqrt();
        (xt - beta / (1.0 - abar).sqrt() * eps) / alpha.sqrt()
    };
    let mut total = 0.0;
    for ((&x0, &xt), &m) in x0.iter().zip(x_t).zip(out) {
        let (x0, xt, m) = (x0 as f64, xt as f64, m as f64);
        let x0_hat = match vb.prediction_type {
            PredictionType::Epsilon => (xt - (1.0 - abar).sqrt() * m) / abar.sqrt(),
            PredictionType::VPrediction => abar.sqrt() * xt - (1.0 - abar).sqrt() * m,
            PredictionType::Sample => m,
        };
        let mu = mean_of(x0_hat, xt);
        total += if t > 0 {
            let (mu_q, var_q) = (mean_of(x0, xt), posterior_var(t));
            0.5 * ((model_var / var_q).ln() + var_q / model_var + (mu_q - mu).powi(2) / model_var
                - 1.0)
        } else {
            match vb.decoder {
                Decoder::Discretized => -bin_probability(x0, mu, model_var.sqrt()).ln(),
                Decoder::Continuous => {
                    0.5 * ((2.0 * std::f64::consts::PI * model_var).ln()
                        + (x0 - mu).powi(2) / model_var)
                }
            }
        };
    }
    total
}

fn terms_match_float64_by_other_formulas() {
    let n = 48;
    let x0 = eight_bit(n, 1);
    let eps = seeded(n, 2);
    for pred in PREDICTIONS {
        for vt in [VarianceType::FixedSmall, VarianceType::FixedLarge] {
            for decoder in [Decoder::Discretized, Decoder::Continuous] {
                let vb = bound(pred, vt, decoder);
                for t in [0usize, 1, 2, 250, 731, 999] {
                    let abar = vb.schedule.alphas_cumprod[t];
                    let x_t: Vec<f32> = x0
                        .iter()
                        .zip(&eps)
                        .map(|(x, e)| abar.sqrt() * x + (1.0 - abar).sqrt() * e)
                        .collect();
                    // A model output near the truth, as a trained model's would be: the
                    // decoder's bins are a few standard deviations wide.
                    let truth: Vec<f32> = match pred {
                        PredictionType::Epsilon => eps.clone(),
                        PredictionType::Sample => x0.clone(),
                        PredictionType::VPrediction => eps
                            .iter()
                            .zip(&x0)
                            .map(|(e, x)| abar.sqrt() * e - (1.0 - abar).sqrt() * x)
                            .collect(),
                    };
                    let out: Vec<f32> = truth
                        .iter()
                        .zip(seeded(n, 3 + t as u64))
                        .map(|(v, r)| v + 2e-3 * r)
                        .collect();
                    let got = vb.term(t, &x0, &x_t, &out).unwrap();
                    let want = term_reference(&vb, t, &x0, &x_t, &out);
                    // The quadrature's and the two routes' rounding, amplified by
                    // 1 / sqrt(abar) and the small variances near t = 0.
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "{pred:?} {vt:?} {decoder:?} t {t}: {got} vs {want}"
                    );
                }
            }
        }
    }
    let vb = bound(
        PredictionType::Epsilon,
        VarianceType::FixedSmall,
        Decoder::Discretized,
    );
    let abar = *vb.schedule.alphas_cumprod.last().unwrap() as f64;
    let want: f64 = x0
        .iter()
        .map(|&x| {
            let (mu, var) = (abar.sqrt() * x as f64, 1.0 - abar);
            0.5 * (var + mu * mu - 1.0 - var.ln())
        })
        .sum();
    let got = vb.prior(&x0).unwrap();
    assert!((got - want).abs() < 1e-12, "prior {got} vs {want}");
}

/// Over the 256 levels the decoder's probabilities sum to one, for sharp and wide Gaussians
/// anywhere, and far tails stay finite.
fn decoder_bins_sum_to_one() {
    for (mean, std) in [
        (0.0, 1e-3),
        (0.37, 7e-3),
        (-0.99, 0.05),
        (1.3, 0.4),
        (0.0, 3.0),
    ] {
        let sum: f64 = (0..256)
            .map(|k| {
                let x = k as f64 * 2.0 / 255.0 - 1.0;
                discretized_gaussian_log_likelihood(x, mean, f64::ln(std)).exp()
            })
            .sum();
        assert!((sum - 1.0).abs() < 1e-9, "mean {mean} std {std}: {sum}");
    }
    let far = discretized_gaussian_log_likelihood(-1.0, 1.0, f64::ln(1e-3));
    assert!(far.is_finite() && far < -1e4, "{far}");
}

const MEAN: f64 = 0.3;
const STD: f64 = 0.5;

fn gaussian(pred: PredictionType) -> GaussianDenoiser {
    GaussianDenoiser {
        schedule: linear(),
        prediction_type: pred,
        mean: MEAN,
        std: STD,
        image: [1, 4, 4],
    }
}

/// `n` images of Gaussian data `N(MEAN, STD^2)`.
fn gaussian_data(n: usize, seed: u64) -> Vec<f32> {
    let mut z = vec![0.0; n * 16];
    diffwgpu::rng::fill_normal(&mut z, seed, 0);
    z.iter().map(|z| (MEAN + STD * *z as f64) as f32).collect()
}

/// The ODE's likelihood of Gaussian data is the first timestep's true marginal density, to
/// within the prior's and Heun's error at 32 steps (the Hutchinson estimate is exact here: the denoiser's
/// Jacobian is diagonal); the bound with a continuous decoder lies above the negative
/// log-likelihood.
fn check_gaussian_likelihood(be: &dyn Backend) {
    let n = 32;
    let x = gaussian_data(n, 5);
    for pred in PREDICTIONS {
        let model = gaussian(pred);
        let abar0 = linear().alphas_cumprod[0] as f64;
        let want = model.log_density(&x, abar0);
        let got =
            ode_log_likelihood(be, &model, &linear(), pred, &x, 32, 9, 8, &mut |_| {}).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Of about 10 nats in 16 dimensions, measured at most 0.037 off: the prior
            // N(0, I) in place of the last timestep's true marginal (abar = 4e-5) and Heun's
            // error at 32 steps.
            assert!(
                (g - w).abs() < 0.06,
                "{} {pred:?} image {i}: ODE log p {g}, true {w}",
                be.name()
            );
        }
        let vb = VariationalBound {
            schedule: linear(),
            prediction_type: pred,
            variance_type: VarianceType::FixedSmall,
            clip_sample: None,
            decoder: Decoder::Continuous,
        };
        let b = variational_bound(be, &model, &vb, &x, Terms::Every, 3, 32, &mut |_| {}).unwrap();
        let nll = -want.iter().sum::<f64>() / n as f64;
        let upper = b.total.iter().sum::<f64>() / n as f64;
        // The gap, the bound's looseness with the fixed variances of the reverse steps, is
        // measured at 8.7 nats (0.78 bits/dim), far above the estimate's noise.
        assert!(
            upper > nll + 1.0,
            "{} {pred:?}: bound {upper} nats, true NLL {nll}",
            be.name()
        );
        assert!(
            upper < nll + 16.0 * std::f64::consts::LN_2,
            "{} {pred:?}: bound {upper}, NLL {nll}",
            be.name()
        );
    }
}

fn gaussian_likelihood_on_cpu() {
    check_gaussian_likelihood(&Cpu);
}

fn gaussian_likelihood_on_gpu(g: &Gpu) {
    check_gaussian_likelihood(g);
}

/// The Monte-Carlo bound with 64 timesteps per image agrees with the bound over all 1000
/// within three of its standard errors, and every term of the full bound adds up to it.
fn sampled_timesteps_estimate_the_bound() {
    let x = eight_bit(64 * 16, 11);
    let model = gaussian(PredictionType::Epsilon);
    let vb = bound(
        PredictionType::Epsilon,
        VarianceType::FixedLarge,
        Decoder::Discretized,
    );
    let every = variational_bound(&Cpu, &model, &vb, &x, Terms::Every, 1, 64, &mut |_| {}).unwrap();
    let mut evaluated = 0;
    let sampled = variational_bound(&Cpu, &model, &vb, &x, Terms::Sampled(64), 1, 16, &mut |b| {
        evaluated += b
    })
    .unwrap();
    assert_eq!(evaluated, 64 * 64);
    let (e, s) = (every.bits_per_dim(), sampled.bits_per_dim());
    assert!(
        (e.mean - s.mean).abs() < 3.0 * s.std_error,
        "every timestep {e:?}, sampled {s:?}"
    );
    assert!(every.terms.iter().all(|t| t.count == 64));
    let sum: f64 = every
        .terms
        .iter()
        .map(|t| t.bits_per_dim(16).mean)
        .sum::<f64>()
        + every.prior_bits_per_dim().mean;
    assert!(
        (sum - e.mean).abs() < 1e-9,
        "terms {sum} vs total {}",
        e.mean
    );
    // The decoder term in bits/dim is the bin's code length.
    let decoder = every.terms[0].bits_per_dim(16).mean;
    assert!(decoder > 0.0 && decoder < 8.0, "{decoder}");
    let per_image = bits_per_dim(every.total[0], 16);
    assert!(per_image.is_finite());
}

fn tiny_unet(be: &dyn Backend) -> (UNet2D, Vec<Tensor>) {
    let model = UNet2D::new(&UNet2DConfig::preset("tiny").unwrap()).unwrap();
    let params = model
        .params
        .specs
        .iter()
        .zip(model.params.initial_values(4))
        .map(|(s, v)| be.upload(&s.shape, &v).unwrap())
        .collect();
    (model, params)
}

/// `v^T (f(x + h u) - f(x - h u)) / 2h` against `vjp . u` for the tiny U-Net, two images at
/// different timesteps.
fn unet_vjp_matches_finite_differences() {
    let (model, params) = tiny_unet(&Cpu);
    let unet = UNetDenoiser {
        model: &model,
        params: &params,
        classes: None,
    };
    let shape = [2, 1, 16, 16];
    let (x, v, u) = (seeded(512, 20), seeded(512, 21), seeded(512, 22));
    let t = [37.0, 612.5];
    let (y, vjp) = unet
        .predict_vjp(&Cpu, &up(&Cpu, &shape, &x), &t, &up(&Cpu, &shape, &v))
        .unwrap();
    assert_eq!(
        down(&Cpu, &y),
        down(
            &Cpu,
            &unet.predict(&Cpu, &up(&Cpu, &shape, &x), &t).unwrap()
        )
    );
    let vjp = down(&Cpu, &vjp);
    let h = 1e-2f32;
    let at = |s: f32| {
        let xs: Vec<f32> = x.iter().zip(&u).map(|(x, u)| x + s * u).collect();
        down(
            &Cpu,
            &unet.predict(&Cpu, &up(&Cpu, &shape, &xs), &t).unwrap(),
        )
    };
    let (plus, minus) = (at(h), at(-h));
    for i in 0..2 {
        let r = i * 256..(i + 1) * 256;
        let fd: f64 = (r.clone())
            .map(|j| v[j] as f64 * (plus[j] - minus[j]) as f64 / (2.0 * h as f64))
            .sum();
        let an: f64 = r.map(|j| vjp[j] as f64 * u[j] as f64).sum();
        assert!(
            (fd - an).abs() < 2e-2 * an.abs().max(1.0),
            "image {i}: finite differences {fd}, vjp {an}"
        );
    }
}

/// The sampled bound and the ODE likelihood of the tiny U-Net agree across backends.
fn unet_likelihoods_match_cpu(g: &Gpu) {
    let x = eight_bit(3 * 256, 30);
    let run = |be: &dyn Backend| {
        let (model, params) = tiny_unet(be);
        let unet = UNetDenoiser {
            model: &model,
            params: &params,
            classes: None,
        };
        let vb = bound(
            PredictionType::Epsilon,
            VarianceType::FixedSmall,
            Decoder::Discretized,
        );
        let b =
            variational_bound(be, &unet, &vb, &x, Terms::Sampled(6), 2, 2, &mut |_| {}).unwrap();
        let ode = ode_log_likelihood(
            be,
            &unet,
            &vb.schedule,
            PredictionType::Epsilon,
            &x,
            3,
            2,
            2,
            &mut |_| {},
        )
        .unwrap();
        (b.total, ode)
    };
    let ((cb, co), (gb, go)) = (run(&Cpu), run(g));
    let f = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    // Sums over 256 values of terms that are f32 model outputs on each backend.
    assert_close("bound", &f(&gb), &f(&cb), 0.0, 1e-4);
    assert_close("ode", &f(&go), &f(&co), 0.0, 1e-3);
}

tests! {
    cpu: [
        terms_match_float64_by_other_formulas,
        decoder_bins_sum_to_one,
        gaussian_likelihood_on_cpu,
        sampled_timesteps_estimate_the_bound,
        unet_vjp_matches_finite_differences,
    ],
    gpu: [
        gaussian_likelihood_on_gpu,
        unet_likelihoods_match_cpu,
    ],
}
