//! Linear layer y = x w^T + b, with `x [M, K]`, `w [N, K]`, `b [N]`, `y [M, N]`.
//!
//! Backward, for an upstream gradient `dy [M, N]`:
//!   dx = dy w (+ acc) `[M, K]`
//!   dw = dy^T x      `[N, K]`
//!   db = sum_m dy    `[N]` (column sums)
//!
//! All three products are one matrix product `C = A B` with `A` and `B` read through (row,
//! column) strides, so a transpose costs nothing: on the CPU through the `gemm` crate, on the
//! GPU through one tiled kernel. dw and db are written as partial sums into a step's arena
//! (see `ops/grads.rs`): the GPU splits their reductions over the M rows, the CPU does not.
//! `acc`, when given, is the gradient x already has from its other consumers: the product
//! adds it as it writes dx (once, into the first part when dx's reduction is split), so
//! the caller needs no separate sum.

use bytemuck::{Pod, Zeroable};

use super::check_rank;
use super::grads::Partials;
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

fn check_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    (need_dx, acc): (bool, Option<&Tensor>),
    dw: &Partials,
    db: Option<&Partials>,
) -> Result<(usize, usize, usize)> {
    let op = "linear_backward";
    let (m, k, n) = check_forward(op, x, w)?;
    if dy.shape() != [m, n] {
        return Err(Error::shape(op, format!("dy [{m}, {n}]"), dy.shape()));
    }
    if let Some(acc) = acc {
        if !need_dx {
            return Err(Error::invalid(
                op,
                "acc is added to dx, which was not asked for",
            ));
        }
        if acc.shape() != [m, k] {
            return Err(Error::shape(
                op,
                format!("acc [{m}, {k}] (x's shape)"),
                acc.shape(),
            ));
        }
    }
    dw.check(op, n * k)?;
    if let Some(db) = db {
        db.check(op, n)?;
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

    /// The CPU computes each parameter gradient whole: one part each.
    pub fn grad_splits(x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
        check_forward("linear_backward", x, w)?;
        Ok((1, 1))
    }

    /// Writes `value` as the first part of `dst` and zeros as the others.
    fn write_parts(dst: &Partials, value: &[f32]) -> Result<()> {
        let mut arena = dst.arena.clone();
        let mut a = arena.cpu_write("linear_backward")?;
        let n = value.len();
        a[dst.offset..dst.offset + n].copy_from_slice(value);
        a[dst.offset + n..dst.offset + dst.splits * n].fill(0.0);
        Ok(())
    }

    /// dx = dy w + acc (when `need_dx`; acc 0 when not given), dw = dy^T x, db = column sums
    /// of dy.
    pub fn backward_into(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        acc: Option<&Tensor>,
        dw_out: &Partials,
        db_out: Option<&Partials>,
    ) -> Result<Option<Tensor>> {
        let op = "linear_backward";
        let (m, k, n) = check_backward(x, w, dy, (need_dx, acc), dw_out, db_out)?;
        let (xd, wd, dyd) = (x.cpu_read(op)?, w.cpu_read(op)?, dy.cpu_read(op)?);
        let threads = rayon::current_num_threads();
        let dx = if need_dx {
            // dx starts as acc (or zeros) and the product is added.
            let mut dx = match acc {
                Some(acc) => acc.cpu_read(op)?.to_vec(),
                None => vec![0.0; m * k],
            };
            matmul(
                (m, n, k),
                &dyd,
                row_major(n),
                &wd,
                row_major(k),
                &mut dx,
                k,
                true,
                threads,
            );
            Some(Tensor::from_cpu(&[m, k], dx))
        } else {
            None
        };
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
        write_parts(dw_out, &dw)?;
        if let Some(db_out) = db_out {
            write_parts(db_out, &column_sums(&dyd, m, n))?;
        }
        Ok(dx)
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
    /// Splits of the reduction (`column_sums_partial`).
    splits: u32,
    /// Where the product (or part 0 of a split product) starts in `c`.
    c_offset: u32,
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Access, Arg, Gpu, GpuBuffer, GpuSlice, Kernel};
    use crate::ops::ELEMENTWISE_WG;

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
    const MATMUL_ADD: Kernel = kernel("matmul_add", &[R, R, R, W]);
    const COLUMN_SUMS_PARTIAL: Kernel = kernel("column_sums_partial", &[R, W]);
    pub(crate) const KERNELS: &[Kernel] = &[MATMUL, MATMUL_BIAS, MATMUL_ADD, COLUMN_SUMS_PARTIAL];

    /// What the epilogue of a product `A B [m, n]` adds as it writes the result.
    #[derive(Clone, Copy)]
    enum Addend<'a> {
        None,
        /// `bias [n]` to every row; the product runs in one part.
        Bias(GpuSlice<'a>),
        /// An `[m, n]` matrix, to part 0 only, so that the parts sum to `A B` plus it once.
        Matrix(GpuSlice<'a>),
    }

    #[allow(clippy::too_many_arguments)]
    fn params(
        m: u32,
        n: u32,
        k: u32,
        k_chunk: u32,
        a: Strided,
        b: Strided,
        splits: u32,
        c_offset: u32,
    ) -> Params {
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
            c_offset,
        }
    }

    /// Every index the kernels form must fit in u32.
    fn check_u32(op: &'static str, elements: usize) -> Result<u32> {
        u32::try_from(elements)
            .map_err(|_| Error::invalid(op, format!("{elements} elements exceed 2^32")))
    }

    /// The output tiles of an `[m, n]` product, checked against the grid limit.
    fn tiles(g: &Gpu, op: &'static str, m: usize, n: usize) -> Result<[u32; 2]> {
        let tiles = [(n as u32).div_ceil(BN), (m as u32).div_ceil(BM)];
        let max = g.limits().max_compute_workgroups_per_dimension;
        if tiles[0] > max || tiles[1] > max {
            return Err(Error::invalid(
                op,
                format!("a [{m}, {n}] output needs {tiles:?} tiles; the adapter allows {max}"),
            ));
        }
        Ok(tiles)
    }

    /// Parts of the reduction of an `[m, n]` product over `k`: a long reduction over a small
    /// output splits so that the pass has about `TARGET_WORKGROUPS` workgroups.
    fn k_splits(m: usize, k: usize, n: usize) -> usize {
        let n_tiles = ((n as u32).div_ceil(BN) * (m as u32).div_ceil(BM)).max(1);
        let k = k as u32;
        if k >= SPLIT_MIN_K && n_tiles < TARGET_WORKGROUPS {
            (TARGET_WORKGROUPS / n_tiles)
                .min(k / (SPLIT_MIN_K / 4))
                .max(1) as usize
        } else {
            1
        }
    }

    /// Parts of dw (the `[N, K]` product reduced over the M rows) and of db (row blocks of
    /// `ROWS_PER_SPLIT`).
    pub fn grad_splits(x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
        let (m, k, n) = check_forward("linear_backward", x, w)?;
        let db = (m as u32).div_ceil(ROWS_PER_SPLIT).max(1) as usize;
        Ok((k_splits(n, m, k), db))
    }

    /// `C = A [m, k] B [k, n] (+ addend)`, `splits` parts of the reduction over k, part `s`
    /// into `c[c_offset + s m n ..]`. Trailing parts past the end of k are written as zeros;
    /// a matrix addend goes into part 0 alone.
    #[allow(clippy::too_many_arguments)]
    fn matmul_into(
        g: &Gpu,
        op: &'static str,
        (m, k, n): (usize, usize, usize),
        (a, sa): (GpuSlice, Strided),
        (b, sb): (GpuSlice, Strided),
        addend: Addend,
        (c, c_offset, splits): (GpuSlice, usize, usize),
    ) -> Result<()> {
        let (m32, k32, n32) = (check_u32(op, m)?, check_u32(op, k)?, check_u32(op, n)?);
        check_u32(op, c_offset + m * n * splits)?;
        check_u32(op, m * k.max(1) + k * n)?;
        let tiles = tiles(g, op, m, n)?;
        let k_chunk = k32.div_ceil(splits as u32).div_ceil(BK) * BK;
        let p = params(
            m32,
            n32,
            k32,
            k_chunk.max(BK),
            sa,
            sb,
            splits as u32,
            c_offset as u32,
        );
        let grid = [tiles[0].max(1), tiles[1].max(1), splits as u32];
        let (kernel, addend) = match addend {
            Addend::None => {
                let args = [Arg::read(a), Arg::read(b), Arg::write(c)];
                return g.dispatch(&MATMUL, &p, &args, grid);
            }
            Addend::Bias(bias) => (&MATMUL_BIAS, bias),
            Addend::Matrix(matrix) => (&MATMUL_ADD, matrix),
        };
        let args = [Arg::read(a), Arg::read(b), Arg::read(addend), Arg::write(c)];
        g.dispatch(kernel, &p, &args, grid)
    }

    /// `C [m, n] = A B (+ addend)` into a fresh buffer; a long reduction over a small output
    /// (without a bias) runs in parts summed by `reduce_partials`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        g: &Gpu,
        op: &'static str,
        (m, k, n): (usize, usize, usize),
        a: (GpuSlice, Strided),
        b: (GpuSlice, Strided),
        addend: Addend,
    ) -> Result<GpuBuffer> {
        let splits = match addend {
            Addend::Bias(_) => 1,
            Addend::None | Addend::Matrix(_) => k_splits(m, k, n),
        };
        if splits == 1 {
            let c = g.alloc(op, m * n)?;
            if m * n > 0 {
                matmul_into(g, op, (m, k, n), a, b, addend, ((&c).into(), 0, 1))?;
            }
            return Ok(c);
        }
        let arena = Tensor::from_gpu(&[splits * m * n], g.alloc(op, splits * m * n)?);
        matmul_into(
            g,
            op,
            (m, k, n),
            a,
            b,
            addend,
            (arena.gpu_buffer(op)?, 0, splits),
        )?;
        let parts = Partials {
            arena: &arena,
            offset: 0,
            splits,
        };
        let sum = crate::ops::grads::gpu::reduce_partials(g, &parts, m * n)?;
        Ok(sum.gpu_buffer(op)?.buffer.clone())
    }

    /// db[j] = sum_i dy[i, j]: part s sums the rows of block s.
    fn column_sums_into(g: &Gpu, dy: GpuSlice, m: usize, n: usize, out: &Partials) -> Result<()> {
        let op = "linear_backward";
        let splits = out.splits as u32;
        let max = g.limits().max_compute_workgroups_per_dimension;
        if splits > max {
            return Err(Error::invalid(
                op,
                format!("{splits} row blocks exceed {max}"),
            ));
        }
        check_u32(op, out.offset + n * out.splits)?;
        let rows = (m as u32).div_ceil(splits).max(1);
        let p = params(
            m as u32,
            n as u32,
            0,
            rows,
            row_major(0),
            row_major(0),
            splits,
            out.offset as u32,
        );
        let grid = [(n as u32).div_ceil(ELEMENTWISE_WG).max(1), splits, 1];
        let args = [Arg::read(dy), Arg::write(out.arena.gpu_buffer(op)?)];
        g.dispatch(&COLUMN_SUMS_PARTIAL, &p, &args, grid)
    }

    pub fn forward(g: &Gpu, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let op = "linear";
        let (m, k, n) = check_forward(op, x, w)?;
        if let Some(b) = b {
            check_bias(op, b, n)?;
        }
        let (xb, wb) = (x.gpu_buffer(op)?, w.gpu_buffer(op)?);
        let bias = match b {
            Some(b) => Addend::Bias(b.gpu_buffer(op)?),
            None => Addend::None,
        };
        let y = matmul(
            g,
            op,
            (m, k, n),
            (xb, row_major(k)),
            (wb, transposed(k)),
            bias,
        )?;
        Ok(Tensor::from_gpu(&[m, n], y))
    }

    /// dx = dy w + acc (when `need_dx`) into a fresh buffer, acc added by the product's
    /// epilogue; the parts of dw = dy^T x and of the column sums of dy into the arena.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into(
        g: &Gpu,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        acc: Option<&Tensor>,
        dw_out: &Partials,
        db_out: Option<&Partials>,
    ) -> Result<Option<Tensor>> {
        let op = "linear_backward";
        let (m, k, n) = check_backward(x, w, dy, (need_dx, acc), dw_out, db_out)?;
        let (xb, wb, dyb) = (x.gpu_buffer(op)?, w.gpu_buffer(op)?, dy.gpu_buffer(op)?);
        let acc = match acc {
            Some(acc) => Addend::Matrix(acc.gpu_buffer(op)?),
            None => Addend::None,
        };
        let dx = if need_dx {
            let dx = matmul(
                g,
                op,
                (m, n, k),
                (dyb, row_major(n)),
                (wb, row_major(k)),
                acc,
            )?;
            Some(Tensor::from_gpu(&[m, k], dx))
        } else {
            None
        };
        if n * k > 0 {
            matmul_into(
                g,
                op,
                (n, m, k),
                (dyb, transposed(n)),
                (xb, row_major(k)),
                Addend::None,
                (dw_out.arena.gpu_buffer(op)?, dw_out.offset, dw_out.splits),
            )?;
        }
        if let Some(db_out) = db_out.filter(|_| n > 0) {
            column_sums_into(g, dyb, m, n, db_out)?;
        }
        Ok(dx)
    }
}
