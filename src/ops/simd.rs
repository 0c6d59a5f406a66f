//! The CPU kernels' SIMD: a run of a kernel compiled for AVX2 where the processor has it, and
//! the loops over rows that the kernels share, written so that the compiler vectorises them.
//!
//! The crate is built for the baseline x86-64 (SSE2, four f32 lanes); a kernel that runs
//! through [`simd`] is compiled a second time for AVX2 (eight lanes) and that copy is taken
//! when the processor has it, and the kernels bound by `exp` a third time for AVX-512
//! (sixteen lanes). The copies give the same bits: the loops below fix their order of
//! operations (reductions in [`LANES`] partial sums, combined in a fixed tree) and Rust never
//! contracts a product and a sum into a fused multiply-add by itself.

/// Partial sums of the reductions below: one AVX2 register of f32.
pub(crate) const LANES: usize = 8;

/// A kernel to run through [`simd`]. Implementations mark `run` `#[inline(always)]`, so that
/// their loops are compiled inside the AVX2 copy.
pub(crate) trait Kernel {
    type Output;
    /// Whether the kernel takes a copy compiled for AVX-512 where the processor has it: the
    /// group norms' SiLU and attention's softmax, whose `exp` ran 1.6x faster there on Zen 4
    /// (the Winograd input transform ran slower, the output transform no faster).
    #[cfg_attr(
        not(target_arch = "x86_64"),
        allow(dead_code, reason = "only the x86-64 dispatch reads it")
    )]
    const AVX512: bool = false;
    fn run(self) -> Self::Output;
}

/// Runs `kernel` compiled for AVX2 where the processor has it (or for AVX-512, where the
/// kernel asks for it and the processor has it), else as it is.
pub(crate) fn simd<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<K: Kernel>(kernel: K) -> K::Output {
            kernel.run()
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<K: Kernel>(kernel: K) -> K::Output {
            kernel.run()
        }
        if K::AVX512 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the processor has AVX-512F, checked just above.
            return unsafe { avx512(kernel) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2, checked just above.
            return unsafe { avx2(kernel) };
        }
    }
    kernel.run()
}

/// `to = from` (the same length), `LANES` floats at a time: for rows of a few dozen floats,
/// where a call to `memcpy` costs more than the copy itself.
#[inline(always)]
pub(crate) fn copy_row(to: &mut [f32], from: &[f32]) {
    assert_eq!(to.len(), from.len(), "copy_row: lengths differ");
    let (mut to, mut from) = (to.chunks_exact_mut(LANES), from.chunks_exact(LANES));
    for (t, f) in (&mut to).zip(&mut from) {
        let f: [f32; LANES] = f.try_into().unwrap();
        t.copy_from_slice(&f);
    }
    for (t, f) in to.into_remainder().iter_mut().zip(from.remainder()) {
        *t = *f;
    }
}

/// The elements of `x` folded with `op` into `LANES` partial results (element `i` into lane
/// `i % LANES`), then those in a fixed tree.
#[inline(always)]
fn reduce(x: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut acc = [init; LANES];
    for chunk in chunks {
        let chunk: &[f32; LANES] = chunk.try_into().unwrap();
        for l in 0..LANES {
            acc[l] = op(acc[l], chunk[l]);
        }
    }
    for (a, &x) in acc.iter_mut().zip(rest) {
        *a = op(*a, x);
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    op(op(op(a0, a4), op(a2, a6)), op(op(a1, a5), op(a3, a7)))
}

/// `sum_i x_i`.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    reduce(x, 0.0, |a, b| a + b)
}

/// `max_i x_i` (negative infinity for none; a NaN element is passed over).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    reduce(x, f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::expf::sigmoid;

    /// SiLU of each value, through the AVX-512 copy where the processor has it.
    struct Silu<'a>(&'a [f32]);

    impl Kernel for Silu<'_> {
        type Output = Vec<f32>;
        const AVX512: bool = true;
        #[inline(always)]
        fn run(self) -> Vec<f32> {
            self.0.iter().map(|&v| v * sigmoid(v)).collect()
        }
    }

    #[test]
    fn the_avx512_copy_of_exp_agrees_with_the_baseline_to_the_bit() {
        let x: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.5) * 0.043).collect();
        let got = simd(Silu(&x));
        let base = Silu(&x).run();
        for (i, (g, b)) in got.iter().zip(&base).enumerate() {
            assert_eq!(g.to_bits(), b.to_bits(), "silu({}): {g} against {b}", x[i]);
        }
    }

    /// A kernel of the reductions, to compare its AVX2 copy with the baseline one.
    struct Reductions<'a>(&'a [f32]);

    impl Kernel for Reductions<'_> {
        type Output = [f32; 2];
        #[inline(always)]
        fn run(self) -> [f32; 2] {
            [sum(self.0), max(self.0)]
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
            let x = values(n, 1);
            let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let got = simd(Reductions(&x));
            assert!(
                (got[0] as f64 - want_sum).abs() <= 1e-6 * (n as f64 + 1.0),
                "sum of {n}"
            );
            assert_eq!(got[1], want_max, "max of {n}");
            let base = Reductions(&x).run();
            assert_eq!(
                got.map(f32::to_bits),
                base.map(f32::to_bits),
                "copies of {n}"
            );
        }
    }
}
