//! Parameter gradients from partial sums: `reduce_partials` and `gather_grads` on the GPU
//! against the CPU (the same sums in the same order, so bit for bit), regions that span
//! several work items, and bad plans.

mod common;

use common::*;
use diffwgpu::ops::grads::{GradPlan, GradRegion, Partials};
use diffwgpu::{Backend, Cpu, Error, Gpu};

/// Regions of several sizes (one over 4,096 values: several work items on the GPU), gaps
/// between them in the flat buffer, parts from 1 to 7 each.
fn plan() -> (GradPlan, usize) {
    let mut regions = Vec::new();
    let (mut flat, mut arena) = (0, 0);
    for (i, (len, splits)) in [(1, 1), (70, 3), (5_000, 7), (64, 2), (333, 1)]
        .into_iter()
        .enumerate()
    {
        regions.push(GradRegion {
            flat,
            len,
            arena,
            splits,
        });
        flat = (flat + len).next_multiple_of(64) + 64 * (i % 2);
        arena += len * splits + 5;
    }
    (GradPlan::new(regions).unwrap(), flat)
}

fn gather_matches_cpu(g: &Gpu) {
    let (plan, flat_len) = plan();
    let arena = seeded(plan.arena_len(), 9);
    let run = |b: &dyn Backend| {
        let a = up(b, &[arena.len()], &arena);
        let mut grads = up(b, &[flat_len], &vec![0.0; flat_len]);
        let norm2 = b.gather_grads(&a, &plan, &mut grads).unwrap();
        (down(b, &grads), down(b, &norm2)[0])
    };
    let (want, want_norm2) = run(&Cpu);
    let (got, got_norm2) = run(g);
    assert!(got == want, "gathered gradients differ");
    // The CPU adds the squares in f64, the GPU in f32 trees: a few ulps of the total.
    assert_close("norm2", &[got_norm2], &[want_norm2], 0.0, 1e-5);
    // The gradient of each region is the sum of its parts, the gaps stay zero.
    let mut expect = vec![0.0f32; flat_len];
    for r in plan.regions() {
        for i in 0..r.len {
            expect[r.flat + i] = (0..r.splits).map(|s| arena[r.arena + s * r.len + i]).sum();
        }
    }
    assert!(
        want == expect,
        "the CPU's gather is not the sum of the parts"
    );
}

fn reduce_partials_matches_cpu(g: &Gpu) {
    for (n, splits, offset) in [(1, 1, 0), (300, 4, 17), (5_000, 9, 3)] {
        let arena = seeded(offset + n * splits + 11, n as u64);
        parity(
            g,
            &format!("reduce_partials {n}x{splits}"),
            0.0,
            0.0,
            |b: &dyn Backend| {
                let a = up(b, &[arena.len()], &arena);
                let p = Partials {
                    arena: &a,
                    offset,
                    splits,
                };
                vec![("sum", down(b, &b.reduce_partials(&p, n).unwrap()))]
            },
        );
    }
}

/// Overlapping regions, a parameter without parts, parts past the arena, and an arena that
/// is the gradient buffer itself are errors on `b`.
fn check_bad_plans(b: &dyn Backend) {
    let r = |flat, len, arena, splits| GradRegion {
        flat,
        len,
        arena,
        splits,
    };
    let invalid = |e: Error| matches!(e, Error::Invalid { .. });
    assert!(GradPlan::new(vec![r(0, 10, 0, 1), r(5, 10, 10, 1)]).is_err_and(invalid));
    assert!(GradPlan::new(vec![r(0, 10, 0, 0)]).is_err_and(invalid));
    let plan = GradPlan::new(vec![r(0, 10, 0, 2)]).unwrap();
    let short = b.zeros(&[19]).unwrap();
    let mut grads = b.zeros(&[10]).unwrap();
    assert!(b
        .gather_grads(&short, &plan, &mut grads)
        .is_err_and(invalid));
    let arena = b.zeros(&[20]).unwrap();
    let mut narrow = b.zeros(&[9]).unwrap();
    assert!(b
        .gather_grads(&arena, &plan, &mut narrow)
        .is_err_and(invalid));
    let mut same = arena.clone();
    assert!(b.gather_grads(&arena, &plan, &mut same).is_err_and(invalid));
    let p = Partials {
        arena: &arena,
        offset: 15,
        splits: 2,
    };
    assert!(b.reduce_partials(&p, 3).is_err_and(invalid));
}

fn bad_plans_are_errors_on_cpu() {
    check_bad_plans(&Cpu);
}

fn bad_plans_are_errors_on_gpu(g: &Gpu) {
    check_bad_plans(g);
}

tests! {
    cpu: [bad_plans_are_errors_on_cpu],
    gpu: [gather_matches_cpu, reduce_partials_matches_cpu, bad_plans_are_errors_on_gpu],
}
