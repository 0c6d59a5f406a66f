//! The model: layers written once over the tape (and so over either backend), assembled into
//! diffusers' `UNet2DModel`.

pub mod attention;
pub mod config;
pub mod layers;
pub mod params;
pub mod resnet;
pub mod unet;

pub use config::UNet2DConfig;
pub use params::{Init, ParamLayout, ParamList, ParamSpec, PARAM_ALIGN};
pub use unet::UNet2D;
