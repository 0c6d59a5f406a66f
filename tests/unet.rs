//! The whole U-Net: the parameter list of the presets, forward and every parameter gradient
//! on the GPU against the CPU, parameter gradients against finite differences, and the flat
//! gradient buffer of training against the per-parameter gradients.

mod common;

use common::{assert_close, loss_and_grads, read_tensors, seeded};
use diffwgpu::autodiff::Tape;
use diffwgpu::nn::{UNet2D, UNet2DConfig, PARAM_ALIGN};
use diffwgpu::{Backend, Cpu, Gpu, Tensor};

/// A model, its parameter values, a batch and a target.
struct Case {
    model: UNet2D,
    values: Vec<Vec<f32>>,
    x: Vec<f32>,
    t: Vec<f32>,
    target: Vec<f32>,
}

/// The tiny preset with its default initialisation, a batch of 2 and a target.
fn tiny_case() -> Case {
    let model = UNet2D::new(&UNet2DConfig::preset("tiny").unwrap()).unwrap();
    let values = model.params.initial_values(7);
    let n = 2 * 16 * 16;
    let x = seeded(n, 1);
    let target = seeded(n, 2);
    Case {
        model,
        values,
        x,
        t: vec![37.0, 901.0],
        target,
    }
}

/// The names and shapes diffusers' `UNet2DModel` gives each preset's parameters
/// (`tests/fixtures/unet_params_<preset>.txt`, written by `tools/diffusers_reference.py`).
fn presets_have_diffusers_parameter_names_and_shapes() {
    for preset in ["tiny", "mnist", "cifar10"] {
        let path = format!(
            "{}/tests/fixtures/unet_params_{preset}.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let mut want: Vec<(String, Vec<usize>)> = Vec::new();
        let mut total = 0;
        for line in text.lines() {
            let (name, shape) = line.split_once(' ').unwrap();
            if name == "total" {
                total = shape.parse().unwrap();
                continue;
            }
            let shape = shape.split(',').map(|d| d.parse().unwrap()).collect();
            want.push((name.to_string(), shape));
        }
        let model = UNet2D::new(&UNet2DConfig::preset(preset).unwrap()).unwrap();
        let mut got: Vec<(String, Vec<usize>)> = model
            .params
            .specs
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone()))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{preset}");
        assert_eq!(model.params.count(), total, "{preset}");
    }
}

fn gpu_forward_and_gradients_match_cpu(g: &Gpu) {
    let Case {
        model,
        values,
        x,
        t,
        target,
    } = tiny_case();
    let (out_c, loss_c, grads_c) = loss_and_grads(&Cpu, &model, &values, &x, &t, &target);
    let (out_g, loss_g, grads_g) = loss_and_grads(g, &model, &values, &x, &t, &target);
    // Tolerance: f32 with different summation orders through ~40 layers; outputs are O(1).
    assert_close("output", &out_g, &out_c, 1e-4, 1e-3);
    assert_close("loss", &[loss_g], &[loss_c], 1e-5, 1e-4);
    for (spec, (gg, gc)) in model.params.specs.iter().zip(grads_g.iter().zip(&grads_c)) {
        let scale = gc.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_close(&spec.name, gg, gc, 1e-3 * scale + 1e-6, 1e-3);
    }
}

