//! Sinusoidal timestep embedding.
use crate::error::Result;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimestepEmbeddingParams {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f32,
    pub scale: f32,
    pub max_period: f32,
}

pub(crate) mod cpu {
    use super::*;
    pub fn timestep_embedding(_t: &Tensor, _p: &TimestepEmbeddingParams) -> Result<Tensor> {
        todo!()
    }
}
pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Gpu;
    pub fn timestep_embedding(
        _g: &Gpu,
        _t: &Tensor,
        _p: &TimestepEmbeddingParams,
    ) -> Result<Tensor> {
        todo!()
    }
}
