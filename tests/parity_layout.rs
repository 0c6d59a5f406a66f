//! Broadcast add per channel, channel concat/split, nearest upsampling x2 and transpose:
//! GPU vs CPU, finite differences, bad input.
//!
//! Tolerances: the data-movement kernels copy values, so they must match bit for bit
//! (tolerance 0); `add_per_channel` is one f32 addition on both sides (also exact); the
//! upsampling backward adds four values in the same order on both sides (exact); the row sum
//! of `add_per_channel_backward` is an f32 tree on the GPU against an f64 sum on the CPU, so
//! it gets `1e-6 * H W` absolute for values of magnitude <= 1.

mod common;

use common::*;
use diffwgpu::{Backend, Cpu, Error, Gpu};

/// NCHW shapes: one pixel, odd spatial sizes with channel counts off any tile size, and a
/// row longer than the 256-wide workgroup.
const SHAPES: &[[usize; 4]] = &[[1, 1, 1, 1], [3, 6, 5, 7], [2, 3, 17, 19]];

fn add_per_channel_matches_cpu(g: &Gpu) {
    for (i, s) in SHAPES.iter().enumerate() {
        let n: usize = s.iter().product();
        let x = seeded(n, i as u64);
        let v = seeded(s[0] * s[1], 10 + i as u64);
        parity(
            g,
            &format!("add_per_channel {s:?}"),
            0.0,
            0.0,
            |be: &dyn Backend| {
                let y = be
                    .add_per_channel(&up(be, s, &x), &up(be, &s[..2], &v))
                    .unwrap();
                vec![("y", down(be, &y))]
            },
        );
        let tol = 1e-6 * (s[2] * s[3]) as f32;
        parity(
            g,
            &format!("add_per_channel_backward {s:?}"),
            tol,
            0.0,
            |be| {
                let dv = be.add_per_channel_backward(&up(be, s, &x)).unwrap();
                assert_eq!(dv.shape(), &s[..2]);
                vec![("dv", down(be, &dv))]
            },
        );
    }
}

fn concat_and_split_match_cpu(g: &Gpu) {
    let cases: &[([usize; 4], usize)] = &[([1, 1, 1, 1], 3), ([3, 6, 5, 7], 2), ([2, 5, 4, 3], 0)];
    for (i, &(sa, cb)) in cases.iter().enumerate() {
        let sb = [sa[0], cb, sa[2], sa[3]];
        let a = seeded(sa.iter().product(), i as u64);
        let b = seeded(sb.iter().product(), 20 + i as u64);
        parity(
            g,
            &format!("concat/split {sa:?} ++ {sb:?}"),
            0.0,
            0.0,
            |be: &dyn Backend| {
                let y = be
                    .concat_channels(&up(be, &sa, &a), &up(be, &sb, &b))
                    .unwrap();
                assert_eq!(y.shape(), &[sa[0], sa[1] + cb, sa[2], sa[3]]);
                let (ya, yb) = be.split_channels(&y, sa[1]).unwrap();
                assert_eq!((ya.shape(), yb.shape()), (&sa[..], &sb[..]));
                let (ya, yb) = (down(be, &ya), down(be, &yb));
                // split is the exact inverse of concat.
                assert_eq!((&ya, &yb), (&a, &b));
                vec![("concat", down(be, &y)), ("split a", ya), ("split b", yb)]
            },
        );
    }
}

