//! Reverse-mode differentiation with a tape.
//!
//! The forward pass calls the tape's op methods instead of the backend's: each computes its
//! result on the backend, stores it as a new variable and, when the tape records, appends a
//! node with exactly what the op's hand-written backward needs (the group norm's `mean` and
//! `rstd`, the attention's log-sum-exp). `backward` walks the nodes in reverse, hands each the
//! gradient of its output, and adds the gradients it returns into those of its inputs: a
//! variable read by several ops (a skip connection, the time embedding that every resnet reads)
//! gets the sum of their contributions.
//!
//! For training, `backward_params` writes the gradients of a model's parameters (leaves put on
//! the tape by `params`) as partial sums into an arena (`ops/grads.rs`) and assembles them into
//! one flat gradient buffer with a single gather; a value is dropped as soon as the last op
//! whose backward reads it has run, so the activations' memory returns to the pool while the
//! gradients are being made.

use std::collections::HashMap;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::ParamLayout;
use crate::ops::attention::AttentionOutput;
use crate::ops::conv2d::{Conv2dEpilogue, Conv2dParams};
use crate::ops::grads::{splits_divisor, GradPlan, GradRegion, Partials};
use crate::ops::group_norm::{GroupNormOutput, GroupNormParams};
use crate::parallel::Shard;
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
        /// What the epilogue added: `[B, Cout]` per channel, and a residual of y's shape.
        add: Option<Var>,
        residual: Option<Var>,
    },
    Linear {
        x: Var,
        w: Var,
        b: Option<Var>,
    },
    /// A linear layer whose weight and bias are several variables stacked.
    LinearStacked {
        x: Var,
        ws: Vec<Var>,
        bs: Vec<Var>,
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
        qkv: Var,
        heads: usize,
        lse: Tensor,
    },
    Dropout {
        x: Var,
        u: Tensor,
        p: f32,
    },
    /// Rows of the table `w` picked by `labels`.
    Embedding {
        w: Var,
        labels: Vec<u32>,
    },
}

impl Op {
    /// Every variable the op's backward reads or sends a gradient to.
    fn vars(&self) -> Vec<Var> {
        match *self {
            Op::Conv2d {
                x,
                w,
                b,
                add,
                residual,
                ..
            } => [Some(x), Some(w), b, add, residual]
                .into_iter()
                .flatten()
                .collect(),
            Op::Linear { x, w, b } => {
                let mut v = vec![x, w];
                v.extend(b);
                v
            }
            Op::LinearStacked { x, ref ws, ref bs } => [vec![x], ws.clone(), bs.clone()].concat(),
            Op::GroupNorm { x, gamma, beta, .. } => vec![x, gamma, beta],
            Op::Silu { x }
            | Op::Upsample2x { x }
            | Op::Transpose { x }
            | Op::Reshape { x }
            | Op::Dropout { x, .. }
            | Op::Embedding { w: x, .. } => vec![x],
            Op::Add { a, b } | Op::ConcatChannels { a, b } => vec![a, b],
            Op::Attention { qkv, .. } => vec![qkv],
        }
    }
}

struct Node {
    out: Var,
    op: Op,
}

/// Where one input slot of an op writes the parts of its parameter gradient.
struct Slot {
    /// In the plan's arena (else in the op's fresh arena).
    planned: bool,
    offset: usize,
    splits: usize,
    /// Values of the gradient.
    len: usize,
    /// The variables whose gradient it is, stacked.
    vars: Vec<Var>,
}

/// The parameter-gradient parts of one op (see `Tape::targets`).
struct Targets<'a> {
    plan_arena: Option<&'a Tensor>,
    fresh: Option<Tensor>,
    slots: Vec<Slot>,
}

impl Targets<'_> {
    fn part(&self, i: usize) -> Partials<'_> {
        let s = &self.slots[i];
        let arena = if s.planned {
            self.plan_arena
                .expect("planned parts have the plan's arena")
        } else {
            self.fresh
                .as_ref()
                .expect("unplanned parts have a fresh arena")
        };
        Partials {
            arena,
            offset: s.offset,
            splits: s.splits,
        }
    }

    fn part_opt(&self, i: usize) -> Option<Partials<'_>> {
        (i < self.slots.len()).then(|| self.part(i))
    }
}

