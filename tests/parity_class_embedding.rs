//! The class embedding (`nn.Embedding`) and classifier-free guidance: GPU vs CPU, the CPU
//! against direct transcriptions of the definitions, and bad input.

mod common;

use common::*;
use diffwgpu::ops::grads::Partials;
use diffwgpu::{Backend, Cpu, Gpu};

/// `(classes, dim, labels)`: repeated labels, labels that are never drawn, one class, odd
/// widths and a batch larger than a workgroup.
fn cases() -> Vec<(usize, usize, Vec<u32>)> {
    let many: Vec<u32> = (0..300).map(|i| (i * 7 % 11) as u32).collect();
    vec![
        (11, 32, vec![3, 10]),
        (4, 5, vec![1, 1, 3, 1, 0]),
        (1, 7, vec![0, 0, 0]),
        (11, 129, many),
        (1000, 3, vec![999, 0, 512]),
    ]
}

/// The table's gradient written as `splits` parts at `offset` of an arena of `len` values
/// that starts as `fill`: returns the whole arena, so that writes outside the parts show.
fn backward_arena(
    be: &dyn Backend,
    labels: &[u32],
    dy: &[f32],
    (classes, dim): (usize, usize),
    (offset, splits, len): (usize, usize, usize),
) -> Vec<f32> {
    let arena = up(be, &[len], &vec![7.0; len]);
    let dy = up(be, &[labels.len(), dim], dy);
    let dw = Partials {
        arena: &arena,
        offset,
        splits,
    };
    be.embedding_backward_into(labels, &dy, classes, &dw)
        .unwrap();
    down(be, &arena)
}

/// Forward and backward are exact on both backends: a copy, and sums of the same f32
/// values in the same (batch) order. The other parts are zeros, the arena outside the
/// parts untouched.
fn embedding_is_exact_on_cpu() {
    for (classes, dim, labels) in cases() {
        let table = seeded(classes * dim, classes as u64);
        let y = down(
            &Cpu,
            &Cpu.embedding(&up(&Cpu, &[classes, dim], &table), &labels)
                .unwrap(),
        );
        let want: Vec<f32> = labels
            .iter()
            .flat_map(|&l| table[l as usize * dim..][..dim].to_vec())
            .collect();
        assert_eq!(y, want, "forward, {classes} classes of {dim}");

        let dy = seeded(labels.len() * dim, 9);
        let (offset, splits) = (5, 3);
        let len = offset + splits * classes * dim + 4;
        let arena = backward_arena(&Cpu, &labels, &dy, (classes, dim), (offset, splits, len));
        let mut want = vec![0.0f32; classes * dim];
        for (b, &l) in labels.iter().enumerate() {
            for d in 0..dim {
                want[l as usize * dim + d] += dy[b * dim + d];
            }
        }
        let n = classes * dim;
        assert_eq!(
            &arena[offset..offset + n],
            &want[..],
            "dW, {classes} x {dim}"
        );
        assert!(arena[offset + n..offset + splits * n]
            .iter()
            .all(|&v| v == 0.0));
        assert!(arena[..offset]
            .iter()
            .chain(&arena[offset + splits * n..])
            .all(|&v| v == 7.0));
    }
}

/// The GPU gives the CPU's values to the bit (tolerance 0: see above).
fn embedding_matches_cpu(g: &Gpu) {
    for (classes, dim, labels) in cases() {
        let table = seeded(classes * dim, classes as u64);
        let dy = seeded(labels.len() * dim, 9);
        let (offset, splits) = (5, 3);
        let len = offset + splits * classes * dim + 300;
        parity(g, &format!("{classes} classes of {dim}"), 0.0, 0.0, |b| {
            let y = b
                .embedding(&up(b, &[classes, dim], &table), &labels)
                .unwrap();
            let arena = backward_arena(b, &labels, &dy, (classes, dim), (offset, splits, len));
            vec![("y", down(b, &y)), ("arena", arena)]
        });
    }
}

