//! Multi-head scaled dot-product self-attention.
use crate::error::Result;
use crate::tensor::Tensor;

/// The output `[B, L, C]` and the row log-sum-exp of the scaled scores `[B, heads, L]`
/// that the backward uses to rebuild the softmax.
pub struct AttentionOutput {
    pub out: Tensor,
    pub lse: Tensor,
}

pub struct AttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

pub(crate) mod cpu {
    use super::*;
    pub fn forward(
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _heads: usize,
    ) -> Result<AttentionOutput> {
        todo!()
    }
    pub fn backward(
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _saved: &AttentionOutput,
        _d_out: &Tensor,
        _heads: usize,
    ) -> Result<AttentionGrads> {
        todo!()
    }
}
pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Gpu;
    pub fn forward(
        _g: &Gpu,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _heads: usize,
    ) -> Result<AttentionOutput> {
        todo!()
    }
    pub fn backward(
        _g: &Gpu,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _saved: &AttentionOutput,
        _d_out: &Tensor,
        _heads: usize,
    ) -> Result<AttentionGrads> {
        todo!()
    }
}
