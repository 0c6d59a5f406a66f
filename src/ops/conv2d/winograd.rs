//! Winograd's minimal filtering for the CPU's 3x3 stride-1 convolutions (Lavin & Gray 2016,
//! "Fast Algorithms for Convolutional Neural Networks").
//!
//! `F(m x m, 3x3)` computes an `m x m` output tile from an `a x a` input tile `d`
//! (`a = m + 2`) and a 3x3 filter `g` as
//!
//! ```text
//! Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A                                            (1)
//! ```
//!
//! with `a^2` multiplications instead of `9 m^2`. Summed over input channels, the elementwise
//! product at each of the `a^2` positions `ξ` of the transformed tile is a matrix product:
//!
//! ```text
//! U[ξ] = (G g G^T)[ξ]                 [Cout, Cin]     the filters
//! V[ξ] = (B^T d B)[ξ]                 [Cin, T]        the input tiles (T of them)
//! M[ξ] = U[ξ] V[ξ]                    [Cout, T]                                  (2)
//! y tile = A^T M A
//! ```
//!
//! (1) is linear in `g`, so the weight gradient is its adjoint: with the output tile's
//! gradient `dY`,
//!
//! ```text
//! dM = A dY A^T,   dU[ξ] = sum_tiles dM[ξ] V[ξ]^T,   dw = G^T dU G               (3)
//! ```
//!
//! and the input gradient at stride 1 is the forward pass of the transposed convolution, so it
//! comes through (2) as well. The tiles of a chunk of images are transformed `LANES` at a time
//! (one tile per SIMD lane), the `a^2` products run on the `gemm` crate, and the images are
//! split across threads in chunks small enough that a chunk's `V` and `M` stay in cache; where
//! the batch is too small for that, a chunk's passes are spread over the threads instead.
//!
//! `F(4x4, 3x3)` (4x fewer multiplications than the direct sum) is what the convolutions use;
//! `F(2x2, 3x3)` (2.25x) is kept beside it, the smaller-error variant the tests and the
//! benchmark compare against. Both are exact in exact arithmetic; in f32 the error of
//! `F(4x4, 3x3)` grows with the transforms' constants (up to 8 and 1/24), about 4x that of
//! the direct sum (BENCHMARKS.md has the measured figures).

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu::{inner_parallelism, matmul, Mat};
use super::{filter_cache, Geometry};
use crate::ops::simd::{copy_row, simd, Kernel};

/// Tiles transformed together, one per SIMD lane (two AVX2 registers of f32).
const LANES: usize = 16;

type Lanes = [f32; LANES];

/// Largest input tile side of the variants below.
const MAX_A: usize = 6;

/// Tiles per chunk of work the transforms and products run on, at least: fewer make the
/// products too small for the GEMM kernels to pay their set-up.
const MIN_CHUNK_TILES: usize = 64;

/// Multiply-adds of a chunk's products below which spreading its passes over the threads
/// costs more in hand-offs than it gains. Measured on two cores: the tiny preset's 8x8 layers
/// (1.2 million at batch 8) ran slower spread, the mnist preset's 16x16 and 32x32 layers at
/// batch 1 (2.4 million) faster.
const MIN_SPREAD_PRODUCTS: usize = 1 << 21;

/// Floats of `V` and `M` one chunk may hold before it is cut (about a core's L2 cache).
const CHUNK_FLOATS: usize = 384 * 1024;

/// Filters transformed together, one per f64 lane (two AVX2 registers).
const FILTER_LANES: usize = 8;

type Lanes64 = [f64; FILTER_LANES];

#[inline(always)]
fn lanes64(f: impl Fn(usize) -> f64) -> Lanes64 {
    let mut out = [0.0; FILTER_LANES];
    for (l, o) in out.iter_mut().enumerate() {
        *o = f(l);
    }
    out
}

#[inline(always)]
fn lanes(f: impl Fn(usize) -> f32) -> Lanes {
    let mut out = [0.0; LANES];
    for (l, o) in out.iter_mut().enumerate() {
        *o = f(l);
    }
    out
}

/// Sets column `c` of a tile of lane vectors.
#[inline(always)]
fn set_column(tile: &mut [[Lanes; MAX_A]; MAX_A], c: usize, col: &[Lanes; MAX_A]) {
    for (row, v) in tile.iter_mut().zip(col) {
        row[c] = *v;
    }
}

/// Column `c` of a tile of lane vectors.
#[inline(always)]
fn column(tile: &[[Lanes; MAX_A]; MAX_A], c: usize) -> [Lanes; MAX_A] {
    let mut out = [[0.0; LANES]; MAX_A];
    for (o, row) in out.iter_mut().zip(tile) {
        *o = row[c];
    }
    out
}

/// One variant `F(m x m, 3x3)`: its three 1-D transforms and their adjoints. The 2-D
/// transforms apply the 1-D ones along rows and then along columns.
pub(crate) trait Variant: Sync {
    /// Output tile side `m`.
    const M: usize;
    /// Input tile side `a = m + 2`.
    const A: usize;
    /// `B^T d` for one column `d` of `A` values (the rest of the array unused).
    fn input(d: &[Lanes; MAX_A]) -> [Lanes; MAX_A];
    /// `A^T v`: `A` values to `M`.
    fn output(v: &[Lanes; MAX_A]) -> [Lanes; MAX_A];
    /// `A o`, the adjoint of `output`: `M` values to `A`.
    fn output_adjoint(o: &[Lanes; MAX_A]) -> [Lanes; MAX_A];
    /// `G g`: three filter taps to `A` values, in f64.
    fn filter(g: &[Lanes64; 3]) -> [Lanes64; MAX_A];
    /// `G^T u`, the adjoint of `filter`: `A` values to three.
    fn filter_adjoint(u: &[Lanes64; MAX_A]) -> [Lanes64; 3];
}

