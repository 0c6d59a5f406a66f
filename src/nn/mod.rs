//! The model: layers written once over `Backend`, assembled into diffusers' `UNet2DModel`.

pub mod config;

pub use config::UNet2DConfig;
