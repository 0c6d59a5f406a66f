//! Data-parallel training: ranks that each train on a slice of the global batch and sum their
//! gradients reproduce one process training on the whole batch. The ranks here are threads
//! with an in-process all-reduce, so this runs without MPI and on the GPU too; `tests/mpi.rs`
//! runs the same through `mpirun`.

mod common;

use std::sync::{Condvar, Mutex};

use common::{assert_close, seeded};
use diffwgpu::diffusion::NoiseSchedule;
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::parallel::{Collective, Shard};
use diffwgpu::train::{HostState, LrSchedule, StepStats, TrainHyper, TrainState, Trainer};
use diffwgpu::{Backend, Cpu, Gpu};

/// `size` ranks in one process, each a thread; the all-reduce sums the ranks' vectors in rank
/// order once all have arrived, so the sum is the same on every run.
struct Threads {
    size: usize,
    round: Mutex<Round>,
    arrived: Condvar,
}

struct Round {
    parts: Vec<Option<Vec<f32>>>,
    sum: Vec<f32>,
    generation: u64,
}

impl Threads {
    fn new(size: usize) -> Self {
        Threads {
            size,
            round: Mutex::new(Round {
                parts: vec![None; size],
                sum: Vec::new(),
                generation: 0,
            }),
            arrived: Condvar::new(),
        }
    }

    /// Rank `rank`'s view of the group.
    fn rank(&self, rank: usize) -> ThreadRank<'_> {
        ThreadRank { group: self, rank }
    }
}

struct ThreadRank<'a> {
    group: &'a Threads,
    rank: usize,
}

impl Collective for ThreadRank<'_> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> diffwgpu::Result<()> {
        let mut round = self.group.round.lock().unwrap();
        let generation = round.generation;
        round.parts[self.rank] = Some(values.to_vec());
        if round.parts.iter().all(Option::is_some) {
            let parts: Vec<Vec<f32>> = round.parts.iter_mut().map(|p| p.take().unwrap()).collect();
            round.sum = (0..values.len())
                .map(|i| parts.iter().map(|p| p[i]).sum())
                .collect();
            round.generation += 1;
            self.group.arrived.notify_all();
        } else {
            while round.generation == generation {
                round = self.group.arrived.wait(round).unwrap();
            }
        }
        values.copy_from_slice(&round.sum);
        Ok(())
    }
}

/// The tiny preset as a class-conditional model with dropout, so that every per-sample random
/// number of a step (timestep, noise, dropout mask, class dropout) is exercised.
fn model() -> UNet2D {
    let config = UNet2DConfig {
        num_class_embeds: Some(4),
        dropout: 0.2,
        ..UNet2DConfig::preset("tiny").unwrap()
    };
    UNet2D::new(&config).unwrap()
}

/// A global batch of 8. AdamW's `eps` is 1e-3, not 1e-8: the split changes the order of the
/// gradient's sums, and an element whose exact gradient is zero (the attention's key bias)
/// gets rounding noise that a tiny `eps` would turn into a step of +-lr; with a larger `eps`
/// the update is a smooth function of the gradient, so a rounding difference stays one.
fn hyper() -> TrainHyper {
    TrainHyper {
        batch_size: 8,
        steps: 3,
        learning_rate: 1e-3,
        lr_warmup_steps: 0,
        lr_schedule: LrSchedule::Constant,
        adam_eps: 1e-3,
        class_dropout: 0.5,
        seed: 11,
        ..TrainHyper::default()
    }
}

fn trainer(be: &dyn Backend) -> Trainer<'_> {
    let model = model();
    let state = TrainState::new(be, &model, &model.params.initial_values(3)).unwrap();
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    Trainer::new(be, model, schedule, hyper(), state).unwrap()
}

/// The global batch of step `k` and its labels.
fn batch(k: u64) -> (Vec<f32>, Vec<u32>) {
    let labels = (0..8).map(|i| (i + k as u32) % 3).collect();
    (seeded(8 * 256, 40 + k), labels)
}

/// Three steps of one process on the whole batch.
fn one_process(be: &dyn Backend) -> (Vec<StepStats>, HostState) {
    let mut t = trainer(be);
    let stats = (0..3)
        .map(|k| {
            let (x0, labels) = batch(k);
            t.step(&x0, Some(&labels)).unwrap()
        })
        .collect();
    (stats, t.state.to_host(be).unwrap())
}

