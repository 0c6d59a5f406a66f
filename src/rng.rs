//! Counter-based random numbers, mirrored in `shaders/rng.wgsl`.
//!
//! The generator is Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as
//! easy as 1, 2, 3", SC 2011): a keyed bijection of a 128-bit counter, so the value at any
//! position of a stream is computed directly, in any order, on any device. A stream is named
//! by a `seed` (the 64-bit key) and its elements by a 64-bit index: element `j` of a stream is
//! word `j % 4` of `philox4x32([j / 4 (low, high 32 bits), kind, 0], seed)`, where `kind`
//! separates the uniform stream (0) from the normal stream (1) of one seed. A fill of `n`
//! values at `offset` holds elements `offset .. offset + n`, so its value `i` depends only on
//! `(seed, offset + i)`, whatever the fill's size or the device.
//!
//! Every step is plain 32-bit integer and f32 arithmetic that WGSL has too, written in the same
//! order here and in the shader: uniform fills are bitwise equal on both backends, normal fills
//! equal up to the few ulps of the GPU's `sqrt`, `cos` and `sin`.

/// Philox4x32 round multipliers and Weyl key increments (Salmon et al., table 2).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Counter word 2 of the uniform stream.
pub const UNIFORM_STREAM: u32 = 0;
/// Counter word 2 of the normal stream.
pub const NORMAL_STREAM: u32 = 1;

/// High and low 32 bits of the 64-bit product `a * b`.
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32-10: ten rounds of `(c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2),
/// hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))`, the key bumped by the Weyl constants between rounds.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, c[0]);
        let (hi1, lo1) = mulhilo(PHILOX_M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The key of a seed: its low and high 32 bits.
pub fn seed_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The four words of block `block` (elements `4 block .. 4 block + 4`) of a stream.
pub fn block(seed: u64, stream: u32, block: u64) -> [u32; 4] {
    philox4x32(
        [block as u32, (block >> 32) as u32, stream, 0],
        seed_key(seed),
    )
}

/// `u = (bits >> 8) 2^-24`: the 24 high bits as a float in [0, 1), exactly.
pub fn uniform_from_bits(bits: u32) -> f32 {
    (bits >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// `-2 ln u` for `u` in (0, 1], from `u = m 2^e` with `m` in [sqrt(1/2), sqrt(2)) and
/// `ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...)`, `s = (m - 1) / (m + 1)`, `|s| < 0.172`.
/// Written out (rather than `ln`) so that both backends agree to an ulp even where `u` is
/// near 1: there the GPU's `log` is only accurate to an absolute 2^-21, which `sqrt` in
/// Box-Muller would turn into an error of 1e-3.
pub fn neg_two_ln(u: f32) -> f32 {
    let bits = u.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0)))));
    let ln_m = 2.0 * s * series;
    // ln 2 split so that e * LN2_HI is exact: ln u = e ln2_hi + (ln m + e ln2_lo).
    const LN2_HI: f32 = f32::from_bits(0x3f31_7180);
    const LN2_LO: f32 = f32::from_bits(0x3717_f7d2);
    let ef = e as f32;
    -2.0 * (ef * LN2_HI + (ln_m + ef * LN2_LO))
}

/// Box-Muller: two standard normals `r cos(theta), r sin(theta)` from two words, with
/// `r = sqrt(-2 ln u1)`, `u1 = ((w0 >> 8) + 1) 2^-24` in (0, 1] (never ln 0) and
/// `theta = pi c 2^-22`, `c = (w1 >> 9) - 2^22 + 1/2`, strictly inside (-pi, pi).
pub fn box_muller(w0: u32, w1: u32) -> (f32, f32) {
    let u1 = ((w0 >> 8) + 1) as f32 * (1.0 / 16_777_216.0);
    let r = neg_two_ln(u1).sqrt();
    let centered = ((w1 >> 9) as i32 - (1 << 22)) as f32 + 0.5;
    let (cos, sin) = cos_sin_of_grid(centered);
    (r * cos, r * sin)
}

