//! attention and attention_backward over packed `qkv [B, L, 3C]`: GPU vs CPU, finite
//! differences, a float64 reference at large logits, bad input.

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

/// `[rows, 3C]` with row i = q_i | k_i | v_i, from `[rows, C]` q, k and v.
fn pack(q: &[f32], k: &[f32], v: &[f32], c: usize) -> Vec<f32> {
    q.chunks_exact(c)
        .zip(k.chunks_exact(c))
        .zip(v.chunks_exact(c))
        .flat_map(|((q, k), v)| q.iter().chain(k).chain(v).copied())
        .collect()
}

/// Part `part` (0: q, 1: k, 2: v) of a packed `[rows, 3C]` tensor, as `[rows, C]`.
fn unpack(qkv: &[f32], c: usize, part: usize) -> Vec<f32> {
    qkv.chunks_exact(3 * c)
        .flat_map(|row| row[part * c..(part + 1) * c].iter().copied())
        .collect()
}

/// Forward and backward on `be` with q and k scaled by `mag`; every output by name, the
/// gradient unpacked into dq, dk and dv.
fn run(
    be: &dyn Backend,
    (b, l, heads, d): (usize, usize, usize, usize),
    mag: f32,
    seed: u64,
) -> Vec<(&'static str, Vec<f32>)> {
    let c = heads * d;
    let n = b * l * c;
    let scaled = |s: u64| -> Vec<f32> { seeded(n, s).iter().map(|v| v * mag).collect() };
    let qkv = pack(&scaled(seed), &scaled(seed + 1), &seeded(n, seed + 2), c);
    let qkv = up(be, &[b, l, 3 * c], &qkv);
    let d_out = up(be, &[b, l, c], &seeded(n, seed + 3));
    let fwd = be.attention(&qkv, heads).unwrap();
    let d_qkv = be.attention_backward(&qkv, &fwd, &d_out, heads).unwrap();
    assert_eq!(d_qkv.shape(), [b, l, 3 * c]);
    let d_qkv = down(be, &d_qkv);
    vec![
        ("out", down(be, &fwd.out)),
        ("lse", down(be, &fwd.lse)),
        ("dq", unpack(&d_qkv, c, 0)),
        ("dk", unpack(&d_qkv, c, 1)),
        ("dv", unpack(&d_qkv, c, 2)),
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

/// Float64 reference of one (b, head): out and lse, from unpacked `[B, L, C]` q, k, v.
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
    let c = heads * d;
    let n = b * l * c;
    let q: Vec<f32> = seeded(n, 1).iter().map(|v| v * 12.0).collect();
    let k: Vec<f32> = seeded(n, 2).iter().map(|v| v * 12.0).collect();
    let v = seeded(n, 3);
    let (want_out, want_lse) = reference(&q, &k, &v, case);
    assert!(
        want_lse.iter().any(|x| x.abs() > 100.0),
        "the case must reach logits ~1e2"
    );
    let qkv = up(be, &[b, l, 3 * c], &pack(&q, &k, &v, c));
    let fwd = be.attention(&qkv, heads).unwrap();
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
    // Two batches and two heads, so that every block of d_qkv (q, k, v columns of each head
    // of each batch) is checked against its own differences.
    let (b, l, heads, d) = (2, 4, 2, 3);
    let shape = [b, l, 3 * heads * d];
    let qkv = seeded(shape.iter().product(), 1);
    let r = seeded(b * l * heads * d, 4);
    let t = |x: &[f32]| up(&Cpu, &shape, x);
    let loss = |x: &[f32]| dot(&down(&Cpu, &Cpu.attention(&t(x), heads).unwrap().out), &r);
    let fwd = Cpu.attention(&t(&qkv), heads).unwrap();
    let d_out = up(&Cpu, &[b, l, heads * d], &r);
    let d_qkv = Cpu
        .attention_backward(&t(&qkv), &fwd, &d_out, heads)
        .unwrap();
    // Tolerance: central differences with h = 1e-2 on an O(1) smooth loss have O(h^2) ~ 1e-4
    // truncation error, plus f32 rounding of the loss over 2h.
    gradcheck(
        "attention d_qkv",
        &qkv,
        &down(&Cpu, &d_qkv),
        1e-2,
        1e-3,
        1e-2,
        loss,
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
                let qkv = up(be, &[b, l, 3 * c], &vec![0.5; b * l * 3 * c]);
                let d_out = up(be, &[b, l, c], &vec![0.5; b * l * c]);
                let fwd = be.attention(&qkv, 1).unwrap();
                let d_qkv = be.attention_backward(&qkv, &fwd, &d_out, 1).unwrap();
                assert_eq!(fwd.out.shape(), [b, l, c]);
                assert_eq!(d_qkv.shape(), [b, l, 3 * c]);
                vec![
                    ("out", down(be, &fwd.out)),
                    ("lse", down(be, &fwd.lse)),
                    ("d_qkv", down(be, &d_qkv)),
                ]
            },
        );
    }
}

