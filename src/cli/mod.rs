//! The subcommands of the `diffwgpu` binary.

pub mod bench;
pub mod device;
pub mod eval;
pub mod info;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod ranks;
pub mod sample;
pub mod train;
