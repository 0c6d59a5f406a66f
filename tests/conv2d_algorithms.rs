//! The CPU's convolution algorithms (im2col, Winograd F(2x2, 3x3) and F(4x4, 3x3)) against a
//! direct sum in f64: forward with every addend, input, weight and bias gradients, on shapes
//! with partial tiles, 1-pixel images, odd sizes and every kind of padding.

use diffwgpu::ops::conv2d::{Conv2dEpilogue, Conv2dParams, CpuAlgorithm};
use diffwgpu::{Backend, Cpu, Tensor};

/// One 3x3 stride-1 convolution: input `[B, Cin, H, W]`, output channels, padding.
struct Case {
    x: [usize; 4],
    cout: usize,
    padding: [usize; 4],
}

const CASES: &[Case] = &[
    // Whole 4x4 tiles.
    Case {
        x: [2, 8, 8, 8],
        cout: 8,
        padding: [1; 4],
    },
    // Odd sizes: partial tiles on both edges, a batch that chunks unevenly.
    Case {
        x: [3, 5, 7, 9],
        cout: 6,
        padding: [1; 4],
    },
    // A 1-pixel image: every tap but the centre falls in the padding.
    Case {
        x: [2, 4, 1, 1],
        cout: 3,
        padding: [1; 4],
    },
    // No padding (a 3x2 output), wide padding (the input gradient's own shape), asymmetric.
    Case {
        x: [2, 3, 5, 4],
        cout: 2,
        padding: [0; 4],
    },
    Case {
        x: [1, 3, 3, 5],
        cout: 4,
        padding: [2; 4],
    },
    Case {
        x: [2, 6, 6, 5],
        cout: 5,
        padding: [0, 1, 2, 0],
    },
    // Enough tiles for several chunks and lane groups per chunk.
    Case {
        x: [5, 16, 19, 13],
        cout: 12,
        padding: [1; 4],
    },
    // 384 filters: the filter transforms' blocks of 256, the second one partial.
    Case {
        x: [2, 16, 6, 7],
        cout: 24,
        padding: [1; 4],
    },
    // Tile rows 8, 16 and 32 tiles wide: lanes read runs of 8 and 16 tiles, and in the first
    // a whole run of lanes lies past the chunk's last tile.
    Case {
        x: [3, 4, 3, 32],
        cout: 5,
        padding: [1; 4],
    },
    Case {
        x: [1, 3, 5, 64],
        cout: 4,
        padding: [1; 4],
    },
    // Batches too small for a chunk per thread, with products large enough to spread each
    // chunk's passes over the threads: one chunk (and fewer images than threads), and two
    // chunks, the second partial (F(4x4, 3x3)).
    Case {
        x: [2, 64, 12, 12],
        cout: 64,
        padding: [1; 4],
    },
    Case {
        x: [11, 32, 16, 16],
        cout: 32,
        padding: [1; 4],
    },
];

/// Runs `f` on a pool of one thread, where each chunk of images is one thread's, and on one of
/// three, where the small batches above spread their chunks' passes over the threads in
/// blocks of uneven size.
fn on_one_and_three_threads(f: impl Fn() + Sync) {
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
        pool.unwrap().install(&f);
    }
}

const ALGORITHMS: [CpuAlgorithm; 3] = [
    CpuAlgorithm::Im2col,
    CpuAlgorithm::WinogradF2,
    CpuAlgorithm::WinogradF4,
];