fn parameter_gradients_match_finite_differences() {
    let Case {
        model,
        values,
        x,
        t,
        target,
    } = tiny_case();
    let (_, _, grads) = loss_and_grads(&Cpu, &model, &values, &x, &t, &target);
    let loss_at = |values: &[Vec<f32>]| -> f64 {
        let s = model.config.size();
        let shape = [2, 1, s, s];
        let params: Vec<Tensor> = model
            .params
            .specs
            .iter()
            .zip(values)
            .map(|(spec, v)| Cpu.upload(&spec.shape, v).unwrap())
            .collect();
        let mut tape = Tape::inference(&Cpu);
        let p = tape.leaves(&params, false);
        let xv = tape.leaf(Cpu.upload(&shape, &x).unwrap(), false);
        let tt = Cpu.upload(&[2], &t).unwrap();
        let out = model.forward(&mut tape, &p, xv, &tt, None).unwrap();
        let out = Cpu.to_vec(tape.value(out)).unwrap();
        let n = out.len() as f64;
        out.iter()
            .zip(&target)
            .map(|(&o, &y)| (o as f64 - y as f64).powi(2))
            .sum::<f64>()
            / n
    };
    // One parameter of every kind: the entry with the largest gradient of each of a spread of
    // tensors (conv, linear, norm, attention, time embedding, shortcut, up and down path).
    let names = [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "down_blocks.0.resnets.0.norm1.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.resnets.0.conv_shortcut.bias",
        "down_blocks.1.attentions.0.to_q.weight",
        "mid_block.attentions.0.to_v.bias",
        "up_blocks.0.resnets.1.time_emb_proj.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.1.resnets.0.norm2.bias",
        "conv_norm_out.weight",
        "conv_out.bias",
    ];
    let h = 1e-2f32;
    for name in names {
        let i = model
            .params
            .specs
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let (j, &analytic) = grads[i]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let mut plus = values.clone();
        plus[i][j] += h;
        let mut minus = values.clone();
        minus[i][j] -= h;
        let numeric = ((loss_at(&plus) - loss_at(&minus)) / (2.0 * h as f64)) as f32;
        let err = (numeric - analytic).abs();
        assert!(
            err <= 2e-2 * analytic.abs() + 1e-5,
            "{name}[{j}]: analytic {analytic}, finite difference {numeric}"
        );
    }
}

/// The tiny model with perturbed weights, evaluated by diffusers in float64
/// (`tests/fixtures/tiny_reference.safetensors`): our output, loss and every parameter
/// gradient agree on `be`.
fn check_tiny_model_matches_diffusers(be: &dyn Backend) {
    let path = format!(
        "{}/tests/fixtures/tiny_reference.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let fx = read_tensors(std::path::Path::new(&path));
    let model = UNet2D::new(&UNet2DConfig::preset("tiny").unwrap()).unwrap();
    let values: Vec<Vec<f32>> = model
        .params
        .specs
        .iter()
        .map(|s| {
            let (shape, data) = &fx[&format!("param.{}", s.name)];
            assert_eq!(shape, &s.shape, "{}", s.name);
            data.clone()
        })
        .collect();
    let (x, t, target) = (&fx["x"].1, &fx["t"].1, &fx["target"].1);
    let (out, loss, grads) = loss_and_grads(be, &model, &values, x, t, target);
    let rel = |name: &str, got: &[f32], want: &[f32], tol: f32| {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_close(
            &format!("{} {name}", be.name()),
            got,
            want,
            tol * scale + 1e-7,
            0.0,
        );
    };
    rel("output", &out, &fx["out"].1, 1e-4);
    rel("loss", &[loss], &fx["loss"].1, 1e-4);
    for (spec, g) in model.params.specs.iter().zip(&grads) {
        let want = &fx[&format!("grad.{}", spec.name)].1;
        // Relative to the largest gradient of the tensor; `to_k.bias` has an exactly zero
        // gradient (softmax cancels a key bias), so it is held to an absolute bound.
        rel(&spec.name, g, want, 1e-3);
    }
}

/// The gradients `backward_params` gathers into the flat buffer (from each op's partial
/// sums) equal, bit for bit, those `backward` returns per parameter (from the same parts,
/// summed per tensor), and the squared norm it returns is that of all of them, on `be`.
fn check_flat_gradients_equal_per_tensor_gradients(be: &dyn Backend) {
    let c = tiny_case();
    let (_, _, per_tensor) = loss_and_grads(be, &c.model, &c.values, &c.x, &c.t, &c.target);
    let layout = c.model.params.layout();
    let flat_params = be
        .upload(&[layout.total], &layout.flatten(&c.values).unwrap())
        .unwrap();
    let mut tape = Tape::new(be);
    let p = tape.params(&layout.views(&flat_params).unwrap());
    let n = c.t.len();
    let x = tape.leaf(be.upload(&[n, 1, 16, 16], &c.x).unwrap(), false);
    let t = be.upload(&[n], &c.t).unwrap();
    let out = c.model.forward(&mut tape, &p, x, &t, None).unwrap();
    let target = be.upload(&[n, 1, 16, 16], &c.target).unwrap();
    let (_, d_out) = be
        .mse_loss_with_grad(tape.value(out), &target, 1.0)
        .unwrap();
    let mut grads = be.zeros(&[layout.total]).unwrap();
    let mut plan = None;
    let norm2 = tape
        .backward_params(out, d_out, &layout, &mut plan, &mut grads)
        .unwrap();
    let flat = be.to_vec(&grads).unwrap();
    for (spec, (got, want)) in c
        .model
        .params
        .specs
        .iter()
        .zip(layout.split(&flat).iter().zip(&per_tensor))
    {
        assert!(got == want, "{}: {} differs", be.name(), spec.name);
    }
    let padding = (0..layout.total).filter(|i| {
        !layout
            .offsets
            .iter()
            .zip(&layout.shapes)
            .any(|(&o, s)| (o..o + s.iter().product::<usize>()).contains(i))
    });
    assert!(padding.clone().count() > 0 && padding.into_iter().all(|i| flat[i] == 0.0));
    let want: f64 = per_tensor
        .iter()
        .flatten()
        .map(|&g| g as f64 * g as f64)
        .sum();
    let got = be.to_vec(&norm2).unwrap()[0] as f64;
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "{}: |g|^2 {got} vs {want}",
        be.name()
    );
}

