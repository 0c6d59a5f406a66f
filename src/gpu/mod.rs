//! The GPU backend's machinery: the wgpu device, pooled buffers, cached pipelines and the
//! command recorder that every op dispatches into.
//!
//! Ops never talk to wgpu directly; they call [`Gpu::alloc`], [`Gpu::dispatch`] and friends.
//! All dispatches between two readbacks go into one command encoder, submitted once.

mod buffer;
mod context;
mod oneshot;
mod pipeline;
mod recorder;
mod scope;
mod slice;

pub use buffer::GpuBuffer;
#[cfg(not(target_arch = "wasm32"))]
pub use context::adapters;
pub use context::{kernel_limits, AdapterSummary, Gpu, GpuStats};
pub use pipeline::{Access, Kernel};
pub use recorder::{grid, Arg};
pub use slice::GpuSlice;
