//! attention and attention_backward: GPU vs CPU, finite differences, a float64 reference at
//! large logits, bad input.

mod common;

use common::*;
use diffwgpu::ops::attention::AttentionOutput;
use diffwgpu::{Backend, Cpu, Error, Gpu, Tensor};

/// (B, L, heads, d): batch 1 and 2, lengths around the 16-row and 64-key blocks, 1 to 4 heads,
/// widths below, at and above the 16-deep feature slices, and the widest head the GPU takes.
const CASES: &[(usize, usize, usize, usize)] = &[
    (1, 1, 1, 4),
    (2, 5, 2, 4),
    (1, 16, 4, 8),
    (2, 64, 2, 32),
    (1, 70, 1, 32),
    (2, 70, 4, 8),
    (1, 33, 2, 128),
    (1, 40, 1, 256),
];

/// Forward and backward on `be` with inputs scaled by `mag`; every output by name.
fn run(
    be: &dyn Backend,
    (b, l, heads, d): (usize, usize, usize, usize),
    mag: f32,
    seed: u64,
) -> Vec<(&'static str, Vec<f32>)> {
    let shape = [b, l, heads * d];
    let n = b * l * heads * d;
    let input = |s: u64| {
        let data: Vec<f32> = seeded(n, s).iter().map(|v| v * mag).collect();
        up(be, &shape, &data)
    };
    let (q, k, v) = (
        input(seed),
        input(seed + 1),
        up(be, &shape, &seeded(n, seed + 2)),
    );
    let d_out = up(be, &shape, &seeded(n, seed + 3));
    let fwd = be.attention(&q, &k, &v, heads).unwrap();
    let g = be
        .attention_backward(&q, &k, &v, &fwd, &d_out, heads)
        .unwrap();
    vec![
        ("out", down(be, &fwd.out)),
        ("lse", down(be, &fwd.lse)),
        ("dq", down(be, &g.dq)),
        ("dk", down(be, &g.dk)),
        ("dv", down(be, &g.dv)),
    ]
}

fn forward_and_backward_match_cpu(g: &Gpu) {
    for (i, &case) in CASES.iter().enumerate() {
        // Tolerance: inputs in [-1, 1] give O(1) scores and outputs; the GPU's online softmax
        // and its sums run in another order than the CPU's gemm, leaving a few ulps of O(1)
        // values, times up to L = 70 terms in the gradients.
        parity(
            g,
            &format!("attention {case:?}"),
            1e-5,
            1e-5,
            |be: &dyn Backend| run(be, case, 1.0, 10 * i as u64),
        );
    }
}

/// Float64 reference of one (b, head): out and lse.
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, l, heads, d): (usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let c = heads * d;
    let mut out = vec![0.0f32; b * l * c];
    let mut lse = vec![0.0f32; b * heads * l];
    let scale = 1.0 / (d as f64).sqrt();
    for bi in 0..b {
        for h in 0..heads {
            let at = |t: &[f32], row: usize, j: usize| t[(bi * l + row) * c + h * d + j] as f64;
            for i in 0..l {
                let s: Vec<f64> = (0..l)
                    .map(|m| (0..d).map(|j| at(q, i, j) * at(k, m, j)).sum::<f64>() * scale)
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
                lse[(bi * heads + h) * l + i] = (max + sum.ln()) as f32;
                for j in 0..d {
                    let o: f64 = (0..l).map(|m| (s[m] - max).exp() / sum * at(v, m, j)).sum();
                    out[(bi * l + i) * c + h * d + j] = o as f32;
                }
            }
        }
    }
    (out, lse)
}

/// (B, L, heads, d) of the large-logit case.
const LARGE_LOGITS: (usize, usize, usize, usize) = (2, 37, 2, 8);

