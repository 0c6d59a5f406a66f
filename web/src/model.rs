//! Sampling in the page: a model trained here or loaded from a pipeline folder's files, its
//! forward pass, and the reverse process taken step by step so that the page can show `x_t`
//! and the predicted `x_0` as they develop.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use diffwgpu::checkpoint::{load_pipeline_files, unet_weights, SchedulerConfig};
use diffwgpu::diffusion::{
    inference_timesteps, predicted_x0, Denoiser, NoiseSchedule, NoiseStream, PredictionType,
    ReverseProcess, Sampler, TakenStep, TimestepSpacing, UNetDenoiser,
};
use diffwgpu::nn::UNet2D;
use diffwgpu::{Backend, Error, Result, Tensor};
use wasm_bindgen::prelude::*;

use crate::picture::Picture;
use crate::{exclusive, js_error, promise, WebGpu};

/// What a sampling model is made of.
pub(crate) struct ModelParts {
    pub be: &'static dyn Backend,
    pub model: UNet2D,
    /// Every parameter, in the model's declaration order.
    pub params: Vec<Tensor>,
    pub scheduler: SchedulerConfig,
    /// Where the weights came from, for [`Model::describe`].
    pub source: String,
}

struct Loaded {
    parts: ModelParts,
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
}

impl Loaded {
    fn denoiser(&self) -> UNetDenoiser<'_> {
        UNetDenoiser {
            model: &self.parts.model,
            params: &self.parts.params,
            classes: None,
        }
    }

    /// `[channels, size]` of the model's images.
    fn image(&self) -> [usize; 2] {
        let cfg = &self.parts.model.config;
        [cfg.in_channels, cfg.size()]
    }

    /// The reverse process of `count` images from the noise of `seed`: "ddim" (deterministic,
    /// `steps` steps) or "ddpm" (`steps` of the training timesteps, ancestral noise).
    fn reverse_process(
        &self,
        kind: &str,
        steps: usize,
        seed: u64,
        count: usize,
    ) -> Result<ReverseProcess> {
        let t_max = self.schedule.num_train_timesteps();
        let clip_sample = self.parts.scheduler.clip();
        let sampler = match kind {
            "ddim" => Sampler::Ddim {
                eta: 0.0,
                clip_sample,
            },
            "ddpm" => Sampler::Ddpm {
                variance_type: self.parts.scheduler.variance_type()?,
                clip_sample,
            },
            other => {
                return Err(Error::invalid(
                    "sample",
                    format!("no sampler {other:?}; choose \"ddim\" or \"ddpm\""),
                ))
            }
        };
        let timesteps =
            inference_timesteps(t_max, steps.clamp(1, t_max), TimestepSpacing::Leading, 0)?;
        let [c, s] = self.image();
        let noise = NoiseStream::single(seed, count.max(1));
        let x_t = noise.initial(self.parts.be, &[count.max(1), c, s, s])?;
        ReverseProcess::new(
            &self.denoiser(),
            &self.schedule,
            self.prediction_type,
            &sampler,
            &timesteps,
            x_t,
            noise,
        )
    }

    /// The grid of the images `x`, `[N, C, S, S]` on the host.
    fn grid(&self, x: &[f32]) -> Result<Picture> {
        let [c, s] = self.image();
        Picture::grid(x, x.len() / (c * s * s), c, s)
    }
}

/// A U-Net with its weights and noise schedule, ready to sample.
#[wasm_bindgen]
pub struct Model {
    loaded: Rc<Loaded>,
}

impl Model {
    pub(crate) fn from_parts(parts: ModelParts) -> Result<Model> {
        if parts.model.config.class_count() > 0 {
            return Err(Error::invalid(
                "web page",
                "this is a class-conditional model; the page samples unconditional models \
                 (sample it with `diffwgpu sample --class`)",
            ));
        }
        Ok(Model {
            loaded: Rc::new(Loaded {
                schedule: parts.scheduler.schedule()?,
                prediction_type: parts.scheduler.prediction_type()?,
                parts,
            }),
        })
    }

