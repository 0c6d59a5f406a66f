//! The GPU command machinery at its edges: every kernel builds on the adapter under WebGPU's
//! default limits, a kernel that fails to build is named in the error, dispatches beyond
//! 65,535 workgroups (split into an x-by-y grid) reach every element, and reductions that run
//! in many passes or splits add every part.

mod common;

use common::*;
use diffwgpu::gpu::Kernel;
use diffwgpu::ops::conv2d::Conv2dParams;
use diffwgpu::{Backend, Gpu};

/// Every listed kernel builds on the adapter (the device is created with WebGPU's default
/// limits, so this is what any WebGPU-class device must accept).
fn every_kernel_builds(g: &Gpu) {
    g.build_pipelines(&diffwgpu::ops::gpu_kernels())
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A kernel whose WGSL does not compile is reported with its name, not as an anonymous
/// device error at the next readback.
fn a_kernel_that_fails_to_build_is_named(_g: &Gpu) {
    let fresh = Gpu::new().unwrap();
    let listed = diffwgpu::ops::gpu_kernels()
        .into_iter()
        .find(|k| k.entry == "conv2d_fwd")
        .unwrap();
    let broken = Kernel {
        source: "@compute @workgroup_size(1) fn conv2d_fwd() { let x: u32 = 1.5; }",
        ..listed
    };
    let err = fresh.build_pipelines(&[broken]).unwrap_err().to_string();
    assert!(
        err.contains("conv2d_fwd"),
        "the error does not name the kernel: {err}"
    );
}

/// `n` integers in {-1, 0, 1}: sums of up to 2^24 of them, and of their squares, are exact in
/// f32 in any order, so a reduction must give exactly the integer total.
fn small_integers(n: usize) -> Vec<f32> {
    seeded(n, 77).iter().map(|v| (v * 1.5).round()).collect()
}

/// 65,535 * 256 + 5,000 elements: the elementwise grid needs two rows of workgroups.
fn elementwise_grid_beyond_65535_workgroups(g: &Gpu) {
    let n = 65_535 * 256 + 5_000;
    let a = small_integers(n);
    let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let sum = down(g, &g.add(&up(g, &[n], &a), &up(g, &[n], &b)).unwrap());
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert!(sum == want, "add over a two-row grid differs from a + b");
}

/// 2^24 + 4,103 elements: 4,097 first-pass partials, then two more passes of `sum_partials`.
fn three_pass_reductions_add_every_part(g: &Gpu) {
    let n = (1 << 24) + 4_103;
    let x = small_integers(n);
    let t = up(g, &[n], &x);
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    let squares: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    assert!(
        squares < (1u64 << 24) as f64,
        "the test's total must be exact in f32"
    );
    assert_eq!(down(g, &g.sum(&t).unwrap())[0] as f64, sum, "sum");
    assert_eq!(
        down(g, &g.sum_squares(&t).unwrap())[0] as f64,
        squares,
        "sum of squares"
    );
}

/// Weight and bias gradients reduce over B Ho Wo output pixels in splits of at least 512:
/// 4,096 pixels run in 8 splits, 40,000 in the most (64), each summed by a second pass.
fn conv2d_gradients_in_many_splits_match_cpu(g: &Gpu) {
    for (x_shape, cout) in [([4, 3, 32, 32], 5), ([40, 2, 25, 40], 3)] {
        let [b, cin, h, w] = x_shape;
        let p = Conv2dParams::new(1, 1);
        let x = seeded(b * cin * h * w, 5);
        let wt = seeded(cout * cin * 9, 6);
        let dy = seeded(b * cout * h * w, 7);
        let pixels = (b * h * w) as f32;
        // Sums of `pixels` products of values in [-1, 1], in another order on each backend:
        // an f32 rounding error of a few ulps of sqrt(pixels)-sized partial sums, per part.
        let atol = 2e-6 * pixels.sqrt() * 16.0;
        parity(
            g,
            &format!("conv2d backward {x_shape:?} -> {cout}"),
            atol,
            1e-4,
            |be: &dyn Backend| {
                let gr = be
                    .conv2d_backward(
                        &up(be, &x_shape, &x),
                        &up(be, &[cout, cin, 3, 3], &wt),
                        &up(be, &[b, cout, h, w], &dy),
                        &p,
                        true,
                    )
                    .unwrap();
                vec![
                    ("dw", down(be, &gr.dw)),
                    ("db", down(be, gr.db.as_ref().unwrap())),
                ]
            },
        );
    }
}

tests! {
    cpu: [],
    gpu: [
        every_kernel_builds,
        a_kernel_that_fails_to_build_is_named,
        elementwise_grid_beyond_65535_workgroups,
        three_pass_reductions_add_every_part,
        conv2d_gradients_in_many_splits_match_cpu,
    ],
}
