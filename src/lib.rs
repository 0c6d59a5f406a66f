//! diffwgpu: denoising diffusion models (DDPM) trained and sampled on any GPU that wgpu
//! reaches, with every kernel hand-written in WGSL, backpropagation written by hand, and a CPU
//! reference implementation of every op that the GPU results are checked against.

pub mod autodiff;
pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod diffusion;
pub mod error;
pub mod gpu;
pub mod images;
pub mod likelihood;
pub mod nn;
pub mod ops;
pub mod parallel;
pub mod rng;
pub mod tensor;
pub mod train;

pub use backend::{Backend, Cpu};
pub use error::{Error, Result};
pub use gpu::Gpu;
pub use tensor::{Device, Tensor};
