//! conv2d and conv2d_backward: GPU vs CPU, finite differences, bad input; the epilogue that
//! adds a per-channel value and a residual in the same pass, against the separate ops and
//! through the tape's backward.

mod common;

use common::*;
use diffwgpu::autodiff::Tape;
use diffwgpu::ops::conv2d::{Conv2dEpilogue, Conv2dParams};
use diffwgpu::{Backend, Cpu, Error, Gpu, Tensor};

/// One convolution: input shape, output channels, square kernel size, parameters, bias.
struct Case {
    x: [usize; 4],
    cout: usize,
    k: usize,
    p: Conv2dParams,
    bias: bool,
}

const fn case(
    x: [usize; 4],
    cout: usize,
    k: usize,
    stride: usize,
    pad: [usize; 4],
    bias: bool,
) -> Case {
    Case {
        x,
        cout,
        k,
        p: Conv2dParams {
            stride,
            padding: pad,
        },
        bias,
    }
}

const SAME: [usize; 4] = [1; 4];
const NONE: [usize; 4] = [0; 4];
/// diffusers' Downsample2D pads bottom and right by one before its stride-2 3x3 conv.
const DOWN: [usize; 4] = [0, 1, 0, 1];

/// Odd image sizes, channel counts that are not multiples of the 64-wide tiles (and a few
/// above 64, so rows span two tiles), batch 1 and 3, every padding and stride the U-Net uses.
const CASES: &[Case] = &[
    case([1, 3, 5, 7], 5, 3, 1, SAME, true),
    case([3, 5, 5, 7], 13, 3, 1, SAME, false),
    case([3, 13, 5, 7], 3, 1, 1, NONE, true),
    case([3, 3, 5, 7], 5, 3, 2, DOWN, true),
    case([1, 5, 6, 6], 3, 3, 2, SAME, false),
    case([1, 3, 5, 7], 5, 1, 2, NONE, true),
    case([1, 3, 5, 7], 5, 3, 1, NONE, false),
    case([1, 4, 6, 5], 70, 3, 1, SAME, true),
    case([1, 67, 4, 4], 3, 3, 1, SAME, true),
    // Reduction over B Ho Wo = 768 pixels: the weight gradient runs in two splits.
    case([3, 5, 16, 16], 7, 3, 1, SAME, true),
    // Moderately sized: several output tiles and reduction slabs in every kernel.
    case([2, 32, 16, 16], 32, 3, 1, SAME, true),
];

/// Seeded data of a case: input, weight, bias, the output's shape and an output gradient.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    yshape: [usize; 4],
    dy: Vec<f32>,
}

fn inputs(c: &Case, seed: u64) -> Inputs {
    let wshape = [c.cout, c.x[1], c.k, c.k];
    let ho = (c.x[2] + c.p.padding[0] + c.p.padding[1] - c.k) / c.p.stride + 1;
    let wo = (c.x[3] + c.p.padding[2] + c.p.padding[3] - c.k) / c.p.stride + 1;
    let yshape = [c.x[0], c.cout, ho, wo];
    Inputs {
        x: seeded(c.x.iter().product(), seed),
        w: seeded(wshape.iter().product(), seed + 1),
        b: seeded(c.cout, seed + 2),
        yshape,
        dy: seeded(yshape.iter().product(), seed + 3),
    }
}

fn forward_and_backward_match_cpu(g: &Gpu) {
    for (i, c) in CASES.iter().enumerate() {
        let Inputs {
            x,
            w,
            b,
            yshape,
            dy,
        } = inputs(c, 10 * i as u64);
        let wshape = [c.cout, c.x[1], c.k, c.k];
        // Tolerance: sums of at most a few hundred products of O(1) values, accumulated in a
        // different order on each backend (tile slabs and splits vs the GEMM's blocking), so a
        // few f32 ulps of partial sums of size up to ~30.
        let name = format!("conv2d x {:?} -> {} k{} {:?}", c.x, c.cout, c.k, c.p);
        parity(g, &name, 1e-4, 1e-4, |be: &dyn Backend| {
            let tx = up(be, &c.x, &x);
            let tw = up(be, &wshape, &w);
            let tb = up(be, &[c.cout], &b);
            let tdy = up(be, &yshape, &dy);
            let y = be.conv2d(&tx, &tw, c.bias.then_some(&tb), &c.p).unwrap();
            assert_eq!(y.shape(), yshape);
            let g = be.conv2d_backward(&tx, &tw, &tdy, &c.p, c.bias).unwrap();
            assert_eq!(g.db.is_some(), c.bias);
            let mut out = vec![
                ("y", down(be, &y)),
                ("dx", down(be, &g.dx)),
                ("dw", down(be, &g.dw)),
            ];
            if let Some(db) = &g.db {
                out.push(("db", down(be, db)));
            }
            out
        });
    }
}

