//! One module per op family. Each holds the op's parameters, its shape checks, the CPU
//! reference (`cpu::`) and the GPU launcher (`gpu::`) beside its shader in `shaders/`.

pub mod attention;
pub mod broadcast;
pub mod class_embedding;
pub mod conv2d;
pub mod diffusion;
pub mod elementwise;
pub mod embedding;
mod expf;
pub mod grads;
pub mod group_norm;
pub mod guidance;
pub mod layout;
pub mod linear;
pub mod optim;
pub mod random;
pub mod reduce;
pub(crate) mod simd;
pub mod solver_step;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Every GPU kernel of every op, as its launcher binds and configures it; `tests/shaders.rs`
/// checks each against its shader without a GPU, and the pipeline cache refuses a kernel that
/// is not listed here.
pub fn gpu_kernels() -> Vec<crate::gpu::Kernel> {
    [
        attention::gpu::KERNELS,
        broadcast::gpu::KERNELS,
        class_embedding::gpu::KERNELS,
        conv2d::gpu::KERNELS,
        diffusion::gpu::KERNELS,
        elementwise::gpu::KERNELS,
        embedding::gpu::KERNELS,
        grads::gpu::KERNELS,
        guidance::gpu::KERNELS,
        group_norm::gpu::KERNELS,
        layout::gpu::KERNELS,
        linear::gpu::KERNELS,
        optim::gpu::KERNELS,
        random::gpu::KERNELS,
        reduce::gpu::KERNELS,
        solver_step::gpu::KERNELS,
    ]
    .concat()
}

/// Checks that `t` has `rank` dimensions.
pub(crate) fn check_rank(op: &'static str, name: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.shape().len() != rank {
        return Err(Error::shape(
            op,
            format!("{name} of rank {rank}"),
            t.shape(),
        ));
    }
    Ok(())
}

/// Checks that `b` has the shape of `a`.
pub(crate) fn check_same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("{:?}", a.shape()), b.shape()));
    }
    Ok(())
}

/// Workgroup size of the one-thread-per-element kernels.
pub(crate) const ELEMENTWISE_WG: u32 = 256;

/// The override constants of the one-thread-per-element kernels (`WG` in their shaders).
pub(crate) const ELEMENTWISE_CONSTANTS: &[(&str, f64)] = &[("WG", ELEMENTWISE_WG as f64)];

/// Workgroups for `n` elements, one thread each, as an x-by-y grid.
pub(crate) fn elementwise_grid(n: usize) -> [u32; 3] {
    crate::gpu::grid((n as u32).div_ceil(ELEMENTWISE_WG))
}
