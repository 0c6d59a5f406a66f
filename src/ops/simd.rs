//! The CPU kernels' SIMD: a run of a kernel compiled for AVX2 where the processor has it, and
//! the loops over rows that the kernels share, written so that the compiler vectorises them.
//!
//! The crate is built for the baseline x86-64 (SSE2, four f32 lanes); a kernel that runs
//! through [`simd`] is compiled a second time for AVX2 (eight lanes) and that copy is taken
//! when the processor has it. The two give the same bits: the loops below fix their order of
//! operations (reductions in [`LANES`] partial sums, combined in a fixed tree) and Rust never
//! contracts a product and a sum into a fused multiply-add by itself.

/// Partial sums of the reductions below: one AVX2 register of f32.
pub(crate) const LANES: usize = 8;

/// A kernel to run through [`simd`]. Implementations mark `run` `#[inline(always)]`, so that
/// their loops are compiled inside the AVX2 copy.
pub(crate) trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `kernel` compiled for AVX2 where the processor has it, else as it is.
pub(crate) fn simd<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<K: Kernel>(kernel: K) -> K::Output {
            kernel.run()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2, checked just above.
            return unsafe { avx2(kernel) };
        }
    }
    kernel.run()
}

/// `y += a x`.
#[inline(always)]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `f(x_i, y_i)` over the shorter of `x` and `y`, folded with `op` into `LANES` partial
/// results (element `i` into lane `i % LANES`), then those in a fixed tree.
#[inline(always)]
fn reduce(
    x: &[f32],
    y: &[f32],
    init: f32,
    f: impl Fn(f32, f32) -> f32,
    op: impl Fn(f32, f32) -> f32,
) -> f32 {
    let n = x.len().min(y.len());
    let (x, y) = (x[..n].chunks_exact(LANES), y[..n].chunks_exact(LANES));
    let (x_rest, y_rest) = (x.remainder(), y.remainder());
    let mut acc = [init; LANES];
    for (x, y) in x.zip(y) {
        let (x, y): (&[f32; LANES], &[f32; LANES]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for l in 0..LANES {
            acc[l] = op(acc[l], f(x[l], y[l]));
        }
    }
    for ((a, &x), &y) in acc.iter_mut().zip(x_rest).zip(y_rest) {
        *a = op(*a, f(x, y));
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    op(op(op(a0, a4), op(a2, a6)), op(op(a1, a5), op(a3, a7)))
}

/// `sum_i x_i`.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    reduce(x, x, 0.0, |x, _| x, |a, b| a + b)
}

/// `sum_i x_i y_i` over the shorter of the two.
#[inline(always)]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    reduce(x, y, 0.0, |x, y| x * y, |a, b| a + b)
}

/// `max_i x_i` (negative infinity for none; a NaN element is passed over).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    reduce(
        x,
        x,
        f32::NEG_INFINITY,
        |x, _| x,
        |a, b| if b > a { b } else { a },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel of the reductions, to compare its AVX2 copy with the baseline one.
    struct Reductions<'a>(&'a [f32], &'a [f32]);

    impl Kernel for Reductions<'_> {
        type Output = [f32; 3];
        #[inline(always)]
        fn run(self) -> [f32; 3] {
            [sum(self.0), dot(self.0, self.1), max(self.0)]
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn reductions_match_f64_and_both_copies_agree_to_the_bit() {
        for n in [0, 1, 7, 8, 9, 63, 64, 70, 1000] {
            let (x, y) = (values(n, 1), values(n, 2));
            let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
            let want_dot: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let got = simd(Reductions(&x, &y));
            let tol = 1e-6 * (n as f64 + 1.0);
            assert!((got[0] as f64 - want_sum).abs() <= tol, "sum of {n}");
            assert!((got[1] as f64 - want_dot).abs() <= tol, "dot of {n}");
            assert_eq!(got[2], want_max, "max of {n}");
            let base = Reductions(&x, &y).run();
            assert_eq!(
                got.map(f32::to_bits),
                base.map(f32::to_bits),
                "copies of {n}"
            );
        }
    }

    #[test]
    fn axpy_adds_a_multiple() {
        let mut y = vec![1.0, 2.0, 3.0];
        axpy(&mut y, 2.0, &[1.0, -1.0, 0.5]);
        assert_eq!(y, [3.0, 0.0, 4.0]);
    }
}
