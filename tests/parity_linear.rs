//! linear and linear_backward: GPU vs CPU, finite differences, the split-K path, dx with an
//! accumulated gradient added (`acc`), bad input.

mod common;

use common::*;
use diffwgpu::ops::grads::Partials;
use diffwgpu::{Backend, Cpu, Error, Gpu, Tensor};

/// (M, K, N): ones and odd sizes around the 64 x 64 output tile and the 16-deep reduction tile.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (7, 33, 5),
    (33, 7, 65),
    (65, 130, 33),
    (130, 65, 7),
    (2, 130, 130),
];

/// Runs forward and backward on `be`, returning every output by name.
fn run(
    be: &dyn Backend,
    (m, k, n): (usize, usize, usize),
    bias: bool,
    seed: u64,
) -> Vec<(&'static str, Vec<f32>)> {
    let x = up(be, &[m, k], &seeded(m * k, seed));
    let w = up(be, &[n, k], &seeded(n * k, seed + 1));
    let b = up(be, &[n], &seeded(n, seed + 2));
    let dy = up(be, &[m, n], &seeded(m * n, seed + 3));
    let y = be.linear(&x, &w, bias.then_some(&b)).unwrap();
    let g = be.linear_backward(&x, &w, &dy, bias).unwrap();
    assert_eq!(g.db.is_some(), bias);
    let mut out = vec![
        ("y", down(be, &y)),
        ("dx", down(be, &g.dx)),
        ("dw", down(be, &g.dw)),
    ];
    if let Some(db) = &g.db {
        out.push(("db", down(be, db)));
    }
    out
}

fn forward_and_backward_match_cpu(g: &Gpu) {
    for (i, &shape) in SHAPES.iter().enumerate() {
        for bias in [false, true] {
            // Tolerance: sums of up to 130 products of values in [-1, 1], accumulated in a
            // different order than gemm's (about sqrt(130) * 6e-8 relative per term).
            parity(
                g,
                &format!("linear {shape:?} bias {bias}"),
                1e-5,
                1e-5,
                |be: &dyn Backend| run(be, shape, bias, 10 * i as u64),
            );
        }
    }
}

fn long_reduction_splits_and_matches_cpu(g: &Gpu) {
    // dw and db reduce over M = 4099 rows: above the split threshold (2048) with a 5 x 3
    // output, so dw runs as split-K partial products plus a summing pass, db as row-block
    // partial sums plus the same pass. Tolerance: 4099-term f32 sums of values in [-1, 1]
    // (|sum| ~ 64), in a different order on each side.
    parity(g, "linear split-K", 2e-4, 1e-4, |be: &dyn Backend| {
        run(be, (4099, 3, 5), true, 77)
    });
}

/// (M, K, N) of the cases with `acc`: ones, odd sizes around the tiles, and dx reduced over
/// N = 4099, which the GPU splits into parts (split-K) where acc must be added once.
const ACC_SHAPES: &[(usize, usize, usize)] = &[(1, 1, 1), (7, 33, 5), (65, 130, 33), (5, 3, 4099)];

/// dx of `linear_backward_into` with `acc`, on `be` (dw's parts go to a scratch arena).
fn dx_with_acc(be: &dyn Backend, x: &Tensor, w: &Tensor, dy: &Tensor, acc: &Tensor) -> Vec<f32> {
    let (splits, _) = be.linear_grad_splits(x, w).unwrap();
    let arena = be.zeros(&[splits * w.numel()]).unwrap();
    let dw = Partials {
        arena: &arena,
        offset: 0,
        splits,
    };
    let dx = be
        .linear_backward_into(x, w, dy, true, Some(acc), &dw, None)
        .unwrap()
        .expect("dx was asked for");
    down(be, &dx)
}

/// dx with acc, and dx without it, on `be`.
fn run_acc(
    be: &dyn Backend,
    (m, k, n): (usize, usize, usize),
    seed: u64,
) -> Vec<(&'static str, Vec<f32>)> {
    let x = up(be, &[m, k], &seeded(m * k, seed));
    let w = up(be, &[n, k], &seeded(n * k, seed + 1));
    let dy = up(be, &[m, n], &seeded(m * n, seed + 2));
    let acc = up(be, &[m, k], &seeded(m * k, seed + 3));
    let dx = be.linear_backward(&x, &w, &dy, false).unwrap().dx;
    vec![
        ("dx + acc", dx_with_acc(be, &x, &w, &dy, &acc)),
        ("dx", down(be, &dx)),
    ]
}

