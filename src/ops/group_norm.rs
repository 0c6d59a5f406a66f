//! Group normalization (Wu & He 2018), exactly as `torch.nn.GroupNorm`, optionally fused
//! with the SiLU that follows it in every resnet (`GroupNormParams::silu`).
//!
//! `x [B, C, ...spatial]` with `C = G * Cg`; one group of sample `b` is the `n = Cg * S`
//! values of channels `g Cg .. (g+1) Cg` (contiguous in memory, S = product of the spatial
//! dims). Per (b, g):
//!
//!   mean = (1/n) sum x,   var = (1/n) sum (x - mean)^2   (biased),   rstd = 1 / sqrt(var + eps)
//!   xhat = (x - mean) * rstd,   z = xhat * gamma_c + beta_c,   y = z  (or silu(z) fused)
//!
//! Backward, with `dz = dy` (or `dy * silu'(z)`, z recomputed from x and the statistics),
//! `u = dz * gamma_c` and means over the group:
//!
//!   dx = rstd * (u - mean(u) - xhat * mean(u * xhat))
//!   dgamma_c = sum_{b, spatial} dz * xhat,   dbeta_c = sum_{b, spatial} dz
//!
//! The fusion saves a pass over the activations each way and keeps z out of memory: the
//! backward recomputes it. The backward can also add the gradient x already has from its
//! other readers (`acc`) as it writes dx, instead of a separate sum.
//!
//! dgamma and dbeta are written as partial sums into a step's arena (`ops/grads.rs`): one part
//! per sample on the GPU, the whole sum on the CPU.
//!
//! The variance is computed in two passes over shifted data: `K` = the group's first value,
//! `m = mean(x - K)`, `var = mean(((x - K) - m)^2)`, `mean = K + m`. Subtracting `K` first keeps
//! the sums small when the group's mean is large against its spread (e.g. 1e3 + noise), where
//! the one-pass `E[x^2] - E[x]^2` loses every digit.

use bytemuck::{Pod, Zeroable};

use super::expf::sigmoid;
use super::grads::Partials;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNormParams {
    pub groups: usize,
    pub eps: f32,
    /// Apply SiLU to the normalized output (`y = silu(z)`).
    pub silu: bool,
}

impl GroupNormParams {
    /// A plain group norm of `groups` groups.
    pub fn new(groups: usize, eps: f32) -> Self {
        GroupNormParams {
            groups,
            eps,
            silu: false,
        }
    }

    /// The same group norm followed by SiLU, in one op.
    pub fn with_silu(self) -> Self {
        GroupNormParams { silu: true, ..self }
    }
}

/// `silu(z)` and `dy * silu'(z)`, in f32 as the elementwise ops compute them: the fused op
/// equals group norm then `silu`.
#[inline(always)]
fn silu(z: f32) -> f32 {
    z * sigmoid(z)
}

#[inline(always)]
fn silu_backward(z: f32, dy: f32) -> f32 {
    let s = sigmoid(z);
    dy * s * (1.0 + z * (1.0 - s))
}

/// The output and what the backward needs: per-(sample, group) mean and 1/std, `[B, G]`.
pub struct GroupNormOutput {
    pub y: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

pub struct GroupNormGrads {
    pub dx: Tensor,
    pub dgamma: Tensor,
    pub dbeta: Tensor,
}

/// Sizes of one group norm: batch, channels, groups, spatial size.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    channels: usize,
    groups: usize,
    spatial: usize,
}

impl Dims {
    fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// Elements per (sample, group).
    fn group_len(&self) -> usize {
        self.channels_per_group() * self.spatial
    }
}

/// Checks `x [B, C, ...]` (rank >= 2), `gamma`/`beta [C]`, `groups` dividing `C`.
fn check_forward(
    op: &'static str,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    p: &GroupNormParams,
) -> Result<Dims> {
    let s = x.shape();
    if s.len() < 2 {
        return Err(Error::shape(op, "x of shape [B, C, ...] (rank >= 2)", s));
    }
    let (batch, channels) = (s[0], s[1]);
    if p.groups == 0 || channels % p.groups != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "{} groups do not divide {channels} channels; pick a group count that divides \
                 the channel count",
                p.groups
            ),
        ));
    }
    for (name, t) in [("gamma", Some(gamma)), ("beta", beta)] {
        if let Some(t) = t {
            if t.shape() != [channels] {
                return Err(Error::shape(
                    op,
                    format!("{name} of shape [{channels}]"),
                    t.shape(),
                ));
            }
        }
    }
    Ok(Dims {
        batch,
        channels,
        groups: p.groups,
        spatial: s[2..].iter().product(),
    })
}