/// `sum(conv2d(x, w, b) * r)` on the CPU.
fn loss(c: &Case, x: &[f32], w: &[f32], b: &[f32], r: &[f32]) -> f64 {
    let tx = up(&Cpu, &c.x, x);
    let tw = up(&Cpu, &[c.cout, c.x[1], c.k, c.k], w);
    let tb = up(&Cpu, &[c.cout], b);
    dot(
        &down(&Cpu, &Cpu.conv2d(&tx, &tw, Some(&tb), &c.p).unwrap()),
        r,
    )
}

fn gradients_match_finite_differences() {
    let cases = [
        case([2, 3, 5, 4], 2, 3, 2, DOWN, true),
        case([1, 2, 4, 5], 3, 3, 1, SAME, true),
        case([2, 3, 3, 2], 2, 1, 1, NONE, true),
        case([1, 2, 5, 5], 2, 3, 2, SAME, true),
    ];
    for (i, c) in cases.iter().enumerate() {
        let Inputs {
            x,
            w,
            b,
            yshape,
            dy: r,
        } = inputs(c, 100 + 10 * i as u64);
        let wshape = [c.cout, c.x[1], c.k, c.k];
        let g = Cpu
            .conv2d_backward(
                &up(&Cpu, &c.x, &x),
                &up(&Cpu, &wshape, &w),
                &up(&Cpu, &yshape, &r),
                &c.p,
                true,
            )
            .unwrap();
        // The loss is linear in each argument, so central differences are exact up to the
        // f32 rounding of the forward pass (~1e-6 of the loss, divided by 2h).
        let (h, atol, rtol) = (1e-2, 2e-3, 1e-3);
        let name = format!("x {:?} k{} {:?}", c.x, c.k, c.p);
        gradcheck(
            &format!("{name} dx"),
            &x,
            &down(&Cpu, &g.dx),
            h,
            atol,
            rtol,
            |xp| loss(c, xp, &w, &b, &r),
        );
        gradcheck(
            &format!("{name} dw"),
            &w,
            &down(&Cpu, &g.dw),
            h,
            atol,
            rtol,
            |wp| loss(c, &x, wp, &b, &r),
        );
        let db = down(&Cpu, g.db.as_ref().unwrap());
        gradcheck(&format!("{name} db"), &b, &db, h, atol, rtol, |bp| {
            loss(c, &x, &w, bp, &r)
        });
    }
}

/// Cases for the epilogue: two tiles of output channels with padding, and a strided case
/// whose output is smaller than its input.
const EPILOGUE_CASES: &[Case] = &[
    case([2, 4, 6, 5], 70, 3, 1, SAME, true),
    case([3, 5, 16, 16], 7, 3, 1, SAME, false),
    case([3, 3, 5, 7], 5, 3, 2, DOWN, true),
];

/// `conv2d_with` of case `c` with an `add [B, Cout]` and a residual (each on or off).
fn conv_with(
    be: &dyn Backend,
    c: &Case,
    seed: u64,
    (with_add, with_residual): (bool, bool),
) -> (Tensor, Tensor, Tensor, Tensor) {
    let i = inputs(c, seed);
    let (b, co) = (c.x[0], c.cout);
    let x = up(be, &c.x, &i.x);
    let w = up(be, &[co, c.x[1], c.k, c.k], &i.w);
    let bias = up(be, &[co], &i.b);
    let add = up(be, &[b, co], &seeded(b * co, seed + 5));
    let residual = up(be, &i.yshape, &seeded(i.dy.len(), seed + 6));
    let e = Conv2dEpilogue {
        add: with_add.then_some(&add),
        residual: with_residual.then_some(&residual),
    };
    let y = be
        .conv2d_with(&x, &w, c.bias.then_some(&bias), &c.p, &e)
        .unwrap();
    (y, x, add, residual)
}

const EPILOGUES: [(bool, bool); 3] = [(true, false), (false, true), (true, true)];

/// GPU vs CPU with each epilogue (tolerance as `forward_and_backward_match_cpu`).
fn epilogue_matches_cpu(g: &Gpu) {
    for (i, c) in EPILOGUE_CASES.iter().enumerate() {
        for e in EPILOGUES {
            let name = format!("conv2d_with {e:?} x {:?} -> {} {:?}", c.x, c.cout, c.p);
            parity(g, &name, 1e-4, 1e-4, |be: &dyn Backend| {
                vec![("y", down(be, &conv_with(be, c, 50 + i as u64, e).0))]
            });
        }
    }
}

