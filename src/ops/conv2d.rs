//! 2-D convolution, forward and backward, as matrix products.
//!
//! With `x [B, Cin, H, W]`, `w [Cout, Cin, KH, KW]`, stride `s` and padding (top, left) =
//! `(pt, pl)`, the output `y [B, Cout, Ho, Wo]` is
//!
//! ```text
//! y[b, co, oy, ox] = bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] x[b, ci, oy s + ky - pt, ox s + kx - pl]
//! ```
//!
//! (`x` is zero outside the image), with `Ho = (H + pt + pb - KH) / s + 1` and likewise `Wo`.
//! Flattening `k = (ci, ky, kx)` and `n = (oy, ox)` and gathering the input into the "column"
//! matrix `X[k, n] = x[b, ci, oy s + ky - pt, ox s + kx - pl]` (im2col) makes each image a GEMM:
//!
//! ```text
//! Y_b = W X_b                       (W: [Cout, K], X_b: [K, Ho Wo])             (1)
//! dW  = sum_b dY_b X_b^T                                                        (2)
//! dX_b = W^T dY_b,   dx_b = col2im(dX_b)  (the adjoint of im2col: scatter-add)  (3)
//! db[co] = sum_{b, oy, ox} dy[b, co, oy, ox]                                    (4)
//! ```
//!
//! The forward can add more to `y` in the same pass (its epilogue, `Conv2dEpilogue`): a value
//! per (sample, output channel), `y += add[b, co]` (a resnet's time embedding), and a tensor
//! of y's shape, `y += residual` (a resnet's skip connection). Both are sums, so their
//! gradients are `dy` summed over the pixels and `dy` itself, and the backward of the
//! convolution is unchanged.
//!
//! The weight and bias gradients (2) and (4) are written as partial sums into a step's arena
//! (see `ops/grads.rs`): the GPU splits the reduction over `B Ho Wo` into parts, the CPU
//! computes each sum whole (one part).
//!
//! The CPU runs (1)-(4) literally, except that 3x3 stride-1 layers (most of a U-Net) go
//! through Winograd's minimal filtering (`conv2d/winograd.rs`), forward, input gradient and
//! weight gradient alike, with 4x fewer multiplications. The GPU never builds `X`: its kernels read the input through
//! the index map above while they fill their tiles (implicit GEMM), and (3) is computed in
//! gather form, `dx[b, ci, iy, ix] = sum_{co, ky, kx} w[co, ci, ky, kx] dy[b, co, oy, ox]` over
//! the `(oy, ox)` with `oy s + ky - pt = iy` and `ox s + kx - pl = ix`.

use bytemuck::{Pod, Zeroable};

use super::check_rank;
use super::grads::Partials;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

mod filter_cache;
mod winograd;

pub use filter_cache::with_filter_cache;

/// What a convolution adds to its output besides the bias, in the same pass:
/// `y[b, co, oy, ox] += add[b, co] + residual[b, co, oy, ox]`.
#[derive(Clone, Copy, Default)]
pub struct Conv2dEpilogue<'a> {
    /// `[B, Cout]`, broadcast over the pixels.
    pub add: Option<&'a Tensor>,
    /// Of the output's shape.
    pub residual: Option<&'a Tensor>,
}

/// How the CPU backend computes a convolution's forward pass and weight gradient (its input
/// gradient at stride 1 is a forward pass too). By default it picks `WinogradF4` for 3x3
/// stride-1 layers of 8 channels or more and `Im2col` for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAlgorithm {
    /// (1)-(4) as written: im2col and one GEMM per image. Any shape.
    Im2col,
    /// Winograd `F(2x2, 3x3)`: 2.25x fewer multiplications; 3x3 at stride 1 only (other
    /// shapes fall back to im2col).
    WinogradF2,
    /// Winograd `F(4x4, 3x3)`: 4x fewer multiplications; 3x3 at stride 1 only.
    WinogradF4,
}

impl CpuAlgorithm {
    /// `Backend::conv2d_with` on the CPU by this algorithm.
    pub fn conv2d(
        self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
        e: &Conv2dEpilogue,
    ) -> Result<Tensor> {
        cpu::forward_by(x, w, b, p, e, Some(self), true)
    }

