//! Training: the tiny model overfits a fixed batch on both backends (with the plain and the
//! Min-SNR-weighted loss), the trainer's update is AdamW with clipping, the learning-rate
//! schedule and the EMA by their formulas, whole training steps give the same updates, moments
//! and EMA on both backends, a resumed run continues exactly on each backend, the schedules,
//! and the Min-SNR-gamma weights by hand and in the trainer's step.

mod common;

use common::{assert_close, down, seeded};
use diffwgpu::autodiff::Tape;
use diffwgpu::diffusion::{NoiseSchedule, PredictionType};
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::ops::optim::{AdamWParams, StepTensors};
use diffwgpu::train::min_snr::{min_snr_weight, min_snr_weights, snr};
use diffwgpu::train::{HostState, LrSchedule, TrainHyper, TrainState, Trainer};
use diffwgpu::{Backend, Cpu, Error, Gpu};

fn tiny() -> UNet2D {
    UNet2D::new(&UNet2DConfig::preset("tiny").unwrap()).unwrap()
}

/// Fixed `x_t`, `t` and target: plain regression, which a working model, backward pass and
/// optimizer drive towards zero loss on `be`; with `weights`, each sample's loss weighted
/// (`weighted_mse_loss_with_grad`).
fn check_overfits_one_fixed_batch(be: &dyn Backend, weights: Option<&[f32]>) {
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
    let weights = weights.map(|w| be.upload(&[2], w).unwrap());
    let mut grads = be.zeros(&[state.layout.total]).unwrap();
    let mut plan = None;
    let mut losses = Vec::new();
    for step in 1..=STEPS {
        let mut tape = Tape::new(be);
        let p = tape.params(&state.param_views().unwrap());
        let xv = tape.leaf(xt.clone(), false);
        let out = model.forward(&mut tape, &p, xv, &t, None).unwrap();
        let pred = tape.value(out);
        let (loss, d) = match &weights {
            None => be.mse_loss_with_grad(pred, &target, 1.0),
            Some(w) => be.weighted_mse_loss_with_grad(pred, &target, w, 1.0),
        }
        .unwrap();
        let layout = state.layout.clone();
        let norm2 = tape
            .backward_params(out, d, &layout, &mut plan, &mut grads)
            .unwrap();
        let h = AdamWParams {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step,
            max_grad_norm: None,
        };
        let tensors = StepTensors {
            params: &mut state.params,
            grads: &grads,
            adam_m: &mut state.adam_m,
            adam_v: &mut state.adam_v,
            ema: &mut state.ema,
            norm2: &norm2,
        };
        be.adamw_ema_step(tensors, &h, 0.0).unwrap();
        losses.push(be.to_vec(&loss).unwrap()[0]);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        losses.iter().all(|l| l.is_finite()),
        "{}: a loss is not finite: {losses:?}",
        be.name()
    );
    assert!(
        last * 10.0 <= first,
        "{}: loss went from {first} to {last} in {STEPS} steps (want a 10x fall)",
        be.name()
    );
}

fn tiny_model_overfits_one_fixed_batch_on_cpu() {
    check_overfits_one_fixed_batch(&Cpu, None);
}

fn tiny_model_overfits_one_fixed_batch_on_gpu(g: &Gpu) {
    check_overfits_one_fixed_batch(g, None);
}

/// The Min-SNR-gamma weights (gamma 5, epsilon) of the fixed batch's timesteps 10 and 500
/// under the linear schedule: about 0.011 (snr about 450) and 1.
fn min_snr_weights_of_the_fixed_batch() -> Vec<f32> {
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    let w = min_snr_weights(
        &schedule.alphas_cumprod,
        &[10.0, 500.0],
        5.0,
        PredictionType::Epsilon,
    )
    .unwrap();
    assert!(w[0] < 0.02 && w[1] == 1.0, "weights {w:?}");
    w
}

fn tiny_model_overfits_with_min_snr_weights_on_cpu() {
    check_overfits_one_fixed_batch(&Cpu, Some(&min_snr_weights_of_the_fixed_batch()));
}

fn tiny_model_overfits_with_min_snr_weights_on_gpu(g: &Gpu) {
    check_overfits_one_fixed_batch(g, Some(&min_snr_weights_of_the_fixed_batch()));
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
    trainer_from(be, values, model, hyper())
}