/// Tolerance of dx over a reduction of `n` terms in [-1, 1]: a few ulps of O(1) values, and
/// for the 4099-term sums (|sum| ~ 64) parts added in another order.
fn acc_tolerance(n: usize) -> f32 {
    if n > 2048 {
        2e-4
    } else {
        1e-5
    }
}

/// On `be`: dx with acc is dx without it plus acc.
fn check_acc_is_added_once(be: &dyn Backend) {
    for (i, &(m, k, n)) in ACC_SHAPES.iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let out = run_acc(be, (m, k, n), seed);
        let acc = seeded(m * k, seed + 3);
        let want: Vec<f32> = out[1].1.iter().zip(&acc).map(|(d, a)| d + a).collect();
        assert_close(
            &format!("{} {:?} dx + acc", be.name(), (m, k, n)),
            &out[0].1,
            &want,
            acc_tolerance(n),
            1e-6,
        );
    }
}

fn acc_is_added_to_dx_on_cpu() {
    check_acc_is_added_once(&Cpu);
}

fn acc_is_added_to_dx_on_gpu(g: &Gpu) {
    check_acc_is_added_once(g);
    for (i, &shape) in ACC_SHAPES.iter().enumerate() {
        parity(
            g,
            &format!("linear acc {shape:?}"),
            acc_tolerance(shape.2),
            1e-5,
            |be: &dyn Backend| run_acc(be, shape, 10 * i as u64),
        );
    }
}

fn gradient_with_acc_matches_finite_differences() {
    // x feeds the layer and another consumer: loss = sum(linear(x) * r) + sum(x * s), whose
    // gradient w.r.t. x is r w + s, what linear_backward_into gives with acc = s.
    let (m, k, n) = (3, 5, 4);
    let x = seeded(m * k, 1);
    let w = up(&Cpu, &[n, k], &seeded(n * k, 2));
    let r = seeded(m * n, 3);
    let s = seeded(m * k, 4);
    let loss = |x: &[f32]| {
        let y = Cpu.linear(&up(&Cpu, &[m, k], x), &w, None).unwrap();
        dot(&down(&Cpu, &y), &r) + dot(x, &s)
    };
    let dx = dx_with_acc(
        &Cpu,
        &up(&Cpu, &[m, k], &x),
        &w,
        &up(&Cpu, &[m, n], &r),
        &up(&Cpu, &[m, k], &s),
    );
    // Linear in x: central differences are exact up to f32 rounding of the loss.
    gradcheck("linear dx + acc", &x, &dx, 1e-2, 1e-3, 1e-3, loss);
}

fn gradients_match_finite_differences() {
    let (m, k, n) = (3, 5, 4);
    let x = seeded(m * k, 1);
    let w = seeded(n * k, 2);
    let b = seeded(n, 3);
    let r = seeded(m * n, 4);
    let loss = |x: &[f32], w: &[f32], b: &[f32]| {
        let y = Cpu
            .linear(
                &up(&Cpu, &[m, k], x),
                &up(&Cpu, &[n, k], w),
                Some(&up(&Cpu, &[n], b)),
            )
            .unwrap();
        dot(&down(&Cpu, &y), &r)
    };
    let g = Cpu
        .linear_backward(
            &up(&Cpu, &[m, k], &x),
            &up(&Cpu, &[n, k], &w),
            &up(&Cpu, &[m, n], &r),
            true,
        )
        .unwrap();
    // The loss is bilinear, so central differences are exact up to f32 rounding of the loss.
    gradcheck(
        "linear dx",
        &x,
        &down(&Cpu, &g.dx),
        1e-2,
        1e-3,
        1e-3,
        |xp| loss(xp, &w, &b),
    );
    gradcheck(
        "linear dw",
        &w,
        &down(&Cpu, &g.dw),
        1e-2,
        1e-3,
        1e-3,
        |wp| loss(&x, wp, &b),
    );
    gradcheck(
        "linear db",
        &b,
        &down(&Cpu, &g.db.unwrap()),
        1e-2,
        1e-3,
        1e-3,
        |bp| loss(&x, &w, bp),
    );
}

fn empty_inputs_give_empty_outputs(g: &Gpu) {
    // M = 0, N = 0 or K = 0 (y = b broadcast, dw = 0): no work, no out-of-bounds access.
    for shape in [(0, 3, 4), (3, 0, 4), (3, 4, 0)] {
        parity(
            g,
            &format!("linear empty {shape:?}"),
            0.0,
            0.0,
            |be: &dyn Backend| run(be, shape, true, 5),
        );
    }
}