/// `F(2x2, 3x3)`: points 0, 1, -1 and infinity.
pub(crate) struct F2;

impl Variant for F2 {
    const M: usize = 2;
    const A: usize = 4;

    #[inline(always)]
    fn input(d: &[Lanes; MAX_A]) -> [Lanes; MAX_A] {
        let z = [0.0; LANES];
        [
            lanes(|l| d[0][l] - d[2][l]),
            lanes(|l| d[1][l] + d[2][l]),
            lanes(|l| d[2][l] - d[1][l]),
            lanes(|l| d[1][l] - d[3][l]),
            z,
            z,
        ]
    }

    #[inline(always)]
    fn output(v: &[Lanes; MAX_A]) -> [Lanes; MAX_A] {
        let z = [0.0; LANES];
        [
            lanes(|l| v[0][l] + v[1][l] + v[2][l]),
            lanes(|l| v[1][l] - v[2][l] - v[3][l]),
            z,
            z,
            z,
            z,
        ]
    }

    #[inline(always)]
    fn output_adjoint(o: &[Lanes; MAX_A]) -> [Lanes; MAX_A] {
        let z = [0.0; LANES];
        [
            o[0],
            lanes(|l| o[0][l] + o[1][l]),
            lanes(|l| o[0][l] - o[1][l]),
            lanes(|l| -o[1][l]),
            z,
            z,
        ]
    }

    #[inline(always)]
    fn filter([g0, g1, g2]: &[Lanes64; 3]) -> [Lanes64; MAX_A] {
        let z = [0.0; FILTER_LANES];
        [
            *g0,
            lanes64(|l| (g0[l] + g1[l] + g2[l]) * 0.5),
            lanes64(|l| (g0[l] - g1[l] + g2[l]) * 0.5),
            *g2,
            z,
            z,
        ]
    }

    #[inline(always)]
    fn filter_adjoint(u: &[Lanes64; MAX_A]) -> [Lanes64; 3] {
        [
            lanes64(|l| u[0][l] + (u[1][l] + u[2][l]) * 0.5),
            lanes64(|l| (u[1][l] - u[2][l]) * 0.5),
            lanes64(|l| (u[1][l] + u[2][l]) * 0.5 + u[3][l]),
        ]
    }
}

/// The reciprocals in `F(4x4, 3x3)`'s `G`, rounded in f64.
const SIXTH: f64 = 1.0 / 6.0;
const TWELFTH: f64 = 1.0 / 12.0;
const TWENTY_FOURTH: f64 = 1.0 / 24.0;

/// `F(4x4, 3x3)`: points 0, 1, -1, 2, -2 and infinity.
pub(crate) struct F4;

impl Variant for F4 {
    const M: usize = 4;
    const A: usize = 6;

    #[inline(always)]
    fn input(d: &[Lanes; MAX_A]) -> [Lanes; MAX_A] {
        [
            lanes(|l| 4.0 * d[0][l] - 5.0 * d[2][l] + d[4][l]),
            lanes(|l| -4.0 * (d[1][l] + d[2][l]) + d[3][l] + d[4][l]),
            lanes(|l| 4.0 * (d[1][l] - d[2][l]) - d[3][l] + d[4][l]),
            lanes(|l| 2.0 * (d[3][l] - d[1][l]) - d[2][l] + d[4][l]),
            lanes(|l| 2.0 * (d[1][l] - d[3][l]) - d[2][l] + d[4][l]),
            lanes(|l| 4.0 * d[1][l] - 5.0 * d[3][l] + d[5][l]),
        ]
    }

    #[inline(always)]
    fn output(v: &[Lanes; MAX_A]) -> [Lanes; MAX_A] {
        let z = [0.0; LANES];
        let s12: Lanes = lanes(|l| v[1][l] + v[2][l]);
        let d12: Lanes = lanes(|l| v[1][l] - v[2][l]);
        let s34: Lanes = lanes(|l| v[3][l] + v[4][l]);
        let d34: Lanes = lanes(|l| v[3][l] - v[4][l]);
        [
            lanes(|l| v[0][l] + s12[l] + s34[l]),
            lanes(|l| d12[l] + 2.0 * d34[l]),
            lanes(|l| s12[l] + 4.0 * s34[l]),
            lanes(|l| d12[l] + 8.0 * d34[l] + v[5][l]),
            z,
            z,
        ]
    }

    #[inline(always)]
    fn output_adjoint(o: &[Lanes; MAX_A]) -> [Lanes; MAX_A] {
        let even: Lanes = lanes(|l| o[0][l] + o[2][l]);
        let even4: Lanes = lanes(|l| o[0][l] + 4.0 * o[2][l]);
        let odd: Lanes = lanes(|l| o[1][l] + o[3][l]);
        let odd2: Lanes = lanes(|l| 2.0 * o[1][l] + 8.0 * o[3][l]);
        [
            o[0],
            lanes(|l| even[l] + odd[l]),
            lanes(|l| even[l] - odd[l]),
            lanes(|l| even4[l] + odd2[l]),
            lanes(|l| even4[l] - odd2[l]),
            o[3],
        ]
    }

    // Products with the reciprocals (rounded in f64, far below f32's rounding) rather than
    // divisions: a division per value made these transforms an eighth of a sampling step.
    #[inline(always)]
    fn filter([g0, g1, g2]: &[Lanes64; 3]) -> [Lanes64; MAX_A] {
        let even: Lanes64 = lanes64(|l| g0[l] * TWENTY_FOURTH + g2[l] * SIXTH);
        let odd: Lanes64 = lanes64(|l| g1[l] * TWELFTH);
        [
            lanes64(|l| g0[l] * 0.25),
            lanes64(|l| -(g0[l] + g1[l] + g2[l]) * SIXTH),
            lanes64(|l| -(g0[l] - g1[l] + g2[l]) * SIXTH),
            lanes64(|l| even[l] + odd[l]),
            lanes64(|l| even[l] - odd[l]),
            *g2,
        ]
    }

