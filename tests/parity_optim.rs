//! Fused AdamW and the EMA update: GPU vs CPU over several steps, the CPU against a float64
//! transcription of torch.optim.AdamW, and bad input.

mod common;

use common::*;
use diffwgpu::ops::optim::AdamWParams;
use diffwgpu::{Backend, Cpu, Error, Gpu};

/// Odd sizes not a multiple of the 256-wide workgroup, and one large enough for several rayon
/// tasks.
const SHAPES: &[&[usize]] = &[&[1], &[3, 5, 7], &[2, 3, 17, 19], &[70_001]];

/// Even steps clip (scale the gradient by 0.37), odd steps do not.
fn hyper(step: u32) -> AdamWParams {
    AdamWParams {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step,
        grad_scale: if step.is_multiple_of(2) { 0.37 } else { 1.0 },
    }
}

fn adamw_and_ema_match_cpu_over_several_steps(g: &Gpu) {
    for (k, shape) in SHAPES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let p0 = seeded(n, 40 + k as u64);
        let grads: Vec<Vec<f32>> = (0..4).map(|s| seeded(n, 50 + 10 * k as u64 + s)).collect();
        // A few ulps of sqrt and division in an update of size lr = 1e-2 on values of O(1).
        parity(
            g,
            &format!("adamw {shape:?}"),
            1e-6,
            1e-5,
            |b: &dyn Backend| {
                let mut p = up(b, shape, &p0);
                let mut m = b.zeros(shape).unwrap();
                let mut v = b.zeros(shape).unwrap();
                let mut ema = up(b, shape, &p0);
                for (s, g) in grads.iter().enumerate() {
                    let g = up(b, shape, g);
                    b.adamw_step(&mut p, &g, &mut m, &mut v, &hyper(s as u32 + 1))
                        .unwrap();
                    b.ema_update(&mut ema, &p, 0.9).unwrap();
                }
                vec![
                    ("param", down(b, &p)),
                    ("m", down(b, &m)),
                    ("v", down(b, &v)),
                    ("ema", down(b, &ema)),
                ]
            },
        );
    }
}

/// torch.optim.AdamW's single-tensor update, in f64, after clip_grad_norm_ scaled the gradient.
fn torch_adamw(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], h: &AdamWParams) {
    let (lr, b1, b2, eps, wd) = (
        h.lr as f64,
        h.beta1 as f64,
        h.beta2 as f64,
        h.eps as f64,
        h.weight_decay as f64,
    );
    let bc1 = 1.0 - b1.powi(h.step as i32);
    let bc2 = 1.0 - b2.powi(h.step as i32);
    let c = h.grad_scale as f64;
    for i in 0..p.len() {
        let g = c * g[i];
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let denom = (v[i] / bc2).sqrt() + eps;
        p[i] -= lr * (m[i] / bc1) / denom;
    }
}

fn cpu_adamw_matches_torch_formulas_in_f64() {
    let n = 257;
    let p0 = seeded(n, 1);
    let mut p64: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let (mut m64, mut v64) = (vec![0.0; n], vec![0.0; n]);
    let mut p = up(&Cpu, &[n], &p0);
    let (mut m, mut v) = (Cpu.zeros(&[n]).unwrap(), Cpu.zeros(&[n]).unwrap());
    let mut ema = up(&Cpu, &[n], &p0);
    let mut ema64 = p64.clone();
    for step in 1..=3u32 {
        // Gradients of several magnitudes, some near eps.
        let g: Vec<f32> = seeded(n, 10 + step as u64)
            .iter()
            .enumerate()
            .map(|(i, x)| x * 10f32.powi(-(i as i32 % 5)))
            .collect();
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        let h = hyper(step);
        torch_adamw(&mut p64, &g64, &mut m64, &mut v64, &h);
        Cpu.adamw_step(&mut p, &up(&Cpu, &[n], &g), &mut m, &mut v, &h)
            .unwrap();
        for (e, x) in ema64.iter_mut().zip(&p64) {
            *e = 0.99 * *e + 0.01 * x;
        }
        Cpu.ema_update(&mut ema, &p, 0.99).unwrap();
    }
    let f32s = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<_>>();
    // f32 rounding of each term over three steps: an ulp or two of the largest term, which
    // for the moments is that of the gradient (up to 1, up to 1e-3 squared and weighted).
    assert_close("param", &down(&Cpu, &p), &f32s(&p64), 1e-6, 1e-5);
    assert_close("m", &down(&Cpu, &m), &f32s(&m64), 3e-8, 1e-5);
    assert_close("v", &down(&Cpu, &v), &f32s(&v64), 1e-10, 1e-5);
    assert_close("ema", &down(&Cpu, &ema), &f32s(&ema64), 1e-6, 1e-5);
}

