//! The subcommands of the `diffwgpu` binary.

pub mod bench;
pub mod device;
pub mod info;
pub mod model;
pub mod noise;
pub mod progress;
pub mod sample;
pub mod train;
