//! sum, mean, sum_squares, mse_loss, mse_loss_with_grad and weighted_mse_loss_with_grad: GPU
//! vs CPU, accuracy of a reduction of a million elements, the fused loss and gradient against
//! mse_loss and the gradient's formula, the weighted loss against its formula and, with
//! weights of one, against the unweighted op bit for bit, finite differences, bad input.
//!
//! Tolerance of a GPU reduction: it sums in f32 by a tree (16 sequential additions per
//! invocation, then trees of 256 per pass), so its error is bounded by about
//! `(16 + log2 N) * eps_f32 * sum_i |term_i|`; the CPU sums in f64 and is exact to f32
//! rounding. `reduction_tolerance` is that bound.

mod common;

use common::*;
use diffwgpu::{Backend, Cpu, Error, Gpu, Tensor};

/// Sizes: one element, odd, just over one 4096-element workgroup chunk, and enough chunks to
/// need a second pass over the partials.
const SIZES: &[&[usize]] = &[&[1], &[5, 7], &[3, 1367], &[70_001]];

/// One weight per sample (the first dimension of `shape`), in (0.1, 4.9).
fn sample_weights(shape: &[usize], seed: u64) -> Vec<f32> {
    seeded(shape[0], seed)
        .iter()
        .map(|v| 2.5 + 2.4 * v)
        .collect()
}

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

/// The weighted loss and its gradient, GPU vs CPU. The loss is a reduction of the weighted
/// squared errors, with `reduction_tolerance` of their mean; the gradient is elementwise, a
/// subtraction and three multiplications, a few ulps.
fn weighted_loss_and_gradient_match_cpu(g: &Gpu) {
    for (i, shape) in SIZES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let pred = seeded(n, 300 + i as u64);
        let target = seeded(n, 400 + i as u64);
        let weights = sample_weights(shape, 500 + i as u64);
        let m = n / shape[0];
        let weighted = abs_sum(
            pred.iter()
                .zip(&target)
                .enumerate()
                .map(|(j, (a, b))| weights[j / m] * (a - b) * (a - b)),
        );
        let tol = reduction_tolerance(n, weighted / n as f64);
        let with_grad = |be: &dyn Backend| {
            let (p, t) = (up(be, shape, &pred), up(be, shape, &target));
            let w = up(be, &[shape[0]], &weights);
            be.weighted_mse_loss_with_grad(&p, &t, &w, 0.7).unwrap()
        };
        let case = format!("weighted_mse_loss_with_grad {shape:?}");
        parity(g, &format!("{case} loss"), tol, 0.0, |be| {
            vec![("loss", down(be, &with_grad(be).0))]
        });
        parity(g, &format!("{case} d_pred"), 1e-7, 1e-6, |be| {
            vec![("d_pred", down(be, &with_grad(be).1))]
        });
    }
}

/// On `be`: the weighted loss is `(1/B) sum_b w_b mean_i (p_bi - t_bi)^2` and its gradient
/// `d_loss * 2 w_b (p_bi - t_bi) / N`, both written out here in f64 (the loss within the
/// GPU's reduction tolerance, the gradient to a few ulps).
fn check_weighted_loss_is_its_formula(be: &dyn Backend) {
    for (i, shape) in SIZES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let (b, m) = (shape[0], n / shape[0]);
        let pred = seeded(n, 600 + i as u64);
        let target = seeded(n, 700 + i as u64);
        let weights = sample_weights(shape, 800 + i as u64);
        let d_loss = -1.3;
        let (p, t) = (up(be, shape, &pred), up(be, shape, &target));
        let w = up(be, &[b], &weights);
        let (loss, d_pred) = be.weighted_mse_loss_with_grad(&p, &t, &w, d_loss).unwrap();
        assert_eq!(loss.shape(), [1]);
        assert_eq!(d_pred.shape(), *shape);
        let per_sample = |s: usize| -> f64 {
            let range = s * m..(s + 1) * m;
            let sq: f64 = pred[range.clone()]
                .iter()
                .zip(&target[range])
                .map(|(&a, &c)| (a as f64 - c as f64).powi(2))
                .sum();
            weights[s] as f64 * sq / m as f64
        };
        let want_loss = (0..b).map(per_sample).sum::<f64>() / b as f64;
        let name = format!("{} weighted {shape:?}", be.name());
        let tol = reduction_tolerance(n, want_loss);
        assert_close(
            &format!("{name} loss"),
            &down(be, &loss),
            &[want_loss as f32],
            tol,
            f32::EPSILON,
        );
        let want_grad: Vec<f32> = (0..n)
            .map(|j| {
                let d = pred[j] as f64 - target[j] as f64;
                (d_loss as f64 * 2.0 * weights[j / m] as f64 * d / n as f64) as f32
            })
            .collect();
        assert_close(
            &format!("{name} d_pred"),
            &down(be, &d_pred),
            &want_grad,
            1e-7,
            1e-6,
        );
    }
}

