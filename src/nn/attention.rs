//! diffusers' spatial self-attention block (`Attention` with a group norm and a residual, as
//! `AttnDownBlock2D`, `AttnUpBlock2D` and the mid block build it):
//!   tokens = GroupNorm(x) as [B, H*W, C]
//!   q | k | v = tokens [W_q; W_k; W_v]^T + [b_q; b_k; b_v]       (one product, packed rows)
//!   out = to_out.0(softmax(q k^T / sqrt(d)) v) per head
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
        let group_norm = GroupNorm::new(list, &format!("{name}.group_norm"), c, groups, eps);
        let to_q = Linear::new(list, &format!("{name}.to_q"), c, c);
        let to_k = Linear::new(list, &format!("{name}.to_k"), c, c);
        let to_v = Linear::new(list, &format!("{name}.to_v"), c, c);
        // The three projections are one product: their weights, and their biases, one block.
        list.group(&[to_q.weight, to_k.weight, to_v.weight]);
        list.group(&[to_q.bias, to_k.bias, to_v.bias]);
        AttentionBlock {
            group_norm,
            to_q,
            to_k,
            to_v,
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
        let (q, k, v) = (&self.to_q, &self.to_k, &self.to_v);
        let ws = [p[q.weight], p[k.weight], p[v.weight]];
        let bs = [p[q.bias], p[k.bias], p[v.bias]];
        let qkv = tape.linear_stacked(rows, &ws, &bs)?;
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
