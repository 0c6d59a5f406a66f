//! The fused diffusion kernels: q_sample, DDPM step, DDIM step.
use crate::error::Result;
use crate::tensor::Tensor;

/// Per-step scalars of a DDPM ancestral step (computed on the host from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpmStepCoefficients {}

/// Per-step scalars of a DDIM step (computed on the host from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimStepCoefficients {}

pub(crate) mod cpu {
    use super::*;
    pub fn q_sample(_x0: &Tensor, _eps: &Tensor, _t: &Tensor, _ac: &Tensor) -> Result<Tensor> {
        todo!()
    }
    pub fn ddpm_step(
        _x_t: &Tensor,
        _mo: &Tensor,
        _noise: &Tensor,
        _c: &DdpmStepCoefficients,
    ) -> Result<Tensor> {
        todo!()
    }
    pub fn ddim_step(
        _x_t: &Tensor,
        _mo: &Tensor,
        _noise: &Tensor,
        _c: &DdimStepCoefficients,
    ) -> Result<Tensor> {
        todo!()
    }
}
pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Gpu;
    pub fn q_sample(
        _g: &Gpu,
        _x0: &Tensor,
        _eps: &Tensor,
        _t: &Tensor,
        _ac: &Tensor,
    ) -> Result<Tensor> {
        todo!()
    }
    pub fn ddpm_step(
        _g: &Gpu,
        _x_t: &Tensor,
        _mo: &Tensor,
        _noise: &Tensor,
        _c: &DdpmStepCoefficients,
    ) -> Result<Tensor> {
        todo!()
    }
    pub fn ddim_step(
        _g: &Gpu,
        _x_t: &Tensor,
        _mo: &Tensor,
        _noise: &Tensor,
        _c: &DdimStepCoefficients,
    ) -> Result<Tensor> {
        todo!()
    }
}
