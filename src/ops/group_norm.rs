//! Group normalization.
use crate::error::Result;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNormParams {
    pub groups: usize,
    pub eps: f32,
}

/// The output and what the backward needs: per-(sample, group) mean and 1/std, `[B, G]`.
pub struct GroupNormOutput {
    pub y: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

pub struct GroupNormGrads {
    pub dx: Tensor,
    pub dgamma: Tensor,
    pub dbeta: Tensor,
}

pub(crate) mod cpu {
    use super::*;
    pub fn forward(
        _x: &Tensor,
        _gamma: &Tensor,
        _beta: &Tensor,
        _p: &GroupNormParams,
    ) -> Result<GroupNormOutput> {
        todo!()
    }
    pub fn backward(
        _x: &Tensor,
        _gamma: &Tensor,
        _saved: &GroupNormOutput,
        _dy: &Tensor,
        _p: &GroupNormParams,
    ) -> Result<GroupNormGrads> {
        todo!()
    }
}
pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Gpu;
    pub fn forward(
        _g: &Gpu,
        _x: &Tensor,
        _gamma: &Tensor,
        _beta: &Tensor,
        _p: &GroupNormParams,
    ) -> Result<GroupNormOutput> {
        todo!()
    }
    pub fn backward(
        _g: &Gpu,
        _x: &Tensor,
        _gamma: &Tensor,
        _saved: &GroupNormOutput,
        _dy: &Tensor,
        _p: &GroupNormParams,
    ) -> Result<GroupNormGrads> {
        todo!()
    }
}