/// Labels out of range, no labels, a table that is not a matrix, `dy` with the wrong rows,
/// parts that do not fit the arena: errors, not garbage.
fn bad_embedding_input_is_an_error(be: &dyn Backend) {
    let table = up(be, &[4, 3], &[0.0; 12]);
    let err = be.embedding(&table, &[1, 4]).unwrap_err().to_string();
    assert!(
        err.contains("label 4") && err.contains("4 classes"),
        "{err}"
    );
    assert!(be.embedding(&table, &[]).is_err());
    assert!(be.embedding(&up(be, &[12], &[0.0; 12]), &[0]).is_err());
    let arena = up(be, &[12], &[0.0; 12]);
    let part = |splits| Partials {
        arena: &arena,
        offset: 0,
        splits,
    };
    let dy = up(be, &[2, 3], &[0.0; 6]);
    assert!(be.embedding_backward_into(&[0], &dy, 4, &part(1)).is_err());
    assert!(be
        .embedding_backward_into(&[0, 5], &dy, 4, &part(1))
        .is_err());
    assert!(be
        .embedding_backward_into(&[0, 1], &dy, 4, &part(2))
        .is_err());
    be.embedding_backward_into(&[0, 1], &dy, 4, &part(1))
        .unwrap();
}

fn bad_embedding_input_is_an_error_on_cpu() {
    bad_embedding_input_is_an_error(&Cpu);
}

fn bad_embedding_input_is_an_error_on_gpu(g: &Gpu) {
    bad_embedding_input_is_an_error(g);
}

/// `out [2B, ...]`: conditional then unconditional predictions.
fn guidance_input(images: usize) -> (Vec<usize>, Vec<f32>) {
    let shape = vec![2 * images, 1, 3, 5];
    let n: usize = shape.iter().product();
    (shape, seeded(n, 21).iter().map(|v| 3.0 * v).collect())
}

/// The CPU against `eps_u + w (eps_c - eps_u)` in f64 (two roundings of f32 values of up to
/// 3, and the scale up to 7.5: 1e-5 absolute); exactly `eps_c` at `w = 1` and `eps_u` at 0.
fn guidance_matches_its_definition_on_cpu() {
    let (shape, out) = guidance_input(3);
    let half = out.len() / 2;
    let (c, u) = out.split_at(half);
    for w in [0.0f32, 1.0, 3.0, 7.5, -0.5] {
        let y = down(&Cpu, &Cpu.guidance(&up(&Cpu, &shape, &out), w).unwrap());
        let want: Vec<f32> = c
            .iter()
            .zip(u)
            .map(|(&c, &u)| (u as f64 + w as f64 * (c as f64 - u as f64)) as f32)
            .collect();
        assert_close(&format!("w = {w}"), &y, &want, 1e-5, 0.0);
        if w == 1.0 {
            assert_eq!(y, c, "w = 1 is the conditional prediction");
        }
        if w == 0.0 {
            assert_eq!(y, u, "w = 0 is the unconditional prediction");
        }
    }
}

/// The GPU against the CPU (a fused multiply-add may round once less: 1e-6 relative), and
/// exactly at w = 1 and 0.
fn guidance_matches_cpu(g: &Gpu) {
    for images in [1, 3, 300] {
        let (shape, out) = guidance_input(images);
        for w in [0.0f32, 1.0, 3.0, -0.5] {
            let (atol, rtol) = if w == 0.0 || w == 1.0 {
                (0.0, 0.0)
            } else {
                (1e-6, 1e-6)
            };
            parity(g, &format!("{images} images, w = {w}"), atol, rtol, |b| {
                vec![("y", down(b, &b.guidance(&up(b, &shape, &out), w).unwrap()))]
            });
        }
    }
}

/// An odd batch (no halves), a scalar, an infinite scale: errors.
fn bad_guidance_input_is_an_error(be: &dyn Backend) {
    assert!(be.guidance(&up(be, &[3, 2], &[0.0; 6]), 2.0).is_err());
    assert!(be.guidance(&up(be, &[], &[0.0]), 2.0).is_err());
    assert!(be
        .guidance(&up(be, &[2, 2], &[0.0; 4]), f32::INFINITY)
        .is_err());
    let y = be
        .guidance(&up(be, &[2, 2], &[1.0, 2.0, 3.0, 4.0]), 2.0)
        .unwrap();
    assert_eq!(y.shape(), [1, 2]);
}

fn bad_guidance_input_is_an_error_on_cpu() {
    bad_guidance_input_is_an_error(&Cpu);
}

fn bad_guidance_input_is_an_error_on_gpu(g: &Gpu) {
    bad_guidance_input_is_an_error(g);
}

tests! {
    cpu: [
        embedding_is_exact_on_cpu,
        bad_embedding_input_is_an_error_on_cpu,
        guidance_matches_its_definition_on_cpu,
        bad_guidance_input_is_an_error_on_cpu,
    ],
    gpu: [
        embedding_matches_cpu,
        bad_embedding_input_is_an_error_on_gpu,
        guidance_matches_cpu,
        bad_guidance_input_is_an_error_on_gpu,
    ],
}
