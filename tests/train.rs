//! Training: the tiny model overfits a fixed batch on both backends, one whole training step
//! gives the same weights on both, a resumed run continues exactly, and the schedules.

mod common;

use common::{assert_close, seeded};
use diffwgpu::autodiff::Tape;
use diffwgpu::diffusion::NoiseSchedule;
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::ops::optim::AdamWParams;
use diffwgpu::train::{LrSchedule, TrainHyper, TrainState, Trainer};
use diffwgpu::{Backend, Cpu, Gpu, Tensor};

fn tiny() -> UNet2D {
    UNet2D::new(&UNet2DConfig::preset("tiny").unwrap()).unwrap()
}

/// Fixed `x_t`, `t` and target: plain regression, which a working model, backward pass and
/// optimizer drive towards zero loss on `be`.
fn check_overfits_one_fixed_batch(be: &dyn Backend) {
    let model = tiny();
    let values = model.params.initial_values(3);
    let shape = [2, 1, 16, 16];
    let x = seeded(512, 10);
    let target: Vec<f32> = seeded(512, 11).iter().map(|v| 0.5 * v).collect();
    const STEPS: u32 = 20;
    let mut state = TrainState::new(be, &model, &values).unwrap();
    let xt = be.upload(&shape, &x).unwrap();
    let t = be.upload(&[2], &[10.0, 500.0]).unwrap();
    let target = be.upload(&shape, &target).unwrap();
    let mut losses = Vec::new();
    for step in 1..=STEPS {
        let mut tape = Tape::new(be);
        let p = tape.leaves(&state.params, true);
        let xv = tape.leaf(xt.clone(), false);
        let out = model.forward(&mut tape, &p, xv, &t).unwrap();
        let loss = be.mse_loss(tape.value(out), &target).unwrap();
        let d = be.mse_loss_backward(tape.value(out), &target, 1.0).unwrap();
        let mut grads = tape.backward(out, d).unwrap();
        let h = AdamWParams {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step,
            grad_scale: 1.0,
        };
        for (i, v) in p.iter().enumerate() {
            let g = grads.take(*v).unwrap();
            let (m, vv) = (&mut state.adam_m[i], &mut state.adam_v[i]);
            be.adamw_step(&mut state.params[i], &g, m, vv, &h).unwrap();
        }
        losses.push(be.to_vec(&loss).unwrap()[0]);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last * 10.0 <= first,
        "{}: loss went from {first} to {last} in {STEPS} steps (want a 10x fall)",
        be.name()
    );
}

fn tiny_model_overfits_one_fixed_batch_on_cpu() {
    check_overfits_one_fixed_batch(&Cpu);
}

fn tiny_model_overfits_one_fixed_batch_on_gpu(g: &Gpu) {
    check_overfits_one_fixed_batch(g);
}

fn hyper() -> TrainHyper {
    TrainHyper {
        batch_size: 3,
        steps: 10,
        learning_rate: 1e-3,
        lr_warmup_steps: 1,
        seed: 42,
        ..TrainHyper::default()
    }
}

fn trainer<'b>(be: &'b dyn Backend, values: &[Vec<f32>]) -> Trainer<'b> {
    trainer_with(be, values, tiny())
}

fn trainer_with<'b>(be: &'b dyn Backend, values: &[Vec<f32>], model: UNet2D) -> Trainer<'b> {
    let state = TrainState::new(be, &model, values).unwrap();
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    Trainer::new(be, model, schedule, hyper(), state).unwrap()
}

fn read_all(be: &dyn Backend, ts: &[Tensor]) -> Vec<Vec<f32>> {
    ts.iter().map(|t| be.to_vec(t).unwrap()).collect()
}

/// Noise, timesteps, forward, backward, clipping, AdamW and EMA: two whole steps on the GPU
/// leave the same weights, moments and EMA as on the CPU.
fn whole_training_steps_match_across_backends(g: &Gpu) {
    let values = tiny().params.initial_values(5);
    let batch: Vec<Vec<f32>> = (0..2).map(|s| seeded(3 * 256, 20 + s)).collect();
    let mut cpu = trainer(&Cpu, &values);
    let mut gpu = trainer(g, &values);
    for x0 in &batch {
        let a = cpu.step(x0).unwrap();
        let b = gpu.step(x0).unwrap();
        assert_close("loss", &[b.loss], &[a.loss], 1e-5, 1e-4);
        assert_close("grad norm", &[b.grad_norm], &[a.grad_norm], 1e-5, 1e-3);
    }
    let names = &cpu.model.params.specs;
    for (what, c, gg) in [
        ("param", &cpu.state.params, &gpu.state.params),
        ("ema", &cpu.state.ema, &gpu.state.ema),
    ] {
        let (c, gg) = (read_all(&Cpu, c), read_all(g, gg));
        for (spec, (c, gg)) in names.iter().zip(c.iter().zip(&gg)) {
            // Adam divides by sqrt(v): where a gradient is tiny the update's direction can
            // differ, so each weight may differ by up to the step size (lr = 1e-3) per step.
            assert_close(&format!("{what} {}", spec.name), gg, c, 2e-3, 1e-4);
        }
    }
}