    /// The whole reverse process of [`Model::sample`] at once, read back as a grid.
    pub(crate) async fn sample_grid(
        &self,
        kind: &str,
        steps: usize,
        seed: u64,
        count: usize,
    ) -> Result<Picture> {
        let l = &self.loaded;
        let mut process = l.reverse_process(kind, steps, seed, count)?;
        while !process.is_done() {
            process.step(l.parts.be, &l.denoiser(), &l.schedule)?;
        }
        l.grid(&l.parts.be.to_vec_async(process.x()).await?)
    }
}

#[wasm_bindgen]
impl Model {
    /// The model in a pipeline folder's files: `names[i]` is the path of `files[i]` inside
    /// the folder the user picked (`run/unet/config.json`, ...).
    pub fn load(
        gpu: &WebGpu,
        names: Vec<String>,
        files: Vec<js_sys::Uint8Array>,
    ) -> Result<Model, JsError> {
        if names.len() != files.len() {
            return Err(JsError::new("load: give one name per file"));
        }
        let files: BTreeMap<String, Vec<u8>> = names
            .into_iter()
            .zip(files.iter().map(js_sys::Uint8Array::to_vec))
            .collect();
        let folder = load_pipeline_files(&files).map_err(js_error)?;
        let model = UNet2D::new(&folder.config).map_err(js_error)?;
        let weights_path = Path::new(&folder.root).join("unet");
        let values = unet_weights(&model, &folder.weights, &weights_path).map_err(js_error)?;
        let be: &'static dyn Backend = gpu.gpu;
        let params = model
            .params
            .specs
            .iter()
            .zip(&values)
            .map(|(spec, v)| be.upload(&spec.shape, v))
            .collect::<Result<Vec<_>>>()
            .map_err(js_error)?;
        let root = folder.root.display().to_string();
        let source = match root.trim_end_matches('/') {
            "" => "the loaded files".to_string(),
            name => name.to_string(),
        };
        Model::from_parts(ModelParts {
            be,
            model,
            params,
            scheduler: folder.scheduler.unwrap_or_default(),
            source,
        })
        .map_err(js_error)
    }

    /// One line on the model: where it came from, its images, size and prediction type.
    pub fn describe(&self) -> String {
        let l = &self.loaded;
        let [c, s] = l.image();
        let params: usize = l.parts.params.iter().map(Tensor::numel).sum();
        format!(
            "{}: {}x{}x{} images, {:.2} M parameters, {} prediction, {} timesteps",
            l.parts.source,
            c,
            s,
            s,
            params as f64 / 1e6,
            l.prediction_type.name(),
            l.schedule.num_train_timesteps()
        )
    }

    #[wasm_bindgen(js_name = imageSize)]
    pub fn image_size(&self) -> usize {
        self.loaded.image()[1]
    }

    pub fn channels(&self) -> usize {
        self.loaded.image()[0]
    }

    /// The model's output for the `count` images `x` (`[count, C, S, S]`) at timestep `t`.
    pub fn predict(&self, x: Vec<f32>, t: f64, count: u32) -> js_sys::Promise {
        let loaded = self.loaded.clone();
        promise(async move {
            let [c, s] = loaded.image();
            let be = loaded.parts.be;
            let x = be.upload(&[count as usize, c, s, s], &x)?;
            let out = loaded
                .denoiser()
                .predict(be, &x, &vec![t; count as usize])?;
            let out = be.to_vec_async(&out).await?;
            Ok(js_sys::Float32Array::from(&out[..]))
        })
    }

    /// The reverse process of `count` images from the noise of `seed`: "ddim" (deterministic,
    /// `steps` steps) or "ddpm" (`steps` of the training timesteps, ancestral noise).
    pub fn sample(
        &self,
        kind: &str,
        steps: u32,
        seed: u32,
        count: u32,
    ) -> Result<Sampling, JsError> {
        Sampling::new(
            self.loaded.clone(),
            kind,
            steps as usize,
            seed as u64,
            count as usize,
        )
        .map_err(js_error)
    }
}

