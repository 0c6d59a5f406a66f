//! `diffwgpu sample`: generates images from a pipeline folder (one `train` wrote, or diffusers')
//! with DDPM ancestral sampling, DDIM, DPM-Solver++, or the reverse SDE or probability-flow
//! ODE, and writes a PNG grid, one PNG per image, and the raw samples on request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use diffwgpu::checkpoint::{
    read_safetensors, write_safetensors, NamedTensor, DPM_SOLVER_SCHEDULER,
};
use diffwgpu::diffusion::{
    inference_timesteps, predicted_x0, sample, ClassGuidance, NoiseStream, Sampler,
    TimestepSpacing, UNetDenoiser, VarianceType,
};
use diffwgpu::images;
use diffwgpu::Backend;
use indicatif::{ProgressBar, ProgressStyle};

use super::device::{self, DeviceChoice};
use super::pipeline::TrainedModel;
use super::progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SamplerName {
    /// Ancestral sampling (Ho et al. 2020, Algorithm 2).
    Ddpm,
    /// DDIM (Song et al. 2021); deterministic with --eta 0.
    Ddim,
    /// DPM-Solver++ (Lu et al. 2022), second-order multistep, as diffusers'
    /// DPMSolverMultistepScheduler; options from the scheduler config.
    #[value(name = "dpm-solver++")]
    DpmSolver,
    /// The reverse VP-SDE by Euler–Maruyama (Song et al. 2021).
    Sde,
    /// The probability-flow ODE by Heun's method: two model evaluations per step but the last.
    Ode,
}

