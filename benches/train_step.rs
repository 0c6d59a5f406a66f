//! One whole training step (noise, forward, backward, clipping, AdamW, EMA) of the `tiny`
//! preset at batch 8 and the `mnist` preset at batch 64, on both backends, in images/s. The
//! PyTorch side of the comparison is `tools/torch_baseline.py` with the same presets.
//!
//! Before the timings it prints, for the GPU, the dispatches and submits of one step and the
//! host time to record them (the step's time less its wait for the loss). A software adapter
//! runs only the tiny step (an mnist step takes minutes there) and no timings.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use diffwgpu::diffusion::NoiseSchedule;
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::train::{TrainHyper, TrainState, Trainer};
use diffwgpu::{Backend, Cpu, Gpu};

fn trainer<'b>(be: &'b dyn Backend, preset: &str, batch: usize) -> Trainer<'b> {
    let model = UNet2D::new(&UNet2DConfig::preset(preset).unwrap()).unwrap();
    let values = model.params.initial_values(0);
    let state = TrainState::new(be, &model, &values).unwrap();
    let hyper = TrainHyper {
        batch_size: batch,
        lr_warmup_steps: 0,
        ..TrainHyper::default()
    };
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    Trainer::new(be, model, schedule, hyper, state).unwrap()
}

/// Clean images in [-1, 1) (a fixed pattern; the step's cost does not depend on the values).
fn batch(t: &Trainer) -> Vec<f32> {
    let n: usize = t.batch_shape().iter().product();
    (0..n)
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

fn report_gpu_step(g: &Gpu, preset: &str, b: usize) {
    let mut t = trainer(g, preset, b);
    let x0 = batch(&t);
    t.step(&x0, None).unwrap();
    g.synchronize().unwrap();
    let before = g.stats();
    let start = Instant::now();
    let stats = t.step(&x0, None).unwrap();
    g.synchronize().unwrap();
    let wall = start.elapsed();
    let after = g.stats();
    println!(
        "{preset}/{b} on {}: one step = {} dispatches, {} submits, {:.1} ms to record, \
         {:.1} ms wall",
        g.name(),
        after.dispatches - before.dispatches,
        after.submits - before.submits,
        stats.host_time.as_secs_f64() * 1e3,
        wall.as_secs_f64() * 1e3
    );
}

fn bench_train_step(c: &mut Criterion) {
    let mut backends: Vec<(&str, Box<dyn Backend>)> = vec![("cpu", Box::new(Cpu))];
    match Gpu::new() {
        // A software renderer takes minutes per mnist step: not worth a benchmark.
        Ok(g) if g.is_software() => {
            report_gpu_step(&g, "tiny", 8);
            println!("skipping the GPU timings on {}", g.name());
        }
        Ok(g) => {
            for (preset, b) in [("tiny", 8), ("mnist", 64)] {
                report_gpu_step(&g, preset, b);
            }
            backends.push(("gpu", Box::new(g)));
        }
        Err(e) => println!("skipping the GPU benches: {e}"),
    }
    for (preset, b) in [("tiny", 8), ("mnist", 64)] {
        let mut group = c.benchmark_group(format!("train_step/{preset}_b{b}"));
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5))
            .throughput(Throughput::Elements(b as u64));
        for (label, be) in &backends {
            let mut t = trainer(be.as_ref(), preset, b);
            let x0 = batch(&t);
            group.bench_function(*label, |it| it.iter(|| t.step(&x0, None).unwrap()));
        }
        group.finish();
    }
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);
