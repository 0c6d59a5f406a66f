//! sum, mean, sum_squares, mse_loss and mse_loss_with_grad: GPU vs CPU, accuracy of a
//! reduction of a million elements, the fused loss and gradient against mse_loss and the
//! gradient's formula, finite differences, bad input.
//!
//! Tolerance of a GPU reduction: it sums in f32 by a tree (16 sequential additions per
//! invocation, then trees of 256 per pass), so its error is bounded by about
//! `(16 + log2 N) * eps_f32 * sum_i |term_i|`; the CPU sums in f64 and is exact to f32
//! rounding. `reduction_tolerance` is that bound.

mod common;

use common::*;
use diffwgpu::{Backend, Cpu, Error, Gpu};

/// Sizes: one element, odd, just over one 4096-element workgroup chunk, and enough chunks to
/// need a second pass over the partials.
const SIZES: &[&[usize]] = &[&[1], &[5, 7], &[3, 1367], &[70_001]];

fn reduction_tolerance(n: usize, sum_abs: f64) -> f32 {
    let depth = 16.0 + (n.max(2) as f64).log2().ceil();
    (depth * f32::EPSILON as f64 * sum_abs) as f32
}

fn abs_sum(v: impl Iterator<Item = f32>) -> f64 {
    v.map(|x| x.abs() as f64).sum()
}

fn forward_and_backward_match_cpu(g: &Gpu) {
    for (i, shape) in SIZES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let pred = seeded(n, i as u64);
        let target = seeded(n, 50 + i as u64);
        let tol_sum = reduction_tolerance(n, abs_sum(pred.iter().copied()));
        let tol_sq = reduction_tolerance(n, abs_sum(pred.iter().map(|v| v * v)));
        let sq_err = abs_sum(pred.iter().zip(&target).map(|(a, b)| (a - b) * (a - b)));
        let tol_mse = reduction_tolerance(n, sq_err / n as f64);
        let case = format!("reduce {shape:?}");
        parity(
            g,
            &format!("{case} sum"),
            tol_sum,
            0.0,
            |be: &dyn Backend| vec![("sum", down(be, &be.sum(&up(be, shape, &pred)).unwrap()))],
        );
        parity(g, &format!("{case} mean"), tol_sum / n as f32, 0.0, |be| {
            vec![("mean", down(be, &be.mean(&up(be, shape, &pred)).unwrap()))]
        });
        parity(g, &format!("{case} sum_squares"), tol_sq, 0.0, |be| {
            let x = up(be, shape, &pred);
            vec![("sum_squares", down(be, &be.sum_squares(&x).unwrap()))]
        });
        parity(g, &format!("{case} mse_loss"), tol_mse, 0.0, |be| {
            let (p, t) = (up(be, shape, &pred), up(be, shape, &target));
            vec![("mse_loss", down(be, &be.mse_loss(&p, &t).unwrap()))]
        });
        let with_grad = |be: &dyn Backend| {
            let (p, t) = (up(be, shape, &pred), up(be, shape, &target));
            be.mse_loss_with_grad(&p, &t, 0.7).unwrap()
        };
        parity(
            g,
            &format!("{case} mse_loss_with_grad loss"),
            tol_mse,
            0.0,
            |be| vec![("loss", down(be, &with_grad(be).0))],
        );
        // Elementwise: one subtraction and two multiplications, a few ulps.
        parity(
            g,
            &format!("{case} mse_loss_with_grad d_pred"),
            1e-7,
            1e-6,
            |be| vec![("d_pred", down(be, &with_grad(be).1))],
        );
    }
}

/// On `be`: the loss of `mse_loss_with_grad` is `mse_loss`'s (the same sums, so equal up to
/// the last bit or two), and its gradient is `d_loss * 2 (pred - target) / N` elementwise.
fn check_loss_with_grad(be: &dyn Backend) {
    for (i, shape) in SIZES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let pred = seeded(n, 100 + i as u64);
        let target = seeded(n, 200 + i as u64);
        let d_loss = -1.3;
        let (p, t) = (up(be, shape, &pred), up(be, shape, &target));
        let (loss, d_pred) = be.mse_loss_with_grad(&p, &t, d_loss).unwrap();
        assert_eq!(loss.shape(), [1]);
        assert_eq!(d_pred.shape(), *shape);
        let name = format!("{} {shape:?}", be.name());
        let want_loss = down(be, &be.mse_loss(&p, &t).unwrap());
        assert_close(
            &format!("{name} loss"),
            &down(be, &loss),
            &want_loss,
            0.0,
            2.0 * f32::EPSILON,
        );
        let s = 2.0 * d_loss / n as f32;
        let want_grad: Vec<f32> = pred.iter().zip(&target).map(|(a, b)| s * (a - b)).collect();
        assert_close(
            &format!("{name} d_pred"),
            &down(be, &d_pred),
            &want_grad,
            1e-7,
            1e-6,
        );
    }
}

fn loss_with_grad_is_mse_loss_and_its_gradient_on_cpu() {
    check_loss_with_grad(&Cpu);
}

fn loss_with_grad_is_mse_loss_and_its_gradient_on_gpu(g: &Gpu) {
    check_loss_with_grad(g);
}

