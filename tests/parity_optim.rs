//! The fused optimizer step (clipping by the global norm, AdamW, EMA): GPU vs CPU over several
//! steps, the CPU against a float64 transcription of torch's `clip_grad_norm_` and `AdamW`
//! and of the EMA, a non-finite norm that leaves everything unchanged, and bad input.

mod common;

use common::*;
use diffwgpu::ops::optim::{AdamWParams, StepTensors};
use diffwgpu::{Backend, Cpu, Error, Gpu, Tensor};

/// Odd sizes not a multiple of the 256-wide workgroup, and one large enough for several rayon
/// tasks.
const SHAPES: &[&[usize]] = &[&[1], &[3, 5, 7], &[2, 3, 17, 19], &[70_001]];

fn hyper(step: u32) -> AdamWParams {
    AdamWParams {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step,
        max_grad_norm: Some(1.0),
    }
}

/// The state of one optimizer: weights, moments, EMA.
struct State {
    p: Tensor,
    m: Tensor,
    v: Tensor,
    ema: Tensor,
}

impl State {
    fn new(b: &dyn Backend, shape: &[usize], p0: &[f32]) -> Self {
        State {
            p: up(b, shape, p0),
            m: b.zeros(shape).unwrap(),
            v: b.zeros(shape).unwrap(),
            ema: up(b, shape, p0),
        }
    }

    fn step(
        &mut self,
        b: &dyn Backend,
        g: &Tensor,
        norm2: f32,
        h: &AdamWParams,
        decay: f32,
    ) -> diffwgpu::Result<()> {
        let norm2 = up(b, &[1], &[norm2]);
        let t = StepTensors {
            params: &mut self.p,
            grads: g,
            adam_m: &mut self.m,
            adam_v: &mut self.v,
            ema: &mut self.ema,
            norm2: &norm2,
        };
        b.adamw_ema_step(t, h, decay)
    }

    fn read(&self, b: &dyn Backend) -> Vec<(&'static str, Vec<f32>)> {
        vec![
            ("param", down(b, &self.p)),
            ("m", down(b, &self.m)),
            ("v", down(b, &self.v)),
            ("ema", down(b, &self.ema)),
        ]
    }
}

/// Squared norms that clip (9: c = 1/3) and that do not (0.25).
const NORMS2: [f32; 4] = [9.0, 0.25, 9.0, 0.25];

fn step_matches_cpu_over_several_steps(g: &Gpu) {
    for (k, shape) in SHAPES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let p0 = seeded(n, 40 + k as u64);
        let grads: Vec<Vec<f32>> = (0..4).map(|s| seeded(n, 50 + 10 * k as u64 + s)).collect();
        // A few ulps of sqrt and division in an update of size lr = 1e-2 on values of O(1).
        parity(
            g,
            &format!("adamw_ema_step {shape:?}"),
            1e-6,
            1e-5,
            |b: &dyn Backend| {
                let mut s = State::new(b, shape, &p0);
                for (i, gr) in grads.iter().enumerate() {
                    let gr = up(b, shape, gr);
                    s.step(b, &gr, NORMS2[i], &hyper(i as u32 + 1), 0.9)
                        .unwrap();
                }
                s.read(b)
            },
        );
    }
}

/// torch's `clip_grad_norm_` then `AdamW`'s single-tensor update, then the EMA, in f64.
#[allow(clippy::too_many_arguments)]
fn torch_step(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    ema: &mut [f64],
    norm2: f64,
    h: &AdamWParams,
    decay: f64,
) {
    let (lr, b1, b2, eps, wd) = (
        h.lr as f64,
        h.beta1 as f64,
        h.beta2 as f64,
        h.eps as f64,
        h.weight_decay as f64,
    );
    let bc1 = 1.0 - b1.powi(h.step as i32);
    let bc2 = 1.0 - b2.powi(h.step as i32);
    let c = (h.max_grad_norm.unwrap() as f64 / (norm2.sqrt() + 1e-6)).min(1.0);
    for i in 0..p.len() {
        let g = c * g[i];
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let denom = (v[i] / bc2).sqrt() + eps;
        p[i] -= lr * (m[i] / bc1) / denom;
        ema[i] = decay * ema[i] + (1.0 - decay) * p[i];
    }
}

