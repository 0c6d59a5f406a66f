//! Training in the page: a preset U-Net on the embedded MNIST digits, with the same
//! initialisation, batches, noise and update as `diffwgpu train` with that preset, seed and
//! batch size, but a constant learning rate after the warm-up (a page trains until stopped).

use std::cell::RefCell;
use std::rc::Rc;

use diffwgpu::checkpoint::{named_weights, pipeline_files, SchedulerConfig};
use diffwgpu::data::{Batcher, Dataset, Split};
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::train::{LrSchedule, TrainHyper, TrainState, Trainer};
use diffwgpu::{Backend, Result};
use wasm_bindgen::prelude::*;

use crate::model::{Model, ModelParts};
use crate::{exclusive, promise, zip, WebGpu};

/// The seed of the training grids' noise, so that successive grids show the same images.
const GRID_SEED: u64 = 0x5EED;

/// A training run on the page's GPU.
#[wasm_bindgen]
pub struct Training {
    run: Rc<RefCell<Run>>,
    preset: String,
    parameters: usize,
    image_size: usize,
}

struct Run {
    be: &'static dyn Backend,
    trainer: Trainer<'static>,
    dataset: Dataset,
    batcher: Batcher,
    scheduler: SchedulerConfig,
}

/// The settings of a page's run of `preset` (see the module's comment).
pub fn hyper(seed: u64, batch_size: usize) -> TrainHyper {
    TrainHyper {
        batch_size,
        seed,
        lr_schedule: LrSchedule::Constant,
        class_dropout: 0.0,
        ..TrainHyper::default()
    }
}

#[wasm_bindgen]
impl Training {
    /// A run of `preset` ("tiny" or "mnist") initialised from `seed`, training on batches of
    /// `batch_size` digits.
    pub fn start(gpu: &WebGpu, preset: &str, seed: u32, batch_size: u32) -> js_sys::Promise {
        let (gpu, preset) = (gpu.gpu, preset.to_string());
        promise(async move { Self::new(gpu, &preset, seed as u64, batch_size as usize) })
    }

    fn new(
        gpu: &'static diffwgpu::Gpu,
        preset: &str,
        seed: u64,
        batch_size: usize,
    ) -> Result<Training> {
        let be: &'static dyn Backend = gpu;
        let config = UNet2DConfig::preset(preset)?;
        let dataset = Dataset::embedded_mnist(Split::Train, config.size(), config.in_channels)?;
        let batcher = Batcher::new(dataset.len, batch_size, seed, false)?;
        let scheduler = SchedulerConfig::default();
        let model = UNet2D::new(&config)?;
        let state = TrainState::new(be, &model, &model.params.initial_values(seed))?;
        let parameters = state.layout.total;
        let trainer = Trainer::new(
            be,
            model,
            scheduler.schedule()?,
            hyper(seed, batch_size),
            state,
        )?;
        Ok(Training {
            run: Rc::new(RefCell::new(Run {
                be,
                trainer,
                dataset,
                batcher,
                scheduler,
            })),
            preset: preset.to_string(),
            parameters,
            image_size: config.size(),
        })
    }

    pub fn preset(&self) -> String {
        self.preset.clone()
    }

    /// The number of trained parameters.
    pub fn parameters(&self) -> usize {
        self.parameters
    }

    #[wasm_bindgen(js_name = imageSize)]
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Optimizer steps taken (0 while a call is running).
    #[wasm_bindgen(js_name = stepsDone)]
    pub fn steps_done(&self) -> f64 {
        self.run
            .try_borrow()
            .map_or(0.0, |r| r.trainer.state.step as f64)
    }

    /// Takes `n` optimizer steps; resolves to their losses (a `Float32Array`).
    pub fn train(&self, n: u32) -> js_sys::Promise {
        let run = self.run.clone();
        promise(async move {
            let mut run = exclusive(&run, "training")?;
            let mut losses = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let Run {
                    trainer,
                    dataset,
                    batcher,
                    ..
                } = &mut *run;
                let x0 = batcher.batch(dataset, trainer.state.step)?;
                losses.push(trainer.step_async(&x0, None).await?.loss);
            }
            Ok(js_sys::Float32Array::from(&losses[..]))
        })
    }

    /// `count` samples of the EMA weights by deterministic DDIM in `steps` steps, from the
    /// noise of `seed`, as a grid `Picture`.
    #[wasm_bindgen(js_name = sampleGrid)]
    pub fn sample_grid(&self, count: u32, steps: u32, seed: u32) -> js_sys::Promise {
        let run = self.run.clone();
        promise(async move {
            let run = exclusive(&run, "training")?;
            let model = run.model(true)?;
            let seed = GRID_SEED ^ seed as u64;
            model
                .sample_grid("ddim", steps as usize, seed, count as usize)
                .await
        })
    }

    /// The diffusers pipeline folder of the EMA weights (what `diffwgpu train` writes) as the
    /// bytes of a zip archive.
    #[wasm_bindgen(js_name = pipelineZip)]
    pub fn pipeline_zip(&self) -> js_sys::Promise {
        let run = self.run.clone();
        promise(async move {
            let run = exclusive(&run, "training")?;
            let trainer = &run.trainer;
            let ema = run.be.to_vec_async(&trainer.state.ema).await?;
            let weights = named_weights(&trainer.model, trainer.state.layout.split(&ema));
            let files = pipeline_files(&trainer.model.config, &weights, &run.scheduler)?;
            Ok(js_sys::Uint8Array::from(&zip::stored(&files)[..]))
        })
    }

    /// A sampling `Model` of a copy of the current weights (the EMA weights when `ema`).
    pub fn model(&self, ema: bool) -> js_sys::Promise {
        let run = self.run.clone();
        promise(async move { exclusive(&run, "training")?.model(ema) })
    }
}

impl Run {
    /// A sampling `Model` of a copy of the current weights (the EMA weights when `ema`).
    fn model(&self, ema: bool) -> Result<Model> {
        let trainer = &self.trainer;
        let flat = match ema {
            true => &trainer.state.ema,
            false => &trainer.state.params,
        };
        let copy = self.be.scale(flat, 1.0)?;
        let params = trainer.state.layout.views(&copy)?;
        Model::from_parts(ModelParts {
            be: self.be,
            model: UNet2D::new(&trainer.model.config)?,
            params,
            scheduler: self.scheduler.clone(),
            source: format!(
                "{} at step {}",
                trainer.model.config.class_name, trainer.state.step
            ),
        })
    }
}
