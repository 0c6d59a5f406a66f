//! Linear layer y = x w^T + b, with `x [M, K]`, `w [N, K]`, `b [N]`, `y [M, N]`.
//!
//! Backward, for an upstream gradient `dy [M, N]`:
//!   dx = dy w        `[M, K]`
//!   dw = dy^T x      `[N, K]`
//!   db = sum_m dy    `[N]` (column sums)
//!
//! All three products are one matrix product `C = A B` with `A` and `B` read through (row,
//! column) strides, so a transpose costs nothing: on the CPU through the `gemm` crate, on the
//! GPU through one tiled kernel.

use bytemuck::{Pod, Zeroable};

use super::check_rank;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Gradients of a linear layer.
pub struct LinearGrads {
    pub dx: Tensor,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

/// A read-only matrix operand: `a[i, j] = data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub rs: usize,
    pub cs: usize,
}

/// Row-major `[rows, cols]`.
pub(crate) const fn row_major(cols: usize) -> Strided {
    Strided { rs: cols, cs: 1 }
}

/// The transpose of a row-major `[cols, rows]` matrix, seen as `[rows, cols]`.
pub(crate) const fn transposed(rows: usize) -> Strided {
    Strided { rs: 1, cs: rows }
}

/// Checks the forward shapes; returns `(M, K, N)`.
fn check_forward(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize)> {
    check_rank(op, "x [M, K]", x, 2)?;
    check_rank(op, "w [N, K]", w, 2)?;
    let (m, k) = (x.shape()[0], x.shape()[1]);
    let n = w.shape()[0];
    if w.shape()[1] != k {
        return Err(Error::shape(op, format!("w [N, {k}] (K of x)"), w.shape()));
    }
    Ok((m, k, n))
}

fn check_bias(op: &'static str, b: &Tensor, n: usize) -> Result<()> {
    if b.shape() != [n] {
        return Err(Error::shape(op, format!("b [{n}] (N of w)"), b.shape()));
    }
    Ok(())
}

