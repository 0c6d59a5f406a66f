//! `diffwgpu eval`: how well a trained model fits held-out images, in bits per dimension —
//! DDPM's variational bound (every timestep, or a Monte-Carlo estimate over drawn ones) and,
//! with `--ode`, the likelihood of the probability-flow ODE — with a CSV of the bound's
//! per-timestep terms and a chart of them.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use diffwgpu::data::{Dataset, Split};
use diffwgpu::diffusion::UNetDenoiser;
use diffwgpu::images;
use diffwgpu::likelihood::{
    bits_per_dim, ode_log_likelihood, variational_bound, BoundEstimate, Decoder, Estimate, Terms,
    VariationalBound,
};
use diffwgpu::rng;
use indicatif::{ProgressBar, ProgressStyle};

use super::device::{self, DeviceChoice};
use super::pipeline::TrainedModel;
use super::{plot, progress};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A pipeline folder (what `diffwgpu train` writes, or a diffusers DDPM pipeline), or a
    /// `unet` folder beside a `scheduler` folder.
    #[arg(long)]
    model: PathBuf,
    /// The images: a folder of PNG/JPEG images, or mnist:PATH for an MNIST IDX file (default:
    /// the embedded digits' 1,000-image test split). They must be 8-bit images of the model's
    /// size.
    #[arg(long)]
    data: Option<String>,
    /// Evaluate the first N images (default: all of them).
    #[arg(long)]
    num: Option<usize>,
    /// Timesteps drawn per image for a Monte-Carlo estimate of the bound (default: every
    /// timestep, the bound itself).
    #[arg(long)]
    t_samples: Option<usize>,
    /// Also the likelihood of the probability-flow ODE (Hutchinson's divergence estimate,
    /// uniform dequantization).
    #[arg(long)]
    ode: bool,
    /// Heun steps of the ODE likelihood (two model evaluations and their gradients each).
    #[arg(long, default_value_t = 32)]
    ode_steps: usize,
    /// Images per model evaluation.
    #[arg(long, alias = "batch", default_value_t = 64)]
    batch_size: usize,
    /// Seed of the noise, the drawn timesteps, the dequantization and the probes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Clip the predicted x_0 to [-1, 1] in the model's means (default: the scheduler config's
    /// `clip_sample`).
    #[arg(long)]
    clip_sample: Option<bool>,
    /// The bound's terms per timestep, in bits/dim.
    #[arg(long, default_value = "bound.csv")]
    csv: PathBuf,
    /// A chart of the terms L_t against t (log scale).
    #[arg(long, default_value = "bound.png")]
    plot: PathBuf,
}

/// `mean ± standard error`, or the mean alone from a single image.
fn show(e: &Estimate) -> String {
    if e.std_error.is_finite() {
        format!("{:.4} ± {:.4}", e.mean, e.std_error)
    } else {
        format!("{:.4}", e.mean)
    }
}

/// The 8-bit level `k` of each value `2 k / 255 - 1`; an error names a value off that grid.
fn levels(data: &Dataset, images: &[f32]) -> Result<Vec<u8>> {
    images
        .iter()
        .map(|&x| {
            let k = (x as f64 + 1.0) * 127.5;
            if (k - k.round()).abs() > 1e-3 || !(0.0..=255.0).contains(&k.round()) {
                bail!(
                    "{}: a pixel value {x} is not one of the 256 levels of 8-bit images once \
                     fitted to the model's {}x{}; the images are another size than the model's \
                     (and were resampled) or are not 8-bit. The likelihood is of 8-bit images \
                     of the model's size: resize them beforehand",
                    data.source,
                    data.size,
                    data.size
                );
            }
            Ok(k.round() as u8)
        })
        .collect()
}

/// The CSV of the bound: the prior, then `L_t` from the last timestep to the decoder's 0.
fn bound_csv(b: &BoundEstimate) -> String {
    let mut csv = String::from("term,t,bits_per_dim,std_error,images\n");
    let prior = b.prior_bits_per_dim();
    let t_max = b.terms.len();
    let _ = writeln!(
        csv,
        "prior,{t_max},{},{},{}",
        prior.mean, prior.std_error, prior.n
    );
    for (t, stats) in b.terms.iter().enumerate().rev() {
        if stats.count == 0 {
            continue;
        }
        let e = stats.bits_per_dim(b.dims);
        let term = if t == 0 { "decoder" } else { "kl" };
        let se = if e.std_error.is_finite() {
            e.std_error.to_string()
        } else {
            String::new()
        };
        let _ = writeln!(csv, "{term},{t},{},{se},{}", e.mean, e.n);
    }
    csv
}