    /// `Backend::conv2d_backward` on the CPU by this algorithm.
    pub fn conv2d_backward(
        self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: &Conv2dParams,
        with_bias: bool,
    ) -> Result<Conv2dGrads> {
        use crate::backend::Backend;
        let (nw, cout) = (w.numel(), w.shape().first().copied().unwrap_or(0));
        let arena = crate::Cpu.zeros(&[nw + cout])?;
        let part = |offset| Partials {
            arena: &arena,
            offset,
            splits: 1,
        };
        let (dw, db) = (part(0), part(nw));
        let db_out = with_bias.then_some(&db);
        let dx = cpu::backward_into_by(x, w, dy, p, true, &dw, db_out, Some(self))?;
        Ok(Conv2dGrads {
            dx: dx.expect("dx was asked for"),
            dw: crate::Cpu.reduce_partials(&dw, nw)?.reshape(w.shape())?,
            db: with_bias
                .then(|| crate::Cpu.reduce_partials(&db, cout))
                .transpose()?,
        })
    }
}

/// Stride and padding (top, bottom, left, right) of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: [usize; 4],
}

impl Conv2dParams {
    /// Stride `stride` and the same padding `pad` on all four sides.
    pub fn new(stride: usize, pad: usize) -> Self {
        Conv2dParams {
            stride,
            padding: [pad; 4],
        }
    }

    /// Stride `stride` and padding `[top, bottom, left, right]`; diffusers' `Downsample2D`
    /// is `with_padding(2, [0, 1, 0, 1])`.
    pub fn with_padding(stride: usize, padding: [usize; 4]) -> Self {
        Conv2dParams { stride, padding }
    }
}

/// Gradients of a convolution.
pub struct Conv2dGrads {
    pub dx: Tensor,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

/// Every size of one convolution, checked.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad_top: usize,
    pad_left: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    /// Checks `x`, `w` and the parameters and derives the output size.
    fn new(op: &'static str, x: &Tensor, w: &Tensor, p: &Conv2dParams) -> Result<Geometry> {
        check_rank(op, "x [B, Cin, H, W]", x, 4)?;
        check_rank(op, "w [Cout, Cin, KH, KW]", w, 4)?;
        let (xs, ws) = (x.shape(), w.shape());
        if ws[1] != xs[1] {
            return Err(Error::shape(
                op,
                format!("w [Cout, {}, KH, KW] (Cin of x {:?})", xs[1], xs),
                ws,
            ));
        }
        if p.stride == 0 {
            return Err(Error::invalid(op, "stride must be at least 1"));
        }
        let [top, bottom, left, right] = p.padding;
        let (hp, wp) = (xs[2] + top + bottom, xs[3] + left + right);
        if ws[2] > hp || ws[3] > wp || ws[2] == 0 || ws[3] == 0 {
            return Err(Error::invalid(
                op,
                format!(
                    "kernel {}x{} does not fit the padded input {hp}x{wp} (x {xs:?}, padding \
                     {:?}); use a smaller kernel or more padding",
                    ws[2], ws[3], p.padding
                ),
            ));
        }
        Ok(Geometry {
            batch: xs[0],
            cin: xs[1],
            h: xs[2],
            w: xs[3],
            cout: ws[0],
            kh: ws[2],
            kw: ws[3],
            stride: p.stride,
            pad_top: top,
            pad_left: left,
            ho: (hp - ws[2]) / p.stride + 1,
            wo: (wp - ws[3]) / p.stride + 1,
        })
    }

    /// Reduction length of the forward GEMM, `Cin KH KW`.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Pixels of one input image.
    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Pixels of one output image.
    fn out_hw(&self) -> usize {
        self.ho * self.wo
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.cout, self.ho, self.wo]
    }

    /// True when im2col is the identity (1x1 kernel, stride 1, no padding).
    fn is_pointwise(&self, p: &Conv2dParams) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && p.padding == [0; 4]
    }

    fn check_bias(&self, op: &'static str, b: &Tensor) -> Result<()> {
        if b.shape() != [self.cout] {
            return Err(Error::shape(op, format!("bias [{}]", self.cout), b.shape()));
        }
        Ok(())
    }

    /// The bias and the epilogue's tensors have their shapes.
    fn check_forward(
        &self,
        op: &'static str,
        b: Option<&Tensor>,
        e: &Conv2dEpilogue,
    ) -> Result<()> {
        if let Some(b) = b {
            self.check_bias(op, b)?;
        }
        if let Some(a) = e.add {
            if a.shape() != [self.batch, self.cout] {
                let want = format!("an epilogue add of [{}, {}]", self.batch, self.cout);
                return Err(Error::shape(op, want, a.shape()));
            }
        }
        if let Some(r) = e.residual {
            if r.shape() != self.out_shape() {
                let want = format!("a residual of {:?}", self.out_shape());
                return Err(Error::shape(op, want, r.shape()));
            }
        }
        Ok(())
    }

    /// The parts of the weight gradient and of the bias gradient fit their arenas.
    fn check_partials(&self, op: &'static str, dw: &Partials, db: Option<&Partials>) -> Result<()> {
        dw.check(op, self.cout * self.k())?;
        if let Some(db) = db {
            db.check(op, self.cout)?;
            if db.splits != dw.splits {
                return Err(Error::invalid(
                    op,
                    "the weight and bias gradients must have as many parts",
                ));
            }
        }
        Ok(())
    }

    fn check_dy(&self, op: &'static str, dy: &Tensor) -> Result<()> {
        if dy.shape() != self.out_shape() {
            return Err(Error::shape(
                op,
                format!("dy {:?}", self.out_shape()),
                dy.shape(),
            ));
        }
        Ok(())
    }
}

