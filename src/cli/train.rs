//! `diffwgpu train`: trains a U-Net on a dataset and writes a diffusers pipeline folder, sample
//! grids, a CSV log and a resumable training state.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use diffwgpu::checkpoint::TRAINING_STATE_FILE;
use diffwgpu::checkpoint::{
    named_weights, save_pipeline, unet_weights, ClassLabels, NamedTensor, SchedulerConfig,
    TrainingState,
};
use diffwgpu::data::{Batcher, Dataset};
use diffwgpu::diffusion::{
    inference_timesteps, sample, ClassGuidance, NoiseStream, PredictionType, Sampler,
    TimestepSpacing, UNetDenoiser,
};
use diffwgpu::images;
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::train::{HostState, LrSchedule, TrainHyper, TrainState, Trainer};
use diffwgpu::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::device::{self, DeviceChoice};
use super::model::ModelArgs;
use super::progress;
use super::ranks::Ranks;

/// The noise schedule, by the names users know (`cosine` is diffusers' `squaredcos_cap_v2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleName {
    Linear,
    Cosine,
    ScaledLinear,
}

impl ScheduleName {
    fn diffusers_name(self) -> &'static str {
        match self {
            ScheduleName::Linear => "linear",
            ScheduleName::Cosine => "squaredcos_cap_v2",
            ScheduleName::ScaledLinear => "scaled_linear",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionName {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionName {
    fn prediction_type(self) -> PredictionType {
        match self {
            PredictionName::Epsilon => PredictionType::Epsilon,
            PredictionName::VPrediction => PredictionType::VPrediction,
            PredictionName::Sample => PredictionType::Sample,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleName {
    Constant,
    Cosine,
}

/// Options that define a run. With `--resume` they come from the run being resumed.
const RUN_OPTIONS: &[&str] = &[
    "data",
    "preset",
    "config",
    "schedule",
    "timesteps",
    "prediction",
    "batch_size",
    "lr",
    "lr_warmup",
    "lr_schedule",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "weight_decay",
    "max_grad_norm",
    "ema_max_decay",
    "ema_power",
    "snr_gamma",
    "conditional",
    "class_dropout",
    "seed",
    "hflip",
    "out",
];

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Output folder (default: runs/<UTC timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training images: a folder of PNG/JPEG files (searched recursively), or mnist:PATH for
    /// MNIST IDX files (gzipped or not). Default: the embedded MNIST digits (9,000).
    /// With --conditional: a folder with one subfolder of images per class, or mnist:PATH
    /// with its labels file beside the images.
    #[arg(long)]
    data: Option<String>,
    /// Train a class-conditional model (diffusers' num_class_embeds) on the data's labels,
    /// for `diffwgpu sample --class`.
    #[arg(long)]
    conditional: bool,
    /// With --conditional: the probability that a label is replaced by the null class, so
    /// that the model also learns the unconditional prediction classifier-free guidance needs.
    #[arg(long, value_parser = probability, default_value = "0.1", requires = "conditional")]
    class_dropout: f32,
    #[command(flatten)]
    model: ModelArgs,
    /// Noise schedule.
    #[arg(long, value_enum, default_value = "linear")]
    schedule: ScheduleName,
    /// Training timesteps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// What the network predicts.
    #[arg(long, value_enum, default_value = "epsilon")]
    prediction: PredictionName,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Optimizer steps in all (default 6000; with --resume, the resumed run's total).
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate of AdamW. 3e-4 with 200 warmup steps drew digits in half the steps
    /// that diffusers' 1e-4 and 500 did on the embedded data (BENCHMARKS.md).
    #[arg(long, default_value_t = 3e-4)]
    lr: f32,
    /// Steps of linear learning-rate warmup.
    #[arg(long, default_value_t = 200)]
    lr_warmup: u64,
    #[arg(long, value_enum, default_value = "cosine")]
    lr_schedule: LrScheduleName,
    /// AdamW's beta1, the decay of its moving average of the gradient, in [0, 1)
    /// (diffusers: --adam_beta1).
    #[arg(long, value_parser = beta, default_value = "0.95", allow_hyphen_values = true)]
    adam_beta1: f32,
    /// AdamW's beta2, the decay of its moving average of the squared gradient, in [0, 1)
    /// (diffusers: --adam_beta2).
    #[arg(long, value_parser = beta, default_value = "0.999", allow_hyphen_values = true)]
    adam_beta2: f32,
    /// AdamW's epsilon, added to the root of the second moment, > 0
    /// (diffusers: --adam_epsilon).
    #[arg(long, value_parser = positive, default_value = "1e-8", allow_hyphen_values = true)]
    adam_epsilon: f32,
    /// AdamW's decoupled weight decay (diffusers: --adam_weight_decay).
    #[arg(long, visible_alias = "adam-weight-decay", default_value_t = 1e-6)]
    weight_decay: f32,
    /// Clip the gradient to this global L2 norm; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// The EMA decay's ceiling (it warms up as diffusers' EMAModel: 1 - (1 + step)^-power).
    #[arg(long, default_value_t = 0.9999)]
    ema_max_decay: f32,
    #[arg(long, default_value_t = 0.75)]
    ema_power: f32,
    /// Weight each sample's loss by Min-SNR-gamma (Hang et al. 2023): min(SNR(t), GAMMA)
    /// over SNR(t) for epsilon, over SNR(t) + 1 for v-prediction, alone for sample; the
    /// paper and diffusers recommend 5 (diffusers: --snr_gamma). Default: off.
    #[arg(long, value_name = "GAMMA", value_parser = positive, allow_hyphen_values = true)]
    snr_gamma: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Random horizontal flips of the training images (off: digits are not symmetric).
    #[arg(long)]
    hflip: bool,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Write a sample grid (EMA weights, DDIM) every N steps; 0: only at the end.
    #[arg(long, default_value_t = 500)]
    sample_every: u64,
    /// Images in each sample grid.
    #[arg(long, default_value_t = 16)]
    num_samples: usize,
    /// DDIM steps of the sample grids.
    #[arg(long, default_value_t = 50)]
    sample_steps: usize,
    /// Write a checkpoint every N steps (and always at the end and on Ctrl-C); 0: only then.
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    /// Stop at this step with a checkpoint, as Ctrl-C would (continue later with --resume).
    #[arg(long)]
    stop_at: Option<u64>,
    /// Continue the run in this folder exactly where its checkpoint stopped.
    #[arg(long, conflicts_with_all = RUN_OPTIONS)]
    resume: Option<PathBuf>,
}

/// Everything that defines a run: written to `train_config.json` and into the training state,
/// so that `--resume` continues with exactly the same settings. The settings added later (the
/// AdamW betas and epsilon, the Min-SNR gamma) read, from a run recorded before them, as what
/// that run trained with.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    data: Option<String>,
    unet: UNet2DConfig,
    schedule: ScheduleName,
    timesteps: usize,
    prediction: PredictionName,
    batch_size: usize,
    steps: u64,
    lr: f32,
    lr_warmup: u64,
    lr_schedule: LrScheduleName,
    #[serde(default = "default_adam_beta1")]
    adam_beta1: f32,
    #[serde(default = "default_adam_beta2")]
    adam_beta2: f32,
    #[serde(default = "default_adam_epsilon")]
    adam_epsilon: f32,
    weight_decay: f32,
    max_grad_norm: f32,
    ema_max_decay: f32,
    ema_power: f32,
    #[serde(default)]
    snr_gamma: Option<f32>,
    /// A class-conditional run: the class names of the data's labels (the U-Net's config has
    /// one embedding row per class and the null class).
    #[serde(default)]
    class_names: Option<Vec<String>>,
    #[serde(default)]
    class_dropout: f32,
    seed: u64,
    hflip: bool,
}

fn default_adam_beta1() -> f32 {
    TrainHyper::default().adam_beta1
}

fn default_adam_beta2() -> f32 {
    TrainHyper::default().adam_beta2
}

fn default_adam_epsilon() -> f32 {
    TrainHyper::default().adam_eps
}

/// Parses an Adam beta: a number in [0, 1).
fn beta(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1), got {s}"))
    }
}

/// Parses a probability below 1: a number in [0, 1).
fn probability(s: &str) -> std::result::Result<f32, String> {
    beta(s)
}

/// Parses a finite number > 0.
fn positive(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a finite number > 0, got {s}"))
    }
}

impl RunRecord {
    fn from_args(a: &TrainArgs) -> Result<Self> {
        let unet = a.model.unet_config()?;
        let conditional = a.conditional || unet.num_class_embeds.is_some();
        Ok(RunRecord {
            data: a.data.clone(),
            unet,
            schedule: a.schedule,
            timesteps: a.timesteps,
            prediction: a.prediction,
            batch_size: a.batch_size,
            steps: a.steps.unwrap_or(6000),
            lr: a.lr,
            lr_warmup: a.lr_warmup,
            lr_schedule: a.lr_schedule,
            adam_beta1: a.adam_beta1,
            adam_beta2: a.adam_beta2,
            adam_epsilon: a.adam_epsilon,
            weight_decay: a.weight_decay,
            max_grad_norm: a.max_grad_norm,
            ema_max_decay: a.ema_max_decay,
            ema_power: a.ema_power,
            snr_gamma: a.snr_gamma,
            class_names: None,
            class_dropout: if conditional { a.class_dropout } else { 0.0 },
            seed: a.seed,
            hflip: a.hflip,
        })
    }

    /// A new conditional run (`--conditional`, or a config with `num_class_embeds`) takes
    /// its classes from the data: one embedding row per class and one for the null class.
    fn take_classes(&mut self, conditional: bool, dataset: &Dataset) -> Result<()> {
        if !conditional && self.unet.num_class_embeds.is_none() {
            return Ok(());
        }
        let names = dataset.class_names.clone();
        let rows = names.len() + 1;
        match self.unet.num_class_embeds {
            None => self.unet.num_class_embeds = Some(rows),
            Some(n) if n == rows => {}
            Some(n) => bail!(
                "the model config has num_class_embeds = {n}, but the data has {} classes; a \
                 conditional model needs one row per class plus the null class: {rows}",
                names.len()
            ),
        }
        self.class_names = Some(names);
        Ok(())
    }

    /// The classes of a conditional run, as the model folder records them: without class
    /// dropout the null class's row is never trained, and the folder names no null class.
    fn class_labels(&self) -> Option<ClassLabels> {
        let names = self.class_names.clone()?;
        Some(match self.class_dropout > 0.0 {
            true => ClassLabels::with_null(names),
            false => ClassLabels {
                names,
                null_class: None,
            },
        })
    }

    fn hyper(&self) -> TrainHyper {
        TrainHyper {
            batch_size: self.batch_size,
            steps: self.steps,
            learning_rate: self.lr,
            lr_warmup_steps: self.lr_warmup,
            lr_schedule: match self.lr_schedule {
                LrScheduleName::Constant => LrSchedule::Constant,
                LrScheduleName::Cosine => LrSchedule::Cosine,
            },
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            ema_max_decay: self.ema_max_decay,
            ema_power: self.ema_power,
            prediction_type: self.prediction.prediction_type(),
            snr_gamma: self.snr_gamma,
            class_dropout: self.class_dropout,
            seed: self.seed,
            ..TrainHyper::default()
        }
    }

    /// The DDPMScheduler config that sampling with this model should use.
    fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            num_train_timesteps: self.timesteps,
            beta_schedule: self.schedule.diffusers_name().into(),
            prediction_type: self.prediction.prediction_type().name().into(),
            ..SchedulerConfig::default()
        }
    }
}

/// The metadata key of the run record in the training state.
const RUN_KEY: &str = "run";

/// Trains; under `mpirun` as one rank of a data-parallel job, where rank 0 writes the log,
/// the sample grids and the checkpoints.
pub fn run(args: TrainArgs, ranks: &Ranks) -> Result<()> {
    let root = ranks.is_root();
    let (out, mut record, resumed) = match &args.resume {
        Some(dir) => {
            let state = TrainingState::load(&dir.join(TRAINING_STATE_FILE)).with_context(|| {
                format!(
                    "cannot resume from {}: no usable training state",
                    dir.display()
                )
            })?;
            let text = state.meta.get(RUN_KEY).with_context(|| {
                format!(
                    "{} has no run settings; it was not written by diffwgpu train",
                    dir.join(TRAINING_STATE_FILE).display()
                )
            })?;
            let mut record: RunRecord = serde_json::from_str(text)
                .with_context(|| format!("corrupt run settings in {}", dir.display()))?;
            if let Some(steps) = args.steps {
                record.steps = steps;
            }
            (dir.clone(), record, Some(state))
        }
        None => {
            let out = args.out.clone().unwrap_or_else(default_out);
            (out, RunRecord::from_args(&args)?, None)
        }
    };
    let resumed_step = resumed.as_ref().map_or(0, |s| s.step);
    if resumed_step >= record.steps {
        bail!(
            "the run in {} already has {} of {} steps; pass --steps with a larger total to train on",
            out.display(),
            resumed_step,
            record.steps
        );
    }

    let (local_rank, local_size) = ranks.local();
    let (be, why) = device::open_for_rank(args.device, local_rank, local_size)?;
    let be: &dyn Backend = be.as_ref();
    match ranks.describe() {
        Some(layout) => eprintln!("{layout}: device: {why}"),
        None => eprintln!("device: {why}"),
    }

    let conditional = record.class_names.is_some() || args.conditional;
    let dataset = {
        let (spec, cfg) = (record.data.as_deref(), &record.unet);
        if conditional || cfg.num_class_embeds.is_some() {
            Dataset::open_labelled(spec, cfg.size(), cfg.in_channels)?
        } else {
            Dataset::open(spec, cfg.size(), cfg.in_channels)?
        }
    };
    if resumed.is_none() {
        record.take_classes(conditional, &dataset)?;
    } else if let Some(names) = &record.class_names {
        if *names != dataset.class_names {
            bail!(
                "the data's classes ({}) are not the ones the run started with ({}); resume \
                 with the same data",
                dataset.class_names.join(", "),
                names.join(", ")
            );
        }
    }
    let record = record;
    let cfg = &record.unet;
    let model = UNet2D::new(cfg)?;
    root.then(|| {
        eprintln!(
            "data: {} ({} images of {}x{}x{}{})",
            dataset.source,
            dataset.len,
            cfg.in_channels,
            cfg.size(),
            cfg.size(),
            match &record.class_names {
                Some(names) => format!(", {} classes", names.len()),
                None => String::new(),
            }
        )
    });
    let batcher = Batcher::new(dataset.len, record.batch_size, record.seed, record.hflip)?;
    let scheduler = record.scheduler();
    let schedule = scheduler.schedule()?;

    let state = match &resumed {
        Some(saved) => restore(be, &model, saved, &out.join(TRAINING_STATE_FILE))?,
        None => TrainState::new(be, &model, &model.params.initial_values(record.seed))?,
    };
    let mut trainer = Trainer::new(be, model, schedule, record.hyper(), state)?;
    if let Some(group) = ranks.group() {
        trainer = trainer.data_parallel(group)?;
    }

    let record_json = serde_json::to_string_pretty(&record)?;
    let mut log = match root {
        true => {
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create the output folder {}", out.display()))?;
            diffwgpu::checkpoint::write_json_atomic(&out.join("train_config.json"), &record_json)?;
            Some(TrainLog::open(&out.join("train_log.csv"), resumed_step)?)
        }
        false => None,
    };
    if root {
        eprintln!(
            "model: {} parameters; {} steps of batch {} into {}",
            trainer.model.params.count(),
            record.steps,
            record.batch_size,
            out.display()
        );
    }
    if root && ranks.size() > 1 {
        let layout = &trainer.state.layout;
        eprintln!(
            "data-parallel: {} ranks of batch {}; {:.1} MiB all-reduced per step",
            ranks.size(),
            trainer.batch_shape()[0],
            (layout.total + 1) as f64 * 4.0 / (1u64 << 20) as f64
        );
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("cannot install the Ctrl-C handler")?;
    }

    let bar = match root {
        true => ProgressBar::new(record.steps),
        false => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps | {msg} | {elapsed_precise} < {eta_precise}",
        )
        .expect("valid template"),
    );
    bar.set_position(resumed_step);
    let checkpoint = |trainer: &Trainer| -> Result<()> {
        match root {
            true => save_checkpoint(&out, trainer, &record, &scheduler, &record_json),
            false => Ok(()),
        }
    };