/// `(cos theta, sin theta)` of `theta = pi c 2^-22` for `c` in (-2^22, 2^22): the nearest
/// quarter turn `q pi / 2` taken exactly (`c` counts 2^21 per quarter turn), then the Taylor
/// series of the rest `a` in [-pi/4, pi/4] (truncation below 2e-9). Written out (rather than
/// `cos`, `sin`) so that both backends agree to an ulp: WGSL's builtins need only be within
/// 2^-11, and a software adapter (SwiftShader) is 2e-4 off.
pub fn cos_sin_of_grid(c: f32) -> (f32, f32) {
    const QUARTER: f32 = 2_097_152.0;
    let q = (c * (1.0 / QUARTER)).round();
    let a = (c - q * QUARTER) * (std::f32::consts::PI / 4_194_304.0);
    let a2 = a * a;
    let sin = a
        * (1.0
            - a2 * (1.0 / 6.0)
                * (1.0
                    - a2 * (1.0 / 20.0) * (1.0 - a2 * (1.0 / 42.0) * (1.0 - a2 * (1.0 / 72.0)))));
    let cos = 1.0
        - a2 * 0.5
            * (1.0
                - a2 * (1.0 / 12.0)
                    * (1.0
                        - a2 * (1.0 / 30.0)
                            * (1.0 - a2 * (1.0 / 56.0) * (1.0 - a2 * (1.0 / 90.0)))));
    // theta = a + q pi / 2, q in -2..=2.
    match (q as i32).rem_euclid(4) {
        0 => (cos, sin),
        1 => (-sin, cos),
        2 => (-cos, -sin),
        _ => (sin, -cos),
    }
}

/// The four standard normals of one Philox block: Box-Muller on words (0, 1) and (2, 3).
pub fn normals_from_block(w: [u32; 4]) -> [f32; 4] {
    let (z0, z1) = box_muller(w[0], w[1]);
    let (z2, z3) = box_muller(w[2], w[3]);
    [z0, z1, z2, z3]
}

/// Fills `out` with elements `offset .. offset + out.len()` of a stream, `values` turning one
/// Philox block into its four values.
fn fill(
    out: &mut [f32],
    seed: u64,
    offset: u64,
    stream: u32,
    values: impl Fn([u32; 4]) -> [f32; 4],
) {
    let mut j = offset;
    let mut i = 0;
    while i < out.len() {
        let v = values(block(seed, stream, j / 4));
        let first = (j % 4) as usize;
        let take = (4 - first).min(out.len() - i);
        out[i..i + take].copy_from_slice(&v[first..first + take]);
        i += take;
        j += take as u64;
    }
}

/// Uniform values in [0, 1): `out[i]` = element `offset + i` of the uniform stream of `seed`.
pub fn fill_uniform(out: &mut [f32], seed: u64, offset: u64) {
    fill(out, seed, offset, UNIFORM_STREAM, |w| {
        w.map(uniform_from_bits)
    });
}

/// Standard normals: `out[i]` = element `offset + i` of the normal stream of `seed`.
pub fn fill_normal(out: &mut [f32], seed: u64, offset: u64) {
    fill(out, seed, offset, NORMAL_STREAM, normals_from_block);
}

/// Element `index` of the uniform stream of `seed`.
pub fn uniform(seed: u64, index: u64) -> f32 {
    uniform_from_bits(block(seed, UNIFORM_STREAM, index / 4)[(index % 4) as usize])
}

/// Element `index` of the normal stream of `seed`.
pub fn normal(seed: u64, index: u64) -> f32 {
    normals_from_block(block(seed, NORMAL_STREAM, index / 4))[(index % 4) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neg_two_ln_matches_f64() {
        for k in [
            1u32,
            2,
            3,
            1000,
            1 << 20,
            (1 << 23) + 7,
            (1 << 24) - 3,
            (1 << 24) - 1,
            1 << 24,
        ] {
            let u = k as f32 / 16_777_216.0;
            let want = -2.0 * (u as f64).ln();
            let got = neg_two_ln(u) as f64;
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs(),
                "u = {u}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn cos_sin_of_grid_matches_f64() {
        // Every quarter turn, its edges, and a sweep across the whole grid.
        let edges = [
            -4_194_303.5f32,
            -2_097_152.5,
            -1_048_576.5,
            -0.5,
            0.5,
            1_048_575.5,
        ];
        let sweep = (0..4096).map(|k| (k * 2048 - (1 << 22)) as f32 + 0.5);
        for c in edges.into_iter().chain(sweep) {
            let theta = std::f64::consts::PI * c as f64 / 4_194_304.0;
            let (cos, sin) = cos_sin_of_grid(c);
            for (got, want) in [(cos, theta.cos()), (sin, theta.sin())] {
                assert!(
                    (got as f64 - want).abs() <= 2.0 * f32::EPSILON as f64,
                    "c = {c}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn per_index_helpers_agree_with_fills() {
        let mut u = vec![0.0; 11];
        let mut z = vec![0.0; 11];
        fill_uniform(&mut u, 5, 3);
        fill_normal(&mut z, 5, 3);
        for i in 0..11 {
            assert_eq!(u[i], uniform(5, 3 + i as u64));
            assert_eq!(z[i], normal(5, 3 + i as u64));
        }
    }
}
