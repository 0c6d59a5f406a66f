//! The subcommands of the `diffwgpu` binary.

pub mod device;
pub mod info;
pub mod noise;
pub mod sample;
pub mod train;