fn trainer_from<'b>(
    be: &'b dyn Backend,
    values: &[Vec<f32>],
    model: UNet2D,
    hyper: TrainHyper,
) -> Trainer<'b> {
    let state = TrainState::new(be, &model, values).unwrap();
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    Trainer::new(be, model, schedule, hyper, state).unwrap()
}

/// Everything a step changes, read to the host: weights, both moments, EMA weights.
fn host_state(t: &Trainer) -> HostState {
    t.state.to_host(t.backend()).unwrap()
}

/// `got` against `want`, every tensor of a group: `|got - want| <= rtol (|want| + 0.01 M)`
/// with `M` the largest `|want|` of the group, so that values near zero are compared at the
/// scale of the group rather than at their own.
fn assert_group_close(
    what: &str,
    names: &[String],
    got: &[Vec<f32>],
    want: &[Vec<f32>],
    rtol: f32,
) {
    let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    for ((name, g), w) in names.iter().zip(got).zip(want) {
        assert_close(&format!("{what} {name}"), g, w, rtol * 0.01 * scale, rtol);
    }
}

fn minus(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<Vec<f32>> {
    a.iter()
        .zip(b)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y).collect())
        .collect()
}

/// Noise, timesteps, forward, backward, clipping (active: the gradient norm is ~3 against a
/// limit of 1), AdamW at a constant learning rate with a weight decay large enough to show
/// (1.0: a tenth of a typical update) and the EMA: after each of three steps the
/// GPU's weight update, both moments and the EMA weights equal the CPU's.
///
/// AdamW's `eps` is 1e-3 here rather than 1e-8: an element whose exact gradient is zero (the
/// attention's key bias: softmax ignores a shift shared by all keys) has a gradient of rounding
/// noise, different on each backend, and with a tiny `eps` Adam turns that noise into a step
/// of +-lr. A larger `eps` keeps the update a smooth function of the gradient, so the backends'
/// updates agree to ~0.3 % (moments and EMA to ~2e-5, 1e-6), and a wrong update (a halved
/// step, a missing moment or decay) shows as a difference of tens of percent.
fn whole_training_steps_match_across_backends(g: &Gpu) {
    let values = tiny().params.initial_values(5);
    let h = TrainHyper {
        steps: 3,
        lr_warmup_steps: 0,
        lr_schedule: LrSchedule::Constant,
        adam_eps: 1e-3,
        weight_decay: 1.0,
        ..hyper()
    };
    let mut cpu = trainer_from(&Cpu, &values, tiny(), h.clone());
    let mut gpu = trainer_from(g, &values, tiny(), h);
    let names: Vec<String> = cpu
        .model
        .params
        .specs
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let (mut before_cpu, mut before_gpu) = (host_state(&cpu), host_state(&gpu));
    for step in 0..3 {
        let x0 = seeded(3 * 256, 20 + step);
        let a = cpu.step(&x0, None).unwrap();
        let b = gpu.step(&x0, None).unwrap();
        assert!(
            a.grad_norm > 1.0,
            "clipping is not active: |g| = {}",
            a.grad_norm
        );
        assert_close("loss", &[b.loss], &[a.loss], 1e-5, 1e-4);
        assert_close("grad norm", &[b.grad_norm], &[a.grad_norm], 1e-5, 1e-4);
        let (c, gg) = (host_state(&cpu), host_state(&gpu));
        let at = |what: &str| format!("step {step}: {what}");
        let (update_cpu, update_gpu) = (
            minus(&c.params, &before_cpu.params),
            minus(&gg.params, &before_gpu.params),
        );
        assert_group_close(&at("update"), &names, &update_gpu, &update_cpu, 1e-2);
        assert_group_close(&at("adam_m"), &names, &gg.adam_m, &c.adam_m, 1e-3);
        assert_group_close(&at("adam_v"), &names, &gg.adam_v, &c.adam_v, 1e-3);
        assert_group_close(&at("ema"), &names, &gg.ema, &c.ema, 1e-4);
        (before_cpu, before_gpu) = (c, gg);
    }
}

