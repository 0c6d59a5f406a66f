//! The `diffwgpu` command line: a thin shell over the library.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cli::ranks::Ranks;

#[derive(Parser)]
#[command(
    name = "diffwgpu",
    version,
    about = "Denoising diffusion models on any GPU wgpu reaches"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a U-Net noise predictor and write a diffusers pipeline folder.
    Train(Box<cli::train::TrainArgs>),
    /// Generate images from a trained model (a pipeline folder) with DDPM, DDIM, DPM-Solver++,
    /// the reverse SDE or the probability-flow ODE.
    Sample(Box<cli::sample::SampleArgs>),
    /// The likelihood of held-out images under a trained model, in bits/dim: the variational
    /// bound and, with --ode, the probability-flow ODE's exact likelihood.
    Eval(Box<cli::eval::EvalArgs>),
    /// Picture the forward process: an image and its noisy versions under one or two schedules.
    Noise(cli::noise::NoiseArgs),
    /// Time training steps and a sampling run of a model: images/s, TFLOP/s and, on the GPU,
    /// dispatches, submits and peak memory per step.
    ///
    /// FLOPs count 2 M N K for every product of a forward pass (conv, linear, attention); a
    /// training step counts as 3 forward passes (the backward pass as about twice the forward).
    Bench(Box<cli::bench::BenchArgs>),
    /// List the GPU adapters wgpu finds and the device `--device auto` would pick.
    Info,
}

/// Stack of the worker threads the command runs on: the main thread's usual 8 MiB.
const WORKER_STACK: usize = 8 << 20;

/// Runs the command on one of rayon's worker threads rather than on the main thread beside
/// them: between two parallel ops the main thread's own work then has a core to itself
/// instead of sharing it with workers that spin waiting for the next job (on two cores
/// that sharing cost a quarter of a small model's training step).
///
/// `train` and `info` first join the MPI job when started by `mpirun` (a build with the `mpi`
/// feature), so that the worker pool can take this rank's share of the cores.
fn main() -> Result<()> {
    let command = Cli::parse().command;
    let ranks = match command {
        Command::Train(_) | Command::Info => Ranks::init()?,
        _ => Ranks::single(),
    };
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(WORKER_STACK);
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        pool = pool.num_threads(ranks.cpu_threads());
    }
    pool.build_global()?;
    rayon::scope(|_| match command {
        Command::Train(args) => cli::train::run(*args, &ranks).map_err(|e| ranks.fail(e)),
        Command::Sample(args) => cli::sample::run(*args),
        Command::Eval(args) => cli::eval::run(*args),
        Command::Noise(args) => cli::noise::run(args),
        Command::Bench(args) => cli::bench::run(*args),
        Command::Info => cli::info::run(&ranks),
    })
}