/// The forward's checks plus `mean`/`rstd [B, G]` and `dy` shaped like `x`.
fn check_backward(
    op: &'static str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    saved: &GroupNormOutput,
    dy: &Tensor,
    p: &GroupNormParams,
) -> Result<Dims> {
    let d = check_forward(op, x, gamma, Some(beta), p)?;
    for (name, t) in [("mean", &saved.mean), ("rstd", &saved.rstd)] {
        if t.shape() != [d.batch, d.groups] {
            return Err(Error::shape(
                op,
                format!("saved {name} of shape [{}, {}]", d.batch, d.groups),
                t.shape(),
            ));
        }
    }
    if dy.shape() != x.shape() {
        return Err(Error::shape(
            op,
            format!("dy of shape {:?}", x.shape()),
            dy.shape(),
        ));
    }
    Ok(d)
}

/// The accumulated gradient has x's shape and comes only with dx.
fn check_acc(op: &'static str, x: &Tensor, acc: Option<&Tensor>, need_dx: bool) -> Result<()> {
    match acc {
        Some(_) if !need_dx => Err(Error::invalid(op, "an accumulated gradient without dx")),
        Some(a) if a.shape() != x.shape() => Err(Error::shape(
            op,
            format!("an accumulated gradient of shape {:?}", x.shape()),
            a.shape(),
        )),
        _ => Ok(()),
    }
}

/// The parts of dgamma and dbeta fit their arena, as many of each.
fn check_partials(op: &'static str, d: &Dims, dgamma: &Partials, dbeta: &Partials) -> Result<()> {
    dgamma.check(op, d.channels)?;
    dbeta.check(op, d.channels)?;
    if dgamma.splits != dbeta.splits {
        return Err(Error::invalid(
            op,
            "dgamma and dbeta must have as many parts",
        ));
    }
    Ok(())
}

pub(crate) mod cpu {
    use std::mem::MaybeUninit;

    use rayon::prelude::*;

    use super::*;
    use crate::ops::simd::{simd, Kernel};

    /// The `K` sums `sum_i f(x_i, y_i)[k]` in f64, each as eight interleaved partial sums so
    /// that the loop vectorises (a single running f64 sum cannot be reordered).
    #[inline(always)]
    fn sums_f64<const K: usize>(
        xs: &[f32],
        ys: &[f32],
        f: impl Fn(f64, f64) -> [f64; K],
    ) -> [f64; K] {
        const L: usize = 8;
        let mut acc = [[0.0f64; K]; L];
        let (xc, yc) = (xs.chunks_exact(L), ys.chunks_exact(L));
        let mut tail = [0.0f64; K];
        for (&x, &y) in xc.remainder().iter().zip(yc.remainder()) {
            tail.iter_mut()
                .zip(f(x as f64, y as f64))
                .for_each(|(t, v)| *t += v);
        }
        for (x, y) in xc.zip(yc) {
            for l in 0..L {
                let v = f(x[l] as f64, y[l] as f64);
                acc[l].iter_mut().zip(v).for_each(|(a, v)| *a += v);
            }
        }
        std::array::from_fn(|k| acc.iter().map(|a| a[k]).sum::<f64>() + tail[k])
    }

    /// `sum f(x_i, y_i)` in f64, by [`sums_f64`].
    #[inline(always)]
    fn sum_f64(xs: &[f32], ys: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
        let [total] = sums_f64(xs, ys, |x, y| [f(x, y)]);
        total
    }

    /// Mean and 1/std of one group, in f64 over data shifted by its first value, in one pass:
    /// `var = E[(x - shift)^2] - E[x - shift]^2`. The shift keeps both terms near the spread
    /// even where the mean is large against it: the difference in f64 loses nothing an f32
    /// result keeps unless the first value lies thousands of spreads from the mean.
    #[inline(always)]
    fn statistics(xg: &[f32], eps: f32) -> (f64, f64) {
        let n = xg.len() as f64;
        let shift = xg.first().copied().unwrap_or(0.0) as f64;
        let [sum, sum_sq] = sums_f64(xg, xg, |v, _| [v - shift, (v - shift) * (v - shift)]);
        let m = sum / n;
        let var = (sum_sq / n - m * m).max(0.0);
        (shift + m, 1.0 / (var + eps as f64).sqrt())
    }