    // Without a terminal the bar is hidden: rank 0 prints a line every LOG_EVERY steps instead.
    const LOG_EVERY: u64 = 100;
    let log_lines = root && !progress::interactive();
    let shard = trainer.shard();
    let mut smoothed = Smoothed::default();
    let mut last = Instant::now();
    while trainer.state.step < record.steps {
        let k = trainer.state.step;
        let x0 = batcher.batch(&dataset, k)?;
        let labels = match record.class_names {
            Some(_) => Some(batcher.batch_labels(&dataset, k)?),
            None => None,
        };
        let x0 = shard.slice(&x0, record.batch_size)?;
        let labels = match &labels {
            Some(l) => Some(shard.slice(l, record.batch_size)?),
            None => None,
        };
        let stats = trainer
            .step(x0, labels)
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| {
                format!("training step {k} failed (out of memory? try a smaller --batch-size)")
            })?;
        let now = Instant::now();
        let images_per_s = record.batch_size as f64 / (now - last).as_secs_f64();
        last = now;
        if let Some(log) = &mut log {
            log.write(k + 1, stats.loss, stats.lr, stats.grad_norm, images_per_s)?;
        }
        let loss = smoothed.push(stats.loss);
        bar.set_message(format!("loss {loss:.4} | {images_per_s:.1} img/s"));
        bar.inc(1);
        if log_lines && (k + 1).is_multiple_of(LOG_EVERY) {
            eprintln!(
                "step {}/{} | loss {loss:.4} | {images_per_s:.1} img/s",
                k + 1,
                record.steps
            );
        }
        let step = trainer.state.step;
        let done = step == record.steps;
        let grid_due = args.sample_every > 0 && step.is_multiple_of(args.sample_every);
        if root && (done || grid_due) {
            let path = out.join("samples").join(format!("step-{step:06}.png"));
            let classes = record.class_labels();
            bar.suspend(|| sample_grid(&trainer, &scheduler, &args, classes.as_ref(), &path))?;
        }
        if done || (args.checkpoint_every > 0 && step.is_multiple_of(args.checkpoint_every)) {
            checkpoint(&trainer)?;
        }
        // Every rank stops at the same step when any was interrupted.
        if ranks.any(interrupted.load(Ordering::SeqCst))? && !done {
            checkpoint(&trainer)?;
            bar.abandon();
            if !root {
                return Ok(());
            }
            eprintln!(
                "interrupted at step {step}: checkpoint written; continue with \
                 `diffwgpu train --resume {}`",
                out.display()
            );
            if ranks.size() > 1 {
                return Ok(());
            }
            std::process::exit(130);
        }
        if args.stop_at == Some(step) && !done {
            checkpoint(&trainer)?;
            bar.abandon();
            root.then(|| {
                eprintln!(
                    "stopped at step {step} (--stop-at): checkpoint written; continue with \
                 `diffwgpu train --resume {}`",
                    out.display()
                )
            });
            return Ok(());
        }
    }
    bar.finish();
    root.then(|| {
        eprintln!(
            "done: {} steps; the pipeline is in {} (sample it with `diffwgpu sample --model {}`)",
            record.steps,
            out.display(),
            out.display()
        )
    });
    Ok(())
}

