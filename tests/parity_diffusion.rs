//! q_sample, ddpm_step and ddim_step: GPU vs CPU, the CPU against a float64 transcription of
//! the formulas, consistency between the kernels, and bad input.

mod common;

use common::*;
use diffwgpu::diffusion::{NoiseSchedule, PredictionType, VarianceType};
use diffwgpu::{Backend, Cpu, Error, Gpu};

const PREDICTIONS: [PredictionType; 3] = [
    PredictionType::Epsilon,
    PredictionType::VPrediction,
    PredictionType::Sample,
];
const CLIPS: [Option<f32>; 2] = [None, Some(1.0)];
/// Timesteps of a 1000-step schedule: the last step, the first, and between.
const TIMESTEPS: [usize; 5] = [0, 1, 250, 731, 999];
/// Odd sizes not a multiple of the 256-wide workgroup, batch > 1.
const SHAPES: &[&[usize]] = &[&[1, 1, 3, 3], &[3, 2, 5, 7], &[2, 3, 17, 19]];

fn schedule() -> NoiseSchedule {
    NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap()
}

/// `x` in [-3, 3), model output and noise in [-1, 1).
fn inputs(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = seeded(n, seed).iter().map(|v| 3.0 * v).collect();
    (x, seeded(n, seed + 1), seeded(n, seed + 2))
}

fn q_sample_matches_cpu(g: &Gpu) {
    let s = schedule();
    for (k, shape) in SHAPES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let b = shape[0];
        let t: Vec<f32> = (0..b).map(|i| [999.0, 0.0, 517.0][i % 3]).collect();
        let (x0, eps, _) = inputs(n, k as u64);
        // One ulp or two of the GPU's sqrt on values of O(1).
        parity(
            g,
            &format!("q_sample {shape:?}"),
            1e-6,
            1e-5,
            |be: &dyn Backend| {
                let y = be
                    .q_sample(
                        &up(be, shape, &x0),
                        &up(be, shape, &eps),
                        &up(be, &[b], &t),
                        &up(be, &[1000], &s.alphas_cumprod),
                    )
                    .unwrap();
                vec![("x_t", down(be, &y))]
            },
        );
    }
}

fn steps_match_cpu(g: &Gpu) {
    let s = schedule();
    for (k, shape) in SHAPES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let (x, m, z) = inputs(n, 10 + k as u64);
        for pred in PREDICTIONS {
            for clip in CLIPS {
                for t in TIMESTEPS {
                    let vt = [VarianceType::FixedSmall, VarianceType::FixedLarge][t % 2];
                    let ddpm = s.ddpm_coefficients(t, vt, pred, clip).unwrap();
                    let t_prev = t.checked_sub(37);
                    let mut ddim = s.ddim_coefficients(t, t_prev, 0.6, pred, clip).unwrap();
                    ddim.use_clipped_model_output = t % 2 == 1;
                    // Division by sqrt(abar_t) = 6e-3 at t = 999 (epsilon prediction) makes
                    // x0_hat ~ 500 and the GPU's 2.5-ulp division a 1e-4 error in it, which
                    // the step weighs by c0 ~ 1e-4; elsewhere a few ulps of O(1) values.
                    let case = format!("{shape:?} {pred:?} clip {clip:?} t {t}");
                    parity(g, &case, 2e-6, 2e-5, |be: &dyn Backend| {
                        let (tx, tm, tz) =
                            (up(be, shape, &x), up(be, shape, &m), up(be, shape, &z));
                        vec![
                            (
                                "ddpm",
                                down(be, &be.ddpm_step(&tx, &tm, &tz, &ddpm).unwrap()),
                            ),
                            (
                                "ddim",
                                down(be, &be.ddim_step(&tx, &tm, &tz, &ddim).unwrap()),
                            ),
                        ]
                    });
                }
            }
        }
    }
}

/// `x0_hat` from the model output, in f64, by prediction type.
fn x0_hat(pred: PredictionType, abar: f64, x: f64, m: f64) -> f64 {
    match pred {
        PredictionType::Epsilon => (x - (1.0 - abar).sqrt() * m) / abar.sqrt(),
        PredictionType::VPrediction => abar.sqrt() * x - (1.0 - abar).sqrt() * m,
        PredictionType::Sample => m,
    }
}

