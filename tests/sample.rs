//! The reverse process: diffusers' timestep sequences, determinism for a seed, and the same
//! images on both backends.

mod common;

use common::assert_close;
use diffwgpu::diffusion::{
    inference_timesteps, sample, NoiseSchedule, NoiseStream, PredictionType, Sampler,
    TimestepSpacing, UNetDenoiser, VarianceType,
};
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::{Backend, Cpu, Gpu, Tensor};

fn timestep_sequences_match_diffusers() {
    let leading = inference_timesteps(1000, 50, TimestepSpacing::Leading, 0).unwrap();
    assert_eq!(&leading[..3], &[980, 960, 940]);
    assert_eq!(*leading.last().unwrap(), 0);
    let offset = inference_timesteps(1000, 50, TimestepSpacing::Leading, 1).unwrap();
    assert_eq!((offset[0], *offset.last().unwrap()), (981, 1));
    let trailing = inference_timesteps(1000, 50, TimestepSpacing::Trailing, 0).unwrap();
    assert_eq!(&trailing[..3], &[999, 979, 959]);
    assert_eq!(*trailing.last().unwrap(), 19);
    let linspace = inference_timesteps(1000, 50, TimestepSpacing::Linspace, 0).unwrap();
    assert_eq!(&linspace[..3], &[999, 979, 958]);
    assert_eq!(*linspace.last().unwrap(), 0);
    let ddpm = inference_timesteps(1000, 1000, TimestepSpacing::Leading, 0).unwrap();
    assert!(ddpm.iter().rev().copied().eq(0..1000));
    assert!(inference_timesteps(1000, 1001, TimestepSpacing::Leading, 0).is_err());
    assert!(inference_timesteps(1000, 0, TimestepSpacing::Leading, 0).is_err());
}

/// Samples 2 images with the tiny model; returns x_t before every step, then x_0.
fn run(be: &dyn Backend, sampler: &Sampler, steps: usize) -> Vec<Vec<f32>> {
    let model = UNet2D::new(&UNet2DConfig::preset("tiny").unwrap()).unwrap();
    let params: Vec<Tensor> = model
        .params
        .specs
        .iter()
        .zip(model.params.initial_values(1))
        .map(|(s, v)| be.upload(&s.shape, &v).unwrap())
        .collect();
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    let ts = inference_timesteps(1000, steps, TimestepSpacing::Leading, 0).unwrap();
    let noise = NoiseStream::single(77, 2);
    let x_t = noise.initial(be, &[2, 1, 16, 16]).unwrap();
    let mut states = Vec::new();
    let x0 = sample(
        be,
        &UNetDenoiser {
            model: &model,
            params: &params,
            classes: None,
        },
        &schedule,
        PredictionType::Epsilon,
        sampler,
        &ts,
        x_t,
        noise,
        &mut |view| {
            states.push(be.to_vec(view.x_t)?);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(states.len(), steps);
    states.push(be.to_vec(&x0).unwrap());
    states
}

/// The samplers of the trajectory tests, each with its number of steps.
fn samplers() -> [(Sampler, usize); 3] {
    [
        (
            Sampler::Ddim {
                eta: 0.0,
                clip_sample: Some(1.0),
            },
            20,
        ),
        (
            Sampler::Ddim {
                eta: 1.0,
                clip_sample: None,
            },
            10,
        ),
        (
            Sampler::Ddpm {
                variance_type: VarianceType::FixedSmall,
                clip_sample: Some(1.0),
            },
            25,
        ),
    ]
}

/// Whole trajectories (every x_t, then x_0) of DDIM with and without noise and of DDPM: the
/// same for a seed on a rerun.
fn sampling_is_deterministic() {
    for (s, steps) in &samplers() {
        let a = run(&Cpu, s, *steps);
        assert_eq!(a, run(&Cpu, s, *steps), "{s:?} is not deterministic");
        assert!(a.iter().flatten().all(|v| v.is_finite()));
    }
}

/// Whole trajectories (every x_t, then x_0) of DDIM with and without noise and of DDPM: the
/// GPU's the same as the CPU's at every step.
fn sampling_matches_across_backends(g: &Gpu) {
    for (s, steps) in &samplers() {
        let a = run(&Cpu, s, *steps);
        // The model's f32 sums in another order and normals a few ulps apart, compounded
        // over the steps; the images are O(1).
        for (i, (got, want)) in run(g, s, *steps).iter().zip(&a).enumerate() {
            assert_close(&format!("{s:?} step {i}"), got, want, 1e-3, 1e-3);
        }
    }
}

tests! {
    cpu: [timestep_sequences_match_diffusers, sampling_is_deterministic],
    gpu: [sampling_matches_across_backends],
}