/// `runs/<UTC date and time>`.
fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    ))
}

/// Uploads a saved training state, checking it fits the model.
fn restore(
    be: &dyn Backend,
    model: &UNet2D,
    saved: &TrainingState,
    path: &Path,
) -> Result<TrainState> {
    let group = |what: &str, ts: &[NamedTensor]| -> Result<Vec<Vec<f32>>> {
        unet_weights(model, ts, path)
            .with_context(|| format!("the training state's {what} tensors do not fit the model"))
    };
    let host = HostState {
        params: group("param", &saved.params)?,
        adam_m: group("adam_m", &saved.adam_m)?,
        adam_v: group("adam_v", &saved.adam_v)?,
        ema: group("ema", &saved.ema)?,
        step: saved.step,
    };
    Ok(TrainState::from_host(be, model, &host)?)
}

/// The pipeline folder (EMA weights) and the training state, each file written atomically.
fn save_checkpoint(
    out: &Path,
    trainer: &Trainer,
    record: &RunRecord,
    scheduler: &SchedulerConfig,
    record_json: &str,
) -> Result<()> {
    let model = &trainer.model;
    let host = trainer.state.to_host(trainer.backend())?;
    let ema = named_weights(model, host.ema);
    if let Some(classes) = record.class_labels() {
        let unet_dir = out.join("unet");
        std::fs::create_dir_all(&unet_dir)
            .with_context(|| format!("cannot create {}", unet_dir.display()))?;
        classes.save(&unet_dir)?;
    }
    save_pipeline(out, &record.unet, &ema, scheduler)?;
    let state = TrainingState {
        step: host.step,
        params: named_weights(model, host.params),
        adam_m: named_weights(model, host.adam_m),
        adam_v: named_weights(model, host.adam_v),
        ema,
        meta: BTreeMap::from([(RUN_KEY.to_string(), record_json.to_string())]),
    };
    state.save(&out.join(TRAINING_STATE_FILE))?;
    Ok(())
}