/// An EMA update on `b` writes the tensor's storage, which its clones share.
fn check_updates_are_shared(b: &dyn Backend) {
    let mut ema = up(b, &[3], &[1.0, 2.0, 3.0]);
    let alias = ema.clone();
    b.ema_update(&mut ema, &up(b, &[3], &[3.0, 2.0, 1.0]), 0.5)
        .unwrap();
    assert_eq!(down(b, &alias), vec![2.0, 2.0, 2.0], "{}", b.name());
}

fn updates_are_seen_by_every_clone_on_cpu() {
    check_updates_are_shared(&Cpu);
}

fn updates_are_seen_by_every_clone_on_gpu(g: &Gpu) {
    check_updates_are_shared(g);
}

/// Every bad call must be an `Err` naming the op and change nothing, on both backends.
fn check_bad_input(b: &dyn Backend) {
    let mut p = up(b, &[2, 3], &[0.5; 6]);
    let g = up(b, &[2, 3], &[0.1; 6]);
    let mut m = b.zeros(&[2, 3]).unwrap();
    let mut v = b.zeros(&[2, 3]).unwrap();
    let mut wrong = b.zeros(&[3, 2]).unwrap();
    let shape_err = |r| {
        matches!(
            r,
            Err(Error::Shape {
                op: "adamw_step",
                ..
            })
        )
    };
    assert!(shape_err(b.adamw_step(
        &mut p,
        &up(b, &[6], &[0.1; 6]),
        &mut m,
        &mut v,
        &hyper(1)
    )));
    assert!(shape_err(b.adamw_step(
        &mut p,
        &g,
        &mut wrong,
        &mut v,
        &hyper(1)
    )));
    assert!(shape_err(b.adamw_step(
        &mut p,
        &g,
        &mut m,
        &mut wrong,
        &hyper(1)
    )));
    let invalid = |r: diffwgpu::Result<()>| {
        matches!(
            r,
            Err(Error::Invalid {
                op: "adamw_step",
                ..
            })
        )
    };
    assert!(invalid(b.adamw_step(&mut p, &g, &mut m, &mut v, &hyper(0))));
    let bad_beta = AdamWParams {
        beta2: 1.0,
        ..hyper(1)
    };
    assert!(invalid(b.adamw_step(&mut p, &g, &mut m, &mut v, &bad_beta)));
    let bad_eps = AdamWParams {
        eps: 0.0,
        ..hyper(1)
    };
    assert!(invalid(b.adamw_step(&mut p, &g, &mut m, &mut v, &bad_eps)));
    // The same storage under two names.
    let mut m_alias = m.clone();
    assert!(invalid(b.adamw_step(
        &mut p,
        &g,
        &mut m,
        &mut m_alias,
        &hyper(1)
    )));
    let p_alias = p.clone();
    assert!(matches!(
        b.ema_update(&mut p, &p_alias, 0.9),
        Err(Error::Invalid {
            op: "ema_update",
            ..
        })
    ));
    assert!(matches!(
        b.ema_update(&mut p, &g, 1.5),
        Err(Error::Invalid {
            op: "ema_update",
            ..
        })
    ));
    assert!(matches!(
        b.ema_update(&mut wrong, &g, 0.9),
        Err(Error::Shape {
            op: "ema_update",
            ..
        })
    ));
    // Nothing was changed by the rejected calls.
    assert_eq!(down(b, &p), vec![0.5; 6]);
    assert_eq!(down(b, &m), vec![0.0; 6]);
}

fn bad_input_is_an_error_on_cpu() {
    check_bad_input(&Cpu);
}

fn bad_input_is_an_error_on_gpu(gpu: &Gpu) {
    check_bad_input(gpu);
    let mut p = up(gpu, &[2], &[0.5; 2]);
    let cpu = up(&Cpu, &[2], &[0.5; 2]);
    let r = gpu.ema_update(&mut p, &cpu, 0.9);
    assert!(matches!(
        r,
        Err(Error::WrongBackend {
            expected: "gpu",
            ..
        })
    ));
}

tests! {
    cpu: [
        cpu_adamw_matches_torch_formulas_in_f64,
        updates_are_seen_by_every_clone_on_cpu,
        bad_input_is_an_error_on_cpu,
    ],
    gpu: [
        adamw_and_ema_match_cpu_over_several_steps,
        updates_are_seen_by_every_clone_on_gpu,
        bad_input_is_an_error_on_gpu,
    ],
}