fn check_backward(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(usize, usize, usize)> {
    let op = "linear_backward";
    let (m, k, n) = check_forward(op, x, w)?;
    if dy.shape() != [m, n] {
        return Err(Error::shape(op, format!("dy [{m}, {n}]"), dy.shape()));
    }
    Ok((m, k, n))
}

pub(crate) mod cpu {
    use gemm::Parallelism;
    use rayon::prelude::*;

    use super::*;

    /// Below this many multiply-adds a product runs on one thread.
    const PAR_MIN_FLOPS: usize = 1 << 18;

    /// `c = a b` (or `c += a b` when `accumulate`) for `a [m, k]`, `b [k, n]` read through
    /// strides and `c [m, n]` row-major with row stride `c_rs`. `threads` caps gemm's own
    /// parallelism (1 inside callers that already run in parallel).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul(
        (m, k, n): (usize, usize, usize),
        a: &[f32],
        sa: Strided,
        b: &[f32],
        sb: Strided,
        c: &mut [f32],
        c_rs: usize,
        accumulate: bool,
        threads: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                for row in c.chunks_mut(c_rs).take(m) {
                    row[..n].fill(0.0);
                }
            }
            return;
        }
        // The unsafe call below reads and writes exactly these extents.
        assert!(
            (m - 1) * sa.rs + (k - 1) * sa.cs < a.len(),
            "matmul: a too short"
        );
        assert!(
            (k - 1) * sb.rs + (n - 1) * sb.cs < b.len(),
            "matmul: b too short"
        );
        assert!(
            c_rs >= n && (m - 1) * c_rs + n <= c.len(),
            "matmul: c too short"
        );
        let parallelism = if threads > 1 && m * n * k >= PAR_MIN_FLOPS {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: the asserts above bound every index gemm touches; `c` is borrowed mutably
        // and cannot alias `a` or `b`.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                c_rs as isize,
                accumulate,
                a.as_ptr(),
                sa.cs as isize,
                sa.rs as isize,
                b.as_ptr(),
                sb.cs as isize,
                sb.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// y = x w^T + b: y starts as the broadcast bias (or zeros) and the product is added.
    pub fn forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let op = "linear";
        let (m, k, n) = check_forward(op, x, w)?;
        let mut y = match b {
            Some(b) => {
                check_bias(op, b, n)?;
                b.cpu_read(op)?.repeat(m)
            }
            None => vec![0.0; m * n],
        };
        let (xd, wd) = (x.cpu_read(op)?, w.cpu_read(op)?);
        let threads = rayon::current_num_threads();
        let sw = transposed(k);
        matmul(
            (m, k, n),
            &xd,
            row_major(k),
            &wd,
            sw,
            &mut y,
            n,
            true,
            threads,
        );
        Ok(Tensor::from_cpu(&[m, n], y))
    }

    /// dx = dy w, dw = dy^T x, db = column sums of dy.
    pub fn backward(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool) -> Result<LinearGrads> {
        let op = "linear_backward";
        let (m, k, n) = check_backward(x, w, dy)?;
        let (xd, wd, dyd) = (x.cpu_read(op)?, w.cpu_read(op)?, dy.cpu_read(op)?);
        let threads = rayon::current_num_threads();
        let mut dx = vec![0.0; m * k];
        matmul(
            (m, n, k),
            &dyd,
            row_major(n),
            &wd,
            row_major(k),
            &mut dx,
            k,
            false,
            threads,
        );
        let mut dw = vec![0.0; n * k];
        matmul(
            (n, m, k),
            &dyd,
            transposed(n),
            &xd,
            row_major(k),
            &mut dw,
            k,
            false,
            threads,
        );
        let db = with_bias.then(|| Tensor::from_cpu(&[n], column_sums(&dyd, m, n)));
        Ok(LinearGrads {
            dx: Tensor::from_cpu(&[m, k], dx),
            dw: Tensor::from_cpu(&[n, k], dw),
            db,
        })
    }

    /// db[j] = sum_i dy[i, j] over the rows of a row-major `[m, n]` matrix, summed in row
    /// blocks in parallel.
    fn column_sums(dy: &[f32], m: usize, n: usize) -> Vec<f32> {
        const ROWS_PER_TASK: usize = 256;
        let add_rows = |rows: &[f32]| {
            let mut s = vec![0.0f32; n];
            for row in rows.chunks_exact(n) {
                s.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
            }
            s
        };
        if n == 0 {
            return Vec::new();
        }
        if m <= ROWS_PER_TASK {
            return add_rows(dy);
        }
        dy.par_chunks(ROWS_PER_TASK * n).map(add_rows).reduce(
            || vec![0.0; n],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
    }
}

