//! Parameter gradients assembled from partial sums.
//!
//! A backward op that produces a parameter's gradient (a convolution's or linear layer's
//! weights and bias, a group norm's scale and shift) reduces over many terms: output pixels,
//! rows, samples. On the GPU it splits that reduction into `S` parts that run in parallel and
//! writes each part's sum to a step's *arena*: for a gradient of `n` values, part `s` goes to
//! `arena[offset + s n .. offset + (s + 1) n]`. The gradient is their sum:
//!
//! ```text
//! g_i = sum_{s < S} arena[offset + s n + i]                                        (1)
//! ```
//!
//! `reduce_partials` computes (1) for one gradient. `gather_grads` computes it for every
//! parameter of a model in one pass, into the flat gradient buffer at each parameter's place,
//! and returns `sum_i g_i^2` over all of them (the squared global norm that clipping needs) —
//! one dispatch and a short reduction instead of a summing pass and a norm per parameter.
//! A parameter used by several ops has the parts of every use side by side in the arena, so
//! (1) adds them all. The CPU backend computes each gradient whole: `S = 1`.

use std::sync::OnceLock;

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Where a backward op writes the `splits` partial sums of one gradient of `n` values:
/// part `s` at `arena[offset + s n ..]`.
#[derive(Clone, Copy)]
pub struct Partials<'a> {
    pub arena: &'a Tensor,
    pub offset: usize,
    pub splits: usize,
}

impl Partials<'_> {
    /// Checks that the parts of a gradient of `n` values fit the arena.
    pub(crate) fn check(&self, op: &'static str, n: usize) -> Result<()> {
        if self.splits == 0 || self.offset + self.splits * n > self.arena.numel() {
            return Err(Error::invalid(
                op,
                format!(
                    "{} partial sums of {n} values at {} do not fit an arena of {}",
                    self.splits,
                    self.offset,
                    self.arena.numel()
                ),
            ));
        }
        Ok(())
    }
}

/// One parameter's gradient: `len` values at `flat` in the flat gradient buffer, assembled
/// from `splits` parts at `arena` in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradRegion {
    pub flat: usize,
    pub len: usize,
    pub arena: usize,
    pub splits: usize,
}

/// The regions of every parameter gradient of a step: the same from step to step for one
/// model and batch size, so a trainer keeps it (and the GPU's copy of it) across steps.
pub struct GradPlan {
    regions: Vec<GradRegion>,
    arena_len: usize,
    /// The work list of `gather_grads` on the GPU, uploaded at its first use.
    pub(crate) device: OnceLock<Tensor>,
}

impl PartialEq for GradPlan {
    fn eq(&self, other: &Self) -> bool {
        self.regions == other.regions
    }
}

impl std::fmt::Debug for GradPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GradPlan({} regions, arena of {})",
            self.regions.len(),
            self.arena_len
        )
    }
}

impl GradPlan {
    /// A plan of disjoint regions; the arena is as long as their parts need.
    pub fn new(regions: Vec<GradRegion>) -> Result<Self> {
        let mut by_flat: Vec<&GradRegion> = regions.iter().collect();
        by_flat.sort_by_key(|r| r.flat);
        if by_flat.windows(2).any(|w| w[0].flat + w[0].len > w[1].flat) {
            return Err(Error::invalid(
                "GradPlan",
                "two gradient regions overlap in the flat buffer",
            ));
        }
        if regions.iter().any(|r| r.splits == 0) {
            return Err(Error::invalid(
                "GradPlan",
                "a parameter has no gradient (no op used it)",
            ));
        }
        let arena_len = regions
            .iter()
            .map(|r| r.arena + r.splits * r.len)
            .max()
            .unwrap_or(0);
        Ok(GradPlan {
            regions,
            arena_len,
            device: OnceLock::new(),
        })
    }

    pub fn regions(&self) -> &[GradRegion] {
        &self.regions
    }

    /// Elements of the arena the parts fill.
    pub fn arena_len(&self) -> usize {
        self.arena_len
    }

    /// Elements of the flat buffer the regions reach.
    fn flat_len(&self) -> usize {
        self.regions
            .iter()
            .map(|r| r.flat + r.len)
            .max()
            .unwrap_or(0)
    }

    fn check(&self, op: &'static str, arena: &Tensor, grads: &Tensor) -> Result<()> {
        if arena.numel() < self.arena_len || grads.numel() < self.flat_len() {
            return Err(Error::invalid(
                op,
                format!(
                    "the plan needs an arena of {} and a gradient buffer of {}; got {} and {}",
                    self.arena_len,
                    self.flat_len(),
                    arena.numel(),
                    grads.numel()
                ),
            ));
        }
        if arena.shares_storage(grads) {
            return Err(Error::invalid(
                op,
                "the arena and the gradients share storage",
            ));
        }
        Ok(())
    }
}

/// How much to cut the parts of a step's gradients so that they fit one arena of at most
/// `budget` values: the smallest power of two `d` such that, each cuttable use `(splits, len)`
/// cut to `ceil(splits / d)` parts of `len` values, beside `fixed` values of parts that cannot
/// be cut, the arena fits; `None` when even one part per use does not. Fewer parts cost
/// parallelism on a large GPU, never correctness: any number of parts sums to the same
/// gradient.
pub fn splits_divisor(uses: &[(usize, usize)], fixed: usize, budget: usize) -> Option<usize> {
    let need = |d: usize| -> usize {
        fixed
            + uses
                .iter()
                .map(|&(s, len)| s.div_ceil(d) * len)
                .sum::<usize>()
    };
    let most = uses
        .iter()
        .map(|u| u.0)
        .max()
        .unwrap_or(1)
        .next_power_of_two();
    std::iter::successors(Some(1usize), |d| (*d < most).then_some(d * 2))
        .find(|&d| need(d) <= budget)
}