    #[inline(always)]
    fn filter_adjoint(u: &[Lanes64; MAX_A]) -> [Lanes64; 3] {
        [
            lanes64(|l| {
                u[0][l] * 0.25 - (u[1][l] + u[2][l]) * SIXTH + (u[3][l] + u[4][l]) * TWENTY_FOURTH
            }),
            lanes64(|l| (u[2][l] - u[1][l]) * SIXTH + (u[3][l] - u[4][l]) * TWELFTH),
            lanes64(|l| (u[3][l] + u[4][l] - u[1][l] - u[2][l]) * SIXTH + u[5][l]),
        ]
    }
}

/// True where (2) applies: a 3x3 kernel at stride 1.
pub(crate) fn applies(g: &Geometry) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == 1
}

/// How the tiles of a convolution are laid out and cut into chunks of whole images.
///
/// The transforms read their tiles from a zero-padded copy of the chunk's planes, one tile
/// `a x a` at `(ty m, tx m)` of a plane `th m + 2` rows by `m (tw + 1)` columns (the last
/// `m - 2` never read), and write the output tiles to planes `th m` by `tw m` that are
/// cropped afterwards: no index is checked against the image's edge inside the loops. The
/// copies hold one more image, all zeros, where lanes past a chunk's last tile read and write.
/// Both are stored channel by channel, each channel's images together (`[C, images + 1, ..]`),
/// and so is `V` (`[Cin, a^2, n]`), so that a block of channels is one run of each.
///
/// The padded planes are stored split by column phase: each is `m` planes `hp x (tw + 1)`,
/// phase `k` holding the columns `k, m + k, 2m + k, ...`. Column `c` of tile `tx` is then
/// column `tx + c / m` of phase `c % m`, so the same tap of `run` tiles side by side in a
/// tile row is `run` consecutive floats: one vector load instead of `run` scalar ones.
#[derive(Clone, Copy)]
struct Tiling {
    /// Tile rows and columns of one image.
    th: usize,
    tw: usize,
    /// Images per chunk.
    images: usize,
    /// Whether the chunks run one after another, each one's passes spread over the threads
    /// (the input tiles by blocks of channels, the products by position, the output tiles by
    /// blocks of channels, the crop by planes), rather than each thread taking chunks of its
    /// own: where the batch is too small to give every thread a chunk of `MIN_CHUNK_TILES`.
    spread: bool,
    /// Tiles of a full chunk, rounded up to whole lane groups: the row length of `V` and `M`.
    n: usize,
    /// Rows of a padded input plane, and columns of each of its phases.
    hp: usize,
    phase: usize,
    /// Lanes of a group that read consecutive tiles of one tile row: the largest power of two
    /// that divides both `tw` and `LANES`.
    run: usize,
    /// Rows and columns of an output plane of whole tiles.
    ho_t: usize,
    wo_t: usize,
}

impl Tiling {
    /// The tiling of `g`; with `spread`, chunks may spread their passes over the threads.
    fn new<T: Variant>(g: &Geometry, spread: bool) -> Tiling {
        let (th, tw) = (g.ho.div_ceil(T::M), g.wo.div_ceil(T::M));
        let per_image = (th * tw).max(1);
        let per_tile = T::A * T::A * (g.cin + g.cout);
        let fit = (CHUNK_FLOATS / per_tile.max(1)).max(MIN_CHUNK_TILES);
        let fit_images = (fit / per_image).clamp(1, g.batch.max(1));
        // A chunk of its own for every thread, where the batch allows one as large as the
        // cache allows or of `MIN_CHUNK_TILES`.
        let threads = rayon::current_num_threads();
        let own = (g.batch / threads).min(fit_images);
        // Else, where allowed and large enough, chunks as large as the cache allows, one after
        // another, each one's passes spread over the threads.
        let products = T::A * T::A * g.cin * g.cout * fit_images * per_image;
        let spread = spread
            && threads > 1
            && own * per_image < MIN_CHUNK_TILES.min(fit_images * per_image)
            && products >= MIN_SPREAD_PRODUCTS;
        let images = if spread || own == 0 { fit_images } else { own };
        Tiling {
            th,
            tw,
            images,
            spread,
            n: (images * per_image).next_multiple_of(LANES),
            hp: th * T::M + 2,
            phase: tw + 1,
            run: 1 << tw.trailing_zeros().min(LANES.trailing_zeros()),
            ho_t: th * T::M,
            wo_t: tw * T::M,
        }
    }

    /// For each lane of the group starting at tile `t0` of a chunk of `images` images, the
    /// offset of its tile's top-left corner in planes of one channel `image_step` floats
    /// apart from image to image, where tile rows are `row_step` floats apart and tiles in a
    /// row `col_step` (`images` itself, the zero image, past the last tile).
    fn lane_offsets(
        &self,
        t0: usize,
        images: usize,
        image_step: usize,
        (row_step, col_step): (usize, usize),
    ) -> [usize; LANES] {
        let per_image = self.th * self.tw;
        std::array::from_fn(|l| {
            let t = (t0 + l).min(images * per_image);
            let (b, ty, tx) = (t / per_image, t % per_image / self.tw, t % self.tw);
            b * image_step + ty * row_step + tx * col_step
        })
    }