/// The uniform of every conv2d kernel (`Params` in shaders/conv2d.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    batch: u32,
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    ho: u32,
    wo: u32,
    has_bias: u32,
    /// The forward's epilogue: bit 0 adds `add[b, co]`, bit 1 the residual.
    epilogue: u32,
    /// Reduction indices per split of a split-K pass.
    split_len: u32,
    /// Number of splits of a split-K pass.
    splits: u32,
    /// Where a split-K pass writes its first part in the arena.
    out_offset: u32,
    /// Where the weight-gradient pass writes the first part of the bias gradient.
    bias_offset: u32,
}

pub(crate) mod cpu {
    use gemm::Parallelism;
    use rayon::iter::Either;
    use rayon::prelude::*;

    use super::*;
    use crate::ops::simd::copy_row;

    /// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
    #[derive(Clone, Copy)]
    pub(super) struct Mat<'a> {
        data: &'a [f32],
        rs: usize,
        cs: usize,
    }

    impl<'a> Mat<'a> {
        /// Rows of consecutive elements, `stride` apart.
        pub(super) fn rows(data: &'a [f32], stride: usize) -> Self {
            Mat {
                data,
                rs: stride,
                cs: 1,
            }
        }

        pub(super) fn transposed(self) -> Self {
            Mat {
                data: self.data,
                rs: self.cs,
                cs: self.rs,
            }
        }

        fn covers(&self, rows: usize, cols: usize) -> bool {
            rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
        }
    }

    /// `dst [m, n] = a [m, k] b [k, n]`, or `dst += a b` when `accumulate`; `dst` row-major.
    pub(super) fn matmul(
        dst: &mut [f32],
        a: Mat,
        b: Mat,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
        par: Parallelism,
    ) {
        assert!(dst.len() >= m * n && a.covers(m, k) && b.covers(k, n));
        // SAFETY: the assertion above keeps every index the strides reach inside its slice.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                a.data.as_ptr(),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr(),
                b.cs as isize,
                b.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }

    /// The output indices `o` in `0..len_out` whose input index `o stride + offset` lies in
    /// `0..len_in`, as a range.
    fn valid(len_in: usize, offset: isize, stride: usize, len_out: usize) -> (usize, usize) {
        let s = stride as isize;
        let lo = if offset >= 0 {
            0
        } else {
            (-offset + s - 1) / s
        };
        let room = len_in as isize - offset;
        let hi = if room <= 0 { 0 } else { (room + s - 1) / s };
        let hi = (hi as usize).min(len_out);
        ((lo as usize).min(hi), hi)
    }

    /// Calls `f(row of X, channel, input row index, ox range, input column of the first ox)`
    /// for each valid output row of each row of the column matrix `X` of one image — the
    /// index map shared by im2col and col2im. Rows of `X` outside the image are passed with
    /// `iy = None`.
    fn for_each_col_row(
        g: &Geometry,
        mut f: impl FnMut(usize, usize, usize, Option<usize>, (usize, usize), usize),
    ) {
        let (s, ow) = (g.stride, g.wo);
        for ci in 0..g.cin {
            for ky in 0..g.kh {
                let off_y = ky as isize - g.pad_top as isize;
                let (oy_lo, oy_hi) = valid(g.h, off_y, s, g.ho);
                for kx in 0..g.kw {
                    let row = (ci * g.kh + ky) * g.kw + kx;
                    let off_x = kx as isize - g.pad_left as isize;
                    let (ox_lo, ox_hi) = valid(g.w, off_x, s, ow);
                    let ix0 = (ox_lo as isize * s as isize + off_x).max(0) as usize;
                    for oy in 0..g.ho {
                        let iy = (oy_lo..oy_hi)
                            .contains(&oy)
                            .then(|| (oy as isize * s as isize + off_y) as usize);
                        f(row, ci, oy, iy, (ox_lo, ox_hi), ix0);
                    }
                }
            }
        }
    }

    /// im2col of one image: `col[k, oy Wo + ox] = x[ci, oy s + ky - pt, ox s + kx - pl]`
    /// with `k = (ci, ky, kx)`, zero where the index falls in the padding.
    fn im2col(g: &Geometry, x: &[f32], col: &mut [f32]) {
        let (hw, ohw, s) = (g.hw(), g.out_hw(), g.stride);
        for_each_col_row(g, |row, ci, oy, iy, (lo, hi), ix0| {
            let out = &mut col[row * ohw + oy * g.wo..][..g.wo];
            let Some(iy) = iy else {
                out.fill(0.0);
                return;
            };
            let src = &x[ci * hw + iy * g.w..][..g.w];
            out[..lo].fill(0.0);
            out[hi..].fill(0.0);
            if lo == hi {
                return;
            }
            if s == 1 {
                copy_row(&mut out[lo..hi], &src[ix0..ix0 + hi - lo]);
            } else {
                for (o, v) in out[lo..hi].iter_mut().zip(src[ix0..].iter().step_by(s)) {
                    *o = *v;
                }
            }
        });
    }

    /// col2im of one image, the adjoint of [`im2col`]: `dx[ci, iy, ix] += dcol[k, oy Wo + ox]`
    /// over every `(k, oy, ox)` that im2col reads `(ci, iy, ix)` from. `dx` starts zeroed.
    fn col2im(g: &Geometry, dcol: &[f32], dx: &mut [f32]) {
        let (hw, ohw, s) = (g.hw(), g.out_hw(), g.stride);
        for_each_col_row(g, |row, ci, oy, iy, (lo, hi), ix0| {
            let Some(iy) = iy.filter(|_| lo < hi) else {
                return;
            };
            let src = &dcol[row * ohw + oy * g.wo..][..g.wo];
            let dst = &mut dx[ci * hw + iy * g.w..][..g.w];
            for (d, v) in dst[ix0..].iter_mut().step_by(s).zip(&src[lo..hi]) {
                *d += *v;
            }
        });
    }

    /// Fewest input and output channels for which Winograd beats im2col: with fewer, its
    /// products are too thin to pay for the transforms.
    const WINOGRAD_MIN_CHANNELS: usize = 8;

    impl CpuAlgorithm {
        /// Winograd `F(4x4, 3x3)` where it applies and pays, im2col elsewhere.
        fn choose(g: &Geometry) -> CpuAlgorithm {
            if winograd::applies(g) && g.cin.min(g.cout) >= WINOGRAD_MIN_CHANNELS {
                CpuAlgorithm::WinogradF4
            } else {
                CpuAlgorithm::Im2col
            }
        }

        /// The algorithm that runs for `g`: Winograd only where it applies.
        fn for_geometry(algorithm: Option<CpuAlgorithm>, g: &Geometry) -> CpuAlgorithm {
            match algorithm {
                None => CpuAlgorithm::choose(g),
                Some(CpuAlgorithm::Im2col) => CpuAlgorithm::Im2col,
                Some(_) if !winograd::applies(g) => CpuAlgorithm::Im2col,
                Some(a) => a,
            }
        }
    }

    /// Parallelism inside one GEMM of `tasks` run in parallel (images, chunks of images):
    /// none when the tasks alone fill the threads.
    pub(super) fn inner_parallelism(tasks: usize) -> Parallelism {
        let threads = rayon::current_num_threads();
        if tasks >= threads {
            Parallelism::None
        } else {
            Parallelism::Rayon(threads)
        }
    }

    /// Forward pass, equation (1) per image plus the bias and the epilogue, images in
    /// parallel: each image's output starts as bias + add + residual and the product
    /// accumulates onto it.
    pub fn forward(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
        e: &Conv2dEpilogue,
    ) -> Result<Tensor> {
        forward_by(x, w, b, p, e, None, true)
    }

    /// [`forward`] by `algorithm`, or by the one [`CpuAlgorithm::choose`] picks; with
    /// `cache_filters`, Winograd's transformed filters of `w` go through the filter cache (not
    /// for a weight made for one call, the input gradient's flipped filters).
    pub(super) fn forward_by(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
        e: &Conv2dEpilogue,
        algorithm: Option<CpuAlgorithm>,
        cache_filters: bool,
    ) -> Result<Tensor> {
        const OP: &str = "conv2d";
        let g = Geometry::new(OP, x, w, p)?;
        g.check_forward(OP, b, e)?;
        let xs = x.cpu_read(OP)?;
        let ws = w.cpu_read(OP)?;
        let bias = b.map(|b| b.cpu_read(OP)).transpose()?;
        let add = e.add.map(|a| a.cpu_read(OP)).transpose()?;
        let residual = e.residual.map(|r| r.cpu_read(OP)).transpose()?;
        let addends = winograd::Addends {
            bias: bias.as_deref(),
            add: add.as_deref(),
            residual: residual.as_deref(),
        };
        let y = match CpuAlgorithm::for_geometry(algorithm, &g) {
            CpuAlgorithm::WinogradF4 => Some(winograd::forward::<winograd::F4>(
                &g,
                &xs,
                &ws,
                &addends,
                cache_filters,
            )),
            CpuAlgorithm::WinogradF2 => Some(winograd::forward::<winograd::F2>(
                &g,
                &xs,
                &ws,
                &addends,
                cache_filters,
            )),
            CpuAlgorithm::Im2col => None,
        };
        if let Some(y) = y {
            return Ok(Tensor::from_cpu(&g.out_shape(), y));
        }
        let (k, ohw, pointwise) = (g.k(), g.out_hw(), g.is_pointwise(p));
        let par = inner_parallelism(g.batch);
        let mut y = match &residual {
            Some(r) => r.to_vec(),
            None => vec![0.0f32; g.batch * g.cout * ohw],
        };
        let accumulate = bias.is_some() || add.is_some() || residual.is_some();
        if ohw > 0 && g.cout > 0 {
            y.par_chunks_mut(g.cout * ohw).enumerate().for_each_init(
                || vec![0.0f32; if pointwise { 0 } else { k * ohw }],
                |col, (bi, yb)| {
                    let xb = &xs[bi * g.cin * g.hw()..][..g.cin * g.hw()];
                    let cols: &[f32] = if pointwise {
                        xb
                    } else {
                        im2col(&g, xb, col);
                        col
                    };
                    for (co, row) in yb.chunks_mut(ohw).enumerate() {
                        let v = bias.as_ref().map_or(0.0, |b| b[co])
                            + add.as_ref().map_or(0.0, |a| a[bi * g.cout + co]);
                        if v != 0.0 {
                            row.iter_mut().for_each(|o| *o += v);
                        }
                    }
                    let wm = Mat::rows(&ws, k);
                    let xm = Mat::rows(cols, ohw);
                    matmul(yb, wm, xm, (g.cout, ohw, k), accumulate, par);
                },
            );
        }
        Ok(Tensor::from_cpu(&g.out_shape(), y))
    }

    /// Per-thread state of the backward pass: one image's columns, their gradient, and this
    /// thread's running sum of `dW`.
    struct Scratch {
        col: Vec<f32>,
        dcol: Vec<f32>,
        dw: Vec<f32>,
    }

    /// The weights of the convolution whose forward pass is this one's input gradient at
    /// stride 1: `w'[ci, co, ky, kx] = w[co, ci, KH-1-ky, KW-1-kx]`, with padding
    /// `KH-1-pad` on each side (a "full" correlation with the flipped kernel). `None` where
    /// that does not apply (stride 2, padding wider than the kernel).
    fn transposed_conv(
        g: &Geometry,
        p: &Conv2dParams,
        w: &[f32],
    ) -> Option<(Tensor, Conv2dParams)> {
        let [pt, pb, pl, pr] = p.padding;
        if g.stride != 1 || pt.max(pb) >= g.kh || pl.max(pr) >= g.kw {
            return None;
        }
        let (kh, kw) = (g.kh, g.kw);
        let mut flipped = vec![0.0f32; w.len()];
        for co in 0..g.cout {
            for ci in 0..g.cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        flipped[((ci * g.cout + co) * kh + ky) * kw + kx] =
                            w[((co * g.cin + ci) * kh + (kh - 1 - ky)) * kw + (kw - 1 - kx)];
                    }
                }
            }
        }
        let padding = [kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr];
        Some((
            Tensor::from_cpu(&[g.cin, g.cout, kh, kw], flipped),
            Conv2dParams::with_padding(1, padding),
        ))
    }

    /// The CPU computes each parameter gradient whole: one part.
    pub fn grad_splits(x: &Tensor, w: &Tensor, p: &Conv2dParams) -> Result<usize> {
        Geometry::new("conv2d_backward", x, w, p)?;
        Ok(1)
    }

    /// Writes `value` as the first part of `dst` and zeros as the others.
    fn write_parts(op: &'static str, dst: &Partials, value: &[f32]) -> Result<()> {
        let mut arena = dst.arena.clone();
        let mut a = arena.cpu_write(op)?;
        let n = value.len();
        a[dst.offset..dst.offset + n].copy_from_slice(value);
        a[dst.offset + n..dst.offset + dst.splits * n].fill(0.0);
        Ok(())
    }

    /// Backward pass: (4), then (2) and (3) by `algorithm` (or the one [`CpuAlgorithm::choose`]
    /// picks). At stride 1, (3) is the forward pass of the transposed convolution (one
    /// product of the forward's shape per image instead of a thin one and a col2im scatter).
    /// Returns dx when `need_dx`; writes dW (and db) to their parts.
    pub fn backward_into(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: &Conv2dParams,
        need_dx: bool,
        dw_out: &Partials,
        db_out: Option<&Partials>,
    ) -> Result<Option<Tensor>> {
        backward_into_by(x, w, dy, p, need_dx, dw_out, db_out, None)
    }

    /// [`backward_into`] by `algorithm`, or by the one [`CpuAlgorithm::choose`] picks.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_into_by(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: &Conv2dParams,
        need_dx: bool,
        dw_out: &Partials,
        db_out: Option<&Partials>,
        algorithm: Option<CpuAlgorithm>,
    ) -> Result<Option<Tensor>> {
        const OP: &str = "conv2d_backward";
        let g = Geometry::new(OP, x, w, p)?;
        g.check_dy(OP, dy)?;
        g.check_partials(OP, dw_out, db_out)?;
        let algorithm = CpuAlgorithm::for_geometry(algorithm, &g);
        let pointwise = g.is_pointwise(p);
        let transposed = if pointwise || !need_dx {
            None
        } else {
            transposed_conv(&g, p, &w.cpu_read(OP)?)
        };
        let dx_by_forward = match &transposed {
            Some((wt, pt)) => {
                let none = Conv2dEpilogue::default();
                Some(forward_by(dy, wt, None, pt, &none, Some(algorithm), false)?)
            }
            None => None,
        };
        let xs = x.cpu_read(OP)?;
        let dys = dy.cpu_read(OP)?;
        let need_col2im = need_dx && dx_by_forward.is_none();
        let (dw, dx) = match algorithm {
            CpuAlgorithm::WinogradF4 if !need_col2im => (
                winograd::weight_gradient::<winograd::F4>(&g, &xs, &dys),
                None,
            ),
            CpuAlgorithm::WinogradF2 if !need_col2im => (
                winograd::weight_gradient::<winograd::F2>(&g, &xs, &dys),
                None,
            ),
            _ => {
                let ws = w.cpu_read(OP)?;
                im2col_backward(&g, &xs, &ws, &dys, pointwise, need_col2im)
            }
        };
        if let Some(db_out) = db_out {
            let ohw = g.out_hw();
            let sums: Vec<f32> = (0..g.cout)
                .into_par_iter()
                .map(|co| {
                    (0..g.batch)
                        .map(|bi| dys[(bi * g.cout + co) * ohw..][..ohw].iter().sum::<f32>())
                        .sum()
                })
                .collect();
            write_parts(OP, db_out, &sums)?;
        }
        write_parts(OP, dw_out, &dw)?;
        Ok(match dx_by_forward {
            Some(dx) => Some(dx),
            None => dx.map(|dx| Tensor::from_cpu(x.shape(), dx)),
        })
    }

    /// (2) summed per thread then across threads, and (3) by col2im per image when `need_dx`:
    /// `dW [Cout, K]` and `dx`.
    fn im2col_backward(
        g: &Geometry,
        xs: &[f32],
        ws: &[f32],
        dys: &[f32],
        pointwise: bool,
        need_dx: bool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let (k, ohw, chw) = (g.k(), g.out_hw(), g.cin * g.hw());
        let par = inner_parallelism(g.batch);
        let scratch_len = if pointwise { 0 } else { k * ohw };
        let dcol_len = if need_dx { scratch_len } else { 0 };
        let mut dx = vec![0.0f32; if need_dx { g.batch * chw } else { 0 }];
        let dw = if chw == 0 || ohw == 0 || g.cout == 0 {
            vec![0.0f32; g.cout * k]
        } else {
            let images = if need_dx {
                Either::Left(
                    dx.par_chunks_mut(chw)
                        .enumerate()
                        .map(|(bi, d)| (bi, Some(d))),
                )
            } else {
                Either::Right((0..g.batch).into_par_iter().map(|bi| (bi, None)))
            };
            images
                .fold(
                    || Scratch {
                        col: vec![0.0; scratch_len],
                        dcol: vec![0.0; dcol_len],
                        dw: vec![0.0; g.cout * k],
                    },
                    |mut t, (bi, dxb)| {
                        let xb = &xs[bi * chw..][..chw];
                        let dyb = Mat::rows(&dys[bi * g.cout * ohw..][..g.cout * ohw], ohw);
                        let cols: &[f32] = if pointwise {
                            xb
                        } else {
                            im2col(g, xb, &mut t.col);
                            &t.col
                        };
                        // dW^T [k, Cout] += cols [k, HoWo] dy^T: the long operand row-major.
                        let dyt = dyb.transposed();
                        matmul(
                            &mut t.dw,
                            Mat::rows(cols, ohw),
                            dyt,
                            (k, g.cout, ohw),
                            true,
                            par,
                        );
                        if let Some(dxb) = dxb {
                            let wt = Mat::rows(ws, k).transposed();
                            if pointwise {
                                matmul(dxb, wt, dyb, (k, ohw, g.cout), false, par);
                            } else {
                                matmul(&mut t.dcol, wt, dyb, (k, ohw, g.cout), false, par);
                                col2im(g, &t.dcol, dxb);
                            }
                        }
                        t
                    },
                )
                .map(|t| t.dw)
                .reduce(
                    || vec![0.0f32; g.cout * k],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(u, v)| *u += v);
                        a
                    },
                )
        };
        let mut dw_rows = vec![0.0f32; dw.len()];
        for (kk, row) in dw.chunks(g.cout.max(1)).enumerate() {
            for (co, &v) in row.iter().enumerate() {
                dw_rows[co * k + kk] = v;
            }
        }
        (dw_rows, need_dx.then_some(dx))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{grid, Access, Arg, Gpu, Kernel};

    const SOURCE: &str = include_str!("../../shaders/conv2d.wgsl");

    /// Invocations per workgroup along the output rows (M) and columns (N) of the GEMM tile;
    /// each invocation holds a 4x4 register tile, so a workgroup computes a 64x64 tile.
    const WG_M: u32 = 16;
    const WG_N: u32 = 16;
    /// Depth of the reduction slab staged in workgroup memory per step.
    const TK: u32 = 16;
    const TM: usize = 4 * WG_M as usize;
    const TN: usize = 4 * WG_N as usize;
    /// Fewest reduction indices one workgroup of a split-K pass handles.
    const MIN_SPLIT: usize = 512;
    /// Most splits of a split-K pass (bounds the scratch buffer).
    const MAX_SPLITS: usize = 64;

    /// The GEMM kernels' tile sizes, passed to the shader.
    const CONSTANTS: &[(&str, f64)] = &[
        ("WG_M", WG_M as f64),
        ("WG_N", WG_N as f64),
        ("TK", TK as f64),
    ];

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "conv2d",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: CONSTANTS,
        }
    }

    const FORWARD: Kernel = kernel("conv2d_fwd", &[R, R, R, W, R, R]);
    const BACKWARD_INPUT: Kernel = kernel("conv2d_bwd_input", &[R, R, W]);
    const BACKWARD_WEIGHT_PARTIAL: Kernel = kernel("conv2d_bwd_weight_partial", &[R, R, W]);
    pub(crate) const KERNELS: &[Kernel] = &[FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT_PARTIAL];

    fn params(g: &Geometry) -> Params {
        let u = |v: usize| v as u32;
        Params {
            batch: u(g.batch),
            cin: u(g.cin),
            h: u(g.h),
            w: u(g.w),
            cout: u(g.cout),
            kh: u(g.kh),
            kw: u(g.kw),
            stride: u(g.stride),
            pad_top: u(g.pad_top),
            pad_left: u(g.pad_left),
            ho: u(g.ho),
            wo: u(g.wo),
            has_bias: 0,
            epilogue: 0,
            split_len: 0,
            splits: 0,
            out_offset: 0,
            bias_offset: 0,
        }
    }

    /// Workgroups for an `m x n` output in 64x64 tiles, `splits` times over.
    fn tile_grid(m: usize, n: usize, splits: usize) -> [u32; 3] {
        grid((m.div_ceil(TM) * n.div_ceil(TN) * splits) as u32)
    }

    /// Workgroups a weight-gradient pass aims for: enough to fill a large GPU.
    const TARGET_WORKGROUPS: usize = 512;

    /// Parts of the weight and bias gradients: the reduction over `B Ho Wo` pixels split so
    /// that the pass has about `TARGET_WORKGROUPS` workgroups, each part at least
    /// `MIN_SPLIT` pixels long, at most `MAX_SPLITS` parts.
    pub fn grad_splits(x: &Tensor, w: &Tensor, p: &Conv2dParams) -> Result<usize> {
        let g = Geometry::new("conv2d_backward", x, w, p)?;
        let tiles = g.cout.div_ceil(TM) * g.k().div_ceil(TN);
        let r = g.batch * g.out_hw();
        Ok(r.div_ceil(MIN_SPLIT)
            .min(TARGET_WORKGROUPS.div_ceil(tiles.max(1)))
            .clamp(1, MAX_SPLITS))
    }

    /// Indices of a reduction of length `r` per part of `splits`, a multiple of `step`. Parts
    /// past the end are empty (and written as zeros).
    fn split_len(r: usize, splits: usize, step: usize) -> usize {
        r.div_ceil(splits).next_multiple_of(step).max(step)
    }

    fn offset_u32(op: &'static str, p: &Partials, n: usize) -> Result<u32> {
        u32::try_from(p.offset + p.splits * n)
            .map(|_| p.offset as u32)
            .map_err(|_| Error::invalid(op, "the arena exceeds 2^32 elements"))
    }

    /// Forward pass: the implicit GEMM (1), 64x64 output tiles, plus the bias.
    pub fn forward(
        g_: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: &Conv2dParams,
        e: &Conv2dEpilogue,
    ) -> Result<Tensor> {
        const OP: &str = "conv2d";
        let g = Geometry::new(OP, x, w, p)?;
        g.check_forward(OP, b, e)?;
        let (xb, wb) = (x.gpu_buffer(OP)?, w.gpu_buffer(OP)?);
        let bias = b.map(|b| b.gpu_buffer(OP)).transpose()?;
        let add = e.add.map(|a| a.gpu_buffer(OP)).transpose()?;
        let residual = e.residual.map(|r| r.gpu_buffer(OP)).transpose()?;
        let numel = g.batch * g.cout * g.out_hw();
        let y = g_.alloc(OP, numel)?;
        if numel > 0 {
            let mut u = params(&g);
            u.has_bias = bias.is_some() as u32;
            u.epilogue = add.is_some() as u32 | (residual.is_some() as u32) << 1;
            // An absent operand binds the weights in its place (never read).
            let args = [
                Arg::read(xb),
                Arg::read(wb),
                Arg::read(bias.unwrap_or(wb)),
                Arg::write(&y),
                Arg::read(add.unwrap_or(wb)),
                Arg::read(residual.unwrap_or(wb)),
            ];
            let workgroups = tile_grid(g.cout, g.batch * g.out_hw(), 1);
            g_.dispatch(&FORWARD, &u, &args, workgroups)?;
        }
        Ok(Tensor::from_gpu(&g.out_shape(), y))
    }

    /// Backward pass: dx by the gather-form implicit GEMM (3) when `need_dx`; the parts of
    /// dW by split-K tiles of (2) and of db (4) from the same pass's staged dy, into the arena.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into(
        g_: &Gpu,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: &Conv2dParams,
        need_dx: bool,
        dw_out: &Partials,
        db_out: Option<&Partials>,
    ) -> Result<Option<Tensor>> {
        const OP: &str = "conv2d_backward";
        let g = Geometry::new(OP, x, w, p)?;
        g.check_dy(OP, dy)?;
        g.check_partials(OP, dw_out, db_out)?;
        let (xb, wb, dyb) = (x.gpu_buffer(OP)?, w.gpu_buffer(OP)?, dy.gpu_buffer(OP)?);
        let (k, r) = (g.k(), g.batch * g.out_hw());
        let empty = x.numel() == 0 || w.numel() == 0 || r == 0;
        let splits = dw_out.splits;

        let dx = if !need_dx {
            None
        } else if empty {
            Some(g_.alloc_zeros(OP, x.numel())?)
        } else {
            let dx = g_.alloc(OP, x.numel())?;
            let args = [Arg::read(dyb), Arg::read(wb), Arg::write(&dx)];
            let workgroups = tile_grid(g.cin, g.batch * g.hw(), 1);
            g_.dispatch(&BACKWARD_INPUT, &params(&g), &args, workgroups)?;
            Some(dx)
        };

        if g.cout * k > 0 {
            let mut u = params(&g);
            u.splits = splits as u32;
            u.split_len = split_len(r, splits, TK as usize) as u32;
            u.out_offset = offset_u32(OP, dw_out, g.cout * k)?;
            if let Some(db_out) = db_out {
                if !db_out.arena.shares_storage(dw_out.arena) {
                    return Err(Error::invalid(
                        OP,
                        "the weight and bias gradients' parts must be in one arena",
                    ));
                }
                u.has_bias = 1;
                u.bias_offset = offset_u32(OP, db_out, g.cout)?;
            }
            let args = [
                Arg::read(xb),
                Arg::read(dyb),
                Arg::write(dw_out.arena.gpu_buffer(OP)?),
            ];
            let workgroups = tile_grid(g.cout, k, splits);
            g_.dispatch(&BACKWARD_WEIGHT_PARTIAL, &u, &args, workgroups)?;
        }
        Ok(dx.map(|dx| Tensor::from_gpu(x.shape(), dx)))
    }
}
