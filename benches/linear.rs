//! Linear and attention, forward and backward, on both backends at U-Net shapes, in GFLOP/s
//! (criterion's elements/s with one element per floating-point operation). GPU timings include
//! a synchronize per iteration, so they measure the work and not just its recording.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use diffwgpu::{Backend, Cpu, Gpu, Tensor};

/// Deterministic inputs in [-1, 1) (a small LCG: benches only need values, not quality).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(747_796_405).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1 << 23) as f32 - 1.0
        })
        .collect()
}

fn tensor(be: &dyn Backend, shape: &[usize], seed: u32) -> Tensor {
    be.upload(shape, &values(shape.iter().product(), seed))
        .unwrap()
}

/// The backends to measure: the CPU, and the GPU when an adapter exists.
fn backends() -> Vec<(String, Box<dyn Backend>)> {
    let mut all: Vec<(String, Box<dyn Backend>)> = vec![("cpu".into(), Box::new(Cpu))];
    match Gpu::new() {
        Ok(g) => {
            println!("GPU benches run on {}", g.name());
            all.push(("gpu".into(), Box::new(g)));
        }
        Err(e) => println!("skipping the GPU benches: {e}"),
    }
    all
}

/// Few samples of a flat iteration count, short windows: the whole file finishes in minutes
/// on a software GPU.
fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

/// `(name, M, K, N)`: attention projections over 64 images of 8 x 8 tokens with 128 channels,
/// and the time-embedding MLP at batch 64.
const LINEAR_SHAPES: &[(&str, usize, usize, usize)] = &[
    ("proj_64x8x8_128", 64 * 64, 128, 128),
    ("time_mlp_64_512", 64, 512, 512),
];

fn bench_linear(c: &mut Criterion) {
    let backends = backends();
    for &(name, m, k, n) in LINEAR_SHAPES {
        let mut group = c.benchmark_group(format!("linear/{name}"));
        configure(&mut group);
        for (label, be) in &backends {
            let be = be.as_ref();
            let x = tensor(be, &[m, k], 1);
            let w = tensor(be, &[n, k], 2);
            let b = tensor(be, &[n], 3);
            let dy = tensor(be, &[m, n], 4);
            // y = x w^T + b: 2MNK; backward dx and dw: 4MNK (db's MN adds are not counted).
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            group.bench_function(format!("{label}/forward"), |it| {
                it.iter(|| {
                    let y = be.linear(&x, &w, Some(&b)).unwrap();
                    be.synchronize().unwrap();
                    y
                })
            });
            group.throughput(Throughput::Elements((4 * m * n * k) as u64));
            group.bench_function(format!("{label}/backward"), |it| {
                it.iter(|| {
                    let g = be.linear_backward(&x, &w, &dy, true).unwrap();
                    be.synchronize().unwrap();
                    g
                })
            });
        }
        group.finish();
    }
}

/// `(name, B, L, C, heads)`: the mnist preset's 8 x 8 blocks at a sampling batch of 16, with
/// its heads of width 8 (diffusers' default `attention_head_dim`); a mid-resolution block
/// (64 images of 8 x 8 tokens) and one 32 x 32 feature map, both with one head of width C.
const ATTENTION_SHAPES: &[(&str, usize, usize, usize, usize)] = &[
    ("b16_8x8_c128_h16", 16, 64, 128, 16),
    ("b64_8x8_c128", 64, 64, 128, 1),
    ("b1_32x32_c128", 1, 1024, 128, 1),
];

fn bench_attention(c: &mut Criterion) {
    let backends = backends();
    for &(name, b, l, ch, heads) in ATTENTION_SHAPES {
        let mut group = c.benchmark_group(format!("attention/{name}"));
        configure(&mut group);
        for (label, be) in &backends {
            let be = be.as_ref();
            let qkv = tensor(be, &[b, l, 3 * ch], 1);
            let d_out = tensor(be, &[b, l, ch], 4);
            let saved = be.attention(&qkv, heads).unwrap();
            // Forward: S = Q K^T and O = P V, 2 B L^2 C each. Backward: dV, dP, dQ and dK,
            // 2 B L^2 C each (the recomputation of S the kernels do is not counted).
            group.throughput(Throughput::Elements((4 * b * l * l * ch) as u64));
            group.bench_function(format!("{label}/forward"), |it| {
                it.iter(|| {
                    let o = be.attention(&qkv, heads).unwrap();
                    be.synchronize().unwrap();
                    o
                })
            });
            group.throughput(Throughput::Elements((8 * b * l * l * ch) as u64));
            group.bench_function(format!("{label}/backward"), |it| {
                it.iter(|| {
                    let g = be.attention_backward(&qkv, &saved, &d_out, heads).unwrap();
                    be.synchronize().unwrap();
                    g
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_linear, bench_attention);
criterion_main!(benches);