    /// Image slots of a channel's padded or output planes: the chunk's and the zero image.
    fn slots(&self) -> usize {
        self.images + 1
    }

    /// Floats of an output plane of whole tiles.
    fn out_plane(&self) -> usize {
        self.ho_t * self.wo_t
    }

    /// Floats of one phase of a padded input plane.
    fn phase_plane(&self) -> usize {
        self.hp * self.phase
    }

    /// Floats of a whole phase-split padded input plane: its `m` phases.
    fn split_plane<T: Variant>(&self) -> usize {
        T::M * self.phase_plane()
    }
}

/// Copies `planes` planes `h x w` into planes `rows x cols` at row `top`, column `left`,
/// zeros around them.
fn pad_planes(
    src: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (top, left): (usize, usize),
    (rows, cols): (usize, usize),
    dst: &mut [f32],
) {
    let copied = h.min(rows - top.min(rows));
    let width = w.min(cols - left.min(cols));
    for (p, out) in dst.chunks_exact_mut(rows * cols).take(planes).enumerate() {
        out[..top * cols].fill(0.0);
        out[(top + copied) * cols..].fill(0.0);
        for r in 0..copied {
            let row = &mut out[(top + r) * cols..][..cols];
            row[..left].fill(0.0);
            copy_row(
                &mut row[left..left + width],
                &src[(p * h + r) * w..][..width],
            );
            row[left + width..].fill(0.0);
        }
    }
}

/// Columns of a padded plane that `deal` takes together: one AVX2 register per phase.
const DEAL_BLOCK: usize = 8;

/// Deals the columns of a padded plane out to its `M` phases: `split[k][i] = padded[M i + k]`
/// (`i` runs over the rows' columns `q` one row after the other), `DEAL_BLOCK` values of `i`
/// at a time (the compiler moves them one by one: a register transpose measured no faster).
#[inline(always)]
fn deal<const M: usize>(padded: &[f32], split: &mut [f32]) {
    let len = split.len() / M;
    let mut phases = split.chunks_exact_mut(len);
    let mut to: [&mut [f32]; M] = std::array::from_fn(|_| phases.next().unwrap());
    let whole = len / DEAL_BLOCK * DEAL_BLOCK;
    for i0 in (0..whole).step_by(DEAL_BLOCK) {
        let block = &padded[i0 * M..][..DEAL_BLOCK * M];
        for (k, t) in to.iter_mut().enumerate() {
            let t: &mut [f32; DEAL_BLOCK] = (&mut t[i0..i0 + DEAL_BLOCK]).try_into().unwrap();
            *t = std::array::from_fn(|i| block[i * M + k]);
        }
    }
    for i in whole..len {
        for (k, t) in to.iter_mut().enumerate() {
            t[i] = padded[i * M + k];
        }
    }
}

/// Copies the planes of a block of channels of a chunk's images `src [images, C, h, w]` into
/// phase-split padded planes `dst [block, slots, m, hp, tw + 1]` (the layout `Tiling`
/// describes), the image at row `top`, column `left` of the padded plane, zeros around it, and
/// a plane of zeros in the slot after the last image (where lanes past the last tile read).
/// Each padded plane is built in `padded`, whose zeros outside the image stay from plane to
/// plane, then its columns dealt out to the phases.
struct SplitPlanes<'a, T> {
    tl: &'a Tiling,
    src: &'a [f32],
    /// `C`, and the block's first channel.
    channels: usize,
    first: usize,
    images: usize,
    hw: (usize, usize),
    top_left: (usize, usize),
    padded: &'a mut [f32],
    dst: &'a mut [f32],
    variant: std::marker::PhantomData<T>,
}

impl<T: Variant> Kernel for SplitPlanes<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let ((h, w), (top, left)) = (self.hw, self.top_left);
        let (rows, cols) = (self.tl.hp, T::M * self.tl.phase);
        let copied = h.min(rows - top.min(rows));
        let width = w.min(cols - left.min(cols));
        let split = rows * cols;
        let padded = &mut self.padded[..split];
        padded.fill(0.0);
        for (c, slots) in self
            .dst
            .chunks_exact_mut(self.tl.slots() * split)
            .enumerate()
        {
            let (images, zero) = slots.split_at_mut(self.images * split);
            for (b, out) in images.chunks_exact_mut(split).enumerate() {
                let src = &self.src[(b * self.channels + self.first + c) * h * w..];
                for r in 0..copied {
                    let to = &mut padded[(top + r) * cols + left..][..width];
                    copy_row(to, &src[r * w..][..width]);
                }
                match T::M {
                    2 => deal::<2>(padded, out),
                    4 => deal::<4>(padded, out),
                    m => unreachable!("no Winograd variant F({m}x{m}, 3x3)"),
                }
            }
            zero[..split].fill(0.0);
        }
    }
}

/// `v [block, a^2, n] = B^T d B` of every tile of a block of channels' phase-split padded
/// planes `xp [block, slots, m, hp, tw + 1]`, read `RUN` lanes (`Tiling::run`) at a time.
struct InputTiles<'a, T, const RUN: usize> {
    tl: &'a Tiling,
    xp: &'a [f32],
    images: usize,
    v: &'a mut [f32],
    variant: std::marker::PhantomData<T>,
}