/// The trainer's update, checked against AdamW, clipping, the learning-rate schedule and the
/// EMA written out from their definitions (torch's `AdamW`, `clip_grad_norm_`, diffusers'
/// cosine schedule and `EMAModel`) in f64, from the same gradients: three steps of a tiny
/// model with non-default hyperparameters, so that no constant can hide in the code.
fn trainer_update_is_adamw_by_its_formula() {
    let values = tiny().params.initial_values(8);
    let h = TrainHyper {
        batch_size: 2,
        steps: 4,
        learning_rate: 2e-3,
        lr_warmup_steps: 0,
        lr_schedule: LrSchedule::Cosine,
        adam_beta1: 0.8,
        adam_beta2: 0.95,
        adam_eps: 1e-8,
        weight_decay: 0.3,
        max_grad_norm: Some(0.5),
        ema_max_decay: 0.999,
        ema_inv_gamma: 2.0,
        ema_power: 2.0 / 3.0,
        seed: 11,
        ..TrainHyper::default()
    };
    let mut t = trainer_from(&Cpu, &values, tiny(), h.clone());
    let names: Vec<String> = t
        .model
        .params
        .specs
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let f = |v: f32| v as f64;
    let (b1, b2, eps, wd) = (
        f(h.adam_beta1),
        f(h.adam_beta2),
        f(h.adam_eps),
        f(h.weight_decay),
    );
    for k in 0..3u64 {
        let before = host_state(&t);
        let sg = t.gradients(&seeded(2 * 256, 60 + k), None).unwrap();
        let grads = t.state.layout.split(&down(&Cpu, &sg.grads));
        let stats = t.apply(sg).unwrap();
        let after = host_state(&t);

        let norm = grads
            .iter()
            .flatten()
            .map(|&g| f(g) * f(g))
            .sum::<f64>()
            .sqrt();
        assert_close("grad norm", &[stats.grad_norm], &[norm as f32], 0.0, 1e-5);
        let clip = (f(h.max_grad_norm.unwrap()) / (norm + 1e-6)).min(1.0);
        assert!(clip < 1.0, "clipping is not active: |g| = {norm}");
        let progress = k as f64 / h.steps as f64;
        let lr = f(h.learning_rate) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        assert_close("lr", &[stats.lr], &[lr as f32], 0.0, 1e-6);
        let n = k as i32 + 1;
        let decay = if k == 0 {
            0.0
        } else {
            let d = 1.0 - (1.0 + k as f64 / f(h.ema_inv_gamma)).powf(-f(h.ema_power));
            d.min(f(h.ema_max_decay))
        };
        let mut want = HostState {
            params: Vec::new(),
            adam_m: Vec::new(),
            adam_v: Vec::new(),
            ema: Vec::new(),
            step: k + 1,
        };
        for (i, grad) in grads.iter().enumerate() {
            let mut tensors = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            for (j, &g) in grad.iter().enumerate() {
                let g = clip * f(g);
                let p = f(before.params[i][j]) * (1.0 - lr * wd);
                let m = b1 * f(before.adam_m[i][j]) + (1.0 - b1) * g;
                let v = b2 * f(before.adam_v[i][j]) + (1.0 - b2) * g * g;
                let (m_hat, v_hat) = (m / (1.0 - b1.powi(n)), v / (1.0 - b2.powi(n)));
                let p = p - lr * m_hat / (v_hat.sqrt() + eps);
                let ema = decay * f(before.ema[i][j]) + (1.0 - decay) * p;
                for (t, value) in tensors.iter_mut().zip([p, m, v, ema]) {
                    t.push(value as f32);
                }
            }
            let [p, m, v, ema] = tensors;
            want.params.push(p);
            want.adam_m.push(m);
            want.adam_v.push(v);
            want.ema.push(ema);
        }
        // f32 arithmetic of the same formula from the same inputs: a few ulps of each value,
        // and of the update (about lr) where the update nearly cancels the weight.
        let lr_ulps = 1e-5 * lr as f32;
        for (what, got, want, atol) in [
            ("param", &after.params, &want.params, lr_ulps),
            ("adam_m", &after.adam_m, &want.adam_m, 0.0),
            ("adam_v", &after.adam_v, &want.adam_v, 0.0),
            ("ema", &after.ema, &want.ema, lr_ulps),
        ] {
            let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            for ((name, g), w) in names.iter().zip(got).zip(want) {
                let name = format!("step {k}: {what} {name}");
                assert_close(&name, g, w, atol + 1e-6 * scale, 2e-6);
            }
        }
    }
}

