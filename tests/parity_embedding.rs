//! Sinusoidal timestep embedding: GPU vs CPU, the CPU against a float64 transcription of
//! diffusers' get_timestep_embedding, and bad input.

mod common;

use common::*;
use diffwgpu::ops::embedding::TimestepEmbeddingParams;
use diffwgpu::{Backend, Cpu, Error, Gpu};

fn params(dim: usize, flip: bool, shift: f32, scale: f32) -> TimestepEmbeddingParams {
    TimestepEmbeddingParams {
        dim,
        flip_sin_to_cos: flip,
        downscale_freq_shift: shift,
        scale,
        max_period: 10_000.0,
    }
}

/// Timesteps over the whole range of a 1000-step schedule.
const TIMESTEPS: [f32; 7] = [0.0, 1.0, 17.0, 250.0, 511.0, 998.0, 999.0];

fn embedding_matches_cpu(g: &Gpu) {
    // Odd and even dims, dims not a multiple of the workgroup, and UNet2DModel's default.
    for dim in [1usize, 4, 7, 32, 129, 512] {
        for flip in [false, true] {
            for (shift, scale) in [(1.0, 1.0), (0.0, 1.0), (0.0, 3.5)] {
                let p = params(dim, flip, shift, scale);
                // Both backends compute the same f32 argument (frequencies from the host,
                // two correctly rounded products), so only sin/cos differ: the GPU reduces
                // to [-pi, pi] (one rounding, 2.4e-7), then to a quarter turn, and sums a
                // Taylor series (shaders/sin_cos.wgsl) instead of trusting the builtins
                // (SwiftShader's are 2e-4 off); 1e-5 leaves room for fused multiply-adds.
                // Measured over t = 0..999 at dim 512: 2.4e-7 on lavapipe.
                parity(
                    g,
                    &format!("dim {dim} flip {flip} shift {shift} scale {scale}"),
                    1e-5,
                    0.0,
                    |b: &dyn Backend| {
                        let t = up(b, &[TIMESTEPS.len()], &TIMESTEPS);
                        vec![("emb", down(b, &b.timestep_embedding(&t, &p).unwrap()))]
                    },
                );
            }
        }
    }
}

/// diffusers' get_timestep_embedding, in f64.
fn reference(t: &[f32], p: &TimestepEmbeddingParams) -> Vec<f32> {
    let half = p.dim / 2;
    let mut out = Vec::new();
    for &tb in t {
        let args: Vec<f64> = (0..half)
            .map(|k| {
                let exponent = -(p.max_period as f64).ln() * k as f64
                    / (half as f64 - p.downscale_freq_shift as f64);
                p.scale as f64 * tb as f64 * exponent.exp()
            })
            .collect();
        let sin = args.iter().map(|a| a.sin() as f32);
        let cos = args.iter().map(|a| a.cos() as f32);
        if p.flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        if p.dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

fn cpu_matches_float64_reference() {
    for dim in [1usize, 6, 33, 256] {
        for flip in [false, true] {
            let p = params(dim, flip, 1.0, 1.0);
            let got = down(
                &Cpu,
                &Cpu.timestep_embedding(&up(&Cpu, &[7], &TIMESTEPS), &p)
                    .unwrap(),
            );
            // torch, like us, forms the argument t freq in f32: at t = 999 its rounding
            // (half an ulp of 999, 3e-5) plus the frequency's (a few ulps relative) moves
            // sin and cos by up to ~1e-4 from the exact value.
            assert_close(
                &format!("dim {dim} flip {flip}"),
                &got,
                &reference(&TIMESTEPS, &p),
                1.5e-4,
                0.0,
            );
            if dim % 2 == 1 {
                assert!(got.chunks(dim).all(|row| row[dim - 1] == 0.0));
            }
        }
    }
    // At t = 0 the embedding is [0 .. 0, 1 .. 1] exactly.
    let p = params(8, false, 1.0, 1.0);
    let zero = down(
        &Cpu,
        &Cpu.timestep_embedding(&up(&Cpu, &[1], &[0.0]), &p).unwrap(),
    );
    assert_eq!(zero, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
}

/// Every bad call must be an `Err`, on both backends.
fn check_bad_input(b: &dyn Backend) {
    let t = up(b, &[3], &[1.0, 2.0, 3.0]);
    let t2 = up(b, &[3, 1], &[1.0, 2.0, 3.0]);
    let op = "timestep_embedding";
    let p = params(8, false, 1.0, 1.0);
    assert!(matches!(b.timestep_embedding(&t2, &p), Err(Error::Shape { op: o, .. }) if o == op));
    let scalar = up(b, &[], &[1.0]);
    assert!(matches!(
        b.timestep_embedding(&scalar, &p),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        b.timestep_embedding(&t, &params(0, false, 1.0, 1.0)),
        Err(Error::Invalid { .. })
    ));
    // half - shift = 0 divides by zero.
    assert!(matches!(
        b.timestep_embedding(&t, &params(2, false, 1.0, 1.0)),
        Err(Error::Invalid { .. })
    ));
    let bad_period = TimestepEmbeddingParams {
        max_period: 0.0,
        ..p
    };
    assert!(matches!(
        b.timestep_embedding(&t, &bad_period),
        Err(Error::Invalid { .. })
    ));
}

fn bad_input_is_an_error_on_cpu() {
    check_bad_input(&Cpu);
}

fn bad_input_is_an_error_on_gpu(g: &Gpu) {
    check_bad_input(g);
    let cpu = up(&Cpu, &[3], &[1.0, 2.0, 3.0]);
    let r = g.timestep_embedding(&cpu, &params(8, false, 1.0, 1.0));
    assert!(matches!(
        r,
        Err(Error::WrongBackend {
            expected: "gpu",
            ..
        })
    ));
}

tests! {
    cpu: [cpu_matches_float64_reference, bad_input_is_an_error_on_cpu],
    gpu: [embedding_matches_cpu, bad_input_is_an_error_on_gpu],
}
