//! conv2d 3x3 forward and backward at the shapes of a 32x32 U-Net (batch 64), on the CPU and
//! the GPU, reported in GFLOP/s of the direct sum (criterion's "elements" are floating-point
//! operations; Winograd does fewer, so its figure is an effective rate).
//!
//! `cargo bench --bench conv2d` runs everything; `cargo bench --bench conv2d -- cpu/fwd`
//! filters by name as usual. The `cpu` group is the backend's own choice per shape; the
//! `cpu-algorithms` group runs each of the CPU's algorithms on every shape. The GPU group is
//! skipped with a note when there is no adapter.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use diffwgpu::ops::conv2d::{Conv2dParams, CpuAlgorithm};
use diffwgpu::{Backend, Cpu, Gpu};

/// (input [B, Cin, H, W], output channels), all 3x3 with stride 1 and padding 1: the cifar10
/// preset's 64- and 128-channel levels, then the mnist preset's three levels.
const SHAPES: &[([usize; 4], usize)] = &[
    ([64, 64, 32, 32], 64),
    ([64, 128, 16, 16], 128),
    ([64, 32, 32, 32], 32),
    ([64, 64, 16, 16], 64),
    ([64, 128, 8, 8], 128),
];

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (i ^ seed).wrapping_mul(0x9E37_79B9).rotate_left(13) ^ seed;
            (h.wrapping_mul(0x85EB_CA6B) >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// Forward FLOPs, `2 B Cout Ho Wo Cin KH KW` (stride 1, same padding: Ho = H).
fn forward_flops(x: &[usize; 4], cout: usize) -> u64 {
    (2 * x[0] * cout * x[2] * x[3] * x[1] * 9) as u64
}

fn run_group<M: criterion::measurement::Measurement>(
    group: &mut BenchmarkGroup<'_, M>,
    be: &dyn Backend,
) {
    let p = Conv2dParams::new(1, 1);
    for (x_shape, cout) in SHAPES {
        let w_shape = [*cout, x_shape[1], 3, 3];
        let y_shape = [x_shape[0], *cout, x_shape[2], x_shape[3]];
        let n = |s: &[usize]| s.iter().product::<usize>();
        let x = be.upload(x_shape, &values(n(x_shape), 1)).unwrap();
        let w = be.upload(&w_shape, &values(n(&w_shape), 2)).unwrap();
        let b = be.upload(&[*cout], &values(*cout, 3)).unwrap();
        let dy = be.upload(&y_shape, &values(n(&y_shape), 4)).unwrap();
        let name = format!("{x_shape:?}->{cout}");
        let flops = forward_flops(x_shape, *cout);

        group.throughput(Throughput::Elements(flops));
        group.bench_function(format!("fwd {name}"), |bench| {
            bench.iter(|| {
                let y = be.conv2d(&x, &w, Some(&b), &p).unwrap();
                be.synchronize().unwrap();
                y
            })
        });
        // The backward is two GEMMs of the forward's size (dx and dW) plus the bias sum.
        group.throughput(Throughput::Elements(2 * flops));
        group.bench_function(format!("bwd {name}"), |bench| {
            bench.iter(|| {
                let g = be.conv2d_backward(&x, &w, &dy, &p, true).unwrap();
                be.synchronize().unwrap();
                g
            })
        });
    }
}

/// Each CPU algorithm on each shape, forward and backward.
fn run_algorithms<M: criterion::measurement::Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    let p = Conv2dParams::new(1, 1);
    for (x_shape, cout) in SHAPES {
        let w_shape = [*cout, x_shape[1], 3, 3];
        let y_shape = [x_shape[0], *cout, x_shape[2], x_shape[3]];
        let n = |s: &[usize]| s.iter().product::<usize>();
        let x = Cpu.upload(x_shape, &values(n(x_shape), 1)).unwrap();
        let w = Cpu.upload(&w_shape, &values(n(&w_shape), 2)).unwrap();
        let dy = Cpu.upload(&y_shape, &values(n(&y_shape), 4)).unwrap();
        let flops = forward_flops(x_shape, *cout);
        for a in [
            CpuAlgorithm::Im2col,
            CpuAlgorithm::WinogradF2,
            CpuAlgorithm::WinogradF4,
        ] {
            let name = format!("{a:?} {x_shape:?}->{cout}");
            group.throughput(Throughput::Elements(flops));
            group.bench_function(format!("fwd {name}"), |bench| {
                bench.iter(|| a.conv2d(&x, &w, None, &p, &Default::default()).unwrap())
            });
            group.throughput(Throughput::Elements(2 * flops));
            group.bench_function(format!("bwd {name}"), |bench| {
                bench.iter(|| a.conv2d_backward(&x, &w, &dy, &p, true).unwrap())
            });
        }
    }
}

fn bench(c: &mut Criterion) {
    {
        let mut group = c.benchmark_group("conv2d/cpu-algorithms");
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        run_algorithms(&mut group);
        group.finish();
    }
    {
        let mut group = c.benchmark_group("conv2d/cpu");
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(3));
        run_group(&mut group, &Cpu);
        group.finish();
    }
    match Gpu::new() {
        Ok(gpu) => {
            let mut group = c.benchmark_group("conv2d/gpu");
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(3));
            run_group(&mut group, &gpu);
            group.finish();
        }
        Err(e) => println!("conv2d/gpu skipped: {e}"),
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
