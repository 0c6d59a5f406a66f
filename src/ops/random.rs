//! Random fills from the counter-based generator in `crate::rng` (Philox4x32-10): value `i` of
//! a fill is element `offset + i` of the stream of `seed`, on both backends alike.

use bytemuck::{Pod, Zeroable};

use crate::error::Result;
use crate::tensor::Tensor;

/// The uniform block of `shaders/rng.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    first: u32,
    block_lo: u32,
    block_hi: u32,
    key0: u32,
    key1: u32,
    stream: u32,
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;
    use crate::rng;

    /// Values per rayon task (a multiple of the 4-value Philox block).
    const CHUNK: usize = 1 << 14;

    /// `fill(out, seed, offset)` over chunks in parallel: every value depends only on its
    /// index, so each chunk is filled on its own.
    fn fill_parallel(
        shape: &[usize],
        seed: u64,
        offset: u64,
        fill: fn(&mut [f32], u64, u64),
    ) -> Tensor {
        let mut out = vec![0.0; shape.iter().product()];
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                fill(chunk, seed, offset.wrapping_add((c * CHUNK) as u64));
            });
        Tensor::from_cpu(shape, out)
    }

    pub fn randn(shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        Ok(fill_parallel(shape, seed, offset, rng::fill_normal))
    }

    pub fn rand_uniform(shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        Ok(fill_parallel(shape, seed, offset, rng::fill_uniform))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::error::Error;
    use crate::gpu::Access::ReadWrite as W;
    use crate::gpu::{grid, Arg, Gpu, Kernel};
    use crate::ops::{ELEMENTWISE_CONSTANTS, ELEMENTWISE_WG};
    use crate::rng::{seed_key, NORMAL_STREAM, UNIFORM_STREAM};

    const fn kernel(entry: &'static str) -> Kernel {
        Kernel {
            shader: "rng",
            source: concat!(
                include_str!("../../shaders/sin_cos.wgsl"),
                include_str!("../../shaders/rng.wgsl")
            ),
            entry,
            params: size_of::<Params>(),
            storage: &[W],
            constants: ELEMENTWISE_CONSTANTS,
        }
    }

    const RANDN: Kernel = kernel("randn");
    const RAND_UNIFORM: Kernel = kernel("rand_uniform");
    pub(crate) const KERNELS: &[Kernel] = &[RANDN, RAND_UNIFORM];

    /// One invocation per Philox block of four values.
    fn fill(
        g: &Gpu,
        kernel: &Kernel,
        stream: u32,
        shape: &[usize],
        seed: u64,
        offset: u64,
    ) -> Result<Tensor> {
        let entry = kernel.entry;
        let n: usize = shape.iter().product();
        let n32 = u32::try_from(n)
            .map_err(|_| Error::invalid(entry, format!("{n} values exceed a GPU fill's 2^32")))?;
        let out = g.alloc(entry, n)?;
        if n > 0 {
            let first = (offset % 4) as u32;
            let block = offset / 4;
            let key = seed_key(seed);
            let params = Params {
                n: n32,
                first,
                block_lo: block as u32,
                block_hi: (block >> 32) as u32,
                key0: key[0],
                key1: key[1],
                stream,
            };
            let blocks = (first + n32).div_ceil(4);
            g.dispatch(
                kernel,
                &params,
                &[Arg::write(&out)],
                grid(blocks.div_ceil(ELEMENTWISE_WG)),
            )?;
        }
        Ok(Tensor::from_gpu(shape, out))
    }

    pub fn randn(g: &Gpu, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        fill(g, &RANDN, NORMAL_STREAM, shape, seed, offset)
    }

    pub fn rand_uniform(g: &Gpu, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor> {
        fill(g, &RAND_UNIFORM, UNIFORM_STREAM, shape, seed, offset)
    }
}