/// A grid of samples from the EMA weights with a fast deterministic DDIM pass; the same seed
/// every time, so grids of successive steps show the same images developing. A conditional
/// model's grid has one row per class (guidance scale [`GRID_GUIDANCE`], 1 without class
/// dropout), of
/// `num_samples / classes` images but at least [`MIN_ROW`].
fn sample_grid(
    trainer: &Trainer,
    scheduler: &SchedulerConfig,
    args: &TrainArgs,
    classes: Option<&ClassLabels>,
    path: &Path,
) -> Result<()> {
    let be = trainer.backend();
    let cfg = &trainer.model.config;
    let (n, columns, guidance) = match classes {
        Some(c) => {
            let k = c.names.len();
            let row = (args.num_samples / k).max(MIN_ROW);
            let guidance = ClassGuidance {
                labels: (0..k as u32)
                    .flat_map(|l| std::iter::repeat_n(l, row))
                    .collect(),
                null_class: c.null_class,
                scale: if c.null_class.is_some() {
                    GRID_GUIDANCE
                } else {
                    1.0
                },
            };
            (k * row, row, Some(guidance))
        }
        None => {
            let n = args.num_samples.max(1);
            (n, images::grid_columns(n), None)
        }
    };
    let t_max = trainer.schedule.num_train_timesteps();
    let steps = args.sample_steps.clamp(1, t_max);
    let timesteps = inference_timesteps(t_max, steps, TimestepSpacing::Leading, 0)?;
    let shape = [n, cfg.in_channels, cfg.size(), cfg.size()];
    let noise = NoiseStream::single(0x5EED, n);
    let x_t = noise.initial(be, &shape)?;
    let sampler = Sampler::Ddim {
        eta: 0.0,
        clip_sample: scheduler.clip(),
    };
    let x0 = sample(
        be,
        &UNetDenoiser {
            model: &trainer.model,
            params: &trainer.state.ema_views()?,
            classes: guidance.as_ref(),
        },
        &trainer.schedule,
        trainer.hyper.prediction_type,
        &sampler,
        &timesteps,
        x_t,
        noise,
        &mut |_| Ok(()),
    )?;
    let data = be.to_vec(&x0)?;
    let grid = images::grid(&data, n, cfg.in_channels, cfg.size(), columns)?;
    images::save_png(&image::DynamicImage::ImageRgb8(grid), path)?;
    Ok(())
}