fn cpu_step_matches_torch_formulas_in_f64() {
    let n = 257;
    let p0 = seeded(n, 1);
    let mut p64: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let (mut m64, mut v64, mut ema64) = (vec![0.0; n], vec![0.0; n], p64.clone());
    let mut s = State::new(&Cpu, &[n], &p0);
    for step in 1..=3u32 {
        // Gradients of several magnitudes, some near eps.
        let g: Vec<f32> = seeded(n, 10 + step as u64)
            .iter()
            .enumerate()
            .map(|(i, x)| x * 10f32.powi(-(i as i32 % 5)))
            .collect();
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        let (h, norm2) = (hyper(step), NORMS2[step as usize]);
        let decay = 0.99;
        torch_step(
            &mut p64,
            &g64,
            &mut m64,
            &mut v64,
            &mut ema64,
            norm2 as f64,
            &h,
            decay,
        );
        s.step(&Cpu, &up(&Cpu, &[n], &g), norm2, &h, decay as f32)
            .unwrap();
    }
    let f32s = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<_>>();
    // f32 rounding of each term over three steps: an ulp or two of the largest term, which
    // for the moments is that of the gradient (up to 1, up to 1e-3 squared and weighted).
    let got = s.read(&Cpu);
    assert_close("param", &got[0].1, &f32s(&p64), 1e-6, 1e-5);
    assert_close("m", &got[1].1, &f32s(&m64), 3e-8, 1e-5);
    assert_close("v", &got[2].1, &f32s(&v64), 1e-10, 1e-5);
    assert_close("ema", &got[3].1, &f32s(&ema64), 1e-6, 1e-5);
}

/// An infinite or NaN norm (an overflow somewhere in the gradients) leaves weights, moments
/// and EMA as they were, on `b`; a finite one updates them.
fn check_non_finite_norm_skips_the_step(b: &dyn Backend) {
    let n = 300;
    let p0 = seeded(n, 3);
    let g = up(b, &[n], &seeded(n, 4));
    let mut s = State::new(b, &[n], &p0);
    let before = s.read(b);
    for bad in [f32::INFINITY, f32::NAN] {
        s.step(b, &g, bad, &hyper(1), 0.5).unwrap();
        assert!(
            s.read(b) == before,
            "{}: norm2 {bad} changed the state",
            b.name()
        );
    }
    s.step(b, &g, 4.0, &hyper(1), 0.5).unwrap();
    assert!(
        s.read(b)[0] != before[0],
        "{}: a finite step changed nothing",
        b.name()
    );
}

fn non_finite_norm_skips_the_step_on_cpu() {
    check_non_finite_norm_skips_the_step(&Cpu);
}

fn non_finite_norm_skips_the_step_on_gpu(g: &Gpu) {
    check_non_finite_norm_skips_the_step(g);
}

/// A step on `b` writes the tensors' storage, which their clones share.
fn check_updates_are_shared(b: &dyn Backend) {
    let mut s = State::new(b, &[3], &[1.0, 2.0, 3.0]);
    let alias = s.ema.clone();
    s.step(b, &up(b, &[3], &[0.0; 3]), 0.0, &hyper(1), 0.5)
        .unwrap();
    let p = down(b, &s.p);
    let want: Vec<f32> = [1.0f32, 2.0, 3.0]
        .iter()
        .zip(&p)
        .map(|(e, p)| 0.5 * e + 0.5 * p)
        .collect();
    assert_close(
        &format!("{} ema alias", b.name()),
        &down(b, &alias),
        &want,
        1e-7,
        1e-7,
    );
}

fn updates_are_seen_by_every_clone_on_cpu() {
    check_updates_are_shared(&Cpu);
}