fn flat_gradients_equal_per_tensor_gradients_on_cpu() {
    check_flat_gradients_equal_per_tensor_gradients(&Cpu);
}

fn flat_gradients_equal_per_tensor_gradients_on_gpu(g: &Gpu) {
    check_flat_gradients_equal_per_tensor_gradients(g);
}

fn tiny_model_matches_diffusers_on_cpu() {
    check_tiny_model_matches_diffusers(&Cpu);
}

fn tiny_model_matches_diffusers_on_gpu(g: &Gpu) {
    check_tiny_model_matches_diffusers(g);
}

/// In the flat layout of every preset, each group norm's shift follows its scale without a
/// gap (its kernels bind the two as one buffer, no copy) and every other parameter starts at
/// a multiple of `PARAM_ALIGN`, where a GPU can bind it as a view.
fn group_norm_scale_and_shift_lie_together() {
    for preset in ["tiny", "mnist", "cifar10"] {
        let model = UNet2D::new(&UNet2DConfig::preset(preset).unwrap()).unwrap();
        let layout = model.params.layout();
        let specs = &model.params.specs;
        for (i, spec) in specs.iter().enumerate() {
            let norm_shift = spec.name.ends_with(".bias")
                && specs[i - 1].name == spec.name.replace(".bias", ".weight")
                && spec.name.contains("norm");
            if norm_shift {
                let want = layout.offsets[i - 1] + spec.numel();
                assert_eq!(layout.offsets[i], want, "{preset}: {} is apart", spec.name);
            } else if layout.group_of(i).is_none() {
                let at = layout.offsets[i];
                assert_eq!(at % PARAM_ALIGN, 0, "{preset}: {} at {at}", spec.name);
            }
        }
    }
}

tests! {
    cpu: [
        presets_have_diffusers_parameter_names_and_shapes,
        parameter_gradients_match_finite_differences,
        tiny_model_matches_diffusers_on_cpu,
        flat_gradients_equal_per_tensor_gradients_on_cpu,
        group_norm_scale_and_shift_lie_together,
    ],
    gpu: [
        gpu_forward_and_gradients_match_cpu,
        tiny_model_matches_diffusers_on_gpu,
        flat_gradients_equal_per_tensor_gradients_on_gpu,
    ],
}