pub fn run(args: EvalArgs) -> Result<()> {
    let trained = TrainedModel::load(&args.model, "the likelihood")?;
    if trained.classes.is_some() {
        bail!(
            "{} is a class-conditional model; eval measures unconditional models only",
            args.model.display()
        );
    }
    let (model, scheduler) = (&trained.model, &trained.scheduler);
    let cfg = &model.config;
    let (c, s) = (cfg.in_channels, cfg.size());
    let dims = c * s * s;
    let data = match &args.data {
        Some(spec) => Dataset::open(Some(spec), s, c)?,
        None => Dataset::embedded_mnist(Split::Test, s, c)?,
    };
    let n = match args.num {
        Some(0) => bail!("--num 0: nothing to evaluate"),
        Some(n) if n > data.len => bail!(
            "--num {n}, but {} holds {} images; ask for at most {}",
            data.source,
            data.len,
            data.len
        ),
        Some(n) => n,
        None => data.len,
    };
    let images = &data.images[..n * dims];
    let levels = levels(&data, images)?;
    let terms = match args.t_samples {
        Some(0) => bail!("--t-samples 0: draw at least one timestep per image"),
        Some(k) => Terms::Sampled(k),
        None => Terms::Every,
    };
    if args.ode && args.ode_steps == 0 {
        bail!("--ode-steps 0: the ODE needs at least one step");
    }
    let clip_sample = match args.clip_sample {
        Some(true) => Some(scheduler.clip_sample_range as f32),
        Some(false) => None,
        None => scheduler.clip(),
    };
    let vb = VariationalBound {
        schedule: scheduler.schedule()?,
        prediction_type: scheduler.prediction_type()?,
        variance_type: scheduler.variance_type()?,
        clip_sample,
        decoder: Decoder::Discretized,
    };
    let t_max = vb.timesteps()?;
    eprintln!("data: {} ({n} images of {c}x{s}x{s})", data.source);

    let (be, why) = device::open(args.device)?;
    let be = be.as_ref();
    eprintln!("device: {why}");
    let params = trained.params(be)?;
    let unet = UNetDenoiser {
        model,
        params: &params,
        classes: None,
    };

    let draws = match terms {
        Terms::Every => t_max,
        Terms::Sampled(k) => k,
    };
    let ode_evaluations = if args.ode { 2 * args.ode_steps } else { 0 };
    let total = (n * (draws + ode_evaluations)) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} image evaluations | {elapsed_precise} < {eta_precise}",
        )
        .expect("valid template"),
    );
    let interactive = progress::interactive();
    let started = Instant::now();
    let mut tick = |images: usize| {
        bar.inc(images as u64);
        if !interactive && progress::at_mark(bar.position(), total, 10) {
            eprintln!(
                "{}/{total} image evaluations | {:.1} s",
                bar.position(),
                started.elapsed().as_secs_f64()
            );
        }
    };
    let batch = args.batch_size;
    let bound = variational_bound(be, &unet, &vb, images, terms, args.seed, batch, &mut tick)?;
    let ode = if args.ode {
        // Uniform dequantization: level k becomes (k + u) / 128 - 1, u ~ U[0, 1).
        let dequantized: Vec<f32> = levels
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let u = rng::uniform(args.seed.wrapping_add(2), i as u64);
                ((k as f64 + u as f64) / 128.0 - 1.0) as f32
            })
            .collect();
        let log_p = ode_log_likelihood(
            be,
            &unet,
            &vb.schedule,
            vb.prediction_type,
            &dequantized,
            args.ode_steps,
            args.seed.wrapping_add(3),
            batch,
            &mut tick,
        )?;
        // A density on [-1, 1]^D over bins 2 / 256 wide: -log2 P(k) <= -log2 p(x) + 7 D.
        Some(Estimate::of(
            log_p.iter().map(|&l| bits_per_dim(-l, dims) + 7.0),
        ))
    } else {
        None
    };
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();

    let how = match terms {
        Terms::Every => format!("every one of the {t_max} timesteps"),
        Terms::Sampled(k) => format!("{k} drawn timesteps per image"),
    };
    println!(
        "variational bound: {} bits/dim over {n} images ({how})",
        show(&bound.bits_per_dim())
    );
    let weight = t_max as f64 / draws as f64 / n as f64;
    let part = |range: std::ops::Range<usize>| {
        let nats: f64 = bound.terms[range].iter().map(|t| t.sum).sum();
        bits_per_dim(nats * weight, dims)
    };
    println!(
        "  prior L_T {:.6} | L_1 .. L_{} {:.4} | decoder L_0 {:.4} bits/dim",
        bound.prior_bits_per_dim().mean,
        t_max - 1,
        part(1..t_max),
        part(0..1)
    );
    if let Some(ode) = &ode {
        println!(
            "ODE likelihood: {} bits/dim over {n} images ({} Heun steps, one Hutchinson probe \
             per image, uniform dequantization)",
            show(ode),
            args.ode_steps
        );
    }
    images::write_file(&args.csv, bound_csv(&bound).as_bytes())?;
    let points: Vec<(f64, f64)> = (1..t_max)
        .filter(|&t| bound.terms[t].count > 0)
        .map(|t| (t as f64, bound.terms[t].bits_per_dim(dims).mean))
        .collect();
    let chart = plot::log_chart(&points, (t_max - 1) as f64);
    images::save_png(&image::DynamicImage::ImageRgb8(chart), &args.plot)?;
    eprintln!(
        "{secs:.1} s; the terms per timestep in {}, their chart in {}",
        args.csv.display(),
        args.plot.display()
    );
    Ok(())
}