impl<T: Variant, const RUN: usize> Kernel for InputTiles<'_, T, RUN> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (a, n, tl) = (T::A, self.tl.n, self.tl);
        let plane = tl.split_plane::<T>();
        let (channel, phase_plane) = (tl.slots() * plane, tl.phase_plane());
        // Every element of `d` and `e` that is read is written first in each iteration.
        let mut d = [[[0.0f32; LANES]; MAX_A]; MAX_A];
        let mut e = [[[0.0f32; LANES]; MAX_A]; MAX_A];
        for t0 in (0..n).step_by(LANES) {
            let steps = (T::M * tl.phase, 1);
            let offsets = tl.lane_offsets(t0, self.images, plane, steps);
            for (ci, vc) in self.v.chunks_exact_mut(a * a * n).enumerate() {
                // The `RUN` lanes from `l0` hold consecutive tiles of one tile row (or all
                // lie in the zero image): column `c` of theirs is a run of `xp`.
                for l0 in (0..LANES).step_by(RUN) {
                    let tile = &self.xp[offsets[l0] + ci * channel..];
                    for (r, row) in d.iter_mut().enumerate().take(a) {
                        let xr = &tile[r * tl.phase..];
                        for (c, lanes) in row.iter_mut().enumerate().take(a) {
                            let at = c % T::M * phase_plane + c / T::M;
                            lanes[l0..l0 + RUN].copy_from_slice(&xr[at..at + RUN]);
                        }
                    }
                }
                // Along the rows' index (B^T d), then along the columns' ((B^T d) B).
                for c in 0..a {
                    set_column(&mut e, c, &T::input(&column(&d, c)));
                }
                for (i, row) in e.iter().enumerate().take(a) {
                    let out = T::input(row);
                    for (j, o) in out.iter().enumerate().take(a) {
                        vc[(i * a + j) * n + t0..][..LANES].copy_from_slice(o);
                    }
                }
            }
        }
    }
}

/// `yp [block, slots, th m, tw m] = A^T M A` of every tile of a block of channels, the first
/// `first`, from `m [a^2, C, n]`.
struct OutputTiles<'a, T> {
    tl: &'a Tiling,
    m: &'a [f32],
    first: usize,
    images: usize,
    yp: &'a mut [f32],
    variant: std::marker::PhantomData<T>,
}

impl<T: Variant> Kernel for OutputTiles<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (a, n, tl) = (T::A, self.tl.n, self.tl);
        let (plane, m_plane) = (tl.out_plane(), self.m.len() / (a * a));
        // Every element of `rows` and `mi` that is read is written first in each iteration.
        let mut rows = [[[0.0f32; LANES]; MAX_A]; MAX_A];
        let mut mi = [[0.0f32; LANES]; MAX_A];
        for t0 in (0..n).step_by(LANES) {
            let steps = (T::M * tl.wo_t, T::M);
            let offsets = tl.lane_offsets(t0, self.images, plane, steps);
            for (co, yc) in self.yp.chunks_exact_mut(tl.slots() * plane).enumerate() {
                let m = &self.m[(self.first + co) * n + t0..];
                for (i, row) in rows.iter_mut().enumerate().take(a) {
                    for (j, v) in mi.iter_mut().enumerate().take(a) {
                        v.copy_from_slice(&m[(i * a + j) * m_plane..][..LANES]);
                    }
                    *row = T::output(&mi);
                }
                for c in 0..T::M {
                    let col = T::output(&column(&rows, c));
                    for (l, &o) in offsets.iter().enumerate() {
                        let out = &mut yc[o + c..];
                        for (r, v) in col.iter().enumerate().take(T::M) {
                            out[r * tl.wo_t] = v[l];
                        }
                    }
                }
            }
        }
    }
}

/// `dm [a^2, C, n] = A dY A^T` of every tile of the planes `dyp [images + 1, C, th m, tw m]`.
struct OutputAdjointTiles<'a, T> {
    tl: &'a Tiling,
    channels: usize,
    dyp: &'a [f32],
    images: usize,
    dm: &'a mut [f32],
    variant: std::marker::PhantomData<T>,
}

impl<T: Variant> Kernel for OutputAdjointTiles<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (a, n, tl) = (T::A, self.tl.n, self.tl);
        let (plane, m_plane) = (tl.ho_t * tl.wo_t, self.channels * n);
        // Every element of `o` and `e` that is read is written first in each iteration.
        let mut o = [[[0.0f32; LANES]; MAX_A]; MAX_A];
        let mut e = [[[0.0f32; LANES]; MAX_A]; MAX_A];
        for t0 in (0..n).step_by(LANES) {
            let steps = (T::M * tl.wo_t, T::M);
            let offsets = tl.lane_offsets(t0, self.images, self.channels * plane, steps);
            for co in 0..self.channels {
                for (l, &off) in offsets.iter().enumerate() {
                    let tile = &self.dyp[off + co * plane..];
                    for (r, row) in o.iter_mut().enumerate().take(T::M) {
                        for (c, &v) in tile[r * tl.wo_t..][..T::M].iter().enumerate() {
                            row[c][l] = v;
                        }
                    }
                }
                for c in 0..T::M {
                    set_column(&mut e, c, &T::output_adjoint(&column(&o, c)));
                }
                for (i, row) in e.iter().enumerate().take(a) {
                    let out = T::output_adjoint(row);
                    for (j, v) in out.iter().enumerate().take(a) {
                        self.dm[(i * a + j) * m_plane + co * n + t0..][..LANES].copy_from_slice(v);
                    }
                }
            }
        }
    }
}

/// Filters transformed together: `U`'s positions are `Cout Cin` apart, so each block is
/// transformed into a buffer of its own and copied out in runs of this many.
const FILTER_BLOCK: usize = 256;

/// `U [a^2, n] = G g G^T` in f64 of the `n` filters `w [n, 3, 3]`, `FILTER_LANES` at a time:
/// `(G g)` for each column of the taps, then `G` along the rows of that.
struct FilterTiles<'a, T> {
    w: &'a [f32],
    u: &'a mut [f32],
    variant: std::marker::PhantomData<T>,
}