impl SamplerName {
    /// Steps when --steps is not given.
    fn default_steps(self, t_max: usize) -> usize {
        match self {
            SamplerName::Ddpm | SamplerName::Sde => t_max,
            SamplerName::Ddim => 50,
            SamplerName::DpmSolver => 20,
            SamplerName::Ode => 50,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SpacingName {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VarianceName {
    FixedSmall,
    FixedLarge,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A pipeline folder (what `diffwgpu train` writes, or a diffusers DDPM pipeline), or a
    /// `unet` folder beside a `scheduler` folder.
    #[arg(long)]
    model: PathBuf,
    /// The sampler (default: dpm-solver++ for a model whose scheduler is
    /// DPMSolverMultistepScheduler, ddpm otherwise).
    #[arg(long, value_enum)]
    sampler: Option<SamplerName>,
    /// Denoising steps (default: every training timestep for ddpm and sde, 50 for ddim, 20 for
    /// dpm-solver++, 50 for ode).
    #[arg(long)]
    steps: Option<usize>,
    /// DDIM's noise scale: 0 is the deterministic ODE sampler, 1 is DDPM-like.
    #[arg(long, default_value_t = 0.0)]
    eta: f32,
    /// Timestep spacing (default: the scheduler config's `timestep_spacing`).
    #[arg(long, value_enum)]
    spacing: Option<SpacingName>,
    /// DDPM's step variance (default: the scheduler config's `variance_type`).
    #[arg(long, value_enum)]
    variance: Option<VarianceName>,
    /// Clip the predicted x_0 to [-1, 1] (default: the scheduler config's `clip_sample`).
    #[arg(long)]
    clip_sample: Option<bool>,
    /// Images to generate (with --class all: per class).
    #[arg(long, default_value_t = 16)]
    num: usize,
    /// For a class-conditional model: the class to draw, by name or id, or `all` for a grid
    /// with one row per class (the default).
    #[arg(long = "class", value_name = "CLASS")]
    class: Option<String>,
    /// Classifier-free guidance scale w, eps = eps_u + w (eps_c - eps_u): 1 is the conditional
    /// model alone, 0 the unconditional one (default: 3, or 1 for a model without a null
    /// class).
    #[arg(long, value_name = "W", allow_hyphen_values = true)]
    guidance: Option<f32>,
    /// Images per model evaluation (default: all of them at once).
    #[arg(long, alias = "batch")]
    batch_size: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// The PNG grid of all images.
    #[arg(long, default_value = "samples.png")]
    output: PathBuf,
    /// Also write each image as its own PNG into this folder.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Start from this x_T: a safetensors file with a tensor `noise` of shape [N, C, H, W].
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Write the final samples, float32 in [-1, 1], as tensor `samples` of this safetensors file.
    #[arg(long)]
    save_tensor: Option<PathBuf>,
    /// Pictures of the reverse process for the first images: a strip PNG of x_t above the
    /// model's predicted x_0 at this many evenly spaced steps (`<output>-trajectory.png`), and
    /// an animated GIF of x_t over the steps (`<output>-trajectory.gif`).
    #[arg(long, num_args = 0..=1, default_missing_value = "8")]
    trajectory: Option<usize>,
}

/// Images of the trajectory strip, at most.
const STRIP_IMAGES: usize = 4;
/// Frames of the trajectory GIF, at most.
const GIF_FRAMES: usize = 60;

/// What the trajectory pictures collect from the first batch as sampling goes.
struct Trajectory {
    /// Step indices that go into the strip and into the GIF.
    strip_at: Vec<usize>,
    gif_at: Vec<usize>,
    /// Per strip step: x_t and x0_hat of the first images.
    strip: Vec<(Vec<f32>, Vec<f32>)>,
    /// Per GIF frame: x_t of the whole first batch.
    frames: Vec<Vec<f32>>,
}

/// `k` step indices spread evenly over `0 .. n`, the first and the last included.
fn evenly(n: usize, k: usize) -> Vec<usize> {
    let k = k.clamp(1, n);
    let mut v: Vec<usize> = (0..k)
        .map(|i| if k == 1 { 0 } else { i * (n - 1) / (k - 1) })
        .collect();
    v.dedup();
    v
}

pub fn run(args: SampleArgs) -> Result<()> {
    let trained = TrainedModel::load(&args.model, "sampling")?;
    let (model, scheduler) = (&trained.model, &trained.scheduler);
    let schedule = scheduler.schedule()?;
    let prediction_type = scheduler.prediction_type()?;
    let t_max = schedule.num_train_timesteps();

    let spacing = match args.spacing {
        Some(SpacingName::Leading) => TimestepSpacing::Leading,
        Some(SpacingName::Trailing) => TimestepSpacing::Trailing,
        Some(SpacingName::Linspace) => TimestepSpacing::Linspace,
        None => TimestepSpacing::from_name(&scheduler.timestep_spacing)?,
    };
    let clip_sample = match args.clip_sample {
        Some(true) => Some(scheduler.clip_sample_range as f32),
        Some(false) => None,
        None => scheduler.clip(),
    };
    let sampler_name = args
        .sampler
        .unwrap_or(if scheduler.class_name == DPM_SOLVER_SCHEDULER {
            SamplerName::DpmSolver
        } else {
            SamplerName::Ddpm
        });
    let steps = args.steps.unwrap_or(sampler_name.default_steps(t_max));
    if steps == 0 || steps > t_max {
        bail!("--steps {steps} must be between 1 and the model's {t_max} training timesteps");
    }
    let sampler = match sampler_name {
        SamplerName::Ddpm => {
            let variance_type = match args.variance {
                Some(VarianceName::FixedSmall) => VarianceType::FixedSmall,
                Some(VarianceName::FixedLarge) => VarianceType::FixedLarge,
                None => scheduler.variance_type()?,
            };
            Sampler::Ddpm {
                variance_type,
                clip_sample,
            }
        }
        SamplerName::Ddim => {
            if !(0.0..=1.0).contains(&args.eta) {
                bail!("--eta {} is outside [0, 1]", args.eta);
            }
            Sampler::Ddim {
                eta: args.eta,
                clip_sample,
            }
        }
        SamplerName::DpmSolver => Sampler::DpmSolver(scheduler.dpm_solver()?),
        SamplerName::Sde => Sampler::Sde,
        SamplerName::Ode => Sampler::Ode,
    };
    let timesteps = match &sampler {
        Sampler::DpmSolver(solver) => {
            solver.timesteps(&schedule, steps, spacing, scheduler.steps_offset)?
        }
        _ => inference_timesteps(t_max, steps, spacing, scheduler.steps_offset)?,
    };
    // DPM-Solver++ may leave out timesteps below its lambda_min_clipped.
    let steps = timesteps.len();

    let cfg = &model.config;
    let (c, s) = (cfg.in_channels, cfg.size());
    let noise = match &args.noise {
        Some(path) => Some(read_noise(path, [c, s, s])?),
        None => None,
    };
    let per_class = match &noise {
        Some((n, _)) => *n,
        None => args.num,
    };
    if per_class == 0 {
        bail!("--num 0: nothing to sample");
    }
    let (classes, columns) = class_guidance(&trained, &args, per_class)?;
    let n = classes.as_ref().map_or(per_class, |c| c.labels.len());
    let batch = args.batch_size.unwrap_or(n).clamp(1, n);

    let (be, why) = device::open(args.device)?;
    let be: &dyn Backend = be.as_ref();
    eprintln!("device: {why}");
    let params = trained.params(be)?;

    let evaluations = (steps * n.div_ceil(batch)) as u64;
    let bar = ProgressBar::new(evaluations);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps | {msg} | {elapsed_precise} < {eta_precise}",
        )
        .expect("valid template"),
    );
    let per_image = c * s * s;
    let mut trajectory = match args.trajectory {
        Some(0) => bail!("--trajectory 0: give the number of steps to show (at least 1)"),
        Some(k) => Some(Trajectory {
            strip_at: evenly(steps, k),
            gif_at: evenly(steps, GIF_FRAMES),
            strip: Vec::new(),
            frames: Vec::new(),
        }),
        None => None,
    };
    // Without a terminal the bar is hidden: a line every 10 % of the model evaluations.
    let interactive = progress::interactive();
    let started = Instant::now();
    let mut out = Vec::with_capacity(n * per_image);
    for first in (0..n).step_by(batch) {
        let b = batch.min(n - first);
        let stream = NoiseStream {
            seed: args.seed,
            first,
            total: n,
        };
        let shape = [b, c, s, s];
        let x_t = match &noise {
            Some((_, data)) => be.upload(&shape, &data[first * per_image..][..b * per_image])?,
            None => stream.initial(be, &shape)?,
        };
        let batch_classes = classes.as_ref().map(|c| ClassGuidance {
            labels: c.labels[first..first + b].to_vec(),
            ..c.clone()
        });
        let x0 = sample(
            be,
            &UNetDenoiser {
                model,
                params: &params,
                classes: batch_classes.as_ref(),
            },
            &schedule,
            prediction_type,
            &sampler,
            &timesteps,
            x_t,
            stream,
            &mut |view| {
                if let (Some(tr), 0) = (trajectory.as_mut(), first) {
                    let (strip, gif) = (
                        tr.strip_at.contains(&view.index),
                        tr.gif_at.contains(&view.index),
                    );
                    if strip || gif {
                        let x_t = be.to_vec(view.x_t)?;
                        if gif {
                            tr.frames.push(x_t.clone());
                        }
                        if strip {
                            let shown = b.min(STRIP_IMAGES) * per_image;
                            let out = be.to_vec(view.model_output)?;
                            let x0 = predicted_x0(
                                &schedule,
                                prediction_type,
                                view.t,
                                &x_t[..shown],
                                &out[..shown],
                            )?;
                            tr.strip.push((x_t[..shown].to_vec(), x0));
                        }
                    }
                }
                bar.inc(1);
                // Images whose last step has run.
                let done = first + if view.index + 1 == view.total { b } else { 0 };
                let elapsed = started.elapsed().as_secs_f64();
                let progress = bar.position() as f64 / bar.length().unwrap_or(1) as f64;
                let ips = if progress > 0.0 {
                    n as f64 * progress / elapsed
                } else {
                    0.0
                };
                bar.set_message(format!("{done}/{n} images | {ips:.2} img/s"));
                if !interactive && progress::at_mark(bar.position(), evaluations, 10) {
                    eprintln!(
                        "step {}/{evaluations} | {done}/{n} images | {elapsed:.1} s",
                        bar.position()
                    );
                }
                Ok(())
            },
        )?;
        let x0 = be.to_vec(&x0)?;
        if let (Some(tr), 0) = (trajectory.as_mut(), first) {
            tr.frames.push(x0.clone());
        }
        out.extend(x0);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();

    let grid = images::grid(&out, n, c, s, columns)?;
    images::save_png(&image::DynamicImage::ImageRgb8(grid), &args.output)?;
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for i in 0..n {
            let img = images::picture(&out[i * per_image..][..per_image], c, s)?;
            images::save_png(&img, &dir.join(format!("{i:04}.png")))?;
        }
    }
    if let Some(tr) = &trajectory {
        write_trajectory(tr, &args.output, batch, [c, s, s])?;
    }
    if let Some(path) = &args.save_tensor {
        let samples = NamedTensor {
            name: "samples".into(),
            shape: vec![n, c, s, s],
            data: out,
        };
        write_safetensors(path, &[samples], &BTreeMap::new())?;
    }
    eprintln!(
        "{n} images in {secs:.1} s ({:.2} images/s) with {} steps of {:?}: {}",
        n as f64 / secs,
        steps,
        sampler_name,
        args.output.display()
    );
    Ok(())
}

/// What a class-conditional model draws (`None` for an unconditional one) and the grid's
/// columns: `--class all` is one row of `per_class` images per class; with `--noise`, its
/// images are shared out among the classes in equal rows.
fn class_guidance(
    trained: &TrainedModel,
    args: &SampleArgs,
    per_class: usize,
) -> Result<(Option<ClassGuidance>, usize)> {
    let Some(classes) = &trained.classes else {
        if args.class.is_some() || args.guidance.is_some() {
            bail!(
                "--class and --guidance need a class-conditional model, and {} is unconditional \
                 (its unet/config.json has no num_class_embeds); train one with `diffwgpu train \
                 --conditional`",
                args.model.display()
            );
        }
        return Ok((None, images::grid_columns(per_class)));
    };
    let scale = match args.guidance {
        Some(w) if !w.is_finite() => bail!("--guidance {w} is not a finite number"),
        Some(w) => w,
        None if classes.null_class.is_some() => DEFAULT_GUIDANCE,
        None => 1.0,
    };
    if scale != 1.0 && classes.null_class.is_none() {
        bail!(
            "--guidance {scale} needs the unconditional model, and {} has no null class (no \
             null_class in unet/class_labels.json); use --guidance 1",
            args.model.display()
        );
    }
    let k = classes.names.len();
    let (labels, columns) = match args.class.as_deref() {
        None | Some("all") => {
            let row = if args.noise.is_some() {
                if !per_class.is_multiple_of(k) {
                    bail!(
                        "the {per_class} images of --noise cannot be shared out among the \
                         model's {k} classes; give a multiple of {k}, or choose one --class"
                    );
                }
                per_class / k
            } else {
                per_class
            };
            let labels = (0..k as u32)
                .flat_map(|l| std::iter::repeat_n(l, row))
                .collect();
            (labels, row)
        }
        Some(name) => {
            let Some(label) = classes.lookup(name) else {
                bail!(
                    "--class {name}: the model has no such class; its classes are {} (by name, \
                     or by id 0 to {}), or `all`",
                    classes.names.join(", "),
                    k - 1
                );
            };
            (vec![label; per_class], images::grid_columns(per_class))
        }
    };
    let guidance = ClassGuidance {
        labels,
        null_class: classes.null_class,
        scale,
    };
    Ok((Some(guidance), columns))
}

/// The guidance scale when --guidance is not given (and the model has a null class).
const DEFAULT_GUIDANCE: f32 = 3.0;

/// The strip (for each of the first images, a row of x_t above a row of x0_hat, one column
/// per strip step) and the GIF (the first batch's x_t over the steps, then x_0).
fn write_trajectory(
    tr: &Trajectory,
    output: &Path,
    batch: usize,
    [c, s, _]: [usize; 3],
) -> Result<()> {
    let per_image = c * s * s;
    let shown = tr.strip.first().map_or(0, |(x, _)| x.len() / per_image);
    let cols = tr.strip.len();
    let mut tiles = Vec::with_capacity(2 * shown * cols * per_image);
    for i in 0..shown {
        for row in [0, 1] {
            for (x_t, x0) in &tr.strip {
                let src = if row == 0 { x_t } else { x0 };
                tiles.extend_from_slice(&src[i * per_image..][..per_image]);
            }
        }
    }
    let strip = images::grid(&tiles, 2 * shown * cols, c, s, cols)?;
    let stem = output.with_extension("");
    let strip_path = PathBuf::from(format!("{}-trajectory.png", stem.display()));
    images::save_png(&image::DynamicImage::ImageRgb8(strip), &strip_path)?;
    let cols = images::grid_columns(batch);
    let frames = tr
        .frames
        .iter()
        .map(|f| images::grid(f, f.len() / per_image, c, s, cols))
        .collect::<diffwgpu::Result<Vec<_>>>()?;
    let gif_path = PathBuf::from(format!("{}-trajectory.gif", stem.display()));
    images::save_gif(&frames, 80, &gif_path)?;
    eprintln!(
        "trajectory: {} and {}",
        strip_path.display(),
        gif_path.display()
    );
    Ok(())
}

/// Reads the tensor `noise [N, C, H, W]` of a safetensors file; returns N and the values.
fn read_noise(path: &Path, image: [usize; 3]) -> Result<(usize, Vec<f32>)> {
    let (tensors, _) = read_safetensors(path)?;
    let t = tensors
        .into_iter()
        .find(|t| t.name == "noise")
        .with_context(|| format!("{} has no tensor named `noise`", path.display()))?;
    if t.shape.len() != 4 || t.shape[1..] != image || t.shape[0] == 0 {
        bail!(
            "the noise in {} has shape {:?}; the model needs [N, {}, {}, {}]",
            path.display(),
            t.shape,
            image[0],
            image[1],
            image[2]
        );
    }
    Ok((t.shape[0], t.data))
}
