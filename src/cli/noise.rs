//! `diffwgpu noise`: a picture of the forward process. One row per noise schedule: the clean
//! image, then `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` at evenly spaced `t`, the same
//! `eps` throughout, so the rows differ only by how fast each schedule destroys the image.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use diffwgpu::data::{folder, Dataset, Split};
use diffwgpu::diffusion::NoiseSchedule;
use diffwgpu::images;
use diffwgpu::{Backend, Cpu};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Schedules {
    Linear,
    Cosine,
    ScaledLinear,
    /// Linear above cosine: the comparison of Nichol and Dhariwal (2021), figure 3.
    Both,
}

#[derive(Debug, Args)]
pub struct NoiseArgs {
    /// An image file (PNG/JPEG; center-cropped and resized to --size).
    #[arg(long, conflicts_with = "digit")]
    image: Option<PathBuf>,
    /// A digit of the embedded MNIST test split, by index (0-999).
    #[arg(long, default_value_t = 0)]
    digit: usize,
    /// Side of the pictures in pixels.
    #[arg(long, default_value_t = 32)]
    size: usize,
    #[arg(long, value_enum, default_value = "both")]
    schedule: Schedules,
    /// Training timesteps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// Noisy images per row (t evenly spaced up to T - 1).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Seed of the noise eps.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "noise.png")]
    output: PathBuf,
}

pub fn run(args: NoiseArgs) -> Result<()> {
    if args.steps == 0 || args.steps > args.timesteps {
        bail!(
            "--steps {} must be between 1 and --timesteps {}",
            args.steps,
            args.timesteps
        );
    }
    if !(1..=4096).contains(&args.size) {
        bail!("--size {} must be between 1 and 4096", args.size);
    }
    let (x0, c) = match &args.image {
        Some(path) => load_image(path, args.size)?,
        None => {
            let ds = Dataset::embedded_mnist(Split::Test, args.size, 1)?;
            if args.digit >= ds.len {
                bail!(
                    "--digit {} is past the {} embedded test digits",
                    args.digit,
                    ds.len
                );
            }
            (ds.image(args.digit).to_vec(), 1)
        }
    };
    let t_max = args.timesteps;
    let ts: Vec<usize> = (1..=args.steps)
        .map(|j| (j * t_max).div_ceil(args.steps) - 1)
        .collect();
    let schedules: Vec<(&str, NoiseSchedule)> = match args.schedule {
        Schedules::Linear => vec![("linear", NoiseSchedule::linear(t_max, 1e-4, 0.02)?)],
        Schedules::Cosine => vec![("cosine", NoiseSchedule::squaredcos_cap_v2(t_max)?)],
        Schedules::ScaledLinear => {
            vec![(
                "scaled_linear",
                NoiseSchedule::scaled_linear(t_max, 1e-4, 0.02)?,
            )]
        }
        Schedules::Both => vec![
            ("linear", NoiseSchedule::linear(t_max, 1e-4, 0.02)?),
            ("cosine", NoiseSchedule::squaredcos_cap_v2(t_max)?),
        ],
    };

    let be = Cpu;
    let per = x0.len();
    let k = ts.len();
    let shape = [k, c, args.size, args.size];
    let x0s = be.upload(&shape, &x0.repeat(k))?;
    let eps = be.randn(&[1, c, args.size, args.size], args.seed, 0)?;
    let eps = be.upload(&shape, &be.to_vec(&eps)?.repeat(k))?;
    let t = be.upload(&[k], &ts.iter().map(|&t| t as f32).collect::<Vec<_>>())?;
    let mut tiles = Vec::with_capacity(schedules.len() * (k + 1) * per);
    for (name, schedule) in &schedules {
        let ac = be.upload(&[t_max], &schedule.alphas_cumprod)?;
        let x_t = be.to_vec(&be.q_sample(&x0s, &eps, &t, &ac)?)?;
        tiles.extend_from_slice(&x0);
        tiles.extend(x_t);
        let abar: Vec<String> = ts
            .iter()
            .map(|&t| format!("{:.3}", schedule.alphas_cumprod[t]))
            .collect();
        eprintln!("{name}: abar_t = {}", abar.join(" "));
    }
    let grid = images::grid(&tiles, schedules.len() * (k + 1), c, args.size, k + 1)?;
    images::save_png(&image::DynamicImage::ImageRgb8(grid), &args.output)?;
    let t_list: Vec<String> = ts.iter().map(|t| t.to_string()).collect();
    eprintln!(
        "columns: x_0, then x_t at t = {}; rows: {}; written to {}",
        t_list.join(", "),
        schedules
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
        args.output.display()
    );
    Ok(())
}

/// An image file as `[C, S, S]` in [-1, 1] (the largest centred square, resampled): gray when
/// the picture is gray, else RGB.
fn load_image(path: &Path, size: usize) -> Result<(Vec<f32>, usize)> {
    let rgb = folder::load_image(path, size, 3)?;
    let px = size * size;
    let (r, rest) = rgb.split_at(px);
    if rest[..px] == *r && rest[px..] == *r {
        Ok((r.to_vec(), 1))
    } else {
        Ok((rgb, 3))
    }
}