/// A reverse process under way.
#[wasm_bindgen]
pub struct Sampling {
    loaded: Rc<Loaded>,
    state: Rc<RefCell<State>>,
    total: usize,
}

struct State {
    process: ReverseProcess,
    /// The last step taken, for the pictures of `x_t` and the predicted `x_0`.
    last: Option<TakenStep>,
}

impl Sampling {
    fn new(
        loaded: Rc<Loaded>,
        kind: &str,
        steps: usize,
        seed: u64,
        count: usize,
    ) -> Result<Sampling> {
        let process = loaded.reverse_process(kind, steps, seed, count)?;
        Ok(Sampling {
            total: process.total(),
            state: Rc::new(RefCell::new(State {
                process,
                last: None,
            })),
            loaded,
        })
    }
}

#[wasm_bindgen]
impl Sampling {
    pub fn total(&self) -> usize {
        self.total
    }

    /// Steps taken.
    pub fn done(&self) -> usize {
        self.state
            .try_borrow()
            .map_or(0, |s| s.process.steps_taken())
    }

    /// The timestep of the last step taken (the first step's before any).
    pub fn timestep(&self) -> usize {
        self.state
            .try_borrow()
            .ok()
            .and_then(|s| s.last.as_ref().map(|l| l.t))
            .unwrap_or(0)
    }

    /// Takes one step; resolves to true once every step is taken. The step is recorded, not
    /// waited for; a read (`views`, `picture`, `result`) waits for the device.
    pub fn step(&self) -> js_sys::Promise {
        let (loaded, state) = (self.loaded.clone(), self.state.clone());
        promise(async move {
            let mut state = exclusive(&state, "sampling")?;
            if !state.process.is_done() {
                let taken =
                    state
                        .process
                        .step(loaded.parts.be, &loaded.denoiser(), &loaded.schedule)?;
                state.last = Some(taken);
            }
            Ok(JsValue::from_bool(state.process.is_done()))
        })
    }

    /// `[x_t, predicted x_0]` of the last step taken, as two grid pictures.
    pub fn views(&self) -> js_sys::Promise {
        let (loaded, state) = (self.loaded.clone(), self.state.clone());
        promise(async move {
            let state = exclusive(&state, "sampling")?;
            let be = loaded.parts.be;
            let (x_t, x0) = match &state.last {
                Some(last) => {
                    let x_t = be.to_vec_async(&last.x_t).await?;
                    let out = be.to_vec_async(&last.model_output).await?;
                    let x0 =
                        predicted_x0(&loaded.schedule, loaded.prediction_type, last.t, &x_t, &out)?;
                    (x_t, x0)
                }
                None => {
                    let x = be.to_vec_async(state.process.x()).await?;
                    (x.clone(), vec![0.0; x.len()])
                }
            };
            let pictures = js_sys::Array::new();
            pictures.push(&loaded.grid(&x_t)?.into());
            pictures.push(&loaded.grid(&x0)?.into());
            Ok(pictures)
        })
    }

    /// The grid of the current state: the samples once every step is taken.
    pub fn picture(&self) -> js_sys::Promise {
        let (loaded, state) = (self.loaded.clone(), self.state.clone());
        promise(async move {
            let state = exclusive(&state, "sampling")?;
            let x = loaded.parts.be.to_vec_async(state.process.x()).await?;
            loaded.grid(&x)
        })
    }

    /// The current state's values, `[N, C, S, S]` (a `Float32Array`).
    pub fn result(&self) -> js_sys::Promise {
        let (loaded, state) = (self.loaded.clone(), self.state.clone());
        promise(async move {
            let state = exclusive(&state, "sampling")?;
            let x = loaded.parts.be.to_vec_async(state.process.x()).await?;
            Ok(js_sys::Float32Array::from(&x[..]))
        })
    }
}
