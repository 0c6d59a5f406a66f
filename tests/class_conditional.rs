//! Class-conditional diffusion with classifier-free guidance: a diffusers `UNet2DModel` with
//! `num_class_embeds` samples with guidance as diffusers does, step for step, on both
//! backends; guidance 1 is the conditional prediction and 0 the unconditional one exactly,
//! any other scale the combination of the two; the trainer's class dropout; a tiny
//! conditional model overfits a labelled batch and learns to tell its classes apart, and its
//! training steps on the GPU give the CPU's.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, read_tensors, seeded};
use diffwgpu::checkpoint::{load_pipeline, unet_weights, SchedulerConfig};
use diffwgpu::diffusion::{
    inference_timesteps, sample, ClassGuidance, Denoiser, NoiseSchedule, NoiseStream,
    PredictionType, Sampler, TimestepSpacing, UNetDenoiser,
};
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::train::{TrainHyper, TrainState, Trainer};
use diffwgpu::{Backend, Cpu, Gpu, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture's conditional model (11 embedding rows: classes 0-9 and the null class 10)
/// and its weights on `be`.
fn fixture_model(be: &dyn Backend) -> (UNet2D, Vec<Tensor>) {
    let path = fixtures().join("unets/class_conditional");
    let folder = load_pipeline(&path).unwrap();
    assert_eq!(folder.config.num_class_embeds, Some(11));
    let model = UNet2D::new(&folder.config).unwrap();
    let values = unet_weights(&model, &folder.weights, &path).unwrap();
    let params = model
        .params
        .specs
        .iter()
        .zip(&values)
        .map(|(s, v)| be.upload(&s.shape, v).unwrap())
        .collect();
    (model, params)
}

/// `|got - want| <= rel * max|want|`.
fn assert_rel(name: &str, got: &[f32], want: &[f32], rel: f32) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_close(name, got, want, rel * scale, 0.0);
}

/// 10 DDIM steps (diffusers' DDIMScheduler defaults) with guidance 3 for classes 3 and 7,
/// null class 10, against diffusers in float64 (`tools/diffusers_reference.py`): every x_t
/// and the sample within 1e-4 of the largest value (diffusers' own float32 run is 3e-5 away);
/// and the same at guidance 1, where only the conditional model runs.
fn check_guided_ddim(be: &dyn Backend) {
    let (model, params) = fixture_model(be);
    let fx = read_tensors(&fixtures().join("class_guided_ddim.safetensors"));
    let config = SchedulerConfig::from_json(r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    let schedule = config.schedule().unwrap();
    let timesteps = inference_timesteps(1000, 10, TimestepSpacing::Leading, 0).unwrap();
    let labels: Vec<u32> = fx["labels"].1.iter().map(|&l| l as u32).collect();
    assert_eq!(labels, [3, 7]);
    for (prefix, scale) in [("", fx["guidance"].1[0]), ("cond.", 1.0)] {
        let classes = ClassGuidance {
            labels: labels.clone(),
            null_class: Some(10),
            scale,
        };
        let (shape, noise) = &fx["noise"];
        let mut seen = 0;
        let x0 = sample(
            be,
            &UNetDenoiser {
                model: &model,
                params: &params,
                classes: Some(&classes),
            },
            &schedule,
            PredictionType::Epsilon,
            &Sampler::Ddim {
                eta: 0.0,
                clip_sample: config.clip(),
            },
            &timesteps,
            be.upload(shape, noise).unwrap(),
            NoiseStream::single(0, shape[0]),
            &mut |view| {
                let want = &fx[&format!("{prefix}x_t.{}", view.index)].1;
                let what = format!(
                    "w = {scale}: x_t before step {} on {}",
                    view.index,
                    be.name()
                );
                assert_rel(&what, &be.to_vec(view.x_t)?, want, 1e-4);
                seen += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, 10);
        let what = format!("w = {scale}: sample on {}", be.name());
        assert_rel(
            &what,
            &be.to_vec(&x0).unwrap(),
            &fx[&format!("{prefix}sample")].1,
            1e-4,
        );
    }
}

fn guided_ddim_matches_diffusers_on_cpu() {
    check_guided_ddim(&Cpu);
}

fn guided_ddim_matches_diffusers_on_gpu(g: &Gpu) {
    check_guided_ddim(g);
}

/// The prediction of the fixture's model for `labels` at one timestep, one evaluation.
fn predict(be: &dyn Backend, x: &Tensor, t: &[f64], classes: &ClassGuidance) -> Vec<f32> {
    let (model, params) = fixture_model(be);
    let unet = UNetDenoiser {
        model: &model,
        params: &params,
        classes: Some(classes),
    };
    be.to_vec(&unet.predict(be, x, t).unwrap()).unwrap()
}

/// Guidance 1 is the conditional prediction and 0 the unconditional one (the null class for
/// every image), to the bit; guidance 2.5 is `(1 - w) eps_u + w eps_c` of those two (the
/// batched evaluation of both halves rounds as the separate ones, within 1e-6); scales other
/// than 1 need a null class.
fn check_guidance_scales(be: &dyn Backend) {
    let x = be.upload(&[3, 1, 8, 8], &seeded(192, 5)).unwrap();
    let t = [700.0, 20.0, 300.0];
    let labels = vec![2, 9, 2];
    let at = |scale: f32, labels: &[u32]| ClassGuidance {
        labels: labels.to_vec(),
        null_class: Some(10),
        scale,
    };
    let cond = predict(be, &x, &t, &at(1.0, &labels));
    let uncond = predict(be, &x, &t, &at(1.0, &[10, 10, 10]));
    assert_eq!(predict(be, &x, &t, &at(0.0, &labels)), uncond);
    let other = predict(be, &x, &t, &at(1.0, &[5, 5, 5]));
    assert!(
        cond.iter().zip(&other).any(|(a, b)| a != b),
        "labels ignored"
    );
    let w = 2.5;
    let want: Vec<f32> = cond
        .iter()
        .zip(&uncond)
        .map(|(&c, &u)| (1.0 - w) * u + w * c)
        .collect();
    assert_close(
        "w = 2.5",
        &predict(be, &x, &t, &at(w, &labels)),
        &want,
        1e-6,
        1e-5,
    );
    let (model, params) = fixture_model(be);
    let no_null = ClassGuidance {
        null_class: None,
        ..at(w, &labels)
    };
    let unet = UNetDenoiser {
        model: &model,
        params: &params,
        classes: Some(&no_null),
    };
    let err = unet.predict(be, &x, &t).unwrap_err().to_string();
    assert!(err.contains("null class"), "{err}");
}

fn guidance_scales_on_cpu() {
    check_guidance_scales(&Cpu);
}

fn guidance_scales_on_gpu(g: &Gpu) {
    check_guidance_scales(g);
}

/// The tiny preset with a class embedding of 3 classes and the null class.
fn tiny_conditional() -> UNet2D {
    let config = UNet2DConfig {
        num_class_embeds: Some(4),
        ..UNet2DConfig::preset("tiny").unwrap()
    };
    UNet2D::new(&config).unwrap()
}

fn trainer<'b>(be: &'b dyn Backend, hyper: TrainHyper) -> Trainer<'b> {
    let model = tiny_conditional();
    let values = model.params.initial_values(5);
    let state = TrainState::new(be, &model, &values).unwrap();
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    Trainer::new(be, model, schedule, hyper, state).unwrap()
}