/// The fused sums equal the convolution followed by `add_per_channel` and `add` on the same
/// backend: the same values added in another order, so within a few ulps (1e-5).
fn check_epilogue_equals_separate_adds(be: &dyn Backend) {
    for (i, c) in EPILOGUE_CASES.iter().enumerate() {
        for e in EPILOGUES {
            let (y, _, add, residual) = conv_with(be, c, 70 + i as u64, e);
            let (plain, ..) = conv_with(be, c, 70 + i as u64, (false, false));
            let mut want = plain;
            if e.0 {
                want = be.add_per_channel(&want, &add).unwrap();
            }
            if e.1 {
                want = be.add(&want, &residual).unwrap();
            }
            let name = format!("{} conv2d_with {e:?} x {:?}", be.name(), c.x);
            assert_close(&name, &down(be, &y), &down(be, &want), 1e-5, 1e-5);
        }
    }
}

fn epilogue_equals_separate_adds_on_cpu() {
    check_epilogue_equals_separate_adds(&Cpu);
}

fn epilogue_equals_separate_adds_on_gpu(g: &Gpu) {
    check_epilogue_equals_separate_adds(g);
}

/// The tape's backward of `conv2d_with`: the gradients of the per-channel addend and of the
/// residual (and of x, w and b, as without an epilogue) against central differences of
/// `sum(y * r)`, which is linear in each, so exact up to the forward's f32 rounding.
fn epilogue_gradients_match_finite_differences() {
    let c = &case([2, 3, 5, 4], 4, 3, 2, DOWN, true);
    let i = inputs(c, 90);
    let (b, co) = (c.x[0], c.cout);
    let a = seeded(b * co, 95);
    let res = seeded(i.dy.len(), 96);
    let wshape = [co, c.x[1], c.k, c.k];
    let forward = |tape: &mut Tape, v: [&[f32]; 5]| {
        let shapes: [&[usize]; 5] = [&c.x, &wshape, &[co], &[b, co], &i.yshape];
        let vars: Vec<_> = v
            .iter()
            .zip(shapes)
            .map(|(d, s)| tape.leaf(up(&Cpu, s, d), true))
            .collect();
        let y = tape
            .conv2d_with(
                vars[0],
                vars[1],
                Some(vars[2]),
                c.p,
                Some(vars[3]),
                Some(vars[4]),
            )
            .unwrap();
        (vars, y)
    };
    let loss = |v: [&[f32]; 5]| {
        let mut tape = Tape::inference(&Cpu);
        let (_, y) = forward(&mut tape, v);
        dot(&down(&Cpu, tape.value(y)), &i.dy)
    };
    let all: [&[f32]; 5] = [&i.x, &i.w, &i.b, &a, &res];
    let mut tape = Tape::new(&Cpu);
    let (vars, y) = forward(&mut tape, all);
    let mut grads = tape.backward(y, up(&Cpu, &i.yshape, &i.dy)).unwrap();
    let (h, atol, rtol) = (1e-2, 2e-3, 1e-3);
    for (k, name) in ["dx", "dw", "db", "d add", "d residual"].iter().enumerate() {
        let got = down(&Cpu, &grads.take(vars[k]).expect("a gradient"));
        gradcheck(name, all[k], &got, h, atol, rtol, |vp| {
            let mut v = all;
            v[k] = vp;
            loss(v)
        });
    }
}

fn params_constructors() {
    assert_eq!(
        Conv2dParams::new(2, 1),
        Conv2dParams {
            stride: 2,
            padding: [1; 4]
        }
    );
    assert_eq!(Conv2dParams::with_padding(2, DOWN).padding, DOWN);
}