/// Where the parameter gradients of a backward pass go.
enum ParamSink<'a> {
    /// As tensors among the returned gradients, like every other variable's.
    Tensors,
    /// As parts in `arena`: input slot `slot` of node `n` writes its `splits` parts from
    /// `offset`, at `places[(n, slot)] = (offset, splits)`.
    Parts {
        arena: &'a Tensor,
        places: HashMap<(usize, usize), (usize, usize)>,
    },
}

/// The values of one forward pass and, when recording, the ops that made them.
pub struct Tape<'b> {
    be: &'b dyn Backend,
    /// `None` once backward has dropped a value no later step reads.
    values: Vec<Option<Tensor>>,
    /// The model parameter each variable is, for the leaves `params` put on the tape.
    param_of: Vec<Option<usize>>,
    /// Whether a gradient flows into the variable (it depends on a leaf that wants one).
    needs_grad: Vec<bool>,
    nodes: Vec<Node>,
    record: bool,
    /// Seed and next element offset of the dropout masks (training only).
    dropout: Option<(u64, u64)>,
    /// Which slice of a data-parallel batch this tape's batch is (see [`Self::sharded`]).
    shard: Shard,
    /// Floating-point operations of the forward products so far (see [`Self::flops`]).
    flops: u64,
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
            param_of: Vec::new(),
            needs_grad: Vec::new(),
            nodes: Vec::new(),
            record: true,
            dropout: None,
            shard: Shard::WHOLE,
            flops: 0,
        }
    }

    /// Turns dropout on (training), its masks drawn from the stream of `seed`.
    pub fn with_dropout(mut self, seed: u64) -> Self {
        self.dropout = Some((seed, 0));
        self
    }

    /// Declares the tape's batch to be one rank's slice of a data-parallel batch: its dropout
    /// masks are then that slice of the masks the whole batch gets in one process.
    pub fn sharded(mut self, shard: Shard) -> Self {
        self.shard = shard;
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

    /// Puts a model's parameters on the tape, parameter `i` as `ts[i]`, for
    /// [`Self::backward_params`].
    pub fn params(&mut self, ts: &[Tensor]) -> Vec<Var> {
        ts.iter()
            .enumerate()
            .map(|(i, t)| {
                let v = self.leaf(t.clone(), true);
                self.param_of[v.0] = Some(i);
                v
            })
            .collect()
    }

    /// The value of a variable.
    pub fn value(&self, v: Var) -> &Tensor {
        self.values[v.0]
            .as_ref()
            .expect("a value is read after backward dropped it")
    }

    /// The forward pass's floating-point operations so far, counting `2 M N K` for every
    /// product: a conv2d `2 B Cout Ho Wo Cin KH KW`, a linear layer `2 M N K`, attention
    /// `4 B heads L^2 d` (`q k^T` and `p v`); normalisations and elementwise ops are not
    /// counted.
    pub fn flops(&self) -> u64 {
        self.flops
    }

    /// The shape of a variable.
    pub fn shape(&self, v: Var) -> &[usize] {
        self.value(v).shape()
    }

    fn push(&mut self, t: Tensor, needs_grad: bool) -> Var {
        self.values.push(Some(t));
        self.param_of.push(None);
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
        self.conv2d_with(x, w, b, p, None, None)
    }

    /// `conv2d(x, w, b) + add[:, :, None, None] + residual`, the sums made by the
    /// convolution's epilogue (`add [B, Cout]`, `residual` of the output's shape).
    pub fn conv2d_with(
        &mut self,
        x: Var,
        w: Var,
        b: Option<Var>,
        p: Conv2dParams,
        add: Option<Var>,
        residual: Option<Var>,
    ) -> Result<Var> {
        let e = Conv2dEpilogue {
            add: add.map(|v| self.value(v)),
            residual: residual.map(|v| self.value(v)),
        };
        let (xv, wv, bv) = (self.value(x), self.value(w), b.map(|b| self.value(b)));
        let y = self.be.conv2d_with(xv, wv, bv, &p, &e)?;
        let w_shape = self.shape(w);
        self.flops += 2 * (y.numel() * w_shape[1..].iter().product::<usize>()) as u64;
        let inputs: Vec<Var> = [Some(x), Some(w), b, add, residual]
            .into_iter()
            .flatten()
            .collect();
        Ok(self.output(y, &inputs, || Op::Conv2d {
            x,
            w,
            b,
            p,
            add,
            residual,
        }))
    }

    /// `x [M, K] w^T + b`.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let y = self
            .be
            .linear(self.value(x), self.value(w), b.map(|b| self.value(b)))?;
        self.flops += 2 * (y.numel() * self.shape(x)[1]) as u64;
        let mut inputs = vec![x, w];
        inputs.extend(b);
        Ok(self.output(y, &inputs, || Op::Linear { x, w, b }))
    }

    /// `x [M, K] W^T + b` with `W` the weights `ws` stacked row-wise and `b` the biases `bs`
    /// concatenated: one product for several linear layers that read the same input (an
    /// attention's query, key and value). Parameters of a group of the flat layout are
    /// stacked as they lie; others are copied together.
    pub fn linear_stacked(&mut self, x: Var, ws: &[Var], bs: &[Var]) -> Result<Var> {
        let (w, b) = (self.stacked(ws)?, self.stacked(bs)?);
        let y = self.be.linear(self.value(x), &w, Some(&b))?;
        self.flops += 2 * (y.numel() * self.shape(x)[1]) as u64;
        let inputs = [&[x], ws, bs].concat();
        let (ws, bs) = (ws.to_vec(), bs.to_vec());
        Ok(self.output(y, &inputs, || Op::LinearStacked { x, ws, bs }))
    }

    /// The values of `vars` stacked along their first dimension.
    fn stacked(&self, vars: &[Var]) -> Result<Tensor> {
        let parts: Vec<&Tensor> = vars.iter().map(|&v| self.value(v)).collect();
        let Some(first) = parts.first() else {
            return Err(Error::invalid("linear_stacked", "nothing to stack"));
        };
        let rows: usize = parts
            .iter()
            .map(|t| t.shape().first().copied().unwrap_or(1))
            .sum();
        let mut shape = first.shape().to_vec();
        if shape.is_empty() || parts.iter().any(|t| t.shape()[1..] != shape[1..]) {
            return Err(Error::invalid(
                "linear_stacked",
                "the stacked tensors differ in their trailing dimensions",
            ));
        }
        shape[0] = rows;
        if let Some(joined) = Tensor::joined(&parts, &shape) {
            return Ok(joined);
        }
        let column = |t: &Tensor| t.reshape(&[1, t.numel(), 1, 1]);
        let mut acc = column(first)?;
        for t in &parts[1..] {
            acc = self.be.concat_channels(&acc, &column(t)?)?;
        }
        acc.reshape(&shape)
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

    /// `softmax(q k^T / sqrt(d)) v` per head over packed `qkv [B, L, 3C]` (rows q | k | v),
    /// giving `[B, L, C]`.
    pub fn attention(&mut self, qkv: Var, heads: usize) -> Result<Var> {
        let o = self.be.attention(self.value(qkv), heads)?;
        self.flops += 4 * (o.out.numel() * self.shape(qkv)[1]) as u64;
        let lse = o.lse;
        Ok(self.output(o.out, &[qkv], || Op::Attention { qkv, heads, lse }))
    }

    /// Inverted dropout with probability `p`: the identity without `with_dropout` (sampling)
    /// or at `p = 0`; the mask's uniforms come from the tape's stream, in call order.
    pub fn dropout(&mut self, x: Var, p: f32) -> Result<Var> {
        let Some((seed, offset)) = self.dropout.filter(|_| p > 0.0) else {
            return Ok(x);
        };
        let shape = self.shape(x).to_vec();
        // This slice's mask is elements rank n .. (rank + 1) n of the whole batch's.
        let n = shape.iter().product::<usize>() as u64;
        let Shard { rank, ranks } = self.shard;
        self.dropout = Some((seed, offset + n * ranks as u64));
        let u = self
            .be
            .rand_uniform(&shape, seed, offset + n * rank as u64)?;
        let y = self.be.dropout(self.value(x), &u, p)?;
        Ok(self.output(y, &[x], || Op::Dropout { x, u, p }))
    }

    /// The rows of the table `w [K, D]` that `labels` name: `[B, D]` (`nn.Embedding`).
    pub fn embedding(&mut self, w: Var, labels: &[u32]) -> Result<Var> {
        let y = self.be.embedding(self.value(w), labels)?;
        let labels = labels.to_vec();
        Ok(self.output(y, &[w], || Op::Embedding { w, labels }))
    }

    /// Backpropagates `seed` (the gradient of the final scalar w.r.t. `out`) through every
    /// recorded op, newest first; every gradient, parameters' included, is a tensor.
    pub fn backward(self, out: Var, seed: Tensor) -> Result<Gradients> {
        self.run_backward(out, seed, &ParamSink::Tensors)
    }

    /// Backpropagates `seed` with the parameters' gradients written as parts into an arena
    /// and gathered into their places of the flat buffer `grads` (`layout`); returns the
    /// squared norm of all of them, `[1]`. `plan` keeps the arena's plan (and its GPU copy)
    /// from step to step: it is replaced only when this pass needs a different one.
    pub fn backward_params(
        self,
        out: Var,
        seed: Tensor,
        layout: &ParamLayout,
        plan: &mut Option<GradPlan>,
        grads: &mut Tensor,
    ) -> Result<Tensor> {
        let (regions, places) = self.plan_parts(layout)?;
        let new = GradPlan::new(regions)?;
        if plan.as_ref() != Some(&new) {
            *plan = Some(new);
        }
        let plan = plan.as_ref().expect("set above");
        let be = self.be;
        let arena = be.zeros(&[plan.arena_len().max(1)])?;
        let sink = ParamSink::Parts {
            arena: &arena,
            places,
        };
        self.run_backward(out, seed, &sink)?;
        be.gather_grads(&arena, plan, grads)
    }

    /// The parts every parameter input of every node writes. Each lone parameter, and each
    /// group of the layout (read whole by `linear_stacked`), is one region of the flat
    /// buffer and of the arena; the parts of several uses of one region lie side by side.
    #[allow(clippy::type_complexity)]
    fn plan_parts(
        &self,
        layout: &ParamLayout,
    ) -> Result<(Vec<GradRegion>, HashMap<(usize, usize), (usize, usize)>)> {
        let be = self.be;
        let lone = layout.shapes.len();
        // Region `i < lone` is parameter i alone, region `lone + g` is group g.
        let region_of = |vars: &[Var]| -> Result<Option<usize>> {
            let params: Vec<Option<usize>> = vars.iter().map(|v| self.param_of[v.0]).collect();
            if params.iter().all(Option::is_none) {
                return Ok(None);
            }
            let params: Option<Vec<usize>> = params.into_iter().collect();
            let region = match params.as_deref() {
                Some(&[i]) if layout.group_of(i).is_none() => Some(i),
                Some(ps) => layout
                    .groups
                    .iter()
                    .position(|g| g.as_slice() == ps)
                    .map(|g| lone + g),
                None => None,
            };
            region.map(Some).ok_or_else(|| {
                Error::invalid(
                    "backward_params",
                    "parameters must be read alone, or as exactly one group of the layout",
                )
            })
        };
        // Per region, its uses: (node, input slot, parts, whether the op takes any number of
        // parts: a group norm's are one per sample).
        let mut uses: Vec<Vec<(usize, usize, usize, bool)>> =
            vec![Vec::new(); lone + layout.groups.len()];
        for (n, node) in self.nodes.iter().enumerate() {
            let cuttable = !matches!(node.op, Op::GroupNorm { .. });
            let inputs: Vec<(Vec<Var>, usize)> = match &node.op {
                Op::Conv2d { x, w, b, p, .. } => {
                    let s = be.conv2d_grad_splits(self.value(*x), self.value(*w), p)?;
                    let mut v = vec![(vec![*w], s)];
                    v.extend(b.map(|b| (vec![b], s)));
                    v
                }
                Op::Linear { x, w, b } => {
                    let (sw, sb) = be.linear_grad_splits(self.value(*x), self.value(*w))?;
                    let mut v = vec![(vec![*w], sw)];
                    v.extend(b.map(|b| (vec![b], sb)));
                    v
                }
                Op::LinearStacked { x, ws, bs } => {
                    let (sw, sb) = be.linear_grad_splits(self.value(*x), &self.stacked(ws)?)?;
                    vec![(ws.clone(), sw), (bs.clone(), sb)]
                }
                Op::GroupNorm {
                    x, gamma, beta, p, ..
                } => {
                    let s = be.group_norm_grad_splits(self.value(*x), self.value(*gamma), p)?;
                    vec![(vec![*gamma], s), (vec![*beta], s)]
                }
                Op::Embedding { w, .. } => vec![(vec![*w], 1)],
                op => {
                    if op.vars().iter().any(|v| self.param_of[v.0].is_some()) {
                        return Err(Error::invalid(
                            "backward_params",
                            "a parameter is read by an op that has no parameter gradient",
                        ));
                    }
                    continue;
                }
            };
            for (slot, (vars, s)) in inputs.into_iter().enumerate() {
                if let Some(r) = region_of(&vars)? {
                    uses[r].push((n, slot, s, cuttable));
                }
            }
        }
        // Each region's place in the flat buffer; a parameter inside a group has none.
        let spans: Vec<Option<(usize, usize)>> = (0..uses.len())
            .map(|r| match r.checked_sub(lone) {
                Some(g) => Some(layout.span(&layout.groups[g])),
                None => layout
                    .group_of(r)
                    .is_none()
                    .then(|| (layout.offsets[r], layout.numel(r))),
            })
            .collect();
        // The arena is one tensor: where the parts the ops ask for would not fit it, each use
        // that can gets fewer.
        let (mut cut, mut fixed) = (Vec::new(), 0);
        for (u, span) in uses.iter().zip(&spans) {
            let Some((_, len)) = *span else { continue };
            for &(_, _, s, cuttable) in u {
                if cuttable {
                    cut.push((s, len));
                } else {
                    fixed += s * len;
                }
            }
        }
        let budget = be.max_tensor_len();
        let d = splits_divisor(&cut, fixed, budget).ok_or_else(|| Error::OutOfMemory {
            op: "backward_params",
            bytes: 4 * (fixed + cut.iter().map(|c| c.1).sum::<usize>()) as u64,
            limit: Some(4 * budget as u64),
            msg: "the parameter gradients do not fit one buffer of this device".into(),
        })?;
        let mut regions = Vec::with_capacity(uses.len());
        let mut places = HashMap::new();
        let mut arena = 0;
        for (uses, span) in uses.iter().zip(spans) {
            let Some((flat, len)) = span else { continue };
            let start = arena;
            let mut splits = 0;
            for &(n, slot, s, cuttable) in uses {
                let s = if cuttable { s.div_ceil(d) } else { s };
                places.insert((n, slot), (arena, s));
                arena += s * len;
                splits += s;
            }
            regions.push(GradRegion {
                flat,
                len,
                arena: start,
                splits,
            });
        }
        Ok((regions, places))
    }

    fn run_backward(mut self, out: Var, seed: Tensor, sink: &ParamSink) -> Result<Gradients> {
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
        // The earliest node whose backward reads each value: once it has run, the value goes.
        let mut first_reader = vec![usize::MAX; self.values.len()];
        for (n, node) in self.nodes.iter().enumerate() {
            for v in node.op.vars().into_iter().chain([node.out]) {
                first_reader[v.0] = first_reader[v.0].min(n);
            }
        }
        let mut g = Gradients {
            grads: vec![None; self.values.len()],
        };
        g.grads[out.0] = Some(seed);
        let nodes = std::mem::take(&mut self.nodes);
        for (n, node) in nodes.into_iter().enumerate().rev() {
            if let Some(dy) = g.grads[node.out.0].take() {
                self.backward_node(n, &node, &dy, &mut g, sink)?;
                if node.out == out {
                    g.grads[out.0] = Some(dy);
                }
            }
            for v in node.op.vars().into_iter().chain([node.out]) {
                if first_reader[v.0] == n {
                    self.values[v.0] = None;
                }
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

    /// The parameter-gradient parts node `n` writes for its input slots: `(variables read
    /// stacked, gradient length, parts)` each. A slot the plan placed writes into the plan's
    /// arena; any other into a fresh arena, whose sums [`Self::finish`] adds to the
    /// variables' gradients (the reference path of `backward`, and weights that are not
    /// parameters).
    fn targets<'a>(
        &self,
        sink: &'a ParamSink,
        n: usize,
        slots: Vec<(Vec<Var>, usize, usize)>,
    ) -> Result<Targets<'a>> {
        let (plan_arena, places) = match sink {
            ParamSink::Parts { arena, places } => (Some(*arena), Some(places)),
            ParamSink::Tensors => (None, None),
        };
        let mut fresh_len = 0;
        let mut out = Vec::with_capacity(slots.len());
        for (i, (vars, len, splits)) in slots.into_iter().enumerate() {
            match places.and_then(|p| p.get(&(n, i))) {
                Some(&(offset, splits)) => out.push(Slot {
                    planned: true,
                    offset,
                    splits,
                    len,
                    vars,
                }),
                None => {
                    out.push(Slot {
                        planned: false,
                        offset: fresh_len,
                        splits,
                        len,
                        vars,
                    });
                    fresh_len += splits * len;
                }
            }
        }
        let fresh = if fresh_len > 0 {
            Some(self.be.zeros(&[fresh_len])?)
        } else {
            None
        };
        Ok(Targets {
            plan_arena,
            fresh,
            slots: out,
        })
    }

    /// Adds the sums of the fresh arena's parts to the gradients of their variables.
    fn finish(&self, t: &Targets, g: &mut Gradients) -> Result<()> {
        for (i, slot) in t.slots.iter().enumerate() {
            if slot.planned || !slot.vars.iter().any(|v| self.needs_grad[v.0]) {
                continue;
            }
            let sum = self.be.reduce_partials(&t.part(i), slot.len)?;
            for (v, grad) in slot.vars.iter().zip(self.unstacked(&slot.vars, &sum)?) {
                self.accumulate(g, *v, grad)?;
            }
        }
        Ok(())
    }

    /// The gradient `x` has received so far, taken out to be added by the op that produces
    /// the next contribution (`None` when no gradient flows into `x`).
    fn take_acc(&self, g: &mut Gradients, x: Var) -> Option<Tensor> {
        if self.needs_grad[x.0] {
            g.grads[x.0].take()
        } else {
            None
        }
    }

    /// `t`, the values of `vars` stacked, cut back into one tensor per variable.
    fn unstacked(&self, vars: &[Var], t: &Tensor) -> Result<Vec<Tensor>> {
        if let [v] = vars {
            return Ok(vec![t.reshape(self.shape(*v))?]);
        }
        let mut rest = t.reshape(&[1, t.numel(), 1, 1])?;
        let mut out = Vec::with_capacity(vars.len());
        for (i, v) in vars.iter().enumerate() {
            let shape = self.shape(*v).to_vec();
            if i + 1 == vars.len() {
                out.push(rest.reshape(&shape)?);
                break;
            }
            let (part, tail) = self.be.split_channels(&rest, shape.iter().product())?;
            out.push(part.reshape(&shape)?);
            rest = tail;
        }
        Ok(out)
    }

    fn backward_node(
        &self,
        n: usize,
        node: &Node,
        dy: &Tensor,
        g: &mut Gradients,
        sink: &ParamSink,
    ) -> Result<()> {
        let be = self.be;
        let y = self.value(node.out);
        match &node.op {
            Op::Conv2d {
                x,
                w,
                b,
                p,
                add,
                residual,
            } => {
                if let Some(r) = residual {
                    self.accumulate(g, *r, dy.clone())?;
                }
                if let Some(a) = add.filter(|a| self.needs_grad[a.0]) {
                    let da = be.add_per_channel_backward(dy)?;
                    self.accumulate(g, a, da)?;
                }
                let (xv, wv) = (self.value(*x), self.value(*w));
                let s = be.conv2d_grad_splits(xv, wv, p)?;
                let mut slots = vec![(vec![*w], wv.numel(), s)];
                slots.extend(b.map(|b| (vec![b], wv.shape()[0], s)));
                let t = self.targets(sink, n, slots)?;
                let need_dx = self.needs_grad[x.0];
                let dx = be.conv2d_backward_into(
                    xv,
                    wv,
                    dy,
                    p,
                    need_dx,
                    &t.part(0),
                    t.part_opt(1).as_ref(),
                )?;
                if let Some(dx) = dx {
                    self.accumulate(g, *x, dx)?;
                }
                self.finish(&t, g)?;
            }
            Op::Linear { x, w, b } => {
                let (xv, wv) = (self.value(*x), self.value(*w));
                let (sw, sb) = be.linear_grad_splits(xv, wv)?;
                let mut slots = vec![(vec![*w], wv.numel(), sw)];
                slots.extend(b.map(|b| (vec![b], wv.shape()[0], sb)));
                let t = self.targets(sink, n, slots)?;
                let (need_dx, acc) = (self.needs_grad[x.0], self.take_acc(g, *x));
                let dx = be.linear_backward_into(
                    xv,
                    wv,
                    dy,
                    need_dx,
                    acc.as_ref(),
                    &t.part(0),
                    t.part_opt(1).as_ref(),
                )?;
                g.grads[x.0] = dx;
                self.finish(&t, g)?;
            }
            Op::LinearStacked { x, ws, bs } => {
                let (xv, w) = (self.value(*x), self.stacked(ws)?);
                let (sw, sb) = be.linear_grad_splits(xv, &w)?;
                let slots = vec![(ws.clone(), w.numel(), sw), (bs.clone(), w.shape()[0], sb)];
                let t = self.targets(sink, n, slots)?;
                let (need_dx, acc) = (self.needs_grad[x.0], self.take_acc(g, *x));
                let dx = be.linear_backward_into(
                    xv,
                    &w,
                    dy,
                    need_dx,
                    acc.as_ref(),
                    &t.part(0),
                    t.part_opt(1).as_ref(),
                )?;
                g.grads[x.0] = dx;
                self.finish(&t, g)?;
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
                let (xv, gv, bv) = (self.value(*x), self.value(*gamma), self.value(*beta));
                let (s, c) = (be.group_norm_grad_splits(xv, gv, p)?, gv.numel());
                let t = self.targets(sink, n, vec![(vec![*gamma], c, s), (vec![*beta], c, s)])?;
                let (need_dx, acc) = (self.needs_grad[x.0], self.take_acc(g, *x));
                let (dgamma, dbeta) = (t.part(0), t.part(1));
                g.grads[x.0] = be.group_norm_backward_into(
                    xv,
                    gv,
                    bv,
                    &saved,
                    dy,
                    p,
                    need_dx,
                    acc.as_ref(),
                    &dgamma,
                    &dbeta,
                )?;
                self.finish(&t, g)?;
            }
            Op::Silu { x } => {
                let dx = be.silu_backward(self.value(*x), dy)?;
                self.accumulate(g, *x, dx)?;
            }
            Op::Add { a, b } => {
                self.accumulate(g, *a, dy.clone())?;
                self.accumulate(g, *b, dy.clone())?;
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
            Op::Attention { qkv, heads, lse } => {
                let saved = AttentionOutput {
                    out: y.clone(),
                    lse: lse.clone(),
                };
                let d_qkv = be.attention_backward(self.value(*qkv), &saved, dy, *heads)?;
                self.accumulate(g, *qkv, d_qkv)?;
            }
            Op::Dropout { x, u, p } => {
                let dx = be.dropout(dy, u, *p)?;
                self.accumulate(g, *x, dx)?;
            }
            Op::Embedding { w, labels } => {
                let wv = self.value(*w);
                let t = self.targets(sink, n, vec![(vec![*w], wv.numel(), 1)])?;
                be.embedding_backward_into(labels, dy, wv.shape()[0], &t.part(0))?;
                self.finish(&t, g)?;
            }
        }
        Ok(())
    }
}
