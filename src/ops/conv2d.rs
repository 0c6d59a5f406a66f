//! 2-D convolution.
use crate::error::Result;
use crate::tensor::Tensor;

/// Stride and padding (top, bottom, left, right) of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: [usize; 4],
}

/// Gradients of a convolution.
pub struct Conv2dGrads {
    pub dx: Tensor,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

pub(crate) mod cpu {
    use super::*;
    pub fn forward(
        _x: &Tensor,
        _w: &Tensor,
        _b: Option<&Tensor>,
        _p: &Conv2dParams,
    ) -> Result<Tensor> {
        todo!()
    }
    pub fn backward(
        _x: &Tensor,
        _w: &Tensor,
        _dy: &Tensor,
        _p: &Conv2dParams,
        _with_bias: bool,
    ) -> Result<Conv2dGrads> {
        todo!()
    }
}
pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Gpu;
    pub fn forward(
        _g: &Gpu,
        _x: &Tensor,
        _w: &Tensor,
        _b: Option<&Tensor>,
        _p: &Conv2dParams,
    ) -> Result<Tensor> {
        todo!()
    }
    pub fn backward(
        _g: &Gpu,
        _x: &Tensor,
        _w: &Tensor,
        _dy: &Tensor,
        _p: &Conv2dParams,
        _with_bias: bool,
    ) -> Result<Conv2dGrads> {
        todo!()
    }
}