/// Uniform parameters of `shaders/linear.wgsl` (layout must match its `Params`).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    /// Reduction length per split (a multiple of the `BK` tile).
    k_chunk: u32,
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    /// Splits of the reduction (`sum_splits`, `column_sums_partial`).
    splits: u32,
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Access, Arg, Gpu, GpuBuffer, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_WG};

    const SOURCE: &str = include_str!("../../shaders/linear.wgsl");

    /// Invocations per workgroup along n and m; each computes a `TM x TN = 4 x 4` register
    /// tile, so a workgroup computes a `(WG_Y * 4) x (WG_X * 4)` = 64 x 64 output tile.
    const WG_X: u32 = 16;
    const WG_Y: u32 = 16;
    /// Reduction depth of one workgroup-memory tile.
    const BK: u32 = 16;
    const BM: u32 = WG_Y * 4;
    const BN: u32 = WG_X * 4;
    /// Split-K aims for about this many workgroups when the output has few tiles.
    const TARGET_WORKGROUPS: u32 = 512;
    /// A reduction shorter than this never splits.
    const SPLIT_MIN_K: u32 = 2048;
    /// Rows of dy each workgroup of `column_sums_partial` adds.
    const ROWS_PER_SPLIT: u32 = 256;

    /// The product's tile sizes and the reductions' workgroup size, passed to the shader.
    const CONSTANTS: &[(&str, f64)] = &[
        ("WG_X", WG_X as f64),
        ("WG_Y", WG_Y as f64),
        ("BK", BK as f64),
        ("WG", ELEMENTWISE_WG as f64),
    ];

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "linear",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: CONSTANTS,
        }
    }

    const MATMUL: Kernel = kernel("matmul", &[R, R, W]);
    const MATMUL_BIAS: Kernel = kernel("matmul_bias", &[R, R, R, W]);
    const SUM_SPLITS: Kernel = kernel("sum_splits", &[R, W]);
    const COLUMN_SUMS_PARTIAL: Kernel = kernel("column_sums_partial", &[R, W]);
    pub(crate) const KERNELS: &[Kernel] = &[MATMUL, MATMUL_BIAS, SUM_SPLITS, COLUMN_SUMS_PARTIAL];

    fn params(m: u32, n: u32, k: u32, k_chunk: u32, a: Strided, b: Strided, splits: u32) -> Params {
        Params {
            m,
            n,
            k,
            k_chunk,
            a_rs: a.rs as u32,
            a_cs: a.cs as u32,
            b_rs: b.rs as u32,
            b_cs: b.cs as u32,
            splits,
        }
    }

    /// Every index the kernels form must fit in u32.
    fn check_u32(op: &'static str, elements: usize) -> Result<u32> {
        u32::try_from(elements)
            .map_err(|_| Error::invalid(op, format!("{elements} elements exceed 2^32")))
    }

    /// `C [m, n] = A [m, k] B [k, n] (+ bias[n])` into a fresh buffer. A long reduction over a
    /// small output is split into `S` parts whose partial products land in `[S, m, n]` and are
    /// summed by a second pass (only without a bias, which the single pass adds).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        g: &Gpu,
        op: &'static str,
        (m, k, n): (usize, usize, usize),
        a: &GpuBuffer,
        sa: Strided,
        b: &GpuBuffer,
        sb: Strided,
        bias: Option<&GpuBuffer>,
    ) -> Result<GpuBuffer> {
        let (m32, k32, n32) = (check_u32(op, m)?, check_u32(op, k)?, check_u32(op, n)?);
        check_u32(op, m * n)?;
        check_u32(op, m * k.max(1) + k * n)?;
        let tiles = [n32.div_ceil(BN), m32.div_ceil(BM)];
        let max = g.limits().max_compute_workgroups_per_dimension;
        if tiles[0] > max || tiles[1] > max {
            return Err(Error::invalid(
                op,
                format!("a [{m}, {n}] output needs {tiles:?} tiles; the adapter allows {max}"),
            ));
        }
        let n_tiles = tiles[0] * tiles[1];
        let splits = if bias.is_none() && k32 >= SPLIT_MIN_K && n_tiles < TARGET_WORKGROUPS {
            (TARGET_WORKGROUPS / n_tiles)
                .min(k32 / (SPLIT_MIN_K / 4))
                .clamp(1, max)
        } else {
            1
        };
        let k_chunk = k32.div_ceil(splits).div_ceil(BK) * BK;
        let splits = k32.div_ceil(k_chunk.max(1)).max(1);
        let p = params(m32, n32, k32, k_chunk, sa, sb, splits);
        let grid = [tiles[0].max(1), tiles[1].max(1), splits];
        let c = g.alloc(op, m * n)?;
        match bias {
            Some(bias) => {
                let args = [Arg::read(a), Arg::read(b), Arg::read(bias), Arg::write(&c)];
                g.dispatch(&MATMUL_BIAS, &p, &args, grid)?;
            }
            None if splits == 1 => {
                let args = [Arg::read(a), Arg::read(b), Arg::write(&c)];
                g.dispatch(&MATMUL, &p, &args, grid)?;
            }
            None => {
                check_u32(op, m * n * splits as usize)?;
                let partial = g.alloc(op, m * n * splits as usize)?;
                let args = [Arg::read(a), Arg::read(b), Arg::write(&partial)];
                g.dispatch(&MATMUL, &p, &args, grid)?;
                sum_splits(g, &partial, &c, m * n, splits)?;
            }
        }
        Ok(c)
    }

    /// `out[i] = sum_s partial[s * len + i]`.
    fn sum_splits(
        g: &Gpu,
        partial: &GpuBuffer,
        out: &GpuBuffer,
        len: usize,
        splits: u32,
    ) -> Result<()> {
        let p = params(len as u32, 0, 0, 0, row_major(0), row_major(0), splits);
        let args = [Arg::read(partial), Arg::write(out)];
        g.dispatch(&SUM_SPLITS, &p, &args, elementwise_grid(len))
    }

    /// db[j] = sum_i dy[i, j]: partial sums of row blocks, then `sum_splits` when there is
    /// more than one block.
    fn column_sums(g: &Gpu, dy: &GpuBuffer, m: usize, n: usize) -> Result<GpuBuffer> {
        let op = "linear_backward";
        let max = g.limits().max_compute_workgroups_per_dimension;
        let splits = (m as u32).div_ceil(ROWS_PER_SPLIT).clamp(1, max);
        let rows = (m as u32).div_ceil(splits);
        let p = params(
            m as u32,
            n as u32,
            0,
            rows,
            row_major(0),
            row_major(0),
            splits,
        );
        let grid = [(n as u32).div_ceil(ELEMENTWISE_WG).max(1), splits, 1];
        let db = g.alloc(op, n)?;
        if splits == 1 {
            let args = [Arg::read(dy), Arg::write(&db)];
            g.dispatch(&COLUMN_SUMS_PARTIAL, &p, &args, grid)?;
        } else {
            let partial = g.alloc(op, n * splits as usize)?;
            let args = [Arg::read(dy), Arg::write(&partial)];
            g.dispatch(&COLUMN_SUMS_PARTIAL, &p, &args, grid)?;
            sum_splits(g, &partial, &db, n, splits)?;
        }
        Ok(db)
    }

    pub fn forward(g: &Gpu, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let op = "linear";
        let (m, k, n) = check_forward(op, x, w)?;
        if let Some(b) = b {
            check_bias(op, b, n)?;
        }
        let (xb, wb) = (x.gpu_buffer(op)?, w.gpu_buffer(op)?);
        let bias = b.map(|b| b.gpu_buffer(op)).transpose()?;
        let y = matmul(g, op, (m, k, n), xb, row_major(k), wb, transposed(k), bias)?;
        Ok(Tensor::from_gpu(&[m, n], y))
    }

    pub fn backward(
        g: &Gpu,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        with_bias: bool,
    ) -> Result<LinearGrads> {
        let op = "linear_backward";
        let (m, k, n) = check_backward(x, w, dy)?;
        let (xb, wb, dyb) = (x.gpu_buffer(op)?, w.gpu_buffer(op)?, dy.gpu_buffer(op)?);
        let dx = matmul(g, op, (m, n, k), dyb, row_major(n), wb, row_major(k), None)?;
        let dw = matmul(g, op, (n, m, k), dyb, transposed(n), xb, row_major(k), None)?;
        let db = if with_bias {
            Some(Tensor::from_gpu(&[n], column_sums(g, dyb, m, n)?))
        } else {
            None
        };
        Ok(LinearGrads {
            dx: Tensor::from_gpu(&[m, k], dx),
            dw: Tensor::from_gpu(&[n, k], dw),
            db,
        })
    }
}