/// The forward pass on `be` at large logits against the float64 reference.
fn check_large_logits(be: &dyn Backend) {
    // q and k in [-12, 12] with d = 8: scores up to a few hundred, typically ~1e2, where a
    // softmax without the max subtraction overflows f32 (e^89 > 3.4e38).
    let case = LARGE_LOGITS;
    let (b, l, heads, d) = case;
    let n = b * l * heads * d;
    let shape = [b, l, heads * d];
    let q: Vec<f32> = seeded(n, 1).iter().map(|v| v * 12.0).collect();
    let k: Vec<f32> = seeded(n, 2).iter().map(|v| v * 12.0).collect();
    let v = seeded(n, 3);
    let (want_out, want_lse) = reference(&q, &k, &v, case);
    assert!(
        want_lse.iter().any(|x| x.abs() > 100.0),
        "the case must reach logits ~1e2"
    );
    let fwd = be
        .attention(
            &up(be, &shape, &q),
            &up(be, &shape, &k),
            &up(be, &shape, &v),
            heads,
        )
        .unwrap();
    // Tolerance: an f32 score of magnitude ~300 carries ~2e-5 absolute rounding, which
    // moves the (near one-hot) softmax weights by about as much relative.
    let name = be.name();
    assert_close(
        &format!("{name} large-logit out"),
        &down(be, &fwd.out),
        &want_out,
        1e-4,
        1e-4,
    );
    assert_close(
        &format!("{name} large-logit lse"),
        &down(be, &fwd.lse),
        &want_lse,
        1e-4,
        1e-5,
    );
}

fn large_logits_are_stable_on_cpu() {
    check_large_logits(&Cpu);
}

fn large_logits_are_stable_on_gpu(g: &Gpu) {
    check_large_logits(g);
    // The backward at those logits: finite, and the same on both backends. Tolerance: the
    // gradients are ~1e1 here (dS times k ~ 12), so a relative bound.
    parity(
        g,
        "attention large logits",
        1e-4,
        1e-3,
        |be: &dyn Backend| {
            let out = run(be, LARGE_LOGITS, 12.0, 1);
            for (name, vals) in &out {
                assert!(vals.iter().all(|x| x.is_finite()), "{name} not finite");
            }
            out
        },
    );
}

fn gradients_match_finite_differences() {
    let (b, l, heads, d) = (1, 4, 2, 3);
    let shape = [b, l, heads * d];
    let n = b * l * heads * d;
    let (q, k, v) = (seeded(n, 1), seeded(n, 2), seeded(n, 3));
    let r = seeded(n, 4);
    let t = |x: &[f32]| up(&Cpu, &shape, x);
    let loss = |q: &[f32], k: &[f32], v: &[f32]| {
        dot(
            &down(
                &Cpu,
                &Cpu.attention(&t(q), &t(k), &t(v), heads).unwrap().out,
            ),
            &r,
        )
    };
    let fwd = Cpu.attention(&t(&q), &t(&k), &t(&v), heads).unwrap();
    let g = Cpu
        .attention_backward(&t(&q), &t(&k), &t(&v), &fwd, &t(&r), heads)
        .unwrap();
    // Tolerance: central differences with h = 1e-2 on an O(1) smooth loss have O(h^2) ~ 1e-4
    // truncation error, plus f32 rounding of the loss over 2h.
    gradcheck(
        "attention dq",
        &q,
        &down(&Cpu, &g.dq),
        1e-2,
        1e-3,
        1e-2,
        |x| loss(x, &k, &v),
    );
    gradcheck(
        "attention dk",
        &k,
        &down(&Cpu, &g.dk),
        1e-2,
        1e-3,
        1e-2,
        |x| loss(&q, x, &v),
    );
    gradcheck(
        "attention dv",
        &v,
        &down(&Cpu, &g.dv),
        1e-2,
        1e-3,
        1e-2,
        |x| loss(&q, &k, x),
    );
}

fn empty_inputs_give_empty_outputs(g: &Gpu) {
    // No batch or no rows: nothing to compute, and nothing may be read or written out of
    // bounds. (C = 0 is refused: heads of width 0 have no 1/sqrt(d) scale.)
    for (b, l, c) in [(0, 5, 4), (2, 0, 4)] {
        parity(
            g,
            &format!("attention empty {:?}", (b, l, c)),
            1e-6,
            1e-6,
            |be: &dyn Backend| {
                let t = up(be, &[b, l, c], &vec![0.5; b * l * c]);
                let fwd = be.attention(&t, &t, &t, 1).unwrap();
                let g = be.attention_backward(&t, &t, &t, &fwd, &t, 1).unwrap();
                assert_eq!(g.dq.shape(), [b, l, c]);
                vec![
                    ("out", down(be, &fwd.out)),
                    ("lse", down(be, &fwd.lse)),
                    ("dq", down(be, &g.dq)),
                ]
            },
        );
    }
}

