//! Linear layer y = x w^T + b.
use crate::error::Result;
use crate::tensor::Tensor;

/// Gradients of a linear layer.
pub struct LinearGrads {
    pub dx: Tensor,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

pub(crate) mod cpu {
    use super::*;
    pub fn forward(_x: &Tensor, _w: &Tensor, _b: Option<&Tensor>) -> Result<Tensor> {
        todo!()
    }
    pub fn backward(
        _x: &Tensor,
        _w: &Tensor,
        _dy: &Tensor,
        _with_bias: bool,
    ) -> Result<LinearGrads> {
        todo!()
    }
}
pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Gpu;
    pub fn forward(_g: &Gpu, _x: &Tensor, _w: &Tensor, _b: Option<&Tensor>) -> Result<Tensor> {
        todo!()
    }
    pub fn backward(
        _g: &Gpu,
        _x: &Tensor,
        _w: &Tensor,
        _dy: &Tensor,
        _with_bias: bool,
    ) -> Result<LinearGrads> {
        todo!()
    }
}
