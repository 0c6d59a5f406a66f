//! DPM-Solver++ against diffusers' `DPMSolverMultistepScheduler`: its timesteps and sigmas from
//! the saved configs, every step of whole runs on synthetic model outputs, and a whole
//! sampling run with a real U-Net. The fixtures are written by `tools/diffusers_reference.py`
//! (diffusers evaluated in float64).

mod common;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use common::{assert_close, read_tensors};
use diffwgpu::checkpoint::{load_pipeline, unet_weights, SchedulerConfig};
use diffwgpu::diffusion::{sample, DpmSolver, NoiseStream, Sampler, TimestepSpacing, UNetDenoiser};
use diffwgpu::nn::UNet2D;
use diffwgpu::ops::solver_step::SolverStepInputs;
use diffwgpu::{Backend, Cpu, Gpu, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Asserts `|got - want| <= rel * max|want|` elementwise.
fn assert_rel(name: &str, got: &[f32], want: &[f32], rel: f32) {
    let largest = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert_close(name, got, want, rel * largest, 0.0);
}

/// One case of `dpm_solver_steps.json`.
#[derive(Deserialize)]
struct DpmCase {
    name: String,
    /// The scheduler config's text as diffusers writes it.
    config: String,
    num_inference_steps: usize,
    timesteps: Vec<usize>,
    sigmas: Vec<f32>,
}

#[derive(Deserialize)]
struct DpmCases {
    cases: Vec<DpmCase>,
}

fn cases() -> DpmCases {
    let text = std::fs::read_to_string(fixtures().join("dpm_solver_steps.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The case's solver, its timesteps and our sigmas, from the config text alone.
fn plan(case: &DpmCase) -> (SchedulerConfig, DpmSolver, Vec<usize>, Vec<f32>) {
    let config =
        SchedulerConfig::from_json(&case.config).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let solver = config.dpm_solver().unwrap();
    let schedule = config.schedule().unwrap();
    let spacing = TimestepSpacing::from_name(&config.timestep_spacing).unwrap();
    let timesteps = solver
        .timesteps(
            &schedule,
            case.num_inference_steps,
            spacing,
            config.steps_offset,
        )
        .unwrap();
    let sigmas = solver.sigmas(&schedule, &timesteps).unwrap();
    (config, solver, timesteps, sigmas)
}

/// Timesteps equal diffusers' exactly; sigmas to the few units in the last place by which our
/// `alphas_cumprod` (a product in f64) differs from diffusers' (a product in float32).
fn timesteps_and_sigmas_match_diffusers() {
    for case in &cases().cases {
        let (_, _, timesteps, sigmas) = plan(case);
        assert_eq!(timesteps, case.timesteps, "{}: timesteps", case.name);
        let name = format!("{}: sigmas", case.name);
        assert_close(&name, &sigmas, &case.sigmas, 0.0, 2e-5);
    }
}

/// Every step of every case, from diffusers' x_t and model output and our own previous
/// `x0_hat`, gives diffusers' `prev_sample`: to 1e-5 with diffusers' sigmas, to 1e-4 with ours.
/// Then the whole run chained through our own steps ends on diffusers' last sample to 1e-4.
fn check_steps(be: &dyn Backend) {
    let fx = read_tensors(&fixtures().join("dpm_solver_steps.safetensors"));
    for case in &cases().cases {
        let (config, solver, timesteps, own_sigmas) = plan(case);
        let prediction = config.prediction_type().unwrap();
        let tensor = |i: usize, what: &str| &fx[&format!("{}.{i}.{what}", case.name)];
        let up = |v: &[f32]| be.upload(&tensor(0, "x_t").0, v).unwrap();
        for (sigmas, which, tol) in [
            (&case.sigmas, "diffusers'", 1e-5),
            (&own_sigmas, "our", 1e-4),
        ] {
            let mut history: Option<Tensor> = None;
            for i in 0..timesteps.len() {
                let (x, m) = (up(&tensor(i, "x_t").1), up(&tensor(i, "model_output").1));
                let k = solver.step(sigmas, i, prediction).unwrap();
                let inputs = SolverStepInputs {
                    x_eval: &x,
                    model_output: &m,
                    x_base: &x,
                    prev: history.as_ref(),
                    noise: None,
                };
                let (next, x0) = be.solver_step(&inputs, &k).unwrap();
                history = Some(x0);
                let what = format!(
                    "{} step {i} with {which} sigmas on {}",
                    case.name,
                    be.name()
                );
                assert_rel(
                    &what,
                    &be.to_vec(&next).unwrap(),
                    &tensor(i, "prev_sample").1,
                    tol,
                );
            }
        }
        // The whole run on our own states.
        let last = timesteps.len() - 1;
        let mut x = up(&tensor(0, "x_t").1);
        let mut history: Option<Tensor> = None;
        for i in 0..timesteps.len() {
            let m = up(&tensor(i, "model_output").1);
            let k = solver.step(&own_sigmas, i, prediction).unwrap();
            let inputs = SolverStepInputs {
                x_eval: &x,
                model_output: &m,
                x_base: &x,
                prev: history.as_ref(),
                noise: None,
            };
            let (next, x0) = be.solver_step(&inputs, &k).unwrap();
            (x, history) = (next, Some(x0));
        }
        let what = format!("{}: the whole run on {}", case.name, be.name());
        assert_rel(
            &what,
            &be.to_vec(&x).unwrap(),
            &tensor(last, "prev_sample").1,
            1e-4,
        );
    }
}

fn steps_match_diffusers_on_cpu() {
    check_steps(&Cpu);
}

fn steps_match_diffusers_on_gpu(g: &Gpu) {
    check_steps(g);
}

/// The U-Net of `unets/first_level_attention` sampled with DPM-Solver++'s defaults in 10 steps
/// from diffusers' x_T: every x_t on the way and the final sample equal diffusers' (float64)
/// to 1e-4 of their largest value.
fn check_unet_run(be: &dyn Backend) {
    let path = fixtures().join("unets/first_level_attention");
    let loaded = load_pipeline(&path).unwrap();
    let model = UNet2D::new(&loaded.config).unwrap();
    let values = unet_weights(&model, &loaded.weights, &path).unwrap();
    let params: Vec<Tensor> = model
        .params
        .specs
        .iter()
        .zip(&values)
        .map(|(spec, v)| be.upload(&spec.shape, v).unwrap())
        .collect();
    let fx = read_tensors(&fixtures().join("dpm_solver_unet.safetensors"));
    let config =
        SchedulerConfig::from_json(r#"{"_class_name": "DPMSolverMultistepScheduler"}"#).unwrap();
    let schedule = config.schedule().unwrap();
    let solver = config.dpm_solver().unwrap();
    let timesteps = solver
        .timesteps(&schedule, 10, TimestepSpacing::Linspace, 0)
        .unwrap();
    let (shape, noise) = &fx["noise"];
    let x_t = be.upload(shape, noise).unwrap();
    let mut seen = 0;
    let x0 = sample(
        be,
        &UNetDenoiser {
            model: &model,
            params: &params,
            classes: None,
        },
        &schedule,
        config.prediction_type().unwrap(),
        &Sampler::DpmSolver(solver),
        &timesteps,
        x_t,
        NoiseStream::single(0, shape[0]),
        &mut |view| {
            let want = &fx[&format!("x_t.{}", view.index)].1;
            let what = format!("x_t before step {} on {}", view.index, be.name());
            assert_rel(&what, &be.to_vec(view.x_t)?, want, 1e-4);
            seen += 1;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(seen, 10);
    let what = format!("the final sample on {}", be.name());
    assert_rel(&what, &be.to_vec(&x0).unwrap(), &fx["sample"].1, 1e-4);
}

fn unet_run_matches_diffusers_on_cpu() {
    check_unet_run(&Cpu);
}

fn unet_run_matches_diffusers_on_gpu(g: &Gpu) {
    check_unet_run(g);
}

/// A config diffwgpu wrote for DPM-Solver++ reads back as the same solver, keeps
/// `lambda_min_clipped = -Infinity` as Python writes it, and options diffwgpu does not
/// implement are refused by key.
fn configs_round_trip_and_unsupported_options_are_refused() {
    let ddpm = SchedulerConfig::default();
    let solver = DpmSolver {
        solver_order: 1,
        lower_order_final: false,
        ..DpmSolver::default()
    };
    let text = ddpm.with_dpm_solver(&solver).to_json();
    assert!(text.contains("\"lambda_min_clipped\": -Infinity"), "{text}");
    assert!(text.contains("\"_class_name\": \"DPMSolverMultistepScheduler\""));
    let back = SchedulerConfig::from_json(&text).unwrap();
    assert_eq!(back.dpm_solver().unwrap(), solver);
    assert_eq!(back.schedule().unwrap(), ddpm.schedule().unwrap());
    assert_eq!(back.to_json(), text);
    let base = &cases().cases[0].config;
    for (key, value) in [
        ("use_karras_sigmas", "true"),
        ("algorithm_type", "\"sde-dpmsolver++\""),
        ("solver_order", "3"),
        ("final_sigmas_type", "\"denoise_to_zero\""),
    ] {
        let pattern = format!("\"{key}\": ");
        let start = base.find(&pattern).unwrap() + pattern.len();
        let end = start + base[start..].find([',', '\n']).unwrap();
        let changed = format!("{}{value}{}", &base[..start], &base[end..]);
        let err = SchedulerConfig::from_json(&changed)
            .expect_err(key)
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

tests! {
    cpu: [
        timesteps_and_sigmas_match_diffusers,
        steps_match_diffusers_on_cpu,
        unet_run_matches_diffusers_on_cpu,
        configs_round_trip_and_unsupported_options_are_refused,
    ],
    gpu: [
        steps_match_diffusers_on_gpu,
        unet_run_matches_diffusers_on_gpu,
    ],
}