/// Stopping after two steps, moving the state through host memory into a new trainer and
/// taking two more gives exactly what four uninterrupted steps give.
fn check_resumed_training_continues_exactly(be: &dyn Backend) {
    let values = tiny().params.initial_values(9);
    let batch: Vec<Vec<f32>> = (0..4).map(|s| seeded(3 * 256, 30 + s)).collect();
    let mut straight = trainer(be, &values);
    let straight_losses: Vec<f32> = batch
        .iter()
        .map(|x| straight.step(x, None).unwrap().loss)
        .collect();

    let mut first = trainer(be, &values);
    let mut losses: Vec<f32> = batch[..2]
        .iter()
        .map(|x| first.step(x, None).unwrap().loss)
        .collect();
    let saved = host_state(&first);
    let mut second = trainer(be, &values);
    second.state = TrainState::from_host(be, &second.model, &saved).unwrap();
    losses.extend(
        batch[2..]
            .iter()
            .map(|x| second.step(x, None).unwrap().loss),
    );
    assert_eq!(losses, straight_losses, "{}", be.name());
    assert!(
        host_state(&second) == host_state(&straight),
        "{}: the resumed state differs",
        be.name()
    );
}

fn resumed_training_continues_exactly_on_cpu() {
    check_resumed_training_continues_exactly(&Cpu);
}

fn resumed_training_continues_exactly_on_gpu(g: &Gpu) {
    check_resumed_training_continues_exactly(g);
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
    let a = with_dropout(&Cpu, &values).step(&x0, None).unwrap();
    let plain = trainer(&Cpu, &values).step(&x0, None).unwrap();
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
    let a = with_dropout(&Cpu, &values).step(&x0, None).unwrap();
    let mut gt = with_dropout(g, &values);
    let b = gt.step(&x0, None).unwrap();
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

/// The Min-SNR-gamma weights against values worked out by hand for gamma 5: at
/// `abar` = 0.5, 0.8, 0.9 the SNR `abar / (1 - abar)` is 1, 4, 9, so epsilon gets
/// `min(snr, 5) / snr` = 1, 1, 5/9, v `min(snr, 5) / (snr + 1)` = 1/2, 4/5, 1/2, and x_0
/// `min(snr, 5)` = 1, 4, 5; then at timesteps of the linear schedule, and bad timesteps.
fn min_snr_weights_by_hand() {
    use PredictionType::{Epsilon, Sample, VPrediction};
    let cases = [
        (0.5, [1.0, 0.5, 1.0]),
        (0.8, [1.0, 0.8, 4.0]),
        (0.9, [5.0 / 9.0, 0.5, 5.0]),
    ];
    for (abar, [eps, v, x0]) in cases {
        let got = [Epsilon, VPrediction, Sample].map(|p| min_snr_weight(abar, 5.0, p));
        // abar is rounded to f32: the SNR is off by a few parts in 1e7.
        assert_close(&format!("abar {abar}"), &got, &[eps, v, x0], 0.0, 1e-6);
    }
    // Linear schedule, beta from 1e-4 to 0.02: abar_0 = 1 - 1e-4 (snr 9999; in f32, 1 - abar_0
    // is off by up to an ulp of 1, 6e-4 of it), and abar_999 about 4.0358e-5 (snr about
    // 4.036e-5).
    let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
    let ac = &schedule.alphas_cumprod;
    let eps = min_snr_weights(ac, &[0.0, 999.0], 5.0, Epsilon).unwrap();
    assert_close("epsilon t = 0, 999", &eps, &[5.0 / 9999.0, 1.0], 0.0, 1e-3);
    let x0 = min_snr_weights(ac, &[0.0, 999.0], 5.0, Sample).unwrap();
    assert_close("x_0 t = 0, 999", &x0, &[5.0, 4.036e-5], 0.0, 1e-3);
    let v = min_snr_weights(ac, &[999.0], 5.0, VPrediction).unwrap();
    assert_close("v t = 999", &v, &[4.036e-5], 0.0, 1e-3);
    // A timestep with no signal at all weighs 1 for epsilon, not 0/0.
    assert_eq!(min_snr_weight(0.0, 5.0, Epsilon), 1.0);
    assert!(matches!(
        min_snr_weights(ac, &[1000.0], 5.0, Epsilon),
        Err(Error::Invalid { .. })
    ));
}

/// With one sample a batch, the Min-SNR step is the plain step scaled by the weight of the
/// step's timestep: the same model output and target (the same seeds), the loss and every
/// gradient times `w`. Gamma is half the SNR of that timestep, so that the weight is well
/// away from 1 for every prediction target (1/2 for epsilon).
fn min_snr_step_is_the_plain_step_times_the_weight() {
    let values = tiny().params.initial_values(12);
    let x0 = seeded(256, 70);
    for prediction in [PredictionType::Epsilon, PredictionType::VPrediction] {
        let h = TrainHyper {
            batch_size: 1,
            prediction_type: prediction,
            ..hyper()
        };
        let mut plain = trainer_from(&Cpu, &values, tiny(), h.clone());
        let t = plain.timesteps(0)[0];
        let abar = plain.schedule.alphas_cumprod[t as usize];
        let gamma = (snr(abar) / 2.0) as f32;
        let snr_gamma = Some(gamma);
        let mut weighted = trainer_from(&Cpu, &values, tiny(), TrainHyper { snr_gamma, ..h });
        let w = min_snr_weight(abar, gamma, prediction);
        let (a, b) = (
            plain.gradients(&x0, None).unwrap(),
            weighted.gradients(&x0, None).unwrap(),
        );
        let name = format!("{prediction:?} at t = {t} (weight {w})");
        let scaled = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|x| w * x).collect() };
        let loss = down(&Cpu, &b.loss);
        assert_close(&name, &loss, &scaled(down(&Cpu, &a.loss)), 0.0, 1e-6);
        let grads = down(&Cpu, &b.grads);
        assert_close(&name, &grads, &scaled(down(&Cpu, &a.grads)), 1e-9, 1e-4);
    }
}

