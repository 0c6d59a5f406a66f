//! `diffwgpu bench`: how fast a model trains and samples on a device. It times whole training
//! steps (noise, forward, backward, clipping, AdamW, EMA, the loss read back) and a whole
//! DDIM sampling run at the model's initial weights (the values do not change the cost), and
//! turns the times into images/s and achieved FLOP rates; on the GPU it also reports the
//! command stream and the memory of a step.
//!
//! FLOPs count `2 M N K` for every product of a forward pass (`Tape::flops`); a training step
//! counts as three forward passes, the usual convention (the backward pass's two products per
//! forward product: the input's gradient and the weight's).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use diffwgpu::autodiff::Tape;
use diffwgpu::checkpoint::SchedulerConfig;
use diffwgpu::diffusion::{
    inference_timesteps, sample, NoiseStream, Sampler, TimestepSpacing, UNetDenoiser,
};
use diffwgpu::gpu::GpuStats;
use diffwgpu::nn::UNet2D;
use diffwgpu::train::{TrainHyper, TrainState, Trainer};
use diffwgpu::{Backend, Gpu, Tensor};
use serde::Serialize;

use super::device::{self, DeviceChoice};
use super::model::ModelArgs;

/// A training step's FLOPs in forward passes: the forward and a backward of about twice it.
const TRAIN_PASSES: u64 = 3;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images per training step and per sampling batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Timed training steps, after one untimed warm-up step.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// DDIM steps (eta 0) of the timed sampling run of --batch-size images; 0 skips sampling.
    #[arg(long, default_value_t = 50)]
    sample_steps: usize,
    /// Seed of the initial weights, the timesteps and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// Everything a bench measured; `--json` prints it with these keys. Fields that only the GPU
/// has are `None` (null) on the CPU, the sampling fields with `--sample-steps 0`.
#[derive(Debug, Serialize)]
struct Report {
    preset: String,
    params: usize,
    batch_size: usize,
    device: String,
    adapter: Option<String>,
    /// One forward pass of the batch, in 10^9 FLOPs.
    forward_gflop: f64,
    train_steps: usize,
    train_ms_per_step: f64,
    train_ms_min: f64,
    train_images_per_s: f64,
    /// Achieved, counting a step as three forward passes.
    train_tflops: f64,
    dispatches_per_step: Option<f64>,
    submits_per_step: Option<f64>,
    /// Host time to record a step's work (the step less its wait for the GPU).
    host_record_ms: Option<f64>,
    /// The most bytes of GPU buffers allocated at once during the timed steps.
    peak_gpu_bytes: Option<u64>,
    sample_steps: usize,
    sample_s: Option<f64>,
    sample_images_per_s: Option<f64>,
    /// The run's time per step: a U-Net evaluation and the DDIM update.
    sample_ms_per_eval: Option<f64>,
    sample_tflops: Option<f64>,
    dispatches_per_sample_step: Option<f64>,
    submits_per_sample_step: Option<f64>,
}

/// The timed training steps.
struct Training {
    wall: Vec<Duration>,
    host: Duration,
    /// The GPU's counters before and after the steps.
    gpu: Option<(GpuStats, GpuStats)>,
}