/// Every bad call must be an `Err` naming the op, on both backends.
fn check_bad_input(be: &dyn Backend) {
    let x = up(be, &[3, 4], &[0.0; 12]);
    let w = up(be, &[5, 4], &[0.0; 20]);
    let w_bad_k = up(be, &[5, 3], &[0.0; 15]);
    let b_bad = up(be, &[4], &[0.0; 4]);
    let dy = up(be, &[3, 5], &[0.0; 15]);
    let dy_bad = up(be, &[5, 3], &[0.0; 15]);
    let x_rank3 = up(be, &[1, 3, 4], &[0.0; 12]);
    assert!(matches!(
        be.linear(&x, &w_bad_k, None),
        Err(Error::Shape { op: "linear", .. })
    ));
    assert!(matches!(
        be.linear(&x, &w, Some(&b_bad)),
        Err(Error::Shape { op: "linear", .. })
    ));
    assert!(matches!(
        be.linear(&x_rank3, &w, None),
        Err(Error::Shape { op: "linear", .. })
    ));
    let bwd = |x, w, dy| be.linear_backward(x, w, dy, true).map(|_| ());
    assert!(matches!(
        bwd(&x, &w_bad_k, &dy),
        Err(Error::Shape {
            op: "linear_backward",
            ..
        })
    ));
    assert!(matches!(
        bwd(&x, &w, &dy_bad),
        Err(Error::Shape {
            op: "linear_backward",
            ..
        })
    ));
    let arena = be.zeros(&[1000]).unwrap();
    let dw = Partials {
        arena: &arena,
        offset: 0,
        splits: 1,
    };
    let with_acc = |need_dx, acc: &Tensor| {
        be.linear_backward_into(&x, &w, &dy, need_dx, Some(acc), &dw, None)
            .map(|_| ())
    };
    // acc must have x's shape [3, 4], and is only added to a dx that is asked for.
    assert!(matches!(
        with_acc(true, &up(be, &[4, 3], &[0.0; 12])),
        Err(Error::Shape {
            op: "linear_backward",
            ..
        })
    ));
    assert!(matches!(
        with_acc(false, &x),
        Err(Error::Invalid {
            op: "linear_backward",
            ..
        })
    ));
}

fn bad_shapes_are_errors_on_cpu() {
    check_bad_input(&Cpu);
}

fn bad_shapes_are_errors_on_gpu(g: &Gpu) {
    check_bad_input(g);
}

fn tensor_from_the_other_backend_is_an_error(g: &Gpu) {
    let (cx, cw) = (up(&Cpu, &[2, 3], &[1.0; 6]), up(&Cpu, &[4, 3], &[1.0; 12]));
    let (gx, gw) = (up(g, &[2, 3], &[1.0; 6]), up(g, &[4, 3], &[1.0; 12]));
    let wrong_on_gpu = |r: Result<_, Error>| {
        matches!(
            r,
            Err(Error::WrongBackend {
                expected: "gpu",
                ..
            })
        )
    };
    assert!(wrong_on_gpu(g.linear(&cx, &gw, None).map(|_| ())));
    assert!(wrong_on_gpu(
        g.linear(&gx, &gw, Some(&up(&Cpu, &[4], &[1.0; 4])))
            .map(|_| ())
    ));
    assert!(wrong_on_gpu(
        g.linear_backward(&gx, &cw, &up(g, &[2, 4], &[1.0; 8]), true)
            .map(|_| ())
    ));
    let arena = g.zeros(&[100]).unwrap();
    let dw = Partials {
        arena: &arena,
        offset: 0,
        splits: 1,
    };
    let dy = up(g, &[2, 4], &[1.0; 8]);
    assert!(wrong_on_gpu(
        g.linear_backward_into(&gx, &gw, &dy, true, Some(&cx), &dw, None)
            .map(|_| ())
    ));
    let wrong_on_cpu = matches!(
        Cpu.linear(&cx, &gw, None),
        Err(Error::WrongBackend {
            expected: "cpu",
            ..
        })
    );
    assert!(wrong_on_cpu);
}

tests! {
    cpu: [
        gradients_match_finite_differences,
        gradient_with_acc_matches_finite_differences,
        acc_is_added_to_dx_on_cpu,
        bad_shapes_are_errors_on_cpu,
    ],
    gpu: [
        forward_and_backward_match_cpu,
        long_reduction_splits_and_matches_cpu,
        acc_is_added_to_dx_on_gpu,
        empty_inputs_give_empty_outputs,
        bad_shapes_are_errors_on_gpu,
        tensor_from_the_other_backend_is_an_error,
    ],
}
