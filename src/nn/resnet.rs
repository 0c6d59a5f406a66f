//! diffusers' `ResnetBlock2D` (pre-activation, time embedding added after the first conv):
//!   h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb))[:, :, None, None]
//!   h = conv2(dropout(SiLU(norm2(h))))
//!   out = shortcut(x) + h,   shortcut = 1x1 conv_shortcut when the channel count changes.

use super::layers::{Conv2d, GroupNorm, Linear};
use super::params::ParamList;
use crate::autodiff::{Tape, Var};
use crate::error::Result;
use crate::ops::conv2d::Conv2dParams;

/// What every resnet of a model shares: the time-embedding width, the group norms' group
/// count and epsilon, and the dropout rate.
#[derive(Debug, Clone, Copy)]
pub struct Shared {
    pub temb: usize,
    pub groups: usize,
    pub eps: f32,
    pub dropout: f32,
}

pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    dropout: f32,
}

impl ResnetBlock2D {
    /// `name.{norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut}`.
    pub fn new(list: &mut ParamList, name: &str, (cin, cout): (usize, usize), c: &Shared) -> Self {
        let (temb, groups, eps) = (c.temb, c.groups, c.eps);
        let same = Conv2dParams::new(1, 1);
        ResnetBlock2D {
            norm1: GroupNorm::new(list, &format!("{name}.norm1"), cin, groups, eps),
            conv1: Conv2d::new(list, &format!("{name}.conv1"), cin, cout, 3, same),
            time_emb_proj: Linear::new(list, &format!("{name}.time_emb_proj"), temb, cout),
            norm2: GroupNorm::new(list, &format!("{name}.norm2"), cout, groups, eps),
            conv2: Conv2d::new(list, &format!("{name}.conv2"), cout, cout, 3, same),
            conv_shortcut: (cin != cout).then(|| {
                let one = Conv2dParams::new(1, 0);
                Conv2d::new(list, &format!("{name}.conv_shortcut"), cin, cout, 1, one)
            }),
            dropout: c.dropout,
        }
    }

    /// `x [B, Cin, H, W]`, `temb_act = SiLU(temb) [B, T]` (shared by every block).
    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var, temb_act: Var) -> Result<Var> {
        // Group norm + SiLU is one op; the time embedding and the shortcut are added by the
        // epilogues of conv1 and conv2.
        let h = self.norm1.forward_silu(tape, p, x)?;
        let t = self.time_emb_proj.forward(tape, p, temb_act)?;
        let h = self.conv1.forward_with(tape, p, h, Some(t), None)?;
        let h = self.norm2.forward_silu(tape, p, h)?;
        let h = tape.dropout(h, self.dropout)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(tape, p, x)?,
            None => x,
        };
        self.conv2.forward_with(tape, p, h, None, Some(shortcut))
    }
}