impl<T: Variant> Kernel for FilterTiles<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (a, n) = (T::A, self.w.len() / 9);
        for (group, taps) in self.w.chunks(9 * FILTER_LANES).enumerate() {
            let filters = taps.len() / 9;
            let tap = |r: usize, c: usize| {
                lanes64(|l| taps.get(l * 9 + r * 3 + c).map_or(0.0, |&v| v as f64))
            };
            let cols: [[Lanes64; MAX_A]; 3] =
                std::array::from_fn(|c| T::filter(&[tap(0, c), tap(1, c), tap(2, c)]));
            let [c0, c1, c2] = &cols;
            for (i, ((x0, x1), x2)) in c0.iter().zip(c1).zip(c2).take(a).enumerate() {
                let row = T::filter(&[*x0, *x1, *x2]);
                for (j, values) in row[..a].iter().enumerate() {
                    let out = &mut self.u[(i * a + j) * n + group * FILTER_LANES..][..filters];
                    out.iter_mut().zip(values).for_each(|(o, &v)| *o = v as f32);
                }
            }
        }
    }
}

/// `dw [n, 3, 3] = G^T dU G` in f64 of `dU [a^2, ...]`, whose position `ξ` holds the `n`
/// filters' values from `du[ξ * stride]`, `FILTER_LANES` filters at a time.
struct FilterAdjointTiles<'a, T> {
    du: &'a [f32],
    stride: usize,
    dw: &'a mut [f32],
    variant: std::marker::PhantomData<T>,
}

impl<T: Variant> Kernel for FilterAdjointTiles<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let a = T::A;
        for (group, taps) in self.dw.chunks_mut(9 * FILTER_LANES).enumerate() {
            let filters = taps.len() / 9;
            let f0 = group * FILTER_LANES;
            let value = |xi: usize| {
                let run = &self.du[xi * self.stride + f0..][..filters];
                lanes64(|l| run.get(l).map_or(0.0, |&v| v as f64))
            };
            let mut tile = [[[0.0f64; FILTER_LANES]; MAX_A]; MAX_A];
            for (i, row) in tile[..a].iter_mut().enumerate() {
                for (j, v) in row[..a].iter_mut().enumerate() {
                    *v = value(i * a + j);
                }
            }
            let rows: [[Lanes64; 3]; MAX_A] = std::array::from_fn(|i| T::filter_adjoint(&tile[i]));
            for c in 0..3 {
                let col = T::filter_adjoint(&std::array::from_fn(|i| rows[i][c]));
                for (r, values) in col.iter().enumerate() {
                    for (l, tap) in taps.chunks_exact_mut(9).enumerate() {
                        tap[r * 3 + c] = values[l] as f32;
                    }
                }
            }
        }
    }
}

/// The transformed filters `U [a^2, Cout, Cin]` of `w [Cout, Cin, 3, 3]`, blocks of filters
/// in parallel.
fn transform_filters<T: Variant>(g: &Geometry, w: &[f32]) -> Vec<f32> {
    let (a, plane) = (T::A, g.cout * g.cin);
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(9 * FILTER_BLOCK)
        .map(|wb| {
            let mut ub = vec![0.0f32; a * a * (wb.len() / 9)];
            simd(FilterTiles::<T> {
                w: wb,
                u: &mut ub,
                variant: std::marker::PhantomData,
            });
            ub
        })
        .collect();
    let mut u = vec![0.0f32; a * a * plane];
    for (k, ub) in blocks.iter().enumerate() {
        let len = ub.len() / (a * a);
        for (xi, run) in ub.chunks_exact(len).enumerate() {
            u[xi * plane + k * FILTER_BLOCK..][..len].copy_from_slice(run);
        }
    }
    u
}

/// The weight gradient `dw [Cout, Cin, 3, 3] = G^T dU G` of `dU [a^2, Cout, Cin]`, blocks of
/// filters in parallel.
fn filters_adjoint<T: Variant>(g: &Geometry, du: &[f32]) -> Vec<f32> {
    let plane = g.cout * g.cin;
    let mut dw = vec![0.0f32; plane * 9];
    dw.par_chunks_mut(9 * FILTER_BLOCK)
        .enumerate()
        .for_each(|(k, dwb)| {
            simd(FilterAdjointTiles::<T> {
                du: &du[k * FILTER_BLOCK..],
                stride: plane,
                dw: dwb,
                variant: std::marker::PhantomData,
            })
        });
    dw
}

/// What the forward pass adds to each output: the bias, a value per (image, channel) and a
/// residual of the output's shape, all optional.
#[derive(Clone, Copy, Default)]
pub(crate) struct Addends<'a> {
    pub bias: Option<&'a [f32]>,
    pub add: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
}

/// Plane `p` of a chunk of images starting at image `b0` (its image `p / Cout`, channel
/// `p % Cout`): `y = yp + addends`, the output plane cropped to `Ho x Wo`; writes every
/// element of `out`.
fn crop_plane(
    g: &Geometry,
    tl: &Tiling,
    yp: &[f32],
    (b0, p): (usize, usize),
    e: &Addends,
    out: &mut [MaybeUninit<f32>],
) {
    let (i, co) = (p / g.cout, p % g.cout);
    let b = b0 + i;
    let yp = &yp[(co * tl.slots() + i) * tl.out_plane()..];
    let shift = e.bias.map_or(0.0, |v| v[co]) + e.add.map_or(0.0, |v| v[b * g.cout + co]);
    let residual = e
        .residual
        .map(|r| &r[(b * g.cout + co) * g.out_hw()..][..g.out_hw()]);
    for (oy, row) in out.chunks_exact_mut(g.wo).enumerate() {
        let src = &yp[oy * tl.wo_t..][..g.wo];
        match residual {
            Some(r) => {
                let r = &r[oy * g.wo..][..g.wo];
                for ((o, s), r) in row.iter_mut().zip(src).zip(r) {
                    o.write(s + shift + r);
                }
            }
            None => row.iter_mut().zip(src).for_each(|(o, s)| {
                o.write(s + shift);
            }),
        }
    }
}