/// The guidance scale of a conditional model's training grids.
const GRID_GUIDANCE: f32 = 3.0;
/// The fewest images per class row of a conditional model's training grid.
const MIN_ROW: usize = 4;

/// `train_log.csv`: one row per step. A resumed run keeps the rows up to its checkpoint and
/// drops any written after it.
struct TrainLog {
    file: std::fs::File,
}

impl TrainLog {
    const HEADER: &'static str = "step,loss,lr,grad_norm,images_per_s";

    fn open(path: &Path, keep_through: u64) -> Result<Self> {
        let mut text = format!("{}\n", Self::HEADER);
        if keep_through > 0 {
            if let Ok(old) = std::fs::read_to_string(path) {
                for line in old.lines().skip(1) {
                    let step = line.split(',').next().and_then(|s| s.parse::<u64>().ok());
                    if step.is_some_and(|s| s <= keep_through) {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
        }
        std::fs::write(path, text)
            .with_context(|| format!("cannot write the training log {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(TrainLog { file })
    }

    fn write(&mut self, step: u64, loss: f32, lr: f32, grad_norm: f32, ips: f64) -> Result<()> {
        writeln!(self.file, "{step},{loss},{lr},{grad_norm},{ips:.2}")?;
        Ok(())
    }
}

/// The bias-corrected exponential moving average of the loss shown in the progress bar.
#[derive(Default)]
struct Smoothed {
    value: f64,
    weight: f64,
}

impl Smoothed {
    fn push(&mut self, x: f32) -> f64 {
        const BETA: f64 = 0.98;
        self.value = BETA * self.value + (1.0 - BETA) * x as f64;
        self.weight = BETA * self.weight + (1.0 - BETA);
        self.value / self.weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run recorded before the AdamW and Min-SNR settings existed resumes with the values
    /// it trained with: the defaults, and no loss weighting.
    #[test]
    fn older_run_records_read_as_their_defaults() {
        let record = RunRecord {
            data: None,
            unet: UNet2DConfig::preset("tiny").unwrap(),
            schedule: ScheduleName::Linear,
            timesteps: 1000,
            prediction: PredictionName::Epsilon,
            batch_size: 4,
            steps: 10,
            lr: 1e-4,
            lr_warmup: 0,
            lr_schedule: LrScheduleName::Cosine,
            adam_beta1: 0.5,
            adam_beta2: 0.9,
            adam_epsilon: 1e-3,
            weight_decay: 1e-6,
            max_grad_norm: 1.0,
            ema_max_decay: 0.9999,
            ema_power: 0.75,
            snr_gamma: Some(5.0),
            class_names: None,
            class_dropout: 0.0,
            seed: 0,
            hflip: false,
        };
        let mut json = serde_json::to_value(&record).unwrap();
        let fields = json.as_object_mut().unwrap();
        for key in ["adam_beta1", "adam_beta2", "adam_epsilon", "snr_gamma"] {
            fields.remove(key).unwrap();
        }
        let old: RunRecord = serde_json::from_value(json).unwrap();
        let (h, want) = (old.hyper(), TrainHyper::default());
        assert_eq!(
            (h.adam_beta1, h.adam_beta2, h.adam_eps, h.snr_gamma),
            (want.adam_beta1, want.adam_beta2, want.adam_eps, None)
        );
    }
}