/// Every bad-input case on backend `be`: each must be an `Err` of the expected kind.
fn bad_inputs_are_errors(be: &dyn Backend) {
    let t = |shape: &[usize]| up(be, shape, &vec![0.5; shape.iter().product()]);
    let x = t(&[2, 3, 5, 5]);
    let w = t(&[4, 3, 3, 3]);
    let dy = t(&[2, 4, 5, 5]);
    let p = Conv2dParams::new(1, 1);
    let shape_err = |r: Result<Tensor, Error>| matches!(r, Err(Error::Shape { op: "conv2d", .. }));
    let invalid = |r: Result<Tensor, Error>| matches!(r, Err(Error::Invalid { op: "conv2d", .. }));

    assert!(
        shape_err(be.conv2d(&x, &t(&[4, 2, 3, 3]), None, &p)),
        "Cin mismatch"
    );
    assert!(
        shape_err(be.conv2d(&x, &w, Some(&t(&[5])), &p)),
        "bias length"
    );
    assert!(
        shape_err(be.conv2d(&x, &w, Some(&t(&[4, 1])), &p)),
        "bias rank"
    );
    assert!(
        shape_err(be.conv2d(&t(&[3, 5, 5]), &w, None, &p)),
        "x rank 3"
    );
    assert!(
        shape_err(be.conv2d(&x, &t(&[4, 3, 9]), None, &p)),
        "w rank 3"
    );
    assert!(
        invalid(be.conv2d(&x, &w, None, &Conv2dParams::new(0, 1))),
        "stride 0"
    );
    let big = t(&[4, 3, 8, 8]);
    assert!(
        invalid(be.conv2d(&x, &big, None, &p)),
        "kernel larger than padded input"
    );
    assert!(
        invalid(be.conv2d(&x, &t(&[4, 3, 0, 3]), None, &p)),
        "empty kernel"
    );
    let with = |add: Option<&Tensor>, residual: Option<&Tensor>| {
        be.conv2d_with(&x, &w, None, &p, &Conv2dEpilogue { add, residual })
    };
    assert!(shape_err(with(Some(&t(&[2, 3])), None)), "add [B, Cin]");
    assert!(shape_err(with(Some(&t(&[4])), None)), "add without batch");
    assert!(
        shape_err(with(None, Some(&t(&[2, 4, 5, 4])))),
        "residual shape"
    );

    let back = |w: &Tensor, dy: &Tensor, p: &Conv2dParams| be.conv2d_backward(&x, w, dy, p, true);
    let is = |r: Result<_, Error>, want: fn(&Error) -> bool| r.is_err_and(|e| want(&e));
    let bshape = |e: &Error| {
        matches!(
            e,
            Error::Shape {
                op: "conv2d_backward",
                ..
            }
        )
    };
    let binvalid = |e: &Error| {
        matches!(
            e,
            Error::Invalid {
                op: "conv2d_backward",
                ..
            }
        )
    };
    assert!(
        is(back(&w, &t(&[2, 4, 4, 4]), &p), bshape),
        "dy of the wrong size"
    );
    assert!(
        is(back(&t(&[4, 2, 3, 3]), &dy, &p), bshape),
        "backward Cin mismatch"
    );
    assert!(
        is(back(&w, &dy, &Conv2dParams::new(0, 1)), binvalid),
        "backward stride 0"
    );
}

fn bad_input_is_an_error_on_cpu() {
    bad_inputs_are_errors(&Cpu);
}

fn bad_input_is_an_error_on_gpu(g: &Gpu) {
    bad_inputs_are_errors(g);
}

fn tensor_from_the_other_backend_is_an_error(g: &Gpu) {
    let p = Conv2dParams::new(1, 1);
    let (cx, cw) = (
        up(&Cpu, &[1, 2, 3, 3], &[1.0; 18]),
        up(&Cpu, &[2, 2, 3, 3], &[1.0; 36]),
    );
    let (gx, gw) = (
        up(g, &[1, 2, 3, 3], &[1.0; 18]),
        up(g, &[2, 2, 3, 3], &[1.0; 36]),
    );
    let gb = up(g, &[2], &[1.0; 2]);
    let cb = up(&Cpu, &[2], &[1.0; 2]);
    let wrong = |r: Result<Tensor, Error>, expected: &str| matches!(r, Err(Error::WrongBackend { expected: e, .. }) if e == expected);
    assert!(wrong(g.conv2d(&cx, &gw, None, &p), "gpu"));
    assert!(wrong(g.conv2d(&gx, &cw, None, &p), "gpu"));
    assert!(wrong(g.conv2d(&gx, &gw, Some(&cb), &p), "gpu"));
    assert!(wrong(Cpu.conv2d(&gx, &cw, None, &p), "cpu"));
    assert!(wrong(Cpu.conv2d(&cx, &cw, Some(&gb), &p), "cpu"));
    let gdy = up(g, &[1, 2, 3, 3], &[1.0; 18]);
    let cdy = up(&Cpu, &[1, 2, 3, 3], &[1.0; 18]);
    assert!(matches!(
        g.conv2d_backward(&gx, &gw, &cdy, &p, true),
        Err(Error::WrongBackend {
            expected: "gpu",
            ..
        })
    ));
    assert!(matches!(
        Cpu.conv2d_backward(&cx, &cw, &gdy, &p, false),
        Err(Error::WrongBackend {
            expected: "cpu",
            ..
        })
    ));
}

tests! {
    cpu: [
        gradients_match_finite_differences,
        epilogue_gradients_match_finite_differences,
        epilogue_equals_separate_adds_on_cpu,
        params_constructors,
        bad_input_is_an_error_on_cpu,
    ],
    gpu: [
        forward_and_backward_match_cpu,
        epilogue_matches_cpu,
        epilogue_equals_separate_adds_on_gpu,
        bad_input_is_an_error_on_gpu,
        tensor_from_the_other_backend_is_an_error,
    ],
}