/// Min-SNR steps on the GPU give the CPU's loss and gradient norm.
fn min_snr_steps_match_across_backends(g: &Gpu) {
    let values = tiny().params.initial_values(13);
    let h = TrainHyper {
        snr_gamma: Some(5.0),
        ..hyper()
    };
    let mut cpu = trainer_from(&Cpu, &values, tiny(), h.clone());
    let mut gpu = trainer_from(g, &values, tiny(), h);
    for step in 0..2 {
        let x0 = seeded(3 * 256, 80 + step);
        let (a, b) = (cpu.step(&x0, None).unwrap(), gpu.step(&x0, None).unwrap());
        assert!(a.loss.is_finite(), "loss {}", a.loss);
        assert_close("loss", &[b.loss], &[a.loss], 1e-5, 1e-4);
        assert_close("grad norm", &[b.grad_norm], &[a.grad_norm], 1e-5, 1e-3);
    }
}

/// Hyperparameters the optimizer or the loss cannot take are refused when the trainer is
/// made, naming the setting.
fn bad_hyperparameters_are_clear_errors() {
    let values = tiny().params.initial_values(1);
    let cases = [
        (
            TrainHyper {
                adam_beta1: 1.0,
                ..hyper()
            },
            "adam_beta1",
        ),
        (
            TrainHyper {
                adam_beta2: -0.1,
                ..hyper()
            },
            "adam_beta2",
        ),
        (
            TrainHyper {
                adam_eps: 0.0,
                ..hyper()
            },
            "adam_eps",
        ),
        (
            TrainHyper {
                snr_gamma: Some(0.0),
                ..hyper()
            },
            "snr_gamma",
        ),
        (
            TrainHyper {
                snr_gamma: Some(f32::NAN),
                ..hyper()
            },
            "snr_gamma",
        ),
    ];
    for (h, name) in cases {
        let model = tiny();
        let state = TrainState::new(&Cpu, &model, &values).unwrap();
        let schedule = NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap();
        match Trainer::new(&Cpu, model, schedule, h, state) {
            Err(e @ Error::Invalid { .. }) => {
                assert!(e.to_string().contains(name), "{e} does not name {name}")
            }
            Err(e) => panic!("{name}: the wrong error: {e}"),
            Ok(_) => panic!("{name}: accepted"),
        }
    }
}

