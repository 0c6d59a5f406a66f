//! `--preset tiny|mnist|cifar10` or `--config config.json`: the U-Net a command builds.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use diffwgpu::nn::UNet2DConfig;

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model size: tiny, mnist or cifar10.
    #[arg(long, default_value = "mnist", conflicts_with = "config")]
    pub preset: String,
    /// A diffusers UNet2DModel config.json instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl ModelArgs {
    /// The config of the preset, or the one read from `--config`.
    pub fn unet_config(&self) -> Result<UNet2DConfig> {
        match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the model config {}", path.display()))?;
                UNet2DConfig::from_json(&text)
                    .with_context(|| format!("in the model config {}", path.display()))
            }
            None => Ok(UNet2DConfig::preset(&self.preset)?),
        }
    }

    /// The preset's name, or the config file's path.
    pub fn name(&self) -> String {
        match &self.config {
            Some(path) => path.display().to_string(),
            None => self.preset.clone(),
        }
    }
}
