//! Fused AdamW and the EMA update.
use crate::error::Result;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u32,
}

pub(crate) mod cpu {
    use super::*;
    pub fn adamw_step(
        _p: &mut Tensor,
        _g: &Tensor,
        _m: &mut Tensor,
        _v: &mut Tensor,
        _h: &AdamWParams,
    ) -> Result<()> {
        todo!()
    }
    pub fn ema_update(_ema: &mut Tensor, _p: &Tensor, _decay: f32) -> Result<()> {
        todo!()
    }
}
pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Gpu;
    pub fn adamw_step(
        _g: &Gpu,
        _p: &mut Tensor,
        _gr: &Tensor,
        _m: &mut Tensor,
        _v: &mut Tensor,
        _h: &AdamWParams,
    ) -> Result<()> {
        todo!()
    }
    pub fn ema_update(_g: &Gpu, _ema: &mut Tensor, _p: &Tensor, _decay: f32) -> Result<()> {
        todo!()
    }
}