fn weighted_loss_is_its_formula_on_cpu() {
    check_weighted_loss_is_its_formula(&Cpu);
}

fn weighted_loss_is_its_formula_on_gpu(g: &Gpu) {
    check_weighted_loss_is_its_formula(g);
}

/// On `be`: with every weight 1 the weighted op gives `mse_loss_with_grad`'s loss and
/// gradient bit for bit (the same sums in the same order, each term times an exact 1).
fn check_weights_of_one_are_the_unweighted_op(be: &dyn Backend) {
    for (i, shape) in SIZES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let (p, t) = (
            up(be, shape, &seeded(n, 900 + i as u64)),
            up(be, shape, &seeded(n, 950 + i as u64)),
        );
        let ones = up(be, &[shape[0]], &vec![1.0; shape[0]]);
        let (loss, d_pred) = be.mse_loss_with_grad(&p, &t, 0.9).unwrap();
        let (wloss, wd_pred) = be.weighted_mse_loss_with_grad(&p, &t, &ones, 0.9).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> { down(be, t).iter().map(|v| v.to_bits()).collect() };
        let name = format!("{} {shape:?}", be.name());
        assert_eq!(bits(&wloss), bits(&loss), "{name}: loss");
        assert!(bits(&wd_pred) == bits(&d_pred), "{name}: d_pred differs");
    }
}

fn weights_of_one_are_the_unweighted_op_on_cpu() {
    check_weights_of_one_are_the_unweighted_op(&Cpu);
}

fn weights_of_one_are_the_unweighted_op_on_gpu(g: &Gpu) {
    check_weights_of_one_are_the_unweighted_op(g);
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

fn weighted_mse_gradient_matches_finite_differences() {
    let shape = [3, 2, 5];
    let pred = seeded(30, 3);
    let target = seeded(30, 4);
    let d_loss = 1.7;
    let tt = up(&Cpu, &shape, &target);
    let w = up(&Cpu, &[3], &[0.4, 2.0, 1.1]);
    let loss_and_grad = |p: &[f32]| {
        Cpu.weighted_mse_loss_with_grad(&up(&Cpu, &shape, p), &tt, &w, d_loss)
            .unwrap()
    };
    let dp = down(&Cpu, &loss_and_grad(&pred).1);
    gradcheck("weighted_mse_loss", &pred, &dp, 1e-2, 1e-4, 1e-3, |p| {
        d_loss as f64 * down(&Cpu, &loss_and_grad(p).0)[0] as f64
    });
}

fn check_mismatched_shapes(be: &dyn Backend) {
    let a = up(be, &[2, 3], &[0.0; 6]);
    let b = up(be, &[6], &[0.0; 6]);
    let op = "weighted_mse_loss_with_grad";
    for (weights, w_shape) in [
        (&[1.0; 3][..], &[3][..]),
        (&[1.0; 2], &[2, 1]),
        (&[1.0], &[1]),
    ] {
        let w = up(be, w_shape, weights);
        let r = be.weighted_mse_loss_with_grad(&a, &a, &w, 1.0);
        assert!(
            matches!(r, Err(Error::Shape { op: o, .. }) if o == op),
            "weights {w_shape:?} for a batch [2, 3]"
        );
    }
    let two = up(be, &[2], &[1.0; 2]);
    assert!(matches!(
        be.weighted_mse_loss_with_grad(&a, &b, &two, 1.0),
        Err(Error::Shape { op: o, .. }) if o == op
    ));
    // A scalar has no batch dimension, not even one that an empty weight tensor would fit.
    let (scalar, none) = (up(be, &[], &[1.0]), up(be, &[0], &[]));
    assert!(matches!(
        be.weighted_mse_loss_with_grad(&scalar, &scalar, &none, 1.0),
        Err(Error::Shape { op: o, .. }) if o == op
    ));
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
    let (cw, gw) = (up(&Cpu, &[4], &[1.0; 4]), up(g, &[4], &[1.0; 4]));
    for r in [
        g.weighted_mse_loss_with_grad(&gt, &gt, &cw, 1.0),
        Cpu.weighted_mse_loss_with_grad(&c, &c, &gw, 1.0),
    ] {
        assert!(matches!(r, Err(Error::WrongBackend { .. })));
    }
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
        weighted_loss_is_its_formula_on_cpu,
        weights_of_one_are_the_unweighted_op_on_cpu,
        weighted_mse_gradient_matches_finite_differences,
        mismatched_shapes_are_errors_on_cpu,
    ],
    gpu: [
        forward_and_backward_match_cpu,
        weighted_loss_and_gradient_match_cpu,
        weighted_loss_is_its_formula_on_gpu,
        weights_of_one_are_the_unweighted_op_on_gpu,
        million_element_sum_is_accurate_on_gpu,
        loss_with_grad_is_mse_loss_and_its_gradient_on_gpu,
        mismatched_shapes_are_errors_on_gpu,
        tensor_from_the_other_backend_is_an_error,
    ],
}