    /// A group's mean as two f32s, so that `x - mean` is computed in f32 to about an ulp of
    /// the difference even where the mean is large against the spread (the first
    /// subtraction is exact for `x` near the mean).
    #[derive(Clone, Copy)]
    struct Mean {
        hi: f32,
        lo: f32,
    }

    impl Mean {
        fn new(mu: f64) -> Mean {
            let hi = mu as f32;
            Mean {
                hi,
                lo: (mu - hi as f64) as f32,
            }
        }

        #[inline(always)]
        fn centre(self, x: f32) -> f32 {
            (x - self.hi) - self.lo
        }
    }

    /// One (sample, group) of the forward pass: its statistics, then
    /// `y = act((x - mean) * rstd * gamma_c + beta_c)` channel by channel, every element of
    /// `yg` written.
    struct ForwardGroup<'a> {
        xg: &'a [f32],
        yg: &'a mut [MaybeUninit<f32>],
        /// The group's channels' scales and shifts.
        gamma: &'a [f32],
        beta: &'a [f32],
        spatial: usize,
        eps: f32,
        silu: bool,
    }

    impl Kernel for ForwardGroup<'_> {
        /// The group's mean and 1/std.
        type Output = (f32, f32);
        const AVX512: bool = true;

        #[inline(always)]
        fn run(self) -> (f32, f32) {
            let (mu, r) = statistics(self.xg, self.eps);
            let m = Mean::new(mu);
            let channels = (self.yg.chunks_mut(self.spatial))
                .zip(self.xg.chunks(self.spatial))
                .zip(self.gamma.iter().zip(self.beta));
            for ((yc, xc), (&g, &b)) in channels {
                // z = (x - mean) rstd gamma_c + beta_c, rstd gamma_c in f64.
                let a = (r * g as f64) as f32;
                let z = xc.iter().map(|&v| m.centre(v) * a + b);
                if self.silu {
                    yc.iter_mut().zip(z).for_each(|(o, z)| {
                        o.write(silu(z));
                    });
                } else {
                    yc.iter_mut().zip(z).for_each(|(o, z)| {
                        o.write(z);
                    });
                }
            }
            (mu as f32, r as f32)
        }
    }

    /// `y = act((x - mean) * rstd * gamma_c + beta_c)`, one task per (sample, group).
    pub fn forward(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        p: &GroupNormParams,
    ) -> Result<GroupNormOutput> {
        const OP: &str = "group_norm";
        let d = check_forward(OP, x, gamma, Some(beta), p)?;
        let (xs, gs, bs) = (x.cpu_read(OP)?, gamma.cpu_read(OP)?, beta.cpu_read(OP)?);
        let rows = d.batch * d.groups;
        let (len, cg, s) = (d.group_len(), d.channels_per_group(), d.spatial);
        // Not zero-filled: each (sample, group) writes all of its elements.
        let mut y: Vec<f32> = Vec::with_capacity(xs.len());
        let mut mean = vec![0.0; rows];
        let mut rstd = vec![0.0; rows];
        if len > 0 {
            y.spare_capacity_mut()[..xs.len()]
                .par_chunks_mut(len)
                .zip(xs.par_chunks(len))
                .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
                .enumerate()
                .for_each(|(bg, ((yg, xg), (mean_bg, rstd_bg)))| {
                    let c0 = (bg % d.groups) * cg;
                    (*mean_bg, *rstd_bg) = simd(ForwardGroup {
                        xg,
                        yg,
                        gamma: &gs[c0..c0 + cg],
                        beta: &bs[c0..c0 + cg],
                        spatial: s,
                        eps: p.eps,
                        silu: p.silu,
                    });
                });
        } else {
            // Empty groups have no statistics (0 / 0, as on the GPU).
            mean.fill(f32::NAN);
            rstd.fill(f32::NAN);
        }
        // SAFETY: with `len > 0` the groups cover `0..xs.len()` and each wrote every element
        // of its chunk; with `len == 0`, `xs` is empty.
        unsafe { y.set_len(xs.len()) };
        let shape = [d.batch, d.groups];
        Ok(GroupNormOutput {
            y: Tensor::from_cpu(x.shape(), y),
            mean: Tensor::from_cpu(&shape, mean),
            rstd: Tensor::from_cpu(&shape, rstd),
        })
    }

    /// dx per (sample, group); the per-(sample, channel) sums of `dy * xhat` and `dy` on the
    /// way, then summed over the batch for dgamma and dbeta. All sums in f64.
    /// The CPU computes dgamma and dbeta whole: one part each.
    pub fn grad_splits(x: &Tensor, gamma: &Tensor, p: &GroupNormParams) -> Result<usize> {
        check_forward("group_norm_backward", x, gamma, None, p)?;
        Ok(1)
    }

    /// Writes `value` as the first part of `dst` and zeros as the others.
    fn write_parts(dst: &Partials, value: &[f32]) -> Result<()> {
        let mut arena = dst.arena.clone();
        let mut a = arena.cpu_write("group_norm_backward")?;
        let n = value.len();
        a[dst.offset..dst.offset + n].copy_from_slice(value);
        a[dst.offset + n..dst.offset + dst.splits * n].fill(0.0);
        Ok(())
    }

    /// One (sample, group) of the backward pass: `dz = dy act'(z)`, each channel's
    /// `(sum dz xhat, sum dz)` into `part`, then
    /// `dx = rstd (dz gamma_c - mean_u - xhat mean_u_xhat) (+ acc)` with `u = dz gamma`.
    struct BackwardGroup<'a> {
        xg: &'a [f32],
        dyg: &'a [f32],
        dxg: &'a mut [f32],
        acc: Option<&'a [f32]>,
        part: &'a mut [(f64, f64)],
        gamma: &'a [f32],
        beta: &'a [f32],
        mean: f64,
        rstd: f64,
        spatial: usize,
        silu: bool,
    }

    impl Kernel for BackwardGroup<'_> {
        type Output = ();
        const AVX512: bool = true;

        #[inline(always)]
        fn run(self) {
            let (mu, r, s) = (self.mean, self.rstd, self.spatial);
            let m = Mean::new(mu);
            let (mut sum_u, mut sum_u_xhat) = (0.0f64, 0.0f64);
            // dz = dy * act'(z) goes into dx's place first: the second pass reads it from there.
            let channels = (self.xg.chunks(s).zip(self.dyg.chunks(s)))
                .zip(self.dxg.chunks_mut(s))
                .zip(self.gamma.iter().zip(self.beta))
                .zip(self.part.iter_mut());
            for ((((xc, dc), dzc), (&g, &b)), part) in channels {
                if self.silu {
                    let a = (r * g as f64) as f32;
                    for ((o, &v), &dy) in dzc.iter_mut().zip(xc).zip(dc) {
                        *o = silu_backward(m.centre(v) * a + b, dy);
                    }
                } else {
                    dzc.copy_from_slice(dc);
                }
                // sum dz xhat = rstd sum dz (x - mean)
                let dg = r * sum_f64(dzc, xc, |dz, v| dz * (v - mu));
                let db = sum_f64(dzc, dzc, |dz, _| dz);
                sum_u += g as f64 * db;
                sum_u_xhat += g as f64 * dg;
                *part = (dg, db);
            }
            let len = self.xg.len() as f64;
            let (mean_u, mean_u_xhat) = (sum_u / len, sum_u_xhat / len);
            let (shift, slope) = ((r * mean_u) as f32, (r * r * mean_u_xhat) as f32);
            let channels = (self.dxg.chunks_mut(s).zip(self.xg.chunks(s))).zip(self.gamma);
            for (j, ((dxc, xc), &g)) in channels.enumerate() {
                let a = (r * g as f64) as f32;
                for (o, &v) in dxc.iter_mut().zip(xc) {
                    *o = *o * a - m.centre(v) * slope - shift;
                }
                if let Some(acc) = self.acc {
                    let acc_c = &acc[j * s..][..s];
                    dxc.iter_mut().zip(acc_c).for_each(|(o, a)| *o += a);
                }
            }
        }
    }

    /// dx when `need_dx`; dgamma and dbeta into their parts.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        saved: &GroupNormOutput,
        dy: &Tensor,
        p: &GroupNormParams,
        need_dx: bool,
        acc: Option<&Tensor>,
        dgamma_out: &Partials,
        dbeta_out: &Partials,
    ) -> Result<Option<Tensor>> {
        const OP: &str = "group_norm_backward";
        let d = check_backward(OP, x, gamma, beta, saved, dy, p)?;
        check_acc(OP, x, acc, need_dx)?;
        check_partials(OP, &d, dgamma_out, dbeta_out)?;
        let (xs, gs, ds) = (x.cpu_read(OP)?, gamma.cpu_read(OP)?, dy.cpu_read(OP)?);
        let acc = acc.map(|a| a.cpu_read(OP)).transpose()?;
        let bs = beta.cpu_read(OP)?;
        let (mean, rstd) = (saved.mean.cpu_read(OP)?, saved.rstd.cpu_read(OP)?);
        let (len, cg, s) = (d.group_len(), d.channels_per_group(), d.spatial);
        let mut dx = vec![0.0; xs.len()];
        // Per (sample, channel): (sum dz * xhat, sum dz).
        let mut partials = vec![(0.0f64, 0.0f64); d.batch * d.channels];
        if len > 0 {
            dx.par_chunks_mut(len)
                .zip(xs.par_chunks(len).zip(ds.par_chunks(len)))
                .zip(partials.par_chunks_mut(cg))
                .enumerate()
                .for_each(|(bg, ((dxg, (xg, dyg)), part))| {
                    let c0 = (bg % d.groups) * cg;
                    simd(BackwardGroup {
                        xg,
                        dyg,
                        dxg,
                        acc: acc.as_ref().map(|a| &a[bg * len..][..len]),
                        part,
                        gamma: &gs[c0..c0 + cg],
                        beta: &bs[c0..c0 + cg],
                        mean: mean[bg] as f64,
                        rstd: rstd[bg] as f64,
                        spatial: s,
                        silu: p.silu,
                    })
                });
        }
        let mut dgamma = vec![0.0f32; d.channels];
        let mut dbeta = vec![0.0f32; d.channels];
        for c in 0..d.channels {
            let (dg, db) = (0..d.batch).fold((0.0, 0.0), |(a, b), n| {
                let (pg, pb) = partials[n * d.channels + c];
                (a + pg, b + pb)
            });
            dgamma[c] = dg as f32;
            dbeta[c] = db as f32;
        }
        write_parts(dgamma_out, &dgamma)?;
        write_parts(dbeta_out, &dbeta)?;
        Ok(need_dx.then(|| Tensor::from_cpu(x.shape(), dx)))
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    batch: u32,
    channels: u32,
    groups: u32,
    spatial: u32,
    eps: f32,
    /// Where the parts of dgamma and of dbeta start in the arena.
    gamma_offset: u32,
    beta_offset: u32,
    /// 1: SiLU after the normalization.
    silu: u32,
    /// 1: dx adds the accumulated gradient.
    has_acc: u32,
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{grid, Access, Arg, Gpu, Kernel};
    use crate::ops::{layout, ELEMENTWISE_CONSTANTS};

    const SOURCE: &str = include_str!("../../shaders/group_norm.wgsl");

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "group_norm",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: ELEMENTWISE_CONSTANTS,
        }
    }

    const FORWARD: Kernel = kernel("group_norm_forward", &[R, R, W, W, W]);
    const BACKWARD: Kernel = kernel("group_norm_backward", &[R, R, R, R, R, R, W, W]);
    pub(crate) const KERNELS: &[Kernel] = &[FORWARD, BACKWARD];

    /// One part of dgamma and of dbeta per sample.
    pub fn grad_splits(x: &Tensor, gamma: &Tensor, p: &GroupNormParams) -> Result<usize> {
        let d = check_forward("group_norm_backward", x, gamma, None, p)?;
        Ok(d.batch.max(1))
    }

    fn params(d: &Dims, p: &GroupNormParams) -> Params {
        Params {
            batch: d.batch as u32,
            channels: d.channels as u32,
            groups: d.groups as u32,
            spatial: d.spatial as u32,
            eps: p.eps,
            gamma_offset: 0,
            beta_offset: 0,
            silu: p.silu as u32,
            has_acc: 0,
        }
    }

    /// `[gamma | beta]` as one tensor: a view where they lie side by side (a model's flat
    /// parameters place them so), else a copy.
    fn affine(g: &Gpu, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
        let c = gamma.numel();
        match Tensor::joined(&[gamma, beta], &[2 * c]) {
            Some(joined) => Ok(joined),
            None => {
                let column = |t: &Tensor| t.reshape(&[1, c, 1, 1]);
                layout::gpu::concat_channels(g, &column(gamma)?, &column(beta)?)
            }
        }
    }

    /// One workgroup per (sample, group): statistics by two tree sums, then `y`.
    pub fn forward(
        g: &Gpu,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        p: &GroupNormParams,
    ) -> Result<GroupNormOutput> {
        const OP: &str = "group_norm";
        let d = check_forward(OP, x, gamma, Some(beta), p)?;
        let rows = d.batch * d.groups;
        let y = g.alloc(OP, x.numel())?;
        let mean = g.alloc(OP, rows)?;
        let rstd = g.alloc(OP, rows)?;
        g.dispatch(
            &FORWARD,
            &params(&d, p),
            &[
                Arg::read(x.gpu_buffer(OP)?),
                Arg::read(affine(g, gamma, beta)?.gpu_buffer(OP)?),
                Arg::write(&y),
                Arg::write(&mean),
                Arg::write(&rstd),
            ],
            grid(rows as u32),
        )?;
        let shape = [d.batch, d.groups];
        Ok(GroupNormOutput {
            y: Tensor::from_gpu(x.shape(), y),
            mean: Tensor::from_gpu(&shape, mean),
            rstd: Tensor::from_gpu(&shape, rstd),
        })
    }

    /// One workgroup per (sample, group): the per-(sample, channel) sums of dgamma and dbeta
    /// as their parts, then dx from them, plus `acc` when given (written even when `need_dx`
    /// is false, then dropped).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into(
        g: &Gpu,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        saved: &GroupNormOutput,
        dy: &Tensor,
        p: &GroupNormParams,
        need_dx: bool,
        acc: Option<&Tensor>,
        dgamma_out: &Partials,
        dbeta_out: &Partials,
    ) -> Result<Option<Tensor>> {
        const OP: &str = "group_norm_backward";
        let d = check_backward(OP, x, gamma, beta, saved, dy, p)?;
        check_acc(OP, x, acc, need_dx)?;
        check_partials(OP, &d, dgamma_out, dbeta_out)?;
        if dgamma_out.splits != d.batch.max(1) || !dgamma_out.arena.shares_storage(dbeta_out.arena)
        {
            return Err(Error::invalid(
                OP,
                "dgamma and dbeta need one part per sample, in one arena",
            ));
        }
        let mut u = params(&d, p);
        let end = dbeta_out.offset.max(dgamma_out.offset) + d.batch * d.channels;
        u32::try_from(end).map_err(|_| Error::invalid(OP, "the arena exceeds 2^32 elements"))?;
        u.gamma_offset = dgamma_out.offset as u32;
        u.beta_offset = dbeta_out.offset as u32;
        u.has_acc = acc.is_some() as u32;
        let affine = affine(g, gamma, beta)?;
        let xb = x.gpu_buffer(OP)?;
        let dx = g.alloc(OP, x.numel())?;
        let rows = d.batch * d.groups;
        if rows > 0 {
            g.dispatch(
                &BACKWARD,
                &u,
                &[
                    Arg::read(xb),
                    Arg::read(affine.gpu_buffer(OP)?),
                    Arg::read(saved.mean.gpu_buffer(OP)?),
                    Arg::read(saved.rstd.gpu_buffer(OP)?),
                    Arg::read(dy.gpu_buffer(OP)?),
                    Arg::read(acc.map(|a| a.gpu_buffer(OP)).transpose()?.unwrap_or(xb)),
                    Arg::write(&dx),
                    Arg::write(dgamma_out.arena.gpu_buffer(OP)?),
                ],
                grid(rows as u32),
            )?;
        }
        Ok(need_dx.then(|| Tensor::from_gpu(x.shape(), dx)))
    }
}