/// Three steps of `ranks` threads, each on its slice; every rank's statistics and state.
fn ranks(be: &dyn Backend, ranks: usize) -> Vec<(Vec<StepStats>, HostState)> {
    let group = Threads::new(ranks);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let rank = group.rank(r);
                s.spawn(move || {
                    let mut t = trainer(be).data_parallel(&rank).unwrap();
                    let shard = t.shard();
                    let stats = (0..3)
                        .map(|k| {
                            let (x0, labels) = batch(k);
                            let x0 = shard.slice(&x0, 8).unwrap();
                            let labels = shard.slice(&labels, 8).unwrap();
                            t.step(x0, Some(labels)).unwrap()
                        })
                        .collect();
                    (stats, t.state.to_host(be).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn flat(groups: &[Vec<f32>]) -> Vec<f32> {
    groups.concat()
}

/// Two ranks of 4 and four ranks of 2 against one process of 8: the same loss and gradient
/// norm at every step (1e-5 relative: only the order of the sums differs), and the same
/// weights, AdamW moments and EMA weights after three steps (2e-6 absolute on weights of
/// ~0.1-1 moved by ~3e-3; the moments within 1e-4 relative plus 1e-5 of their largest value,
/// as a near-zero gradient's rounding is relatively large); every rank holds the same state,
/// to the bit.
fn check_ranks_reproduce_one_process(be: &dyn Backend) {
    let (want_stats, want) = one_process(be);
    for n in [2, 4] {
        let got = ranks(be, n);
        let (stats, state) = &got[0];
        for (k, (a, b)) in stats.iter().zip(&want_stats).enumerate() {
            let at = |what: &str| format!("{n} ranks, step {k}: {what}");
            assert_close(&at("loss"), &[a.loss], &[b.loss], 0.0, 1e-5);
            assert_close(&at("grad norm"), &[a.grad_norm], &[b.grad_norm], 0.0, 1e-5);
        }
        let at = |what: &str| format!("{n} ranks: {what}");
        let moved: f32 = flat(&want.params)
            .iter()
            .zip(flat(&model().params.initial_values(3)))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(moved > 1e-3, "the weights barely moved: {moved}");
        let (p, e) = (flat(&state.params), flat(&state.ema));
        assert_close(&at("params"), &p, &flat(&want.params), 2e-6, 0.0);
        assert_close(&at("ema"), &e, &flat(&want.ema), 2e-6, 0.0);
        for (what, got, want) in [
            ("adam_m", &state.adam_m, &want.adam_m),
            ("adam_v", &state.adam_v, &want.adam_v),
        ] {
            let (got, want) = (flat(got), flat(want));
            let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(&at(what), &got, &want, 1e-5 * largest, 1e-4);
        }
        for (r, (_, other)) in got.iter().enumerate().skip(1) {
            assert!(other == state, "rank {r}'s state differs from rank 0's");
        }
    }
}

fn ranks_reproduce_one_process_on_cpu() {
    check_ranks_reproduce_one_process(&Cpu);
}

fn ranks_reproduce_one_process_on_gpu(g: &Gpu) {
    check_ranks_reproduce_one_process(g);
}

/// Each rank draws exactly its slice of the whole batch's timesteps and class-dropout labels.
fn ranks_draw_their_slice_of_the_batch_randomness() {
    let whole = trainer(&Cpu);
    let labels: Vec<u32> = (0..8).map(|i| i % 3).collect();
    let group = Threads::new(2);
    for r in 0..2 {
        let rank = group.rank(r);
        let t = trainer(&Cpu).data_parallel(&rank).unwrap();
        let range = t.shard().range(8).unwrap();
        assert_eq!(range, r * 4..(r + 1) * 4);
        for k in 0..20 {
            assert_eq!(t.timesteps(k), whole.timesteps(k)[range.clone()].to_vec());
            assert_eq!(
                t.step_labels(k, &labels[range.clone()]),
                whole.step_labels(k, &labels)[range.clone()].to_vec()
            );
        }
    }
}

/// A batch that does not split evenly over the ranks is refused with the fix in the message.
fn uneven_batches_are_refused() {
    let group = Threads::new(3);
    let rank = group.rank(0);
    let err = trainer(&Cpu)
        .data_parallel(&rank)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("a batch of 8 does not split into 3 equal slices")
            && err.contains("multiple of 3"),
        "{err}"
    );
    let shard = Shard { rank: 1, ranks: 2 };
    assert_eq!(shard.slice(&[1, 2, 3, 4, 5, 6], 2).unwrap(), &[4, 5, 6]);
    assert!(shard.slice(&[1, 2, 3, 4, 5], 2).is_err());
}

tests! {
    cpu: [
        ranks_reproduce_one_process_on_cpu,
        ranks_draw_their_slice_of_the_batch_randomness,
        uneven_batches_are_refused,
    ],
    gpu: [ranks_reproduce_one_process_on_gpu],
}