/// DESIGN.md section 1, DDPM ancestral step, in f64 from the cumulative products alone.
fn ddpm_reference(
    abar: &[f64],
    t: usize,
    vt: VarianceType,
    pred: PredictionType,
    clip: bool,
    [x, m, z]: [f64; 3],
) -> f64 {
    let a = abar[t];
    let ap = if t > 0 { abar[t - 1] } else { 1.0 };
    let beta = 1.0 - a / ap;
    let mut x0 = x0_hat(pred, a, x, m);
    if clip {
        x0 = x0.clamp(-1.0, 1.0);
    }
    let mu = ap.sqrt() * beta / (1.0 - a) * x0 + (a / ap).sqrt() * (1.0 - ap) / (1.0 - a) * x;
    let var = match vt {
        VarianceType::FixedSmall => beta * (1.0 - ap) / (1.0 - a),
        VarianceType::FixedLarge => beta,
    };
    if t > 0 {
        mu + var.sqrt() * z
    } else {
        mu
    }
}

/// DDIM (Song et al. eq. 12) as diffusers' DDIMScheduler.step with eta and no recomputation
/// of eps_hat from the clipped x0_hat.
fn ddim_reference(
    abar: &[f64],
    t: usize,
    tp: Option<usize>,
    eta: f64,
    pred: PredictionType,
    clip: bool,
    [x, m, z]: [f64; 3],
) -> f64 {
    let a = abar[t];
    let ap = tp.map_or(1.0, |tp| abar[tp]);
    let x0 = x0_hat(pred, a, x, m);
    let eps = match pred {
        PredictionType::Epsilon => m,
        PredictionType::VPrediction => a.sqrt() * m + (1.0 - a).sqrt() * x,
        PredictionType::Sample => (x - a.sqrt() * x0) / (1.0 - a).sqrt(),
    };
    let x0 = if clip { x0.clamp(-1.0, 1.0) } else { x0 };
    let sigma = eta * ((1.0 - ap) / (1.0 - a)).sqrt() * (1.0 - a / ap).sqrt();
    ap.sqrt() * x0 + (1.0 - ap - sigma * sigma).sqrt() * eps + sigma * z
}

fn cpu_steps_match_float64_formulas() {
    let s = schedule();
    let abar: Vec<f64> = s.alphas_cumprod.iter().map(|&a| a as f64).collect();
    let shape = [2, 3, 4, 5];
    let (x, m, z) = inputs(120, 99);
    let t_cpu = |v: &[f32]| up(&Cpu, &shape, v);
    for pred in PREDICTIONS {
        for clip in CLIPS {
            for t in TIMESTEPS {
                for vt in [VarianceType::FixedSmall, VarianceType::FixedLarge] {
                    let c = s.ddpm_coefficients(t, vt, pred, clip).unwrap();
                    let got = down(
                        &Cpu,
                        &Cpu.ddpm_step(&t_cpu(&x), &t_cpu(&m), &t_cpu(&z), &c)
                            .unwrap(),
                    );
                    let want: Vec<f32> = (0..120)
                        .map(|i| {
                            ddpm_reference(
                                &abar,
                                t,
                                vt,
                                pred,
                                clip.is_some(),
                                [x[i] as f64, m[i] as f64, z[i] as f64],
                            ) as f32
                        })
                        .collect();
                    // f32 rounding of x0_hat, amplified up to 1 / sqrt(abar_999) = 160 before
                    // it is weighted by c0.
                    assert_close(
                        &format!("ddpm {pred:?} {clip:?} t {t} {vt:?}"),
                        &got,
                        &want,
                        2e-5,
                        2e-5,
                    );
                }
                for (tp, eta) in [
                    (t.checked_sub(1), 0.0),
                    (t.checked_sub(100), 1.0),
                    (None, 0.5),
                ] {
                    let c = s.ddim_coefficients(t, tp, eta as f32, pred, clip).unwrap();
                    let got = down(
                        &Cpu,
                        &Cpu.ddim_step(&t_cpu(&x), &t_cpu(&m), &t_cpu(&z), &c)
                            .unwrap(),
                    );
                    let want: Vec<f32> = (0..120)
                        .map(|i| {
                            ddim_reference(
                                &abar,
                                t,
                                tp,
                                eta,
                                pred,
                                clip.is_some(),
                                [x[i] as f64, m[i] as f64, z[i] as f64],
                            ) as f32
                        })
                        .collect();
                    // As above; sample prediction divides by sqrt(1 - abar_0) = 1e-2 too.
                    assert_close(
                        &format!("ddim {pred:?} {clip:?} t {t} -> {tp:?} eta {eta}"),
                        &got,
                        &want,
                        5e-5,
                        5e-5,
                    );
                }
            }
        }
    }
}