/// The uniform of `shaders/grads.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    /// `reduce_partials`: values per part; `gather_grads`: work items.
    n: u32,
    splits: u32,
    offset: u32,
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// (1) for one gradient of `n` values.
    pub fn reduce_partials(p: &Partials, n: usize) -> Result<Tensor> {
        const OP: &str = "reduce_partials";
        p.check(OP, n)?;
        let arena = p.arena.cpu_read(OP)?;
        let mut out = arena[p.offset..p.offset + n].to_vec();
        for s in 1..p.splits {
            let part = &arena[p.offset + s * n..][..n];
            out.iter_mut().zip(part).for_each(|(o, v)| *o += v);
        }
        Ok(Tensor::from_cpu(&[n], out))
    }

    /// (1) for every region, written into `grads`; returns `sum g^2` (accumulated in f64).
    pub fn gather_grads(arena: &Tensor, plan: &GradPlan, grads: &mut Tensor) -> Result<Tensor> {
        const OP: &str = "gather_grads";
        plan.check(OP, arena, grads)?;
        let a = arena.cpu_read(OP)?;
        let mut g = grads.cpu_write(OP)?;
        let mut norm2 = 0.0f64;
        for r in &plan.regions {
            let dst = &mut g[r.flat..r.flat + r.len];
            dst.copy_from_slice(&a[r.arena..r.arena + r.len]);
            for s in 1..r.splits {
                let part = &a[r.arena + s * r.len..][..r.len];
                dst.par_iter_mut()
                    .zip(part.par_iter())
                    .for_each(|(o, v)| *o += v);
            }
            norm2 += dst
                .par_iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>();
        }
        Ok(Tensor::from_cpu(&[1], vec![norm2 as f32]))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{grid, Access, Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, reduce, ELEMENTWISE_WG};

    const SOURCE: &str = include_str!("../../shaders/grads.wgsl");

    /// Values of one region that one workgroup of `gather_grads` assembles.
    const CHUNK: usize = 4096;
    const CONSTANTS: &[(&str, f64)] = &[("WG", ELEMENTWISE_WG as f64)];

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "grads",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: CONSTANTS,
        }
    }

    const REDUCE_PARTIALS: Kernel = kernel("reduce_partials", &[R, W]);
    const GATHER_GRADS: Kernel = kernel("gather_grads", &[R, R, W, W]);
    pub(crate) const KERNELS: &[Kernel] = &[REDUCE_PARTIALS, GATHER_GRADS];

    fn u32_index(op: &'static str, v: usize) -> Result<u32> {
        u32::try_from(v).map_err(|_| Error::invalid(op, format!("index {v} exceeds 2^32")))
    }

    /// (1) for one gradient, one invocation per value. The arena is bound whole and the
    /// parts' offset passed as a parameter, so parts need no alignment.
    pub fn reduce_partials(g: &Gpu, p: &Partials, n: usize) -> Result<Tensor> {
        const OP: &str = "reduce_partials";
        p.check(OP, n)?;
        let out = g.alloc(OP, n)?;
        if n > 0 {
            u32_index(OP, p.offset + p.splits * n)?;
            let params = Params {
                n: n as u32,
                splits: p.splits as u32,
                offset: p.offset as u32,
            };
            let args = [Arg::read(p.arena.gpu_buffer(OP)?), Arg::write(&out)];
            g.dispatch(&REDUCE_PARTIALS, &params, &args, elementwise_grid(n))?;
        }
        Ok(Tensor::from_gpu(&[n], out))
    }

    /// The work list: every region cut into chunks of at most `CHUNK` values, each as two
    /// `vec4<u32>`: (flat start, count, arena start, region length), (splits, 0, 0, 0).
    fn work_items(op: &'static str, plan: &GradPlan) -> Result<Vec<u32>> {
        let mut items = Vec::new();
        for r in &plan.regions {
            for start in (0..r.len).step_by(CHUNK) {
                let count = CHUNK.min(r.len - start);
                for v in [
                    r.flat + start,
                    count,
                    r.arena + start,
                    r.len,
                    r.splits,
                    0,
                    0,
                    0,
                ] {
                    items.push(u32_index(op, v)?);
                }
            }
        }
        Ok(items)
    }

    /// One workgroup per work item assembles (1) and the item's sum of squares; a short
    /// reduction of those gives the squared norm.
    pub fn gather_grads(
        g: &Gpu,
        arena: &Tensor,
        plan: &GradPlan,
        grads: &mut Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "gather_grads";
        plan.check(OP, arena, grads)?;
        u32_index(OP, arena.numel().max(grads.numel()))?;
        let items = match plan.device.get() {
            Some(t) => t.clone(),
            None => {
                let words = work_items(OP, plan)?;
                let table = g.upload(&[words.len()], bytemuck::cast_slice(&words))?;
                plan.device.get_or_init(|| table).clone()
            }
        };
        let count = items.numel() / 8;
        let norm_partials = g.alloc(OP, count.max(1))?;
        if count == 0 {
            return Ok(Tensor::from_gpu(&[1], g.alloc_zeros(OP, 1)?));
        }
        let params = Params {
            n: u32_index(OP, count)?,
            splits: 0,
            offset: 0,
        };
        let args = [
            Arg::read(arena.gpu_buffer(OP)?),
            Arg::read(items.gpu_buffer(OP)?),
            Arg::write(grads.gpu_buffer(OP)?),
            Arg::write(&norm_partials),
        ];
        g.dispatch(&GATHER_GRADS, &params, &args, grid(count as u32))?;
        reduce::gpu::sum_to_one(g, OP, norm_partials, count, 1.0)
    }
}