/// A batch too large for the adapter's largest buffer is an out-of-memory error that names
/// the batch size and the bytes, and the device keeps working: a small step succeeds after.
fn too_large_a_batch_is_a_clear_out_of_memory_error(g: &Gpu) {
    // conv_in's output, [B, 16, 16, 16] floats, is the first tensor past the limit.
    let limit = g.limits().max_storage_buffer_binding_size;
    let batch = (limit / (16 * 16 * 16 * 4)) as usize + 1;
    let values = tiny().params.initial_values(1);
    let big = TrainHyper {
        batch_size: batch,
        ..hyper()
    };
    let mut t = trainer_from(g, &values, tiny(), big);
    let err = t.step(&vec![0.1; batch * 256], None).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, diffwgpu::Error::OutOfMemory { .. })
            && msg.contains(&format!("batch size {batch}"))
            && msg.contains("bytes"),
        "{msg}"
    );
    let mut small = trainer(g, &values);
    assert!(small
        .step(&seeded(3 * 256, 1), None)
        .unwrap()
        .loss
        .is_finite());
}

/// One backward pass of the tiny model at batch 16 into the flat gradient buffer: the
/// gradients, their squared norm and the length of the arena of parts the pass used.
fn flat_gradients(be: &dyn Backend, values: &[Vec<f32>]) -> (Vec<f32>, f32, usize) {
    let model = tiny();
    let layout = model.params.layout();
    let flat = be
        .upload(&[layout.total], &layout.flatten(values).unwrap())
        .unwrap();
    let mut tape = Tape::new(be);
    let p = tape.params(&layout.views(&flat).unwrap());
    let shape = [16, 1, 16, 16];
    let x = tape.leaf(be.upload(&shape, &seeded(4096, 3)).unwrap(), false);
    let t: Vec<f32> = (0..16).map(|i| (i * 61) as f32).collect();
    let t = be.upload(&[16], &t).unwrap();
    let out = model.forward(&mut tape, &p, x, &t, None).unwrap();
    let target = be.upload(&shape, &seeded(4096, 4)).unwrap();
    let (_, d_out) = be
        .mse_loss_with_grad(tape.value(out), &target, 1.0)
        .unwrap();
    let (mut plan, mut grads) = (None, be.zeros(&[layout.total]).unwrap());
    let norm2 = tape
        .backward_params(out, d_out, &layout, &mut plan, &mut grads)
        .unwrap();
    let arena = plan.expect("a plan").arena_len();
    (down(be, &grads), down(be, &norm2)[0], arena)
}

/// A device that binds smaller buffers than the parts of a step's parameter gradients want
/// (WebGPU's default binds 128 MiB; a mnist/64 step asks ~200 MB of parts on a GPU) gets
/// fewer parts per gradient, and the same gradients.
fn gradient_parts_are_cut_to_fit_a_smaller_device(g: &Gpu) {
    let values = tiny().params.initial_values(2);
    let (want, want_norm2, arena) = flat_gradients(g, &values);
    let small = Gpu::new().unwrap();
    let total = tiny().params.layout().total;
    // Room for the flat buffers of `total` values, not for the arena.
    let limit = (arena + total) / 2;
    assert!(
        limit > total && limit < arena,
        "the arena ({arena}) is too small to cut"
    );
    small.limit_tensor_bytes(4 * limit as u64);
    let (got, got_norm2, cut) = flat_gradients(&small, &values);
    assert!(
        cut <= limit,
        "an arena of {cut} values past the limit of {limit}"
    );
    assert_close("gradients", &got, &want, 1e-6, 1e-4);
    assert_close("squared norm", &[got_norm2], &[want_norm2], 0.0, 1e-5);
    assert!(
        small.zeros(&[limit + 1]).is_err(),
        "a tensor past the lowered limit was made"
    );
}

tests! {
    cpu: [
        trainer_update_is_adamw_by_its_formula,
        tiny_model_overfits_one_fixed_batch_on_cpu,
        resumed_training_continues_exactly_on_cpu,
        dropout_changes_the_step,
        learning_rate_and_ema_schedules,
        tiny_model_overfits_with_min_snr_weights_on_cpu,
        min_snr_weights_by_hand,
        min_snr_step_is_the_plain_step_times_the_weight,
        bad_hyperparameters_are_clear_errors,
    ],
    gpu: [
        too_large_a_batch_is_a_clear_out_of_memory_error,
        gradient_parts_are_cut_to_fit_a_smaller_device,
        resumed_training_continues_exactly_on_gpu,
        tiny_model_overfits_one_fixed_batch_on_gpu,
        whole_training_steps_match_across_backends,
        dropout_steps_match_across_backends,
        tiny_model_overfits_with_min_snr_weights_on_gpu,
        min_snr_steps_match_across_backends,
    ],
}
