//! Philox4x32-10 against the published test vectors, uniform and normal fills on both
//! backends, the stream layout (offsets), and the distribution of the normals.

mod common;

use common::*;
use diffwgpu::rng::{philox4x32, uniform_from_bits};
use diffwgpu::{Backend, Cpu, Gpu};

/// Known-answer tests of the Random123 distribution (`kat_vectors`, philox4x32_10).
fn philox_matches_random123_test_vectors() {
    let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0; 4],
            [0; 2],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [0xffff_ffff; 4],
            [0xffff_ffff; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (counter, key, want) in cases {
        assert_eq!(
            philox4x32(counter, key),
            want,
            "counter {counter:x?} key {key:x?}"
        );
    }
}

fn uniform_bits_map_to_unit_interval_exactly() {
    assert_eq!(uniform_from_bits(0), 0.0);
    assert_eq!(uniform_from_bits(u32::MAX), 1.0 - 2f32.powi(-24));
    assert_eq!(uniform_from_bits(0x8000_0000), 0.5);
}

/// Sizes that are not multiples of the 4-value block or of the 256-wide workgroup, offsets
/// that start mid-block, and one where the 64-bit block index carries into its high word.
const CASES: &[(&[usize], u64, u64)] = &[
    (&[1], 0, 0),
    (&[3, 5, 7], 42, 1),
    (&[2, 3, 17, 19], 7, 6),
    (&[1027], 0xdead_beef_cafe_f00d, (1 << 34) - 6),
    (&[70_001], 3, 12_345),
];

fn uniform_fill_is_bitwise_equal_on_gpu_and_cpu(g: &Gpu) {
    for &(shape, seed, offset) in CASES {
        // Exact: integer arithmetic and one multiply by a power of two.
        parity(
            g,
            &format!("rand_uniform {shape:?} seed {seed} offset {offset}"),
            0.0,
            0.0,
            |b: &dyn Backend| vec![("u", down(b, &b.rand_uniform(shape, seed, offset).unwrap()))],
        );
    }
}

fn normal_fill_matches_cpu(g: &Gpu) {
    for &(shape, seed, offset) in CASES {
        // |z| < 5.8; the logarithm, cos and sin are written out in both backends, and only
        // the GPU's sqrt (and its choice to fuse multiply-adds) may differ, so a few ulps of
        // 5.8 (4.8e-7 each) plus a relative few ulps. Measured over 2^20 draws: bitwise equal
        // on lavapipe; 1.5e-6 on an NVIDIA H100 (Vulkan) when cos and sin were builtins.
        parity(
            g,
            &format!("randn {shape:?} seed {seed} offset {offset}"),
            4e-6,
            4e-6,
            |b: &dyn Backend| vec![("z", down(b, &b.randn(shape, seed, offset).unwrap()))],
        );
    }
}

/// On `b`, a fill at offset `o + k` is the fill at `o` without its first `k` values, and
/// another seed gives another stream.
fn check_offsets(b: &dyn Backend) {
    for k in [1u64, 2, 3, 4, 5, 13] {
        let uniform = |n: usize, off: u64| b.rand_uniform(&[n], 9, off).unwrap();
        let normal = |n: usize, off: u64| b.randn(&[n], 9, off).unwrap();
        for (name, fill) in [
            ("rand_uniform", &uniform as &dyn Fn(usize, u64) -> _),
            ("randn", &normal),
        ] {
            let long = down(b, &fill(40, 100));
            let short = down(b, &fill(40 - k as usize, 100 + k));
            assert_eq!(
                &long[k as usize..],
                &short[..],
                "{name} on {}: shift {k}",
                b.name()
            );
        }
    }
    let other_seed = down(b, &b.rand_uniform(&[40], 10, 100).unwrap());
    let same_seed = down(b, &b.rand_uniform(&[40], 9, 100).unwrap());
    assert!(other_seed.iter().zip(&same_seed).all(|(a, c)| a != c));
}

fn offset_shifts_the_stream_on_cpu() {
    check_offsets(&Cpu);
}

fn offset_shifts_the_stream_on_gpu(g: &Gpu) {
    check_offsets(g);
}

fn normals_have_standard_statistics() {
    let n = 1_000_000;
    let z = down(&Cpu, &Cpu.randn(&[n], 2024, 0).unwrap());
    let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    // Standard errors: 1e-3 for the mean, 1.4e-3 for the variance.
    assert!(mean.abs() < 5e-3, "mean {mean}");
    assert!((var - 1.0).abs() < 1e-2, "variance {var}");
    // P(|z| > 2) = 0.0455 (standard error 2.1e-4), P(|z| > 3) = 0.0027 (5.2e-5).
    let tail = |c: f32| z.iter().filter(|v| v.abs() > c).count() as f64 / n as f64;
    assert!(
        (tail(2.0) - 0.0455).abs() < 1.5e-3,
        "P(|z| > 2) = {}",
        tail(2.0)
    );
    assert!(
        (tail(3.0) - 0.0027).abs() < 4e-4,
        "P(|z| > 3) = {}",
        tail(3.0)
    );
    assert!(z.iter().all(|v| v.is_finite()));

    let u = down(&Cpu, &Cpu.rand_uniform(&[n], 2024, 0).unwrap());
    let mean_u = u.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!((mean_u - 0.5).abs() < 2e-3, "uniform mean {mean_u}");
    assert!(u.iter().all(|&v| (0.0..1.0).contains(&v)));
}

fn gpu_fills_are_deterministic(g: &Gpu) {
    let a = down(g, &g.randn(&[515], 77, 3).unwrap());
    let b = down(g, &g.randn(&[515], 77, 3).unwrap());
    assert_eq!(a, b);
}

tests! {
    cpu: [
        philox_matches_random123_test_vectors,
        uniform_bits_map_to_unit_interval_exactly,
        offset_shifts_the_stream_on_cpu,
        normals_have_standard_statistics,
    ],
    gpu: [
        uniform_fill_is_bitwise_equal_on_gpu_and_cpu,
        normal_fill_matches_cpu,
        offset_shifts_the_stream_on_gpu,
        gpu_fills_are_deterministic,
    ],
}
