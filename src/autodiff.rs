//! Reverse-mode differentiation with a tape.
//!
//! The forward pass calls the tape's op methods instead of the backend's: each computes its
//! result on the backend, stores it as a new variable and, when the tape records, appends a
//! node with exactly what the op's hand-written backward needs (the group norm's `mean` and
//! `rstd`, the attention's log-sum-exp). `backward` walks the nodes in reverse, hands each the
//! gradient of its output, and adds the gradients it returns into those of its inputs: a
//! variable read by several ops (a skip connection, the time embedding that every resnet reads)
//! gets the sum of their contributions.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::attention::AttentionOutput;
use crate::ops::conv2d::Conv2dParams;
use crate::ops::group_norm::{GroupNormOutput, GroupNormParams};
use crate::tensor::Tensor;

/// A value on the tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var(usize);

/// One recorded op: its inputs, and what its backward reads besides them.
enum Op {
    Conv2d {
        x: Var,
        w: Var,
        b: Option<Var>,
        p: Conv2dParams,
    },
    Linear {
        x: Var,
        w: Var,
        b: Option<Var>,
    },
    GroupNorm {
        x: Var,
        gamma: Var,
        beta: Var,
        p: GroupNormParams,
        mean: Tensor,
        rstd: Tensor,
    },
    Silu {
        x: Var,
    },
    Add {
        a: Var,
        b: Var,
    },
    AddPerChannel {
        x: Var,
        v: Var,
    },
    ConcatChannels {
        a: Var,
        b: Var,
    },
    Upsample2x {
        x: Var,
    },
    Transpose {
        x: Var,
    },
    Reshape {
        x: Var,
    },
    Attention {
        q: Var,
        k: Var,
        v: Var,
        heads: usize,
        lse: Tensor,
    },
    Dropout {
        x: Var,
        u: Tensor,
        p: f32,
    },
}

struct Node {
    out: Var,
    op: Op,
}

/// The values of one forward pass and, when recording, the ops that made them.
pub struct Tape<'b> {
    be: &'b dyn Backend,
    values: Vec<Tensor>,
    /// Whether a gradient flows into the variable (it depends on a leaf that wants one).
    needs_grad: Vec<bool>,
    nodes: Vec<Node>,
    record: bool,
    /// Seed and next element offset of the dropout masks (training only).
    dropout: Option<(u64, u64)>,
}

/// The gradients `backward` found, indexed by variable.
pub struct Gradients {
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    /// The gradient of a variable, if any flowed into it.
    pub fn get(&self, v: Var) -> Option<&Tensor> {
        self.grads.get(v.0).and_then(|g| g.as_ref())
    }

    /// Moves a gradient out.
    pub fn take(&mut self, v: Var) -> Option<Tensor> {
        self.grads.get_mut(v.0).and_then(|g| g.take())
    }
}

impl<'b> Tape<'b> {
    /// A tape that records, for a forward pass that will be differentiated.
    pub fn new(be: &'b dyn Backend) -> Self {
        Tape {
            be,
            values: Vec::new(),
            needs_grad: Vec::new(),
            nodes: Vec::new(),
            record: true,
            dropout: None,
        }
    }

    /// Turns dropout on (training), its masks drawn from the stream of `seed`.
    pub fn with_dropout(mut self, seed: u64) -> Self {
        self.dropout = Some((seed, 0));
        self
    }

    /// A tape that only computes (sampling): nothing is kept for a backward pass.
    pub fn inference(be: &'b dyn Backend) -> Self {
        Tape {
            record: false,
            ..Tape::new(be)
        }
    }