/// 2^20 seeded values, their exact sum and sum of squares, and the CPU's sum of them.
fn million_elements() -> (Vec<f32>, f64, f64, f32) {
    let n = 1 << 20;
    let x = seeded(n, 2024);
    let exact: f64 = x.iter().map(|&v| v as f64).sum();
    let exact_sq: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let cpu_sum = down(&Cpu, &Cpu.sum(&up(&Cpu, &[n], &x)).unwrap())[0];
    (x, exact, exact_sq, cpu_sum)
}

fn million_element_sum_is_accurate_on_cpu() {
    let (_, exact, _, cpu_sum) = million_elements();
    // The CPU sums in f64: exact up to the final rounding to f32.
    assert!((cpu_sum as f64 - exact).abs() <= exact.abs() * f32::EPSILON as f64);
}

fn million_element_sum_is_accurate_on_gpu(g: &Gpu) {
    let (x, exact, exact_sq, cpu_sum) = million_elements();
    let n = x.len();
    let t = up(g, &[n], &x);
    let gpu_sum = down(g, &g.sum(&t).unwrap())[0];
    let gpu_sq = down(g, &g.sum_squares(&t).unwrap())[0];
    let gpu_mean = down(g, &g.mean(&t).unwrap())[0];
    let sum_abs = abs_sum(x.iter().copied());
    // The bound stated above: 36 eps sum|x_i| = 2.2 here.
    let tol = reduction_tolerance(n, sum_abs) as f64;
    assert!(
        (gpu_sum as f64 - exact).abs() <= tol,
        "sum {gpu_sum} vs {exact} (tol {tol})"
    );
    assert!((gpu_mean as f64 - exact / n as f64).abs() <= tol / n as f64);
    let tol_sq = reduction_tolerance(n, exact_sq) as f64;
    assert!(
        (gpu_sq as f64 - exact_sq).abs() <= tol_sq,
        "{gpu_sq} vs {exact_sq}"
    );
    // In practice the tree's rounding errors are random and far below that bound: the sum
    // (about 1224, where an f32 ulp is 1.2e-4) lands within 8 ulps of the exact value, closer
    // than a sequential f32 loop gets (6e-3 off for these values).
    assert!(
        (gpu_sum as f64 - exact).abs() <= 1e-3,
        "sum {gpu_sum} vs {exact}"
    );
    assert!(
        (gpu_sum - cpu_sum).abs() <= 1e-3,
        "sum {gpu_sum} vs cpu {cpu_sum}"
    );
}

fn mse_gradient_matches_finite_differences() {
    let shape = [2, 3, 5];
    let pred = seeded(30, 1);
    let target = seeded(30, 2);
    let d_loss = 1.7;
    let tt = up(&Cpu, &shape, &target);
    let (_, dp) = Cpu
        .mse_loss_with_grad(&up(&Cpu, &shape, &pred), &tt, d_loss)
        .unwrap();
    gradcheck("mse_loss", &pred, &down(&Cpu, &dp), 1e-2, 1e-4, 1e-3, |p| {
        let loss = Cpu.mse_loss(&up(&Cpu, &shape, p), &tt).unwrap();
        d_loss as f64 * down(&Cpu, &loss)[0] as f64
    });
}

fn check_mismatched_shapes(be: &dyn Backend) {
    let a = up(be, &[2, 3], &[0.0; 6]);
    let b = up(be, &[6], &[0.0; 6]);
    assert!(matches!(
        be.mse_loss(&a, &b),
        Err(Error::Shape { op: "mse_loss", .. })
    ));
    assert!(matches!(
        be.mse_loss_with_grad(&a, &b, 1.0),
        Err(Error::Shape {
            op: "mse_loss_with_grad",
            ..
        })
    ));
}

fn mismatched_shapes_are_errors_on_cpu() {
    check_mismatched_shapes(&Cpu);
}

fn mismatched_shapes_are_errors_on_gpu(g: &Gpu) {
    check_mismatched_shapes(g);
}

fn tensor_from_the_other_backend_is_an_error(g: &Gpu) {
    let c = up(&Cpu, &[4], &[1.0; 4]);
    let gt = up(g, &[4], &[1.0; 4]);
    for r in [
        g.sum(&c),
        g.mean(&c),
        g.sum_squares(&c),
        g.mse_loss(&gt, &c),
    ] {
        assert!(matches!(
            r,
            Err(Error::WrongBackend {
                expected: "gpu",
                ..
            })
        ));
    }
    assert!(matches!(
        g.mse_loss_with_grad(&c, &gt, 1.0),
        Err(Error::WrongBackend {
            expected: "gpu",
            ..
        })
    ));
    assert!(matches!(
        Cpu.sum(&gt),
        Err(Error::WrongBackend {
            expected: "cpu",
            ..
        })
    ));
    assert!(matches!(
        Cpu.mse_loss_with_grad(&c, &gt, 1.0),
        Err(Error::WrongBackend {
            expected: "cpu",
            ..
        })
    ));
}

tests! {
    cpu: [
        million_element_sum_is_accurate_on_cpu,
        loss_with_grad_is_mse_loss_and_its_gradient_on_cpu,
        mse_gradient_matches_finite_differences,
        mismatched_shapes_are_errors_on_cpu,
    ],
    gpu: [
        forward_and_backward_match_cpu,
        million_element_sum_is_accurate_on_gpu,
        loss_with_grad_is_mse_loss_and_its_gradient_on_gpu,
        mismatched_shapes_are_errors_on_gpu,
        tensor_from_the_other_backend_is_an_error,
    ],
}
