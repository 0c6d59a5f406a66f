//! add, scale, silu and silu_backward, dropout: GPU vs CPU, finite differences, bad input.

mod common;

use common::*;
use diffwgpu::{Backend, Cpu, Error, Gpu};

/// Odd sizes that are not multiples of the 256-wide workgroup, and one large enough to use
/// the CPU's parallel path.
const SIZES: &[&[usize]] = &[&[1], &[3, 5, 7], &[2, 3, 17, 19], &[70_001]];

fn forward_and_backward_match_cpu(g: &Gpu) {
    for (i, shape) in SIZES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let a: Vec<f32> = seeded(n, i as u64).iter().map(|v| v * 6.0).collect();
        let b = seeded(n, 100 + i as u64);
        // Tolerance: one or two ulps of exp and division.
        parity(
            g,
            &format!("elementwise {shape:?}"),
            1e-6,
            1e-5,
            |be: &dyn Backend| {
                let ta = up(be, shape, &a);
                let tb = up(be, shape, &b);
                let u = be.rand_uniform(shape, 5, 11).unwrap();
                vec![
                    ("add", down(be, &be.add(&ta, &tb).unwrap())),
                    ("scale", down(be, &be.scale(&ta, -0.37).unwrap())),
                    ("silu", down(be, &be.silu(&ta).unwrap())),
                    (
                        "silu_backward",
                        down(be, &be.silu_backward(&ta, &tb).unwrap()),
                    ),
                    ("dropout", down(be, &be.dropout(&ta, &u, 0.3).unwrap())),
                ]
            },
        );
    }
}

fn silu_gradient_matches_finite_differences() {
    let shape = [2, 3, 4];
    let x: Vec<f32> = seeded(24, 7).iter().map(|v| v * 4.0).collect();
    let r = seeded(24, 8);
    let dx = Cpu
        .silu_backward(&up(&Cpu, &shape, &x), &up(&Cpu, &shape, &r))
        .unwrap();
    gradcheck("silu", &x, &down(&Cpu, &dx), 1e-2, 1e-3, 1e-2, |xp| {
        dot(&down(&Cpu, &Cpu.silu(&up(&Cpu, &shape, xp)).unwrap()), &r)
    });
}

/// Dropout keeps the elements whose uniform is at least p, scaled by 1 / (1 - p); it is
/// linear in x with the same uniforms, so its own gradient; about p of the elements drop.
fn dropout_keeps_scales_and_is_its_own_gradient() {
    let n = 100_000;
    let x = up(&Cpu, &[n], &vec![1.0; n]);
    let u = Cpu.rand_uniform(&[n], 3, 0).unwrap();
    let y = down(&Cpu, &Cpu.dropout(&x, &u, 0.25).unwrap());
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    let shape = [2, 3, 4];
    let xs: Vec<f32> = seeded(24, 9);
    let r = seeded(24, 10);
    let u = Cpu.rand_uniform(&shape, 1, 0).unwrap();
    let dx = Cpu.dropout(&up(&Cpu, &shape, &r), &u, 0.5).unwrap();
    gradcheck("dropout", &xs, &down(&Cpu, &dx), 1e-2, 1e-3, 1e-2, |xp| {
        dot(
            &down(&Cpu, &Cpu.dropout(&up(&Cpu, &shape, xp), &u, 0.5).unwrap()),
            &r,
        )
    });
    assert!(Cpu
        .dropout(&x, &Cpu.rand_uniform(&[n], 3, 0).unwrap(), 1.0)
        .is_err());
}

fn mismatched_shapes_are_errors_on_cpu() {
    let a = up(&Cpu, &[2, 3], &[0.0; 6]);
    let b = up(&Cpu, &[3, 2], &[0.0; 6]);
    assert!(matches!(
        Cpu.add(&a, &b),
        Err(Error::Shape { op: "add", .. })
    ));
}

fn mismatched_shapes_are_errors_on_gpu(g: &Gpu) {
    let ga = up(g, &[2, 3], &[0.0; 6]);
    let gb = up(g, &[3, 2], &[0.0; 6]);
    assert!(matches!(
        g.add(&ga, &gb),
        Err(Error::Shape { op: "add", .. })
    ));
}

fn tensor_from_the_other_backend_is_an_error(g: &Gpu) {
    let c = up(&Cpu, &[4], &[1.0; 4]);
    let gt = up(g, &[4], &[1.0; 4]);
    let err = g.silu(&c).unwrap_err();
    assert!(matches!(
        err,
        Error::WrongBackend {
            expected: "gpu",
            found: "cpu",
            ..
        }
    ));
    assert!(err.to_string().contains("upload"), "{err}");
    assert!(matches!(
        Cpu.add(&c, &gt),
        Err(Error::WrongBackend {
            expected: "cpu",
            ..
        })
    ));
}

tests! {
    cpu: [
        silu_gradient_matches_finite_differences,
        dropout_keeps_scales_and_is_its_own_gradient,
        mismatched_shapes_are_errors_on_cpu,
    ],
    gpu: [
        forward_and_backward_match_cpu,
        mismatched_shapes_are_errors_on_gpu,
        tensor_from_the_other_backend_is_an_error,
    ],
}
