//! The samplers against the truth: for data `x_0 ~ N(m, s^2 I)` the exact denoiser is known in
//! closed form, and so are the probability-flow ODE's map from `x_T` to `x_0` and the
//! distribution that the reverse SDE ends in. Heun's method and DPM-Solver++ must land on the
//! ODE's map, the Euler–Maruyama SDE on the data distribution, on both backends and for every
//! prediction type.

mod common;

use common::*;
use diffwgpu::diffusion::{
    inference_timesteps, sample, DpmSolver, GaussianDenoiser, NoiseSchedule, NoiseStream,
    PredictionType, Sampler, TimestepSpacing,
};
use diffwgpu::{Backend, Cpu, Gpu};

const MEAN: f64 = 0.3;
const STD: f64 = 0.5;
const PREDICTIONS: [PredictionType; 3] = [
    PredictionType::Epsilon,
    PredictionType::VPrediction,
    PredictionType::Sample,
];

fn gaussian(schedule: &NoiseSchedule, pred: PredictionType, image: [usize; 3]) -> GaussianDenoiser {
    GaussianDenoiser {
        schedule: schedule.clone(),
        prediction_type: pred,
        mean: MEAN,
        std: STD,
        image,
    }
}

/// The probability-flow ODE keeps `(x_t - sqrt(abar_t) m) / sqrt(abar_t s^2 + 1 - abar_t)`
/// constant: from `x_T` at timestep `t` it ends at `x_0 = m + s (x_T - sqrt(abar) m) /
/// sqrt(abar s^2 + 1 - abar)`.
fn flow_map(abar: f64, x_t: &[f32]) -> Vec<f32> {
    let v = abar * STD * STD + 1.0 - abar;
    x_t.iter()
        .map(|&x| (MEAN + STD * (x as f64 - abar.sqrt() * MEAN) / v.sqrt()) as f32)
        .collect()
}

/// Runs `sampler` over `timesteps` from `seed`'s `x_T`; returns `(x_T, x_0)`.
fn run(
    be: &dyn Backend,
    schedule: &NoiseSchedule,
    pred: PredictionType,
    sampler: &Sampler,
    timesteps: &[usize],
    shape: [usize; 4],
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let noise = NoiseStream::single(seed, shape[0]);
    let x_t = noise.initial(be, &shape).unwrap();
    let start = down(be, &x_t);
    let model = gaussian(schedule, pred, [shape[1], shape[2], shape[3]]);
    let x0 = sample(
        be,
        &model,
        schedule,
        pred,
        sampler,
        timesteps,
        x_t,
        noise,
        &mut |_| Ok(()),
    )
    .unwrap();
    (start, down(be, &x0))
}

