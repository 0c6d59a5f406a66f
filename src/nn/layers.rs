//! The leaf layers: convolution, linear, group norm and embedding, each a handful of
//! parameter indices and a forward that records onto the tape.

use super::params::{Init, ParamList};
use crate::autodiff::{Tape, Var};
use crate::error::Result;
use crate::ops::conv2d::Conv2dParams;
use crate::ops::group_norm::GroupNormParams;

/// `nn.Conv2d` with bias.
pub struct Conv2d {
    weight: usize,
    bias: usize,
    params: Conv2dParams,
}

impl Conv2d {
    /// A `kernel x kernel` convolution `cin -> cout` named `name` (`name.weight`, `name.bias`).
    pub fn new(
        list: &mut ParamList,
        name: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        params: Conv2dParams,
    ) -> Self {
        let bound = 1.0 / ((cin * kernel * kernel) as f32).sqrt();
        Conv2d {
            weight: list.add(
                format!("{name}.weight"),
                &[cout, cin, kernel, kernel],
                Init::Uniform(bound),
            ),
            bias: list.add(format!("{name}.bias"), &[cout], Init::Uniform(bound)),
            params,
        }
    }

    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        tape.conv2d(x, p[self.weight], Some(p[self.bias]), self.params)
    }

    /// The convolution plus `add [B, Cout]` broadcast over the pixels and a `residual` of the
    /// output's shape, both added by the convolution's epilogue.
    pub fn forward_with(
        &self,
        tape: &mut Tape,
        p: &[Var],
        x: Var,
        add: Option<Var>,
        residual: Option<Var>,
    ) -> Result<Var> {
        let (w, b) = (p[self.weight], Some(p[self.bias]));
        tape.conv2d_with(x, w, b, self.params, add, residual)
    }
}

/// `nn.Linear` with bias, over `[rows, in]`.
pub struct Linear {
    /// Parameter indices of the weight and the bias.
    pub(crate) weight: usize,
    pub(crate) bias: usize,
}

impl Linear {
    pub fn new(list: &mut ParamList, name: &str, fan_in: usize, fan_out: usize) -> Self {
        let bound = 1.0 / (fan_in as f32).sqrt();
        Linear {
            weight: list.add(
                format!("{name}.weight"),
                &[fan_out, fan_in],
                Init::Uniform(bound),
            ),
            bias: list.add(format!("{name}.bias"), &[fan_out], Init::Uniform(bound)),
        }
    }

    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        tape.linear(x, p[self.weight], Some(p[self.bias]))
    }
}

/// `nn.GroupNorm` with affine scale and shift.
pub struct GroupNorm {
    weight: usize,
    bias: usize,
    params: GroupNormParams,
}

impl GroupNorm {
    pub fn new(list: &mut ParamList, name: &str, channels: usize, groups: usize, eps: f32) -> Self {
        let weight = list.add(format!("{name}.weight"), &[channels], Init::Ones);
        let bias = list.add(format!("{name}.bias"), &[channels], Init::Zeros);
        // The kernels read scale and shift as one buffer.
        list.place_together(&[weight, bias]);
        GroupNorm {
            weight,
            bias,
            params: GroupNormParams::new(groups, eps),
        }
    }

    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        tape.group_norm(x, p[self.weight], p[self.bias], self.params)
    }

    /// `SiLU(GroupNorm(x))` as one fused op.
    pub fn forward_silu(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        let params = self.params.with_silu();
        tape.group_norm(x, p[self.weight], p[self.bias], params)
    }
}

/// `nn.Embedding`: one learned row of width `dim` per class.
pub struct Embedding {
    weight: usize,
}

impl Embedding {
    /// A `[classes, dim]` table named `name.weight`.
    pub fn new(list: &mut ParamList, name: &str, classes: usize, dim: usize) -> Self {
        Embedding {
            weight: list.add(format!("{name}.weight"), &[classes, dim], Init::Normal(1.0)),
        }
    }

    /// The rows of `labels`, `[B, dim]`.
    pub fn forward(&self, tape: &mut Tape, p: &[Var], labels: &[u32]) -> Result<Var> {
        tape.embedding(p[self.weight], labels)
    }
}