    pub fn backend(&self) -> &'b dyn Backend {
        self.be
    }

    /// Puts a tensor on the tape; `requires_grad` marks a parameter.
    pub fn leaf(&mut self, t: Tensor, requires_grad: bool) -> Var {
        self.push(t, requires_grad && self.record)
    }

    /// Puts several tensors on the tape (a model's parameters), in order.
    pub fn leaves(&mut self, ts: &[Tensor], requires_grad: bool) -> Vec<Var> {
        ts.iter()
            .map(|t| self.leaf(t.clone(), requires_grad))
            .collect()
    }

    /// The value of a variable.
    pub fn value(&self, v: Var) -> &Tensor {
        &self.values[v.0]
    }

    /// The shape of a variable.
    pub fn shape(&self, v: Var) -> &[usize] {
        self.values[v.0].shape()
    }

    fn push(&mut self, t: Tensor, needs_grad: bool) -> Var {
        self.values.push(t);
        self.needs_grad.push(needs_grad);
        Var(self.values.len() - 1)
    }

    /// Stores an op's result; records the op when any input carries a gradient.
    fn output(&mut self, t: Tensor, inputs: &[Var], op: impl FnOnce() -> Op) -> Var {
        let needs = self.record && inputs.iter().any(|v| self.needs_grad[v.0]);
        let out = self.push(t, needs);
        if needs {
            self.nodes.push(Node { out, op: op() });
        }
        out
    }

    pub fn conv2d(&mut self, x: Var, w: Var, b: Option<Var>, p: Conv2dParams) -> Result<Var> {
        let y = self
            .be
            .conv2d(self.value(x), self.value(w), b.map(|b| self.value(b)), &p)?;
        let mut inputs = vec![x, w];
        inputs.extend(b);
        Ok(self.output(y, &inputs, || Op::Conv2d { x, w, b, p }))
    }

    /// `x [M, K] w^T + b`.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let y = self
            .be
            .linear(self.value(x), self.value(w), b.map(|b| self.value(b)))?;
        let mut inputs = vec![x, w];
        inputs.extend(b);
        Ok(self.output(y, &inputs, || Op::Linear { x, w, b }))
    }

    pub fn group_norm(&mut self, x: Var, gamma: Var, beta: Var, p: GroupNormParams) -> Result<Var> {
        let GroupNormOutput { y, mean, rstd } =
            self.be
                .group_norm(self.value(x), self.value(gamma), self.value(beta), &p)?;
        Ok(self.output(y, &[x, gamma, beta], || Op::GroupNorm {
            x,
            gamma,
            beta,
            p,
            mean,
            rstd,
        }))
    }

    pub fn silu(&mut self, x: Var) -> Result<Var> {
        let y = self.be.silu(self.value(x))?;
        Ok(self.output(y, &[x], || Op::Silu { x }))
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = self.be.add(self.value(a), self.value(b))?;
        Ok(self.output(y, &[a, b], || Op::Add { a, b }))
    }

    /// `x [B, C, H, W] + v [B, C]` broadcast over H and W.
    pub fn add_per_channel(&mut self, x: Var, v: Var) -> Result<Var> {
        let y = self.be.add_per_channel(self.value(x), self.value(v))?;
        Ok(self.output(y, &[x, v], || Op::AddPerChannel { x, v }))
    }

    /// `torch.cat([a, b], dim=1)`.
    pub fn concat_channels(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = self.be.concat_channels(self.value(a), self.value(b))?;
        Ok(self.output(y, &[a, b], || Op::ConcatChannels { a, b }))
    }

    pub fn upsample_nearest2x(&mut self, x: Var) -> Result<Var> {
        let y = self.be.upsample_nearest2x(self.value(x))?;
        Ok(self.output(y, &[x], || Op::Upsample2x { x }))
    }

    /// `[B, M, N] -> [B, N, M]`.
    pub fn transpose(&mut self, x: Var) -> Result<Var> {
        let y = self.be.transpose(self.value(x))?;
        Ok(self.output(y, &[x], || Op::Transpose { x }))
    }

    /// The same elements seen with another shape.
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let y = self.value(x).reshape(shape)?;
        Ok(self.output(y, &[x], || Op::Reshape { x }))
    }

    /// `softmax(q k^T / sqrt(d)) v` per head over `[B, L, C]` tokens.
    pub fn attention(&mut self, q: Var, k: Var, v: Var, heads: usize) -> Result<Var> {
        let o = self
            .be
            .attention(self.value(q), self.value(k), self.value(v), heads)?;
        let lse = o.lse;
        Ok(self.output(o.out, &[q, k, v], || Op::Attention {
            q,
            k,
            v,
            heads,
            lse,
        }))
    }

    /// Inverted dropout with probability `p`: the identity without `with_dropout` (sampling)
    /// or at `p = 0`; the mask's uniforms come from the tape's stream, in call order.
    pub fn dropout(&mut self, x: Var, p: f32) -> Result<Var> {
        let Some((seed, offset)) = self.dropout.filter(|_| p > 0.0) else {
            return Ok(x);
        };
        let shape = self.shape(x).to_vec();
        let n: usize = shape.iter().product();
        self.dropout = Some((seed, offset + n as u64));
        let u = self.be.rand_uniform(&shape, seed, offset)?;
        let y = self.be.dropout(self.value(x), &u, p)?;
        Ok(self.output(y, &[x], || Op::Dropout { x, u, p }))
    }

    /// Backpropagates `seed` (the gradient of the final scalar w.r.t. `out`) through every
    /// recorded op, newest first.
    pub fn backward(&self, out: Var, seed: Tensor) -> Result<Gradients> {
        if !self.record {
            return Err(Error::invalid(
                "backward",
                "this tape was made for inference and recorded nothing; use Tape::new",
            ));
        }
        if seed.shape() != self.shape(out) {
            return Err(Error::shape(
                "backward",
                format!("a seed gradient of shape {:?}", self.shape(out)),
                seed.shape(),
            ));
        }
        let mut g = Gradients {
            grads: vec![None; self.values.len()],
        };
        g.grads[out.0] = Some(seed);
        for node in self.nodes.iter().rev() {
            let Some(dy) = g.grads[node.out.0].take() else {
                continue;
            };
            self.backward_node(node, &dy, &mut g)?;
            if node.out == out {
                g.grads[out.0] = Some(dy);
            }
        }
        Ok(g)
    }

    /// Adds `grad` into the gradient of `v` (when a gradient flows into `v` at all).
    fn accumulate(&self, g: &mut Gradients, v: Var, grad: Tensor) -> Result<()> {
        if !self.needs_grad[v.0] {
            return Ok(());
        }
        let slot = &mut g.grads[v.0];
        *slot = Some(match slot.take() {
            Some(sum) => self.be.add(&sum, &grad)?,
            None => grad,
        });
        Ok(())
    }

    fn backward_node(&self, node: &Node, dy: &Tensor, g: &mut Gradients) -> Result<()> {
        let be = self.be;
        let y = self.value(node.out);
        match &node.op {
            Op::Conv2d { x, w, b, p } => {
                let gr = be.conv2d_backward(self.value(*x), self.value(*w), dy, p, b.is_some())?;
                self.accumulate(g, *x, gr.dx)?;
                self.accumulate(g, *w, gr.dw)?;
                if let (Some(b), Some(db)) = (b, gr.db) {
                    self.accumulate(g, *b, db)?;
                }
            }
            Op::Linear { x, w, b } => {
                let gr = be.linear_backward(self.value(*x), self.value(*w), dy, b.is_some())?;
                self.accumulate(g, *x, gr.dx)?;
                self.accumulate(g, *w, gr.dw)?;
                if let (Some(b), Some(db)) = (b, gr.db) {
                    self.accumulate(g, *b, db)?;
                }
            }
            Op::GroupNorm {
                x,
                gamma,
                beta,
                p,
                mean,
                rstd,
            } => {
                let saved = GroupNormOutput {
                    y: y.clone(),
                    mean: mean.clone(),
                    rstd: rstd.clone(),
                };
                let gr =
                    be.group_norm_backward(self.value(*x), self.value(*gamma), &saved, dy, p)?;
                self.accumulate(g, *x, gr.dx)?;
                self.accumulate(g, *gamma, gr.dgamma)?;
                self.accumulate(g, *beta, gr.dbeta)?;
            }
            Op::Silu { x } => {
                let dx = be.silu_backward(self.value(*x), dy)?;
                self.accumulate(g, *x, dx)?;
            }
            Op::Add { a, b } => {
                self.accumulate(g, *a, dy.clone())?;
                self.accumulate(g, *b, dy.clone())?;
            }
            Op::AddPerChannel { x, v } => {
                self.accumulate(g, *x, dy.clone())?;
                if self.needs_grad[v.0] {
                    let dv = be.add_per_channel_backward(dy)?;
                    self.accumulate(g, *v, dv)?;
                }
            }
            Op::ConcatChannels { a, b } => {
                let (da, db) = be.split_channels(dy, self.shape(*a)[1])?;
                self.accumulate(g, *a, da)?;
                self.accumulate(g, *b, db)?;
            }
            Op::Upsample2x { x } => {
                let dx = be.upsample_nearest2x_backward(dy)?;
                self.accumulate(g, *x, dx)?;
            }
            Op::Transpose { x } => {
                let dx = be.transpose(dy)?;
                self.accumulate(g, *x, dx)?;
            }
            Op::Reshape { x } => {
                let dx = dy.reshape(self.shape(*x))?;
                self.accumulate(g, *x, dx)?;
            }
            Op::Attention {
                q,
                k,
                v,
                heads,
                lse,
            } => {
                let saved = AttentionOutput {
                    out: y.clone(),
                    lse: lse.clone(),
                };
                let gr = be.attention_backward(
                    self.value(*q),
                    self.value(*k),
                    self.value(*v),
                    &saved,
                    dy,
                    *heads,
                )?;
                self.accumulate(g, *q, gr.dq)?;
                self.accumulate(g, *k, gr.dk)?;
                self.accumulate(g, *v, gr.dv)?;
            }
            Op::Dropout { x, u, p } => {
                let dx = be.dropout(dy, u, *p)?;
                self.accumulate(g, *x, dx)?;
            }
        }
        Ok(())
    }
}