fn clipped_model_output_recomputes_eps() {
    let s = schedule();
    let mut c = s
        .ddim_coefficients(500, Some(400), 0.0, PredictionType::Epsilon, Some(1.0))
        .unwrap();
    c.use_clipped_model_output = true;
    let (a, ap) = (s.alphas_cumprod[500] as f64, s.alphas_cumprod[400] as f64);
    let (x, m) = (2.5f64, -0.3f64);
    let x0 = ((x - (1.0 - a).sqrt() * m) / a.sqrt()).clamp(-1.0, 1.0);
    let eps = (x - a.sqrt() * x0) / (1.0 - a).sqrt();
    let want = ap.sqrt() * x0 + (1.0 - ap).sqrt() * eps;
    let one = |v: f64| up(&Cpu, &[1], &[v as f32]);
    let got = down(
        &Cpu,
        &Cpu.ddim_step(&one(x), &one(m), &one(0.0), &c).unwrap(),
    )[0];
    assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
}

/// With the true noise as the model output, a deterministic DDIM step from `x_t` lands on
/// `q_sample(x_0, eps, t')`: the kernels agree with each other, on both backends.
fn check_ddim_lands_on_q_sample(b: &dyn Backend) {
    let s = schedule();
    let shape = [2, 3, 5];
    let (x0, eps, z) = inputs(30, 5);
    let x0: Vec<f32> = x0.iter().map(|v| v / 3.0).collect();
    let ac = |b: &dyn Backend| up(b, &[1000], &s.alphas_cumprod);
    for (t, tp) in [(999usize, 899usize), (500, 300), (40, 0)] {
        let ts = |v: usize| up(b, &[2], &[v as f32; 2]);
        let x_t = b
            .q_sample(&up(b, &shape, &x0), &up(b, &shape, &eps), &ts(t), &ac(b))
            .unwrap();
        let want = down(
            b,
            &b.q_sample(&up(b, &shape, &x0), &up(b, &shape, &eps), &ts(tp), &ac(b))
                .unwrap(),
        );
        let (sa, sb) = (
            s.alphas_cumprod[t].sqrt(),
            (1.0 - s.alphas_cumprod[t]).sqrt(),
        );
        let v: Vec<f32> = eps.iter().zip(&x0).map(|(e, x)| sa * e - sb * x).collect();
        for (pred, out) in [
            (PredictionType::Epsilon, &eps),
            (PredictionType::VPrediction, &v),
            (PredictionType::Sample, &x0),
        ] {
            let c = s.ddim_coefficients(t, Some(tp), 0.0, pred, None).unwrap();
            let got = down(
                b,
                &b.ddim_step(&x_t, &up(b, &shape, out), &up(b, &shape, &z), &c)
                    .unwrap(),
            );
            // Sample prediction recovers eps by dividing by sqrt(1 - abar_40) ~ 0.09.
            assert_close(
                &format!("{} {pred:?} {t} -> {tp}", b.name()),
                &got,
                &want,
                1e-4,
                1e-4,
            );
        }
    }
}

fn ddim_with_true_noise_lands_on_q_sample_on_cpu() {
    check_ddim_lands_on_q_sample(&Cpu);
}

fn ddim_with_true_noise_lands_on_q_sample_on_gpu(g: &Gpu) {
    check_ddim_lands_on_q_sample(g);
}