/// Largest error allowed, relative to the largest magnitude of the f64 result: measured at
/// most 5.1e-7 (im2col), 2.2e-7 (F2) and 3.8e-6 (F4, the input gradient) on these cases.
fn tolerance(a: CpuAlgorithm) -> f64 {
    match a {
        CpuAlgorithm::Im2col | CpuAlgorithm::WinogradF2 => 2e-6,
        CpuAlgorithm::WinogradF4 => 1e-5,
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

struct Dims {
    b: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    ho: usize,
    wo: usize,
    pt: usize,
    pl: usize,
}

impl Dims {
    fn new(c: &Case) -> Dims {
        let [b, ci, h, w] = c.x;
        let [pt, pb, pl, pr] = c.padding;
        Dims {
            b,
            ci,
            h,
            w,
            co: c.cout,
            ho: h + pt + pb - 2,
            wo: w + pl + pr - 2,
            pt,
            pl,
        }
    }

    /// Calls `f(x index, w index, y index)` for every term of the direct sum.
    fn for_each_term(&self, mut f: impl FnMut(usize, usize, usize)) {
        for b in 0..self.b {
            for co in 0..self.co {
                for oy in 0..self.ho {
                    for ox in 0..self.wo {
                        let yi = ((b * self.co + co) * self.ho + oy) * self.wo + ox;
                        for ci in 0..self.ci {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let iy = (oy + ky) as isize - self.pt as isize;
                                    let ix = (ox + kx) as isize - self.pl as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= self.h as isize
                                        || ix >= self.w as isize
                                    {
                                        continue;
                                    }
                                    let xi = ((b * self.ci + ci) * self.h + iy as usize) * self.w
                                        + ix as usize;
                                    let wi = ((co * self.ci + ci) * 3 + ky) * 3 + kx;
                                    f(xi, wi, yi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Largest `|got - want|` over the largest `|want|`.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
        / scale
}

fn check(what: &str, a: CpuAlgorithm, c: &Case, got: &Tensor, want: &[f64]) {
    let err = relative_error(&Cpu.to_vec(got).unwrap(), want);
    assert!(
        err <= tolerance(a),
        "{a:?} {what} x {:?} -> {} padding {:?}: relative error {err:.2e} above {:.1e}",
        c.x,
        c.cout,
        c.padding,
        tolerance(a)
    );
}

#[test]
fn forward_with_every_addend_matches_the_direct_sum() {
    for (i, c) in CASES.iter().enumerate() {
        let d = Dims::new(c);
        let seed = 10 * i as u64;
        let (xv, wv) = (
            values(d.b * d.ci * d.h * d.w, seed),
            values(d.co * d.ci * 9, seed + 1),
        );
        let (bv, av) = (values(d.co, seed + 2), values(d.b * d.co, seed + 3));
        let rv = values(d.b * d.co * d.ho * d.wo, seed + 4);
        let mut want: Vec<f64> = rv.iter().map(|&r| r as f64).collect();
        for (yi, y) in want.iter_mut().enumerate() {
            let (b, co) = (yi / (d.ho * d.wo) / d.co, yi / (d.ho * d.wo) % d.co);
            *y += bv[co] as f64 + av[b * d.co + co] as f64;
        }
        d.for_each_term(|xi, wi, yi| want[yi] += xv[xi] as f64 * wv[wi] as f64);

        let t = |s: &[usize], v: &[f32]| Cpu.upload(s, v).unwrap();
        let (x, w) = (t(&c.x, &xv), t(&[d.co, d.ci, 3, 3], &wv));
        let (bias, add) = (t(&[d.co], &bv), t(&[d.b, d.co], &av));
        let residual = t(&[d.b, d.co, d.ho, d.wo], &rv);
        let p = Conv2dParams::with_padding(1, c.padding);
        let e = Conv2dEpilogue {
            add: Some(&add),
            residual: Some(&residual),
        };
        on_one_and_three_threads(|| {
            for a in ALGORITHMS {
                let y = a.conv2d(&x, &w, Some(&bias), &p, &e).unwrap();
                check("forward", a, c, &y, &want);
            }
        });
    }
}

#[test]
fn gradients_match_the_direct_sum() {
    for (i, c) in CASES.iter().enumerate() {
        let d = Dims::new(c);
        let seed = 10 * i as u64 + 5;
        let (xv, wv) = (
            values(d.b * d.ci * d.h * d.w, seed),
            values(d.co * d.ci * 9, seed + 1),
        );
        let dyv = values(d.b * d.co * d.ho * d.wo, seed + 2);
        let (mut dx, mut dw) = (vec![0.0f64; xv.len()], vec![0.0f64; wv.len()]);
        d.for_each_term(|xi, wi, yi| {
            dx[xi] += dyv[yi] as f64 * wv[wi] as f64;
            dw[wi] += dyv[yi] as f64 * xv[xi] as f64;
        });
        let mut db = vec![0.0f64; d.co];
        for (yi, v) in dyv.iter().enumerate() {
            db[yi / (d.ho * d.wo) % d.co] += *v as f64;
        }

        let t = |s: &[usize], v: &[f32]| Cpu.upload(s, v).unwrap();
        let (x, w) = (t(&c.x, &xv), t(&[d.co, d.ci, 3, 3], &wv));
        let dy = t(&[d.b, d.co, d.ho, d.wo], &dyv);
        let p = Conv2dParams::with_padding(1, c.padding);
        on_one_and_three_threads(|| {
            for a in ALGORITHMS {
                let g = a.conv2d_backward(&x, &w, &dy, &p, true).unwrap();
                check("dx", a, c, &g.dx, &dx);
                check("dw", a, c, &g.dw, &dw);
                check("db", a, c, g.db.as_ref().unwrap(), &db);
            }
        });
    }
}

/// The backend's own choice (Winograd F(4x4, 3x3) at 8 channels and more) agrees with im2col.
#[test]
fn the_backend_default_agrees_with_im2col() {
    let c = &CASES[6];
    let d = Dims::new(c);
    let t = |s: &[usize], seed| Cpu.upload(s, &values(s.iter().product(), seed)).unwrap();
    let (x, w) = (t(&c.x, 1), t(&[d.co, d.ci, 3, 3], 2));
    let dy = t(&[d.b, d.co, d.ho, d.wo], 3);
    let p = Conv2dParams::with_padding(1, c.padding);
    let want = Cpu
        .to_vec(
            &CpuAlgorithm::Im2col
                .conv2d(&x, &w, None, &p, &Default::default())
                .unwrap(),
        )
        .unwrap();
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let a = CpuAlgorithm::WinogradF4;
    check(
        "default forward",
        a,
        c,
        &Cpu.conv2d(&x, &w, None, &p).unwrap(),
        &want,
    );
    let reference = CpuAlgorithm::Im2col
        .conv2d_backward(&x, &w, &dy, &p, false)
        .unwrap();
    let got = Cpu.conv2d_backward(&x, &w, &dy, &p, false).unwrap();
    for (what, g, r) in [
        ("default dx", &got.dx, &reference.dx),
        ("default dw", &got.dw, &reference.dw),
    ] {
        let r: Vec<f64> = Cpu.to_vec(r).unwrap().iter().map(|&v| v as f64).collect();
        check(what, a, c, g, &r);
    }
}

/// Where Winograd does not apply (a 5x5 kernel, stride 2) the Winograd choices run im2col
/// and agree with it exactly.
#[test]
fn winograd_falls_back_to_im2col_where_it_does_not_apply() {
    let t = |s: &[usize], seed| Cpu.upload(s, &values(s.iter().product(), seed)).unwrap();
    let x = t(&[2, 8, 9, 9], 1);
    for (w_shape, p) in [
        ([8, 8, 5, 5], Conv2dParams::new(1, 2)),
        ([8, 8, 3, 3], Conv2dParams::new(2, 1)),
    ] {
        let w = t(&w_shape, 2);
        let want = CpuAlgorithm::Im2col
            .conv2d(&x, &w, None, &p, &Default::default())
            .unwrap();
        for a in [CpuAlgorithm::WinogradF2, CpuAlgorithm::WinogradF4] {
            let got = a.conv2d(&x, &w, None, &p, &Default::default()).unwrap();
            assert_eq!(
                Cpu.to_vec(&got).unwrap(),
                Cpu.to_vec(&want).unwrap(),
                "{a:?} {w_shape:?}"
            );
        }
    }
}

/// Bad shapes are errors naming the op, whichever algorithm is asked for.
#[test]
fn bad_shapes_are_errors_for_every_algorithm() {
    let t = |s: &[usize]| Cpu.upload(s, &values(s.iter().product(), 9)).unwrap();
    let (x, p) = (t(&[2, 4, 6, 6]), Conv2dParams::new(1, 1));
    let dy = t(&[2, 3, 6, 6]);
    for a in ALGORITHMS {
        let forward = |w: &Tensor| a.conv2d(&x, w, None, &p, &Default::default());
        assert!(matches!(
            forward(&t(&[3, 5, 3, 3])),
            Err(diffwgpu::Error::Shape { op: "conv2d", .. })
        ));
        assert!(matches!(
            forward(&t(&[3, 4, 9])),
            Err(diffwgpu::Error::Shape { op: "conv2d", .. })
        ));
        let backward = |w: &Tensor, dy: &Tensor| a.conv2d_backward(&x, w, dy, &p, true);
        let wrong_dy = backward(&t(&[3, 4, 3, 3]), &t(&[2, 3, 5, 6]));
        assert!(matches!(
            wrong_dy,
            Err(diffwgpu::Error::Shape {
                op: "conv2d_backward",
                ..
            })
        ));
        assert!(backward(&t(&[3, 4, 9]), &dy).is_err());
    }
}