/// Class dropout replaces labels by the null class (the table's last row) at the asked rate
/// (4,000 draws at p = 0.25: within 5 standard errors), the same labels for the same step,
/// none at p = 0.
fn class_dropout_draws_the_null_class() {
    let hyper = |class_dropout| TrainHyper {
        batch_size: 8,
        class_dropout,
        seed: 3,
        ..TrainHyper::default()
    };
    let labels = [0, 1, 2, 0, 1, 2, 0, 1];
    let t = trainer(&Cpu, hyper(0.25));
    let mut nulls = 0;
    for k in 0..500 {
        let drawn = t.step_labels(k, &labels);
        assert_eq!(
            drawn,
            t.step_labels(k, &labels),
            "step {k} is not reproducible"
        );
        for (d, l) in drawn.iter().zip(&labels) {
            assert!(*d == *l || *d == 3, "label {l} became {d}");
            nulls += usize::from(*d == 3);
        }
    }
    let rate = nulls as f64 / 4000.0;
    let se = (0.25f64 * 0.75 / 4000.0).sqrt();
    assert!((rate - 0.25).abs() < 5.0 * se, "null rate {rate}");
    let plain = trainer(&Cpu, hyper(0.0));
    assert!((0..50).all(|k| plain.step_labels(k, &labels) == labels));
}