fn schedules() -> [(&'static str, NoiseSchedule); 2] {
    [
        ("linear", NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap()),
        ("cosine", NoiseSchedule::squaredcos_cap_v2(1000).unwrap()),
    ]
}

/// Heun's method over 200 steps and DPM-Solver++ over 50 land on the exact flow map (whose
/// `x_0` spans about +-2). Their errors there, measured: Heun 1.7e-3 (linear schedule) and
/// 2.1e-3 (cosine), mostly its last step, an Euler step to `sigma = 0`; DPM-Solver++ 6.5e-4
/// and 1.4e-3, mostly its first-order last step.
fn check_ode_solvers_follow_the_flow(be: &dyn Backend) {
    let shape = [2, 1, 8, 8];
    for (name, schedule) in schedules() {
        let heun = inference_timesteps(1000, 200, TimestepSpacing::Trailing, 0).unwrap();
        let solver = DpmSolver::default();
        let dpm = solver
            .timesteps(&schedule, 50, TimestepSpacing::Linspace, 0)
            .unwrap();
        for pred in PREDICTIONS {
            for (sampler, ts, tol) in [
                (Sampler::Ode, &heun, 5e-3),
                (Sampler::DpmSolver(solver), &dpm, 3e-3),
            ] {
                let (x_t, x0) = run(be, &schedule, pred, &sampler, ts, shape, 3);
                let abar = schedule.alphas_cumprod[ts[0]] as f64;
                let case = format!("{} {name} {pred:?} {sampler:?}", be.name());
                assert_close(&case, &x0, &flow_map(abar, &x_t), tol, 0.0);
            }
        }
    }
}

fn ode_solvers_follow_the_flow_on_cpu() {
    check_ode_solvers_follow_the_flow(&Cpu);
}

fn ode_solvers_follow_the_flow_on_gpu(g: &Gpu) {
    check_ode_solvers_follow_the_flow(g);
}

/// Halving Heun's step size divides its error by about four (second order).
fn heun_converges_at_second_order() {
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    let error = |steps: usize| {
        let ts = inference_timesteps(1000, steps, TimestepSpacing::Trailing, 0).unwrap();
        let pred = PredictionType::Epsilon;
        let (x_t, x0) = run(&Cpu, &schedule, pred, &Sampler::Ode, &ts, [1, 1, 4, 4], 9);
        let abar = schedule.alphas_cumprod[ts[0]] as f64;
        let want = flow_map(abar, &x_t);
        x0.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max)
    };
    let (coarse, fine) = (error(20), error(40));
    let ratio = coarse / fine;
    assert!(
        (3.0..6.0).contains(&ratio),
        "error {coarse:e} at 20 steps, {fine:e} at 40: ratio {ratio}, not about 4"
    );
}

/// Sample mean and standard deviation.
fn moments(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The reverse SDE over all 1000 timesteps passes through the forward process's marginals
/// `q(x_t) = N(sqrt(abar_t) m, abar_t s^2 + 1 - abar_t)` and ends in `N(m, s^2)`: sample means
/// and standard deviations of 65536 values within five standard errors (at most 0.004 of the
/// mean and 0.003 of the standard deviation).
fn check_sde_reaches_the_data(be: &dyn Backend) {
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    let ts = inference_timesteps(1000, 1000, TimestepSpacing::Leading, 0).unwrap();
    let shape = [64, 1, 32, 32];
    for (k, pred) in PREDICTIONS.into_iter().enumerate() {
        let noise = NoiseStream::single(20 + k as u64, shape[0]);
        let model = gaussian(&schedule, pred, [1, 32, 32]);
        let mut seen = Vec::new();
        let x0 = sample(
            be,
            &model,
            &schedule,
            pred,
            &Sampler::Sde,
            &ts,
            noise.initial(be, &shape).unwrap(),
            noise,
            &mut |view| {
                if [900, 700, 500, 300, 100].contains(&view.t) {
                    let abar = schedule.alphas_cumprod[view.t] as f64;
                    let want = (abar.sqrt() * MEAN, (abar * STD * STD + 1.0 - abar).sqrt());
                    seen.push((view.t, moments(&be.to_vec(view.x_t)?), want));
                }
                Ok(())
            },
        )
        .unwrap();
        seen.push((0, moments(&down(be, &x0)), (MEAN, STD)));
        for (t, (mean, std), (want_mean, want_std)) in seen {
            let case = format!("{} {pred:?} before timestep {t}", be.name());
            assert!(
                (mean - want_mean).abs() < 0.02,
                "{case}: mean {mean}, want {want_mean}"
            );
            assert!(
                (std - want_std).abs() < 0.015,
                "{case}: std {std}, want {want_std}"
            );
        }
    }
}

fn sde_reaches_the_data_on_cpu() {
    check_sde_reaches_the_data(&Cpu);
}

fn sde_reaches_the_data_on_gpu(g: &Gpu) {
    check_sde_reaches_the_data(g);
}

tests! {
    cpu: [
        ode_solvers_follow_the_flow_on_cpu,
        heun_converges_at_second_order,
        sde_reaches_the_data_on_cpu,
    ],
    gpu: [
        ode_solvers_follow_the_flow_on_gpu,
        sde_reaches_the_data_on_gpu,
    ],
}
