//! diffusers' spatial self-attention block (`Attention` with a group norm and a residual, as
//! `AttnDownBlock2D`, `AttnUpBlock2D` and the mid block build it):
//!   tokens = GroupNorm(x) as [B, H*W, C]
//!   out = to_out.0(softmax(to_q(tokens) to_k(tokens)^T / sqrt(d)) to_v(tokens)) per head
//!   y = out as [B, C, H, W] + x
//! The three projections are concatenated per token into the packed `qkv [B, L, 3C]` the
//! attention op reads.

use super::layers::{GroupNorm, Linear};
use super::params::ParamList;
use crate::autodiff::{Tape, Var};
use crate::error::{Error, Result};

pub struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl AttentionBlock {
    /// `name.{group_norm, to_q, to_k, to_v, to_out.0}` over `channels` with `heads` heads.
    pub fn new(
        list: &mut ParamList,
        name: &str,
        channels: usize,
        heads: usize,
        groups: usize,
        eps: f32,
    ) -> Self {
        let c = channels;
        AttentionBlock {
            group_norm: GroupNorm::new(list, &format!("{name}.group_norm"), c, groups, eps),
            to_q: Linear::new(list, &format!("{name}.to_q"), c, c),
            to_k: Linear::new(list, &format!("{name}.to_k"), c, c),
            to_v: Linear::new(list, &format!("{name}.to_v"), c, c),
            to_out: Linear::new(list, &format!("{name}.to_out.0"), c, c),
            heads,
        }
    }

    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        let [b, c, h, w] = <[usize; 4]>::try_from(tape.shape(x))
            .map_err(|_| Error::shape("attention block", "[B, C, H, W]", tape.shape(x)))?;
        let l = h * w;
        let normed = self.group_norm.forward(tape, p, x)?;
        let flat = tape.reshape(normed, &[b, c, l])?;
        let tokens = tape.transpose(flat)?;
        let rows = tape.reshape(tokens, &[b * l, c])?;
        // Each projection as [B L, C, 1, 1], so that concatenating channels packs the rows.
        let project = |tape: &mut Tape, layer: &Linear| -> Result<Var> {
            let y = layer.forward(tape, p, rows)?;
            tape.reshape(y, &[b * l, c, 1, 1])
        };
        let q = project(tape, &self.to_q)?;
        let k = project(tape, &self.to_k)?;
        let v = project(tape, &self.to_v)?;
        let qk = tape.concat_channels(q, k)?;
        let qkv = tape.concat_channels(qk, v)?;
        let qkv = tape.reshape(qkv, &[b, l, 3 * c])?;
        let o = tape.attention(qkv, self.heads)?;
        let o = tape.reshape(o, &[b * l, c])?;
        let o = self.to_out.forward(tape, p, o)?;
        let o = tape.reshape(o, &[b, l, c])?;
        let o = tape.transpose(o)?;
        let o = tape.reshape(o, &[b, c, h, w])?;
        tape.add(o, x)
    }
}