/// Buffers of a chunk: one padded input plane and the chunk's phase-split ones, `V`, `M` (or
/// `dM`), and the output planes (or the padded `dy`).
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    xp: Vec<f32>,
    v: Vec<f32>,
    m: Vec<f32>,
    yp: Vec<f32>,
}

thread_local! {
    /// The buffers of the last `Scratch` this thread recycled, for the next convolution.
    static SPARE: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// Channels per block where a pass is spread over the threads: one block per thread.
fn per_block(channels: usize) -> usize {
    channels.div_ceil(rayon::current_num_threads()).max(1)
}

impl Scratch {
    /// Buffers of the sizes `g` and `tl` need, the last convolution's on this thread where
    /// there was one: no allocation and no zero fill, so their contents are stale, and every
    /// pass writes each element it later reads.
    fn new<T: Variant>(g: &Geometry, tl: &Tiling) -> Scratch {
        let (a2, n) = (T::A * T::A, tl.n);
        let mut s = SPARE.with(|spare| spare.take()).unwrap_or_default();
        // One padded plane per block of channels where the passes are spread, else one.
        let blocks = if tl.spread {
            g.cin.div_ceil(per_block(g.cin))
        } else {
            1
        };
        s.padded.resize(blocks * tl.split_plane::<T>(), 0.0);
        s.xp.resize(g.cin * tl.slots() * tl.split_plane::<T>(), 0.0);
        s.v.resize(g.cin * a2 * n, 0.0);
        s.m.resize(a2 * g.cout * n, 0.0);
        s.yp.resize(g.cout * tl.slots() * tl.out_plane(), 0.0);
        s
    }

    /// Leaves the buffers to this thread's next convolution.
    fn recycle(self) {
        SPARE.with(|spare| spare.replace(Some(self)));
    }

    /// Pads the chunk's `images` images of `x` and transforms their tiles into `V`, by blocks
    /// of channels over the threads where `tl.spread`.
    fn input_tiles<T: Variant>(&mut self, g: &Geometry, tl: &Tiling, x: &[f32], images: usize) {
        let plane = tl.split_plane::<T>();
        let block = |first: usize, padded: &mut [f32], xp: &mut [f32], v: &mut [f32]| {
            simd(SplitPlanes::<T> {
                tl,
                src: x,
                channels: g.cin,
                first,
                images,
                hw: (g.h, g.w),
                top_left: (g.pad_top, g.pad_left),
                padded,
                dst: xp,
                variant: std::marker::PhantomData,
            });
            macro_rules! input_tiles {
                ($run:literal) => {
                    simd(InputTiles::<T, $run> {
                        tl,
                        xp,
                        images,
                        v,
                        variant: std::marker::PhantomData,
                    })
                };
            }
            match tl.run {
                16 => input_tiles!(16),
                8 => input_tiles!(8),
                4 => input_tiles!(4),
                2 => input_tiles!(2),
                _ => input_tiles!(1),
            }
        };
        if tl.spread {
            let per = per_block(g.cin);
            let padded = self.padded.par_chunks_mut(plane);
            let xp = self.xp.par_chunks_mut(per * tl.slots() * plane);
            let v = self.v.par_chunks_mut(per * T::A * T::A * tl.n);
            (padded.zip(xp).zip(v).enumerate())
                .for_each(|(k, ((padded, xp), v))| block(k * per, padded, xp, v));
        } else {
            block(0, &mut self.padded, &mut self.xp, &mut self.v);
        }
    }

    /// `M[ξ] = U[ξ] V[ξ]` at every position `ξ` of the tile, the positions over the threads
    /// where `tl.spread`, else one after another, each with parallelism `par`.
    fn products<T: Variant>(&mut self, g: &Geometry, tl: &Tiling, u: &[f32], par: Parallelism) {
        let (a2, n, v) = (T::A * T::A, tl.n, &self.v);
        let product = |(xi, m): (usize, &mut [f32])| {
            matmul(
                m,
                Mat::rows(&u[xi * g.cout * g.cin..][..g.cout * g.cin], g.cin),
                Mat::rows(&v[xi * n..], a2 * n),
                (g.cout, n, g.cin),
                false,
                if tl.spread { Parallelism::None } else { par },
            )
        };
        if tl.spread {
            self.m
                .par_chunks_mut(g.cout * n)
                .enumerate()
                .for_each(product);
        } else {
            self.m.chunks_mut(g.cout * n).enumerate().for_each(product);
        }
    }

    /// The output tiles of the chunk's `images` images, by blocks of channels over the
    /// threads where `tl.spread`.
    fn output_tiles<T: Variant>(&mut self, g: &Geometry, tl: &Tiling, images: usize) {
        let m = &self.m;
        let block = |(k, yp): (usize, &mut [f32])| {
            simd(OutputTiles::<T> {
                tl,
                m,
                first: k * per_block(g.cout),
                images,
                yp,
                variant: std::marker::PhantomData,
            })
        };
        if tl.spread {
            let per = per_block(g.cout) * tl.slots() * tl.out_plane();
            self.yp.par_chunks_mut(per).enumerate().for_each(block);
        } else {
            block((0, &mut self.yp));
        }
    }

    /// The chunk's output `y` (images from `b0`) cropped from the output tiles, plus the
    /// addends, by planes over the threads where `tl.spread`.
    fn crop(&self, g: &Geometry, tl: &Tiling, b0: usize, e: &Addends, y: &mut [MaybeUninit<f32>]) {
        let plane = |(p, out): (usize, &mut [MaybeUninit<f32>])| {
            crop_plane(g, tl, &self.yp, (b0, p), e, out)
        };
        if tl.spread {
            y.par_chunks_mut(g.out_hw()).enumerate().for_each(plane);
        } else {
            y.chunks_mut(g.out_hw()).enumerate().for_each(plane);
        }
    }
}

/// Forward pass (2) of `x [B, Cin, H, W]` and `w [Cout, Cin, 3, 3]` plus the addends:
/// `y [B, Cout, Ho, Wo]`. With `cache`, `w`'s transformed filters come from (and go to) the
/// filter cache when one is open (`filter_cache.rs`).
pub(crate) fn forward<T: Variant>(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    e: &Addends,
    cache: bool,
) -> Vec<f32> {
    let len = g.batch * g.cout * g.out_hw();
    if len == 0 || g.cin == 0 {
        return vec![0.0; len];
    }
    // Not zero-filled: every chunk's `crop` writes each of its elements.
    let mut y: Vec<f32> = Vec::with_capacity(len);
    let tl = Tiling::new::<T>(g, true);
    let u = if cache {
        filter_cache::transformed(g, T::A, w, || transform_filters::<T>(g, w))
    } else {
        Arc::new(transform_filters::<T>(g, w))
    };
    let (x_image, y_image) = (g.cin * g.hw(), g.cout * g.out_hw());
    let par = inner_parallelism(g.batch.div_ceil(tl.images));
    let chunk = |s: &mut Scratch, b0: usize, yc: &mut [MaybeUninit<f32>]| {
        let images = yc.len() / y_image;
        s.input_tiles::<T>(g, &tl, &x[b0 * x_image..][..images * x_image], images);
        s.products::<T>(g, &tl, &u, par);
        s.output_tiles::<T>(g, &tl, images);
        s.crop(g, &tl, b0, e, yc);
    };
    let unwritten = &mut y.spare_capacity_mut()[..len];
    if tl.spread {
        let mut s = Scratch::new::<T>(g, &tl);
        for (c, yc) in unwritten.chunks_mut(tl.images * y_image).enumerate() {
            chunk(&mut s, c * tl.images, yc);
        }
        s.recycle();
    } else {
        // One run of consecutive chunks per thread, so that each thread allocates one Scratch.
        let threads = rayon::current_num_threads();
        let per_thread = g.batch.div_ceil(tl.images).div_ceil(threads) * tl.images;
        unwritten
            .par_chunks_mut(per_thread * y_image)
            .enumerate()
            .for_each(|(run, yr)| {
                let mut s = Scratch::new::<T>(g, &tl);
                for (i, yc) in yr.chunks_mut(tl.images * y_image).enumerate() {
                    chunk(&mut s, run * per_thread + i * tl.images, yc);
                }
                s.recycle();
            });
    }
    // SAFETY: the chunks cover `0..len`, and `crop` wrote every element of each.
    unsafe { y.set_len(len) };
    y
}

/// Weight gradient (3) of the convolution of `x [B, Cin, H, W]` given `dy [B, Cout, Ho, Wo]`:
/// `dw [Cout, Cin, 3, 3]`.
pub(crate) fn weight_gradient<T: Variant>(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (a2, plane) = (T::A * T::A, g.cout * g.cin);
    if g.batch * g.out_hw() == 0 || plane == 0 {
        return vec![0.0; plane * 9];
    }
    let tl = Tiling::new::<T>(g, false);
    let n = tl.n;
    let (x_image, y_image) = (g.cin * g.hw(), g.cout * g.out_hw());
    let (chunks, threads) = (g.batch.div_ceil(tl.images), rayon::current_num_threads());
    let par = inner_parallelism(chunks);
    // One run of consecutive chunks per thread, each with one Scratch and one sum of dU.
    let per_thread = chunks.div_ceil(threads);
    let du = (0..chunks.div_ceil(per_thread))
        .into_par_iter()
        .map(|run| {
            let mut s = Scratch::new::<T>(g, &tl);
            let mut du = vec![0.0f32; a2 * plane];
            for chunk in run * per_thread..((run + 1) * per_thread).min(chunks) {
                let b0 = chunk * tl.images;
                let images = tl.images.min(g.batch - b0);
                s.input_tiles::<T>(g, &tl, &x[b0 * x_image..][..images * x_image], images);
                let dims = (tl.ho_t, tl.wo_t);
                let dyc = &dy[b0 * y_image..][..images * y_image];
                pad_planes(dyc, images * g.cout, (g.ho, g.wo), (0, 0), dims, &mut s.yp);
                s.yp[images * g.cout * dims.0 * dims.1..].fill(0.0);
                simd(OutputAdjointTiles::<T> {
                    tl: &tl,
                    channels: g.cout,
                    dyp: &s.yp,
                    images,
                    dm: &mut s.m,
                    variant: std::marker::PhantomData,
                });
                for xi in 0..a2 {
                    // dU[ξ] [Cout, Cin] += dM[ξ] [Cout, n] V[ξ]^T [n, Cin]
                    matmul(
                        &mut du[xi * plane..][..plane],
                        Mat::rows(&s.m[xi * g.cout * n..][..g.cout * n], n),
                        Mat::rows(&s.v[xi * n..], a2 * n).transposed(),
                        (g.cout, g.cin, n),
                        true,
                        par,
                    );
                }
            }
            s.recycle();
            du
        })
        .reduce(
            || vec![0.0f32; a2 * plane],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(u, v)| *u += v);
                a
            },
        );
    filters_adjoint::<T>(g, &du)
}
