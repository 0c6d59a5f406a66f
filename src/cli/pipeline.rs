//! A pipeline folder as the commands that use a trained model read it: the U-Net, its
//! weights and the scheduler config it was trained with.

use std::path::Path;

use anyhow::{Context, Result};
use diffwgpu::checkpoint::{load_pipeline, unet_weights, ClassLabels, SchedulerConfig};
use diffwgpu::nn::UNet2D;
use diffwgpu::{Backend, Tensor};

pub struct TrainedModel {
    pub model: UNet2D,
    /// The weights, in the order of `model.params.specs`.
    pub values: Vec<Vec<f32>>,
    pub scheduler: SchedulerConfig,
    /// A class-conditional model's classes.
    pub classes: Option<ClassLabels>,
}

impl TrainedModel {
    /// Reads `path` (a pipeline folder, or a `unet` folder beside a `scheduler` folder);
    /// `purpose` says in the error why the scheduler config is needed.
    pub fn load(path: &Path, purpose: &str) -> Result<TrainedModel> {
        let folder = load_pipeline(path)?;
        let scheduler = folder.scheduler.clone().with_context(|| {
            format!(
                "{} has no scheduler config (scheduler/scheduler_config.json); {purpose} needs \
                 the noise schedule the model was trained with",
                path.display()
            )
        })?;
        let model = UNet2D::new(&folder.config)?;
        let values = unet_weights(&model, &folder.weights, &folder.root.join("unet"))?;
        Ok(TrainedModel {
            model,
            values,
            scheduler,
            classes: folder.classes,
        })
    }

    /// The weights on `be`.
    pub fn params(&self, be: &dyn Backend) -> Result<Vec<Tensor>> {
        Ok(self
            .model
            .params
            .specs
            .iter()
            .zip(&self.values)
            .map(|(spec, v)| be.upload(&spec.shape, v))
            .collect::<diffwgpu::Result<_>>()?)
    }
}