fn concat_puts_a_first_in_each_sample() {
    // torch.cat([a, b], dim=1) of a = [[1], [2]] and b = [[3, 4], [5, 6]] (B = 2, H = W = 1).
    let y = Cpu
        .concat_channels(
            &up(&Cpu, &[2, 1, 1, 1], &[1.0, 2.0]),
            &up(&Cpu, &[2, 2, 1, 1], &[3.0, 4.0, 5.0, 6.0]),
        )
        .unwrap();
    assert_eq!(down(&Cpu, &y), [1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
}

fn upsample_matches_cpu(g: &Gpu) {
    for (i, s) in SHAPES.iter().enumerate() {
        let n: usize = s.iter().product();
        let x = seeded(n, 30 + i as u64);
        let dy = seeded(4 * n, 40 + i as u64);
        let s_up = [s[0], s[1], 2 * s[2], 2 * s[3]];
        parity(
            g,
            &format!("upsample {s:?}"),
            0.0,
            0.0,
            |be: &dyn Backend| {
                let y = be.upsample_nearest2x(&up(be, s, &x)).unwrap();
                assert_eq!(y.shape(), &s_up);
                let dx = be.upsample_nearest2x_backward(&up(be, &s_up, &dy)).unwrap();
                assert_eq!(dx.shape(), s);
                vec![("y", down(be, &y)), ("dx", down(be, &dx))]
            },
        );
    }
}

fn upsample_repeats_each_pixel_in_a_2x2_block() {
    let y = Cpu
        .upsample_nearest2x(&up(&Cpu, &[1, 1, 1, 2], &[1.0, 2.0]))
        .unwrap();
    assert_eq!(down(&Cpu, &y), [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]);
}

fn transpose_matches_cpu(g: &Gpu) {
    // Empty, and edges of the 32x32 tile: smaller, one over, several tiles with ragged ends.
    let shapes: &[[usize; 3]] = &[
        [0, 3, 4],
        [1, 1, 1],
        [3, 5, 7],
        [2, 33, 65],
        [1, 64, 32],
        [2, 100, 3],
    ];
    for (i, s) in shapes.iter().enumerate() {
        let x = seeded(s.iter().product(), 50 + i as u64);
        parity(
            g,
            &format!("transpose {s:?}"),
            0.0,
            0.0,
            |be: &dyn Backend| {
                let y = be.transpose(&up(be, s, &x)).unwrap();
                assert_eq!(y.shape(), &[s[0], s[2], s[1]]);
                let back = down(be, &be.transpose(&y).unwrap());
                assert_eq!(back, x, "transpose twice is the identity");
                vec![("y", down(be, &y))]
            },
        );
    }
}

fn transpose_swaps_the_last_two_axes() {
    let y = Cpu
        .transpose(&up(&Cpu, &[1, 2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
        .unwrap();
    assert_eq!(down(&Cpu, &y), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
}

fn gradients_match_finite_differences() {
    // The ops are linear, so central differences are exact up to f32 rounding of the loss.
    let (h, atol, rtol) = (1e-2, 1e-3, 1e-3);
    let s = [2, 3, 3, 5];
    let x = seeded(90, 1);
    let v = seeded(6, 2);
    let r = seeded(90, 3);
    let tr = up(&Cpu, &s, &r);
    // add_per_channel: d/dv = add_per_channel_backward(r), d/dx = r.
    let dv = down(&Cpu, &Cpu.add_per_channel_backward(&tr).unwrap());
    let tx = up(&Cpu, &s, &x);
    gradcheck("add_per_channel dv", &v, &dv, h, atol, rtol, |vp| {
        let y = Cpu.add_per_channel(&tx, &up(&Cpu, &[2, 3], vp)).unwrap();
        dot(&down(&Cpu, &y), &r)
    });
    let tv = up(&Cpu, &[2, 3], &v);
    gradcheck("add_per_channel dx", &x, &r, h, atol, rtol, |xp| {
        let y = Cpu.add_per_channel(&up(&Cpu, &s, xp), &tv).unwrap();
        dot(&down(&Cpu, &y), &r)
    });

    // upsample: d/dx = upsample_nearest2x_backward(r).
    let r_up = seeded(360, 4);
    let dx = Cpu
        .upsample_nearest2x_backward(&up(&Cpu, &[2, 3, 6, 10], &r_up))
        .unwrap();
    gradcheck("upsample", &x, &down(&Cpu, &dx), h, atol, rtol, |xp| {
        let y = Cpu.upsample_nearest2x(&up(&Cpu, &s, xp)).unwrap();
        dot(&down(&Cpu, &y), &r_up)
    });

    // concat: d/da, d/db = split(r).
    let b = seeded(30, 5);
    let sb = [2, 1, 3, 5];
    let r_cat = seeded(120, 6);
    let (da, db) = Cpu
        .split_channels(&up(&Cpu, &[2, 4, 3, 5], &r_cat), 3)
        .unwrap();
    let tb = up(&Cpu, &sb, &b);
    gradcheck("concat a", &x, &down(&Cpu, &da), h, atol, rtol, |xp| {
        let y = Cpu.concat_channels(&up(&Cpu, &s, xp), &tb).unwrap();
        dot(&down(&Cpu, &y), &r_cat)
    });
    gradcheck("concat b", &b, &down(&Cpu, &db), h, atol, rtol, |bp| {
        let y = Cpu.concat_channels(&tx, &up(&Cpu, &sb, bp)).unwrap();
        dot(&down(&Cpu, &y), &r_cat)
    });

    // transpose: its own backward.
    let st = [2, 9, 5];
    let dxt = Cpu.transpose(&up(&Cpu, &[2, 5, 9], &r)).unwrap();
    gradcheck("transpose", &x, &down(&Cpu, &dxt), h, atol, rtol, |xp| {
        dot(&down(&Cpu, &Cpu.transpose(&up(&Cpu, &st, xp)).unwrap()), &r)
    });
}

/// Every bad call must be an `Err`, on both backends.
fn check_bad_shapes(be: &dyn Backend) {
    let x = up(be, &[2, 3, 4, 5], &[0.0; 120]);
    let z = |shape: &[usize]| up(be, shape, &vec![0.0; shape.iter().product()]);
    // add_per_channel: v's batch or channels differ, x not rank 4.
    for v in [z(&[1, 3]), z(&[2, 4]), z(&[6])] {
        let r = be.add_per_channel(&x, &v);
        assert!(
            matches!(
                r,
                Err(Error::Shape {
                    op: "add_per_channel",
                    ..
                })
            ),
            "{r:?}"
        );
    }
    let r = be.add_per_channel(&z(&[2, 3, 20]), &z(&[2, 3]));
    assert!(matches!(r, Err(Error::Shape { .. })));
    assert!(matches!(
        be.add_per_channel_backward(&z(&[6, 20])),
        Err(Error::Shape { .. })
    ));
    // concat: batch mismatch, spatial mismatch, rank.
    for b in [z(&[1, 3, 4, 5]), z(&[2, 3, 5, 4]), z(&[2, 3, 20])] {
        let r = be.concat_channels(&x, &b);
        assert!(
            matches!(
                r,
                Err(Error::Shape {
                    op: "concat_channels",
                    ..
                })
            ),
            "{r:?}"
        );
    }
    // split beyond the channel count.
    let r = be.split_channels(&x, 4);
    assert!(
        matches!(
            r,
            Err(Error::Invalid {
                op: "split_channels",
                ..
            })
        ),
        "{r:?}"
    );
    // upsampling: rank, odd gradient sizes.
    assert!(matches!(
        be.upsample_nearest2x(&z(&[3, 4, 5])),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        be.upsample_nearest2x_backward(&x),
        Err(Error::Shape { .. })
    ));
    // transpose of rank 2 and 4.
    for t in [z(&[3, 4]), x.clone()] {
        assert!(matches!(
            be.transpose(&t),
            Err(Error::Shape {
                op: "transpose",
                ..
            })
        ));
    }
}

fn bad_shapes_are_errors_on_cpu() {
    check_bad_shapes(&Cpu);
}

fn bad_shapes_are_errors_on_gpu(g: &Gpu) {
    check_bad_shapes(g);
}

fn tensor_from_the_other_backend_is_an_error(g: &Gpu) {
    let wrong = |r: Result<(), Error>, expected: &str| {
        assert!(
            matches!(r, Err(Error::WrongBackend { expected: e, .. }) if e == expected),
            "{r:?}"
        );
    };
    let (c, gt) = (
        up(&Cpu, &[1, 2, 2, 2], &[0.0; 8]),
        up(g, &[1, 2, 2, 2], &[0.0; 8]),
    );
    let (cv, gv) = (up(&Cpu, &[1, 2], &[0.0; 2]), up(g, &[1, 2], &[0.0; 2]));
    wrong(g.add_per_channel(&gt, &cv).map(drop), "gpu");
    wrong(g.add_per_channel_backward(&c).map(drop), "gpu");
    wrong(g.concat_channels(&gt, &c).map(drop), "gpu");
    wrong(g.split_channels(&c, 1).map(drop), "gpu");
    wrong(g.upsample_nearest2x(&c).map(drop), "gpu");
    wrong(g.upsample_nearest2x_backward(&c).map(drop), "gpu");
    wrong(
        g.transpose(&up(&Cpu, &[1, 2, 4], &[0.0; 8])).map(drop),
        "gpu",
    );
    wrong(Cpu.add_per_channel(&c, &gv).map(drop), "cpu");
    wrong(Cpu.concat_channels(&gt, &c).map(drop), "cpu");
    wrong(
        Cpu.transpose(&up(g, &[1, 2, 4], &[0.0; 8])).map(drop),
        "cpu",
    );
}

tests! {
    cpu: [
        concat_puts_a_first_in_each_sample,
        upsample_repeats_each_pixel_in_a_2x2_block,
        transpose_swaps_the_last_two_axes,
        gradients_match_finite_differences,
        bad_shapes_are_errors_on_cpu,
    ],
    gpu: [
        add_per_channel_matches_cpu,
        concat_and_split_match_cpu,
        upsample_matches_cpu,
        transpose_matches_cpu,
        bad_shapes_are_errors_on_gpu,
        tensor_from_the_other_backend_is_an_error,
    ],
}