/// Every bad call must be an `Err` naming the op, on both backends.
fn check_bad_input(be: &dyn Backend) {
    let t = |shape: &[usize]| up(be, shape, &vec![0.0; shape.iter().product()]);
    let fwd = |qkv: &Tensor, heads| be.attention(qkv, heads).map(|_| ());
    let shape_err = |r: Result<(), Error>, want: &str| match r {
        Err(Error::Shape { op, .. }) => assert_eq!(op, want),
        other => panic!("{want}: expected a shape error, got {other:?}"),
    };
    let invalid = |r: Result<(), Error>, want: &str| match r {
        Err(Error::Invalid { op, .. }) => assert_eq!(op, want),
        other => panic!("{want}: expected an invalid-argument error, got {other:?}"),
    };
    // [2, 5, 12]: q | k | v of 2 heads of width 2.
    let qkv = t(&[2, 5, 12]);
    shape_err(fwd(&t(&[10, 12]), 2), "attention");
    // Widths that are not 3 heads d: not a multiple of 3, of 3 heads, or none at all.
    invalid(fwd(&t(&[2, 5, 8]), 1), "attention");
    invalid(fwd(&qkv, 3), "attention");
    invalid(fwd(&qkv, 0), "attention");
    invalid(fwd(&t(&[2, 5, 0]), 1), "attention");
    let saved = be.attention(&qkv, 2).unwrap();
    let d_out = t(&[2, 5, 4]);
    let bwd = |saved: &AttentionOutput, d_out: &Tensor, heads| {
        be.attention_backward(&qkv, saved, d_out, heads).map(|_| ())
    };
    bwd(&saved, &d_out, 2).unwrap();
    // d_out shaped like qkv instead of like the output.
    shape_err(bwd(&saved, &qkv, 2), "attention_backward");
    let wrong_out = AttentionOutput {
        out: qkv.clone(),
        lse: saved.lse.clone(),
    };
    shape_err(bwd(&wrong_out, &d_out, 2), "attention_backward");
    let wrong_lse = AttentionOutput {
        out: saved.out.clone(),
        lse: t(&[2, 3, 5]),
    };
    shape_err(bwd(&wrong_lse, &d_out, 2), "attention_backward");
    invalid(bwd(&saved, &d_out, 3), "attention_backward");
}

fn bad_input_is_an_error_on_cpu() {
    check_bad_input(&Cpu);
}

fn bad_input_is_an_error_on_gpu(g: &Gpu) {
    check_bad_input(g);
    // Heads wider than the GPU kernels' 256 columns are refused with a hint, not run.
    let wide = up(g, &[1, 2, 3 * 512], &[0.0; 2 * 3 * 512]);
    let err = g.attention(&wide, 1).map(|_| ()).unwrap_err();
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
    let c = up(&Cpu, &[1, 3, 12], &[0.5; 36]);
    let x = up(g, &[1, 3, 12], &[0.5; 36]);
    let err = g.attention(&c, 2).map(|_| ()).unwrap_err();
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
    let saved = g.attention(&x, 2).unwrap();
    let d_out = up(&Cpu, &[1, 3, 4], &[0.5; 12]);
    let err = g
        .attention_backward(&x, &saved, &d_out, 2)
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
    let err = Cpu.attention(&x, 2).map(|_| ()).unwrap_err();
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