/// Every bad call must be an `Err` naming the op, on both backends.
fn check_bad_input(be: &dyn Backend) {
    let t = |shape: &[usize]| up(be, shape, &vec![0.0; shape.iter().product()]);
    let (q, k, v) = (t(&[2, 5, 6]), t(&[2, 5, 6]), t(&[2, 5, 6]));
    let fwd = |q: &Tensor, k: &Tensor, v: &Tensor, heads| be.attention(q, k, v, heads).map(|_| ());
    let shape_err = |r: Result<(), Error>, want: &str| match r {
        Err(Error::Shape { op, .. }) => assert_eq!(op, want),
        other => panic!("{want}: expected a shape error, got {other:?}"),
    };
    let invalid = |r: Result<(), Error>| assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    shape_err(fwd(&q, &t(&[2, 6, 6]), &v, 2), "attention");
    shape_err(fwd(&q, &k, &t(&[2, 5, 3]), 2), "attention");
    shape_err(fwd(&t(&[5, 6]), &t(&[5, 6]), &t(&[5, 6]), 2), "attention");
    invalid(fwd(&q, &k, &v, 4));
    invalid(fwd(&q, &k, &v, 0));
    let no_features = t(&[2, 5, 0]);
    invalid(fwd(&no_features, &no_features, &no_features, 1));
    let saved = be.attention(&q, &k, &v, 2).unwrap();
    let bwd = |saved: &AttentionOutput, d_out: &Tensor, heads| {
        be.attention_backward(&q, &k, &v, saved, d_out, heads)
            .map(|_| ())
    };
    shape_err(bwd(&saved, &t(&[2, 5, 4]), 2), "attention_backward");
    let wrong_lse = AttentionOutput {
        out: saved.out.clone(),
        lse: t(&[2, 3, 5]),
    };
    shape_err(bwd(&wrong_lse, &q, 2), "attention_backward");
    invalid(bwd(&saved, &q, 4));
}

fn bad_input_is_an_error_on_cpu() {
    check_bad_input(&Cpu);
}

fn bad_input_is_an_error_on_gpu(g: &Gpu) {
    check_bad_input(g);
    // Heads wider than the GPU kernels' 256 columns are refused with a hint, not run.
    let wide = up(g, &[1, 2, 512], &[0.0; 1024]);
    let err = g.attention(&wide, &wide, &wide, 1).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                op: "attention",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("heads"), "{err}");
}

fn tensor_from_the_other_backend_is_an_error(g: &Gpu) {
    let c = up(&Cpu, &[1, 3, 4], &[0.5; 12]);
    let x = up(g, &[1, 3, 4], &[0.5; 12]);
    let err = g.attention(&x, &c, &x, 2).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongBackend {
                expected: "gpu",
                found: "cpu",
                ..
            }
        ),
        "{err}"
    );
    let saved = g.attention(&x, &x, &x, 2).unwrap();
    let err = g
        .attention_backward(&x, &x, &x, &saved, &c, 2)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongBackend {
                expected: "gpu",
                ..
            }
        ),
        "{err}"
    );
    let err = Cpu.attention(&c, &c, &x, 2).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongBackend {
                expected: "cpu",
                found: "gpu",
                ..
            }
        ),
        "{err}"
    );
}

tests! {
    cpu: [
        large_logits_are_stable_on_cpu,
        gradients_match_finite_differences,
        bad_input_is_an_error_on_cpu,
    ],
    gpu: [
        forward_and_backward_match_cpu,
        large_logits_are_stable_on_gpu,
        empty_inputs_give_empty_outputs,
        bad_input_is_an_error_on_gpu,
        tensor_from_the_other_backend_is_an_error,
    ],
}