/// The timed sampling run.
struct Sampling {
    wall: Duration,
    gpu: Option<(GpuStats, GpuStats)>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps 0: time at least one training step");
    }
    if args.batch_size == 0 {
        bail!("--batch-size 0: a batch needs at least one image");
    }
    let cfg = args.model.unet_config()?;
    let scheduler = SchedulerConfig::default();
    let schedule = scheduler.schedule()?;
    let t_max = schedule.num_train_timesteps();
    let timesteps = match args.sample_steps {
        0 => None,
        n => Some(
            inference_timesteps(t_max, n, TimestepSpacing::Leading, 0)
                .with_context(|| format!("--sample-steps {n}"))?,
        ),
    };

    let device = device::select(args.device)?;
    let be: &dyn Backend = device.backend.as_ref();
    let gpu = device.gpu.as_ref();
    eprintln!("device: {}", device.why);
    if let Some(g) = gpu {
        // Every pipeline built now: the timed runs (sampling has no warm-up) build none.
        g.build_pipelines(&diffwgpu::ops::gpu_kernels())?;
    }
    let model = UNet2D::new(&cfg)?;
    let params = model.params.count();
    let state = TrainState::new(be, &model, &model.params.initial_values(args.seed))?;
    let hyper = TrainHyper {
        batch_size: args.batch_size,
        seed: args.seed,
        ..TrainHyper::default()
    };
    let mut trainer = Trainer::new(be, model, schedule, hyper, state)?;
    let weights = trainer.state.param_views()?;
    let forward_flops = forward_flops(be, &trainer.model, &weights)? * args.batch_size as u64;

    let b = args.batch_size;
    eprintln!(
        "{}: {params} parameters; 1 warm-up and {} timed training steps of batch {b}",
        args.model.name(),
        args.steps
    );
    let training = time_training(&mut trainer, gpu, args.steps)?;
    let sampling = match &timesteps {
        Some(ts) => {
            eprintln!("sampling {b} images with {} DDIM steps", ts.len());
            let sampler = Sampler::Ddim {
                eta: 0.0,
                clip_sample: scheduler.clip(),
            };
            Some(time_sampling(
                &trainer, gpu, &weights, &sampler, ts, args.seed,
            )?)
        }
        None => None,
    };

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let steps = args.steps as f64;
    let step_s = training.wall.iter().map(Duration::as_secs_f64).sum::<f64>() / steps;
    let per = |stats: &Option<(GpuStats, GpuStats)>, n: f64| {
        stats.as_ref().map(|(a, z)| {
            (
                (z.dispatches - a.dispatches) as f64 / n,
                (z.submits - a.submits) as f64 / n,
            )
        })
    };
    let train_gpu = per(&training.gpu, steps);
    let n_sample = args.sample_steps as f64;
    let sample_s = sampling.as_ref().map(|s| s.wall.as_secs_f64());
    let sample_gpu = sampling.as_ref().and_then(|s| per(&s.gpu, n_sample));
    let report = Report {
        preset: args.model.name(),
        params,
        batch_size: b,
        device: device.why.clone(),
        adapter: gpu.map(|g| g.adapter_info().name.clone()),
        forward_gflop: forward_flops as f64 / 1e9,
        train_steps: args.steps,
        train_ms_per_step: step_s * 1e3,
        train_ms_min: training.wall.iter().copied().min().map_or(0.0, ms),
        train_images_per_s: b as f64 / step_s,
        train_tflops: (TRAIN_PASSES * forward_flops) as f64 / step_s / 1e12,
        dispatches_per_step: train_gpu.map(|(d, _)| d),
        submits_per_step: train_gpu.map(|(_, s)| s),
        host_record_ms: gpu.map(|_| ms(training.host) / steps),
        peak_gpu_bytes: training.gpu.as_ref().map(|(_, z)| z.peak_bytes),
        sample_steps: args.sample_steps,
        sample_s,
        sample_images_per_s: sample_s.map(|s| b as f64 / s),
        sample_ms_per_eval: sample_s.map(|s| s * 1e3 / n_sample),
        sample_tflops: sample_s.map(|s| forward_flops as f64 * n_sample / s / 1e12),
        dispatches_per_sample_step: sample_gpu.map(|(d, _)| d),
        submits_per_sample_step: sample_gpu.map(|(_, s)| s),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// FLOPs of one forward pass of one image. Every product of the U-Net has the batch as a
/// factor, so a batch of B costs exactly B times this.
fn forward_flops(be: &dyn Backend, model: &UNet2D, weights: &[Tensor]) -> Result<u64> {
    let c = &model.config;
    let mut tape = Tape::inference(be);
    let p = tape.leaves(weights, false);
    let x = tape.leaf(be.zeros(&[1, c.in_channels, c.size(), c.size()])?, false);
    let t = be.upload(&[1], &[0.0])?;
    model.forward(&mut tape, &p, x, &t, None)?;
    Ok(tape.flops())
}

/// Clean images in [-1, 1) (a fixed pattern: a step's cost does not depend on the values).
fn batch(trainer: &Trainer) -> Vec<f32> {
    let n: usize = trainer.batch_shape().iter().product();
    (0..n)
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

/// One warm-up step (pipelines built, buffers pooled), then `steps` timed ones, each ending
/// with its loss read back.
fn time_training(trainer: &mut Trainer, gpu: Option<&Gpu>, steps: usize) -> Result<Training> {
    let x0 = batch(trainer);
    let b = trainer.hyper.batch_size;
    let step = |trainer: &mut Trainer| {
        trainer.step(&x0, None).with_context(|| {
            format!(
                "a training step of batch {b} failed (out of memory? try a smaller --batch-size)"
            )
        })
    };
    step(trainer)?;
    let before = match gpu {
        Some(g) => {
            g.synchronize()?;
            g.reset_peak();
            Some(g.stats())
        }
        None => None,
    };
    let mut wall = Vec::with_capacity(steps);
    let mut host = Duration::ZERO;
    for _ in 0..steps {
        let started = Instant::now();
        let stats = step(trainer)?;
        wall.push(started.elapsed());
        host += stats.host_time;
    }
    let gpu = before.zip(gpu.map(Gpu::stats));
    Ok(Training { wall, host, gpu })
}

/// A whole DDIM run of a batch from `x_T` to `x_0`, read back at the end.
fn time_sampling(
    trainer: &Trainer,
    gpu: Option<&Gpu>,
    weights: &[Tensor],
    sampler: &Sampler,
    timesteps: &[usize],
    seed: u64,
) -> Result<Sampling> {
    let be = trainer.backend();
    let shape = trainer.batch_shape();
    let noise = NoiseStream::single(seed, shape[0]);
    let x_t = noise.initial(be, &shape)?;
    let before = match gpu {
        Some(g) => {
            g.synchronize()?;
            Some(g.stats())
        }
        None => None,
    };
    let started = Instant::now();
    sample(
        be,
        &UNetDenoiser {
            model: &trainer.model,
            params: weights,
            classes: None,
        },
        &trainer.schedule,
        trainer.hyper.prediction_type,
        sampler,
        timesteps,
        x_t,
        noise,
        &mut |_| Ok(()),
    )
    .and_then(|x0| be.to_vec(&x0))
    .with_context(|| {
        format!(
            "sampling a batch of {} failed (out of memory? try a smaller --batch-size)",
            shape[0]
        )
    })?;
    let wall = started.elapsed();
    let gpu = before.zip(gpu.map(Gpu::stats));
    Ok(Sampling { wall, gpu })
}

/// The report as aligned lines.
fn print_table(r: &Report) {
    let flops = |tflops: f64| format!("{tflops:.3} TFLOP/s ({:.1} GFLOP/s)", tflops * 1e3);
    println!(
        "model     {}: {} parameters, {:.2} GFLOP per forward pass of batch {}",
        r.preset, r.params, r.forward_gflop, r.batch_size
    );
    println!("device    {}", r.device);
    println!(
        "training  {:.1} ms/step (min {:.1}) over {} steps, {:.1} images/s",
        r.train_ms_per_step, r.train_ms_min, r.train_steps, r.train_images_per_s
    );
    println!(
        "          {} (a step counts as {TRAIN_PASSES} forward passes)",
        flops(r.train_tflops)
    );
    if let (Some(d), Some(s), Some(host), Some(peak)) = (
        r.dispatches_per_step,
        r.submits_per_step,
        r.host_record_ms,
        r.peak_gpu_bytes,
    ) {
        println!(
            "          per step: dispatches {d:.0}, submits {s:.0}, recording {host:.1} ms, \
             peak GPU memory {:.1} MiB",
            peak as f64 / (1 << 20) as f64
        );
    }
    if let (Some(secs), Some(ips), Some(ms), Some(tflops)) = (
        r.sample_s,
        r.sample_images_per_s,
        r.sample_ms_per_eval,
        r.sample_tflops,
    ) {
        println!(
            "sampling  {} DDIM steps of {} images: {secs:.2} s, {ips:.2} images/s, {ms:.1} ms \
             per U-Net evaluation",
            r.sample_steps, r.batch_size
        );
        println!("          {}", flops(tflops));
    }
    if let (Some(d), Some(s)) = (r.dispatches_per_sample_step, r.submits_per_sample_step) {
        println!("          per step: dispatches {d:.0}, submits {s:.1}");
    }
}