/// Mismatched shapes are `Err`s naming the op, on both backends.
fn check_bad_shapes(b: &dyn Backend) {
    let s = schedule();
    let c = s
        .ddpm_coefficients(10, VarianceType::FixedSmall, PredictionType::Epsilon, None)
        .unwrap();
    let d = s
        .ddim_coefficients(10, Some(5), 0.0, PredictionType::Epsilon, None)
        .unwrap();
    let x = up(b, &[2, 3], &[0.5; 6]);
    let y = up(b, &[3, 2], &[0.5; 6]);
    assert!(matches!(
        b.ddpm_step(&x, &y, &x, &c),
        Err(Error::Shape {
            op: "ddpm_step",
            ..
        })
    ));
    assert!(matches!(
        b.ddpm_step(&x, &x, &y, &c),
        Err(Error::Shape {
            op: "ddpm_step",
            ..
        })
    ));
    assert!(matches!(
        b.ddim_step(&x, &y, &x, &d),
        Err(Error::Shape {
            op: "ddim_step",
            ..
        })
    ));
    let ac = up(b, &[1000], &s.alphas_cumprod);
    let t2 = up(b, &[2], &[1.0, 2.0]);
    assert!(matches!(
        b.q_sample(&x, &y, &t2, &ac),
        Err(Error::Shape { op: "q_sample", .. })
    ));
    assert!(matches!(
        b.q_sample(&x, &x, &up(b, &[3], &[1.0; 3]), &ac),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        b.q_sample(&x, &x, &t2, &up(b, &[2, 500], &s.alphas_cumprod)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        b.q_sample(&x, &x, &t2, &up(b, &[0], &[])),
        Err(Error::Shape { .. })
    ));
    let scalar = up(b, &[], &[1.0]);
    assert!(matches!(
        b.q_sample(&scalar, &scalar, &t2, &ac),
        Err(Error::Shape { .. })
    ));
}

fn bad_input_is_an_error_on_cpu() {
    check_bad_shapes(&Cpu);
    let s = schedule();
    // The CPU sees the timesteps and checks them.
    let x = up(&Cpu, &[2, 3], &[0.5; 6]);
    let ac = up(&Cpu, &[1000], &s.alphas_cumprod);
    for bad in [[1000.0, 0.0], [-1.0, 0.0], [2.5, 0.0], [f32::NAN, 0.0]] {
        let r = Cpu.q_sample(&x, &x, &up(&Cpu, &[2], &bad), &ac);
        assert!(
            matches!(r, Err(Error::Invalid { op: "q_sample", .. })),
            "{bad:?}"
        );
    }
}

fn bad_input_is_an_error_on_gpu(g: &Gpu) {
    check_bad_shapes(g);
    let s = schedule();
    let c = s
        .ddpm_coefficients(10, VarianceType::FixedSmall, PredictionType::Epsilon, None)
        .unwrap();
    // On the GPU a bad timestep is clamped into the table, never read out of bounds.
    let x = up(g, &[2, 3], &[0.5; 6]);
    let ac = up(g, &[1000], &s.alphas_cumprod);
    let bad = down(
        g,
        &g.q_sample(&x, &x, &up(g, &[2], &[5000.0, -7.0]), &ac)
            .unwrap(),
    );
    let good = down(
        g,
        &g.q_sample(&x, &x, &up(g, &[2], &[999.0, 0.0]), &ac)
            .unwrap(),
    );
    assert_eq!(bad, good);
    let cpu = up(&Cpu, &[2, 3], &[0.5; 6]);
    assert!(matches!(
        g.ddpm_step(&cpu, &x, &x, &c),
        Err(Error::WrongBackend { .. })
    ));
}

tests! {
    cpu: [
        cpu_steps_match_float64_formulas,
        clipped_model_output_recomputes_eps,
        ddim_with_true_noise_lands_on_q_sample_on_cpu,
        bad_input_is_an_error_on_cpu,
    ],
    gpu: [
        q_sample_matches_cpu,
        steps_match_cpu,
        ddim_with_true_noise_lands_on_q_sample_on_gpu,
        bad_input_is_an_error_on_gpu,
    ],
}
