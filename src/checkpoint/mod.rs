//! Checkpoints: safetensors tensors, diffusers config files and the pipeline folder a run writes.
//!
//! A training run writes its output folder `OUT` as a diffusers `DDPMPipeline`, so that
//! `diffusers.DDPMPipeline.from_pretrained(OUT)` loads it, plus one file of its own to resume
//! from:
//!
//! ```text
//! OUT/model_index.json                          the pipeline: a DDPMScheduler and a UNet2DModel
//! OUT/unet/config.json                          the UNet2DModel config
//! OUT/unet/diffusion_pytorch_model.safetensors  the EMA weights, f32, diffusers parameter names
//! OUT/unet/class_labels.json                    a conditional model's class names
//! OUT/scheduler/scheduler_config.json           the DDPMScheduler config
//! OUT/training_state.safetensors                raw weights, AdamW moments, EMA, step, seeds
//! ```
//!
//! Every file is written atomically (a temporary file beside it, synced, then renamed over
//! it), so a run stopped at any moment leaves the previous checkpoint or the new one, never
//! a mix.

pub mod atomic;
pub mod class_labels;
pub mod dpm_solver_config;
pub mod pipeline;
pub mod safetensors_io;
pub mod scheduler_config;
pub mod training_state;
pub mod unet_weights;

pub use atomic::write_atomic;
pub use class_labels::{ClassLabels, CLASS_LABELS_FILE};
pub use pipeline::{
    load_pipeline, load_pipeline_files, pipeline_files, save_pipeline, write_json_atomic,
    UnetFolder, DIFFUSERS_VERSION,
};
pub use safetensors_io::{
    parse_safetensors, read_safetensors, safetensors_bytes, write_safetensors, NamedTensor,
};
pub use scheduler_config::{SchedulerConfig, DPM_SOLVER_SCHEDULER};
pub use training_state::{TrainingState, TRAINING_STATE_FILE};
pub use unet_weights::{named_weights, unet_weights};

use std::path::Path;

use crate::error::Error;

/// A checkpoint error about the file or folder `path`.
fn error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}
