//! solver_step, the fused step of DPM-Solver++, Euler–Maruyama and Heun: GPU vs CPU for every
//! target and prediction type with and without history and noise, the CPU against a float64
//! transcription, and bad input.

mod common;

use common::*;
use diffwgpu::diffusion::PredictionType;
use diffwgpu::ops::solver_step::{SolverStepCoefficients, SolverStepInputs, SolverTarget};
use diffwgpu::{Backend, Cpu, Error, Gpu};

const PREDICTIONS: [PredictionType; 3] = [
    PredictionType::Epsilon,
    PredictionType::VPrediction,
    PredictionType::Sample,
];
const TARGETS: [SolverTarget; 2] = [SolverTarget::Epsilon, SolverTarget::Sample];
/// Odd sizes not a multiple of the 256-wide workgroup, batch > 1.
const SHAPES: &[&[usize]] = &[&[1, 1, 3, 3], &[3, 2, 5, 7], &[2, 3, 17, 19]];
/// `abar` where the model was evaluated: near the end, the middle and the start of a schedule.
const ALPHA_BARS: [f64; 3] = [0.9999, 0.5, 4e-5];

fn coefficients(pred: PredictionType, target: SolverTarget, abar: f64) -> SolverStepCoefficients {
    SolverStepCoefficients {
        prediction_type: pred,
        target,
        sqrt_abar: abar.sqrt() as f32,
        sqrt_one_minus_abar: (1.0 - abar).sqrt() as f32,
        a: 0.83,
        b: -0.41,
        c: 0.27,
        sigma: 0.35,
    }
}

/// Five tensors' worth of values: `x_eval` and `x_base` in [-3, 3), the rest in [-1, 1).
fn inputs(n: usize, seed: u64) -> [Vec<f32>; 5] {
    let x = |s| seeded(n, s).iter().map(|v| 3.0 * v).collect();
    [
        x(seed),
        seeded(n, seed + 1),
        x(seed + 2),
        seeded(n, seed + 3),
        seeded(n, seed + 4),
    ]
}

fn step(
    be: &dyn Backend,
    shape: &[usize],
    v: &[Vec<f32>; 5],
    with: (bool, bool),
    k: &SolverStepCoefficients,
) -> (Vec<f32>, Vec<f32>) {
    let t: Vec<_> = v.iter().map(|d| up(be, shape, d)).collect();
    let s = SolverStepInputs {
        x_eval: &t[0],
        model_output: &t[1],
        x_base: &t[2],
        prev: with.0.then_some(&t[3]),
        noise: with.1.then_some(&t[4]),
    };
    let (next, d) = be.solver_step(&s, k).unwrap();
    (down(be, &next), down(be, &d))
}

const WITH: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

fn matches_cpu(g: &Gpu) {
    for (i, shape) in SHAPES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let v = inputs(n, 40 + i as u64);
        for pred in PREDICTIONS {
            for target in TARGETS {
                for abar in ALPHA_BARS {
                    let k = coefficients(pred, target, abar);
                    for with in WITH {
                        // Dividing by sqrt(abar) = 6e-3 or sqrt(1 - abar) = 1e-2 makes values
                        // of O(500) whose last ulp, after the GPU's 2.5-ulp division, is 1e-4.
                        let case = format!("{shape:?} {pred:?} {target:?} abar {abar} {with:?}");
                        parity(g, &case, 1e-5, 1e-5, |be: &dyn Backend| {
                            let (next, d) = step(be, shape, &v, with, &k);
                            vec![("x_next", next), ("d", d)]
                        });
                    }
                }
            }
        }
    }
}

/// `convert` in f64 from `abar` itself.
fn convert_reference(pred: PredictionType, target: SolverTarget, abar: f64, x: f64, m: f64) -> f64 {
    let (s0, s1) = (abar.sqrt(), (1.0 - abar).sqrt());
    let (eps, x0) = match pred {
        PredictionType::Epsilon => (m, (x - s1 * m) / s0),
        PredictionType::VPrediction => (s0 * m + s1 * x, s0 * x - s1 * m),
        PredictionType::Sample => ((x - s0 * m) / s1, m),
    };
    match target {
        SolverTarget::Epsilon => eps,
        SolverTarget::Sample => x0,
    }
}

fn cpu_matches_float64_formula() {
    let shape = [2, 3, 4, 5];
    let v = inputs(120, 7);
    for pred in PREDICTIONS {
        for target in TARGETS {
            for abar in ALPHA_BARS {
                let k = coefficients(pred, target, abar);
                for with in WITH {
                    let (next, d) = step(&Cpu, &shape, &v, with, &k);
                    let (mut want_next, mut want_d) = (vec![], vec![]);
                    let [xe, m, xb, p, z] = v.each_ref().map(|t| t.iter().map(|&e| e as f64));
                    for ((((xe, m), xb), p), z) in xe.zip(m).zip(xb).zip(p).zip(z) {
                        let di = convert_reference(pred, target, abar, xe, m);
                        let mut y = k.a as f64 * xb + k.b as f64 * di;
                        if with.0 {
                            y += k.c as f64 * p;
                        }
                        if with.1 {
                            y += k.sigma as f64 * z;
                        }
                        want_next.push(y as f32);
                        want_d.push(di as f32);
                    }
                    // The f32 square roots of abar and 1 - abar, amplified by the division
                    // by them (up to 1 / 6e-3), and f32 rounding of values up to O(500).
                    let case = format!("{pred:?} {target:?} abar {abar} {with:?}");
                    assert_close(&format!("d {case}"), &d, &want_d, 1e-4, 1e-5);
                    assert_close(&format!("x_next {case}"), &next, &want_next, 1e-4, 1e-5);
                }
            }
        }
    }
}

/// Mismatched shapes are `Err`s naming the op, on both backends, whichever tensor is wrong.
fn check_bad_shapes(b: &dyn Backend) {
    let k = coefficients(PredictionType::Epsilon, SolverTarget::Sample, 0.5);
    let x = up(b, &[2, 3], &[0.5; 6]);
    let y = up(b, &[3, 2], &[0.5; 6]);
    for wrong in 0..5 {
        let t: Vec<&diffwgpu::Tensor> = (0..5).map(|i| if i == wrong { &y } else { &x }).collect();
        let s = SolverStepInputs {
            x_eval: t[0],
            model_output: t[1],
            x_base: t[2],
            prev: Some(t[3]),
            noise: Some(t[4]),
        };
        assert!(
            matches!(
                b.solver_step(&s, &k),
                Err(Error::Shape {
                    op: "solver_step",
                    ..
                })
            ),
            "tensor {wrong} of the wrong shape on {}",
            b.name()
        );
    }
}

fn bad_shapes_are_errors_on_cpu() {
    check_bad_shapes(&Cpu);
}

fn bad_input_is_an_error_on_gpu(g: &Gpu) {
    check_bad_shapes(g);
    let k = coefficients(PredictionType::Epsilon, SolverTarget::Sample, 0.5);
    let x = up(g, &[2, 3], &[0.5; 6]);
    let cpu = up(&Cpu, &[2, 3], &[0.5; 6]);
    let s = SolverStepInputs {
        x_eval: &x,
        model_output: &x,
        x_base: &x,
        prev: Some(&cpu),
        noise: None,
    };
    assert!(matches!(
        g.solver_step(&s, &k),
        Err(Error::WrongBackend { .. })
    ));
}

tests! {
    cpu: [
        cpu_matches_float64_formula,
        bad_shapes_are_errors_on_cpu,
    ],
    gpu: [
        matches_cpu,
        bad_input_is_an_error_on_gpu,
    ],
}