/// Stopping after two steps, moving the state through host memory into a new trainer and
/// taking two more gives exactly what four uninterrupted steps give.
fn resumed_training_continues_exactly() {
    let values = tiny().params.initial_values(9);
    let batch: Vec<Vec<f32>> = (0..4).map(|s| seeded(3 * 256, 30 + s)).collect();
    let mut straight = trainer(&Cpu, &values);
    let straight_losses: Vec<f32> = batch
        .iter()
        .map(|x| straight.step(x).unwrap().loss)
        .collect();

    let mut first = trainer(&Cpu, &values);
    let mut losses: Vec<f32> = batch[..2]
        .iter()
        .map(|x| first.step(x).unwrap().loss)
        .collect();
    let s = &first.state;
    let copy = |ts: &[Tensor]| -> Vec<Tensor> {
        read_all(&Cpu, ts)
            .iter()
            .zip(ts)
            .map(|(v, t)| Cpu.upload(t.shape(), v).unwrap())
            .collect()
    };
    let state = TrainState {
        params: copy(&s.params),
        adam_m: copy(&s.adam_m),
        adam_v: copy(&s.adam_v),
        ema: copy(&s.ema),
        step: s.step,
    };
    let mut second = trainer(&Cpu, &values);
    second.state = state;
    losses.extend(batch[2..].iter().map(|x| second.step(x).unwrap().loss));
    assert_eq!(losses, straight_losses);
    assert_eq!(
        read_all(&Cpu, &second.state.ema),
        read_all(&Cpu, &straight.state.ema)
    );
}

/// A trainer on `be` of the tiny model with dropout 0.2.
fn with_dropout<'b>(be: &'b dyn Backend, values: &[Vec<f32>]) -> Trainer<'b> {
    let config = UNet2DConfig {
        dropout: 0.2,
        ..UNet2DConfig::preset("tiny").unwrap()
    };
    trainer_with(be, values, UNet2D::new(&config).unwrap())
}

/// Dropout does change the step.
fn dropout_changes_the_step() {
    let values = tiny().params.initial_values(6);
    let x0 = seeded(3 * 256, 40);
    let a = with_dropout(&Cpu, &values).step(&x0).unwrap();
    let plain = trainer(&Cpu, &values).step(&x0).unwrap();
    assert!(
        (a.loss - plain.loss).abs() > 1e-4,
        "dropout changed nothing"
    );
}

/// With dropout the masks come from the counter-based generator, so a GPU step still equals
/// the CPU step.
fn dropout_steps_match_across_backends(g: &Gpu) {
    let values = tiny().params.initial_values(6);
    let x0 = seeded(3 * 256, 40);
    let a = with_dropout(&Cpu, &values).step(&x0).unwrap();
    let mut gt = with_dropout(g, &values);
    let b = gt.step(&x0).unwrap();
    assert_close("loss", &[b.loss], &[a.loss], 1e-5, 1e-4);
    assert_close("grad norm", &[b.grad_norm], &[a.grad_norm], 1e-5, 1e-3);
}

fn learning_rate_and_ema_schedules() {
    let h = TrainHyper {
        learning_rate: 1.0,
        lr_warmup_steps: 10,
        steps: 110,
        ..TrainHyper::default()
    };
    assert_eq!(h.lr_at(0), 0.0);
    assert_eq!(h.lr_at(5), 0.5);
    assert_eq!(h.lr_at(10), 1.0);
    assert!((h.lr_at(60) - 0.5).abs() < 1e-6);
    assert!(h.lr_at(110).abs() < 1e-6);
    let c = TrainHyper {
        lr_schedule: LrSchedule::Constant,
        ..h.clone()
    };
    assert_eq!(c.lr_at(100), 1.0);
    assert_eq!(h.ema_decay_at(1), 0.0);
    assert!((h.ema_decay_at(2) - (1.0 - 2f32.powf(-0.75))).abs() < 1e-6);
    assert_eq!(h.ema_decay_at(u32::MAX as u64), 0.9999);
}

tests! {
    cpu: [
        tiny_model_overfits_one_fixed_batch_on_cpu,
        resumed_training_continues_exactly,
        dropout_changes_the_step,
        learning_rate_and_ema_schedules,
    ],
    gpu: [
        tiny_model_overfits_one_fixed_batch_on_gpu,
        whole_training_steps_match_across_backends,
        dropout_steps_match_across_backends,
    ],
}