fn updates_are_seen_by_every_clone_on_gpu(g: &Gpu) {
    check_updates_are_shared(g);
}

/// Every bad call must be an `Err` naming the op and change nothing, on `b`.
fn check_bad_input(b: &dyn Backend) {
    let mut s = State::new(b, &[2, 3], &[0.5; 6]);
    let g = up(b, &[2, 3], &[0.1; 6]);
    let norm2 = up(b, &[1], &[1.0]);
    let op = "adamw_ema_step";
    let is_shape =
        |r: diffwgpu::Result<()>| matches!(r, Err(Error::Shape { op: o, .. }) if o == op);
    let is_invalid =
        |r: diffwgpu::Result<()>| matches!(r, Err(Error::Invalid { op: o, .. }) if o == op);
    let mut wrong = b.zeros(&[3, 2]).unwrap();
    let call = |s: &mut State, g: &Tensor, n2: &Tensor, h: &AdamWParams, d: f32| {
        let t = StepTensors {
            params: &mut s.p,
            grads: g,
            adam_m: &mut s.m,
            adam_v: &mut s.v,
            ema: &mut s.ema,
            norm2: n2,
        };
        b.adamw_ema_step(t, h, d)
    };
    assert!(is_shape(call(
        &mut s,
        &up(b, &[6], &[0.1; 6]),
        &norm2,
        &hyper(1),
        0.9
    )));
    assert!(is_shape(call(
        &mut s,
        &g,
        &up(b, &[2], &[1.0; 2]),
        &hyper(1),
        0.9
    )));
    assert!(is_invalid(call(&mut s, &g, &norm2, &hyper(0), 0.9)));
    for bad in [
        AdamWParams {
            beta2: 1.0,
            ..hyper(1)
        },
        AdamWParams {
            eps: 0.0,
            ..hyper(1)
        },
        AdamWParams {
            max_grad_norm: Some(0.0),
            ..hyper(1)
        },
    ] {
        assert!(is_invalid(call(&mut s, &g, &norm2, &bad, 0.9)), "{bad:?}");
    }
    assert!(
        is_invalid(call(&mut s, &g, &norm2, &hyper(1), 1.5)),
        "decay 1.5"
    );
    // A moment with the wrong shape, and the same storage under two names.
    let t = StepTensors {
        params: &mut s.p,
        grads: &g,
        adam_m: &mut wrong,
        adam_v: &mut s.v,
        ema: &mut s.ema,
        norm2: &norm2,
    };
    assert!(is_shape(b.adamw_ema_step(t, &hyper(1), 0.9)));
    let mut m_alias = s.m.clone();
    let t = StepTensors {
        params: &mut s.p,
        grads: &g,
        adam_m: &mut s.m,
        adam_v: &mut m_alias,
        ema: &mut s.ema,
        norm2: &norm2,
    };
    assert!(is_invalid(b.adamw_ema_step(t, &hyper(1), 0.9)));
    // Nothing was changed by the rejected calls.
    assert_eq!(down(b, &s.p), vec![0.5; 6]);
    assert_eq!(down(b, &s.m), vec![0.0; 6]);
}

fn bad_input_is_an_error_on_cpu() {
    check_bad_input(&Cpu);
}

fn bad_input_is_an_error_on_gpu(gpu: &Gpu) {
    check_bad_input(gpu);
    let mut s = State::new(gpu, &[2], &[0.5; 2]);
    let cpu_grad = up(&Cpu, &[2], &[0.5; 2]);
    let r = s.step(gpu, &cpu_grad, 1.0, &hyper(1), 0.9);
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
        cpu_step_matches_torch_formulas_in_f64,
        non_finite_norm_skips_the_step_on_cpu,
        updates_are_seen_by_every_clone_on_cpu,
        bad_input_is_an_error_on_cpu,
    ],
    gpu: [
        step_matches_cpu_over_several_steps,
        non_finite_norm_skips_the_step_on_gpu,
        updates_are_seen_by_every_clone_on_gpu,
        bad_input_is_an_error_on_gpu,
    ],
}