/// A tiny conditional model trained on one fixed batch of two "classes" (a bright and a dark
/// image): the loss falls, and afterwards the model's prediction of x_0 from pure noise at
/// the last timestep follows the label it is given — class 0 brighter than class 1.
fn check_conditional_overfit(be: &dyn Backend) {
    let hyper = TrainHyper {
        batch_size: 4,
        steps: 150,
        learning_rate: 2e-3,
        lr_warmup_steps: 1,
        class_dropout: 0.0,
        seed: 7,
        ..TrainHyper::default()
    };
    let mut t = trainer(be, hyper);
    let bright = vec![0.8f32; 256];
    let dark = vec![-0.8f32; 256];
    let x0 = [bright.clone(), dark.clone(), bright, dark].concat();
    let labels = [0, 1, 0, 1];
    let mut losses = Vec::new();
    for _ in 0..150 {
        losses.push(t.step(&x0, Some(&labels)).unwrap().loss);
    }
    let early: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let late: f32 = losses[140..].iter().sum::<f32>() / 10.0;
    assert!(late * 3.0 < early, "{}: loss {early} -> {late}", be.name());

    let params = t.state.param_views().unwrap();
    let x = be.upload(&[2, 1, 16, 16], &seeded(512, 1)).unwrap();
    let classes = ClassGuidance {
        labels: vec![0, 1],
        null_class: Some(3),
        scale: 1.0,
    };
    let unet = UNetDenoiser {
        model: &t.model,
        params: &params,
        classes: Some(&classes),
    };
    // At t = 999 x_t is nearly pure noise: x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar).
    let abar = t.schedule.alphas_cumprod[999] as f64;
    let eps = be
        .to_vec(&unet.predict(be, &x, &[999.0; 2]).unwrap())
        .unwrap();
    let xs = be.to_vec(&x).unwrap();
    let mean_x0 = |i: usize| {
        let r = i * 256..(i + 1) * 256;
        let sum: f64 = xs[r.clone()]
            .iter()
            .zip(&eps[r])
            .map(|(&x, &e)| (x as f64 - (1.0 - abar).sqrt() * e as f64) / abar.sqrt())
            .sum();
        sum / 256.0
    };
    let (a, b) = (mean_x0(0), mean_x0(1));
    assert!(
        a > 0.3 && b < -0.3,
        "{}: x0_hat means {a} (class 0), {b} (class 1)",
        be.name()
    );
}

fn tiny_conditional_model_learns_its_classes_on_cpu() {
    check_conditional_overfit(&Cpu);
}

/// Three conditional training steps with class dropout on the GPU give the CPU's losses
/// (1e-4 relative) and class embedding table (1e-4 of its largest value): the lookup and its
/// gradient through a whole step, with the labels of both halves of the null-class draw.
fn conditional_training_steps_match_cpu(g: &Gpu) {
    let hyper = TrainHyper {
        batch_size: 4,
        learning_rate: 1e-3,
        lr_warmup_steps: 1,
        class_dropout: 0.3,
        seed: 11,
        ..TrainHyper::default()
    };
    let x0 = seeded(4 * 256, 8);
    let labels = [0, 2, 1, 2];
    let run = |be: &dyn Backend| {
        let mut t = trainer(be, hyper.clone());
        let losses: Vec<f32> = (0..3)
            .map(|_| t.step(&x0, Some(&labels)).unwrap().loss)
            .collect();
        let host = t.state.to_host(be).unwrap();
        let table = t
            .model
            .params
            .specs
            .iter()
            .position(|s| s.name == "class_embedding.weight")
            .unwrap();
        (losses, host.params[table].clone())
    };
    let (cpu_losses, cpu_table) = run(&Cpu);
    let (gpu_losses, gpu_table) = run(g);
    assert_close("losses", &gpu_losses, &cpu_losses, 0.0, 1e-4);
    assert_rel("class_embedding.weight", &gpu_table, &cpu_table, 1e-4);
}

/// Labels for an unconditional model, none (or too few) for a conditional one: errors.
fn labels_must_fit_the_model() {
    let be = &Cpu;
    let hyper = TrainHyper {
        batch_size: 2,
        ..TrainHyper::default()
    };
    let mut t = trainer(be, hyper.clone());
    let x0 = vec![0.0; 512];
    let err = t.step(&x0, None).unwrap_err().to_string();
    assert!(err.contains("class-conditional"), "{err}");
    assert!(t.step(&x0, Some(&[1])).is_err());
    assert!(t.step(&x0, Some(&[1, 4])).is_err());
    let model = UNet2D::new(&UNet2DConfig::preset("tiny").unwrap()).unwrap();
    let values = model.params.initial_values(5);
    let state = TrainState::new(be, &model, &values).unwrap();
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    let mut plain = Trainer::new(be, model, schedule, hyper, state).unwrap();
    let err = plain.step(&x0, Some(&[0, 1])).unwrap_err().to_string();
    assert!(err.contains("unconditional"), "{err}");
}

tests! {
    cpu: [
        guided_ddim_matches_diffusers_on_cpu,
        guidance_scales_on_cpu,
        class_dropout_draws_the_null_class,
        tiny_conditional_model_learns_its_classes_on_cpu,
        labels_must_fit_the_model,
    ],
    gpu: [
        guided_ddim_matches_diffusers_on_gpu,
        guidance_scales_on_gpu,
        conditional_training_steps_match_cpu,
    ],
}
