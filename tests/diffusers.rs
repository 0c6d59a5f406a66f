//! Interoperability with diffusers itself. Model folders written by diffusers'
//! `UNet2DModel.save_pretrained` load, and compute diffusers' output, loss and every parameter
//! gradient; single steps of diffusers' `DDPMScheduler` and `DDIMScheduler` are reproduced from
//! their saved configs; configs with options diffwgpu does not build are refused by key and
//! value. The fixtures under `tests/fixtures/` are written by `tools/diffusers_reference.py`.

mod common;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use common::{assert_close, loss_and_grads_labelled, read_tensors};
use diffwgpu::checkpoint::{load_pipeline, unet_weights, SchedulerConfig};
use diffwgpu::diffusion::{inference_timesteps, NoiseSchedule, TimestepSpacing};
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::{Backend, Cpu, Gpu};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The largest magnitude of `v`.
fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Asserts `|got - want| <= rel * max|want| + floor` elementwise.
fn assert_rel(name: &str, got: &[f32], want: &[f32], rel: f32, floor: f32) {
    assert_close(name, got, want, rel * max_abs(want) + floor, 0.0);
}

/// Loads `tests/fixtures/unets/<folder>` as diffwgpu loads any diffusers folder and compares
/// output, loss and gradients with `unets/<reference>_reference.safetensors` (diffusers in
/// float64) on `be`. Returns the names of the tensors in the weights file.
fn check_unet_folder(be: &dyn Backend, folder: &str, reference: &str) -> Vec<String> {
    let path = fixtures().join("unets").join(folder);
    let loaded = load_pipeline(&path).unwrap();
    let model = UNet2D::new(&loaded.config).unwrap();
    let values = unet_weights(&model, &loaded.weights, &path).unwrap();
    let fx = read_tensors(
        &fixtures()
            .join("unets")
            .join(format!("{reference}_reference.safetensors")),
    );
    let (x, t, target) = (&fx["x"].1, &fx["t"].1, &fx["target"].1);
    let labels: Option<Vec<u32>> = fx
        .get("class_labels")
        .map(|(_, l)| l.iter().map(|&l| l as u32).collect());
    let (out, loss, grads) =
        loss_and_grads_labelled(be, &model, &values, x, t, labels.as_deref(), target);
    let on = |what: &str| format!("{folder} on {}: {what}", be.name());
    assert_rel(&on("output"), &out, &fx["out"].1, 1e-4, 0.0);
    assert_rel(&on("loss"), &[loss], &fx["loss"].1, 1e-4, 0.0);
    // Each gradient relative to its tensor's largest. The floor, float32 rounding of
    // the model's largest gradient, is for `to_k.bias`: the softmax cancels a key bias,
    // so its exact gradient is zero and a float32 backward pass leaves only rounding.
    let largest = grads.iter().map(|g| max_abs(g)).fold(0.0f32, f32::max);
    for (spec, g) in model.params.specs.iter().zip(&grads) {
        let (shape, want) = &fx[&format!("grad.{}", spec.name)];
        assert_eq!(shape, &spec.shape, "{}", spec.name);
        assert_rel(&on(&spec.name), g, want, 1e-3, 1e-7 * largest);
    }
    loaded.weights.into_iter().map(|t| t.name).collect()
}

/// Three levels, two resnets per level, one attention head, 2 input and 3 output channels.
fn three_levels_folder_matches_diffusers_on_cpu() {
    check_unet_folder(&Cpu, "three_levels", "three_levels");
}

/// The same on the GPU.
fn three_levels_folder_matches_diffusers_on_gpu(g: &Gpu) {
    check_unet_folder(g, "three_levels", "three_levels");
}

/// The cifar10 preset's flags (flip_sin_to_cos false, freq_shift 1, downsample_padding 0,
/// norm_eps 1e-6), act_fn "swish", two heads.
fn cifar_flags_folder_matches_diffusers_on_cpu() {
    check_unet_folder(&Cpu, "cifar_flags", "cifar_flags");
}

/// The same on the GPU.
fn cifar_flags_folder_matches_diffusers_on_gpu(g: &Gpu) {
    check_unet_folder(g, "cifar_flags", "cifar_flags");
}

/// Attention at full resolution with 4-wide heads, attn_norm_num_groups, sample_size [8, 8].
fn first_level_attention_folder_matches_diffusers_on_cpu() {
    check_unet_folder(&Cpu, "first_level_attention", "first_level_attention");
}

/// The same on the GPU.
fn first_level_attention_folder_matches_diffusers_on_gpu(g: &Gpu) {
    check_unet_folder(g, "first_level_attention", "first_level_attention");
}

/// A class-conditional model (num_class_embeds 11): one image of a class, one of the null
/// class; the class embedding's gradient reaches exactly those two rows.
fn class_conditional_folder_matches_diffusers_on_cpu() {
    check_unet_folder(&Cpu, "class_conditional", "class_conditional");
}

/// The same on the GPU.
fn class_conditional_folder_matches_diffusers_on_gpu(g: &Gpu) {
    check_unet_folder(g, "class_conditional", "class_conditional");
}

/// The same weights under the attention names older diffusers versions wrote.
fn old_attention_names_load_as_todays_on_cpu() {
    let names = check_unet_folder(
        &Cpu,
        "first_level_attention_old_names",
        "first_level_attention",
    );
    for old in [".query.", ".key.", ".value.", ".proj_attn."] {
        assert!(names.iter().any(|n| n.contains(old)), "no {old} tensor");
    }
    assert!(!names.iter().any(|n| n.contains(".to_q.")));
}

/// The folder with the old attention names, on the GPU.
fn old_attention_names_load_as_todays_on_gpu(g: &Gpu) {
    check_unet_folder(
        g,
        "first_level_attention_old_names",
        "first_level_attention",
    );
}

/// One case of `scheduler_steps.json`.
#[derive(Deserialize)]
struct SchedulerCase {
    name: String,
    /// The scheduler config as diffusers' `save_config` writes it.
    config: Value,
    num_inference_steps: usize,
    /// DDIM's eta; null for DDPM.
    eta: Option<f32>,
    /// diffusers' timesteps after `set_timesteps(num_inference_steps)`.
    timesteps: Vec<usize>,
    /// The timesteps stepped from.
    steps: Vec<usize>,
}

#[derive(Deserialize)]
struct SchedulerCases {
    cases: Vec<SchedulerCase>,
}

/// diffusers' `alphas_cumprod` as a schedule (the other fields are unused by the steps).
fn with_alphas_cumprod(
    own: &NoiseSchedule,
    config: &SchedulerConfig,
    abar: &[f32],
) -> NoiseSchedule {
    let final_alpha_cumprod = match config.set_alpha_to_one {
        Some(false) => abar[0],
        _ => 1.0,
    };
    NoiseSchedule {
        alphas_cumprod: abar.to_vec(),
        final_alpha_cumprod,
        ..own.clone()
    }
}

/// Single scheduler steps: our timesteps are diffusers' and our coefficients and fused step
/// kernels, for the same `t -> t_prev`, give diffusers' `prev_sample` on `be`. DDPM
/// steps to the next entry of its timesteps (past the end: `abar = 1`); DDIM steps back by
/// `T / n` whatever the spacing (below 0: `final_alpha_cumprod`).
///
/// The steps are checked twice: with diffusers' own `alphas_cumprod`, to 1e-5, and with the
/// schedule we build from the config, whose float32 table differs from diffusers' by a few
/// units in the last place (diffusers multiplies in float32, we in f64), to 1e-4. Near
/// `t = 0` the step's `beta = 1 - abar_t / abar_prev` (about 1e-4) is recovered from two
/// float32 values near 1, so one unit in the last place of either moves it by 5e-4 relative:
/// each table is as far from the exact step as from the other.
fn check_scheduler_steps(be: &dyn Backend) {
    let text = std::fs::read_to_string(fixtures().join("scheduler_steps.json")).unwrap();
    let cases: SchedulerCases = serde_json::from_str(&text).unwrap();
    let fx = read_tensors(&fixtures().join("scheduler_steps.safetensors"));
    for case in &cases.cases {
        let name = &case.name;
        let config = SchedulerConfig::from_json(&case.config.to_string())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let own = config.schedule().unwrap();
        let total = own.num_train_timesteps();
        let n = case.num_inference_steps;
        let spacing = TimestepSpacing::from_name(&config.timestep_spacing).unwrap();
        let timesteps = inference_timesteps(total, n, spacing, config.steps_offset).unwrap();
        assert_eq!(timesteps, case.timesteps, "{name}: timesteps");
        // The largest difference is at the cosine schedule's capped last beta, which
        // diffusers rounds to float32 before taking 1 - 0.999.
        let abar = &fx[&format!("{name}.alphas_cumprod")].1;
        let label = format!("{name}: alphas_cumprod");
        assert_close(&label, &own.alphas_cumprod, abar, 0.0, 2e-5);
        let theirs = with_alphas_cumprod(&own, &config, abar);
        let prediction = config.prediction_type().unwrap();
        let clip = config.clip();
        for &t in &case.steps {
            let tensor = |what: &str| &fx[&format!("{name}.{t}.{what}")];
            let (shape, x_t) = tensor("x_t");
            let (model_output, noise, want) = (
                &tensor("model_output").1,
                &tensor("noise").1,
                &tensor("prev_sample").1,
            );
            for (schedule, table, tol) in [(&theirs, "diffusers'", 1e-5), (&own, "our", 1e-4)] {
                let up = |v: &[f32]| be.upload(shape, v).unwrap();
                let (x_t, model_output, noise) = (up(x_t), up(model_output), up(noise));
                let prev = match config.class_name.as_str() {
                    "DDPMScheduler" => {
                        let i = timesteps.iter().position(|&s| s == t).unwrap();
                        let k = schedule
                            .ddpm_coefficients_to(
                                t,
                                timesteps.get(i + 1).copied(),
                                config.variance_type().unwrap(),
                                prediction,
                                clip,
                            )
                            .unwrap();
                        be.ddpm_step(&x_t, &model_output, &noise, &k).unwrap()
                    }
                    "DDIMScheduler" => {
                        let eta = case.eta.expect("a DDIM case has an eta");
                        let t_prev = t.checked_sub(total / n);
                        let k = schedule
                            .ddim_coefficients(t, t_prev, eta, prediction, clip)
                            .unwrap();
                        be.ddim_step(&x_t, &model_output, &noise, &k).unwrap()
                    }
                    other => panic!("{name}: unexpected scheduler {other}"),
                };
                let got = be.to_vec(&prev).unwrap();
                let what = format!("{name} t={t} with {table} alphas_cumprod on {}", be.name());
                assert_rel(&what, &got, want, tol, 0.0);
            }
        }
    }
}

fn scheduler_steps_match_diffusers_on_cpu() {
    check_scheduler_steps(&Cpu);
}

fn scheduler_steps_match_diffusers_on_gpu(g: &Gpu) {
    check_scheduler_steps(g);
}

/// `config` with `key` set to `value`, as JSON text.
fn with(config: &Value, key: &str, value: Value) -> String {
    let mut config = config.clone();
    config[key] = value;
    config.to_string()
}

/// Options of diffusers' `UNet2DModel` that diffwgpu does not build are refused, and the
/// message names the key and the value found.
fn unsupported_model_configs_are_refused_by_key_and_value() {
    let path = fixtures().join("unets/three_levels/config.json");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    UNet2DConfig::from_json(&base.to_string()).unwrap();
    let refused = [
        (
            "down_block_types",
            json!(["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
            "CrossAttnDownBlock2D",
        ),
        (
            "up_block_types",
            json!(["UpBlock2D", "AttnSkipUpBlock2D", "UpBlock2D"]),
            "AttnSkipUpBlock2D",
        ),
        ("class_embed_type", json!("timestep"), "timestep"),
        ("class_embed_type", json!("identity"), "identity"),
        ("num_class_embeds", json!(0), "0"),
        ("time_embedding_type", json!("fourier"), "fourier"),
        (
            "resnet_time_scale_shift",
            json!("scale_shift"),
            "scale_shift",
        ),
        ("act_fn", json!("gelu"), "gelu"),
        ("downsample_type", json!("resnet"), "resnet"),
        ("upsample_type", json!("resnet"), "resnet"),
        ("center_input_sample", json!(true), "true"),
        ("mid_block_scale_factor", json!(1.414), "1.414"),
        ("add_attention", json!(false), "false"),
        ("mid_block_type", json!(null), "None"),
        (
            "mid_block_type",
            json!("UNetMidBlock2DCrossAttn"),
            "UNetMidBlock2DCrossAttn",
        ),
        (
            "_class_name",
            json!("UNet2DConditionModel"),
            "UNet2DConditionModel",
        ),
    ];
    for (key, value, shown) in refused {
        let err = UNet2DConfig::from_json(&with(&base, key, value))
            .expect_err(key)
            .to_string();
        assert!(
            err.contains(key) && err.contains(shown),
            "{key}: the message does not name the key and {shown}: {err}"
        );
    }
}

/// diffusers' `time_embedding_dim` sets the time embedding's width when it is not null.
fn time_embedding_dim_sets_the_embedding_width() {
    let path = fixtures().join("unets/three_levels/config.json");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let config = UNet2DConfig::from_json(&with(&base, "time_embedding_dim", json!(24))).unwrap();
    let model = diffwgpu::nn::UNet2D::new(&config).unwrap();
    let linear_2 = model
        .params
        .specs
        .iter()
        .find(|s| s.name == "time_embedding.linear_2.weight")
        .unwrap();
    assert_eq!(linear_2.shape, vec![24, 24]);
}

/// Scheduler options diffwgpu does not implement are refused by key and value too.
fn unsupported_scheduler_configs_are_refused_by_key_and_value() {
    let text = std::fs::read_to_string(fixtures().join("scheduler_steps.json")).unwrap();
    let cases: SchedulerCases = serde_json::from_str(&text).unwrap();
    let base = &cases.cases[0].config;
    let refused = [
        ("variance_type", json!("learned_range"), "learned_range"),
        ("thresholding", json!(true), "true"),
        ("rescale_betas_zero_snr", json!(true), "true"),
        ("beta_schedule", json!("sigmoid"), "sigmoid"),
        ("timestep_spacing", json!("karras"), "karras"),
        ("prediction_type", json!("flow"), "flow"),
        (
            "_class_name",
            json!("EulerDiscreteScheduler"),
            "EulerDiscreteScheduler",
        ),
    ];
    for (key, value, shown) in refused {
        let err = SchedulerConfig::from_json(&with(base, key, value))
            .expect_err(key)
            .to_string();
        assert!(
            err.contains(key) && err.contains(shown),
            "{key}: the message does not name the key and {shown}: {err}"
        );
    }
}

tests! {
    cpu: [
        three_levels_folder_matches_diffusers_on_cpu,
        cifar_flags_folder_matches_diffusers_on_cpu,
        first_level_attention_folder_matches_diffusers_on_cpu,
        old_attention_names_load_as_todays_on_cpu,
        class_conditional_folder_matches_diffusers_on_cpu,
        scheduler_steps_match_diffusers_on_cpu,
        unsupported_model_configs_are_refused_by_key_and_value,
        time_embedding_dim_sets_the_embedding_width,
        unsupported_scheduler_configs_are_refused_by_key_and_value,
    ],
    gpu: [
        three_levels_folder_matches_diffusers_on_gpu,
        cifar_flags_folder_matches_diffusers_on_gpu,
        first_level_attention_folder_matches_diffusers_on_gpu,
        old_attention_names_load_as_todays_on_gpu,
        class_conditional_folder_matches_diffusers_on_gpu,
        scheduler_steps_match_diffusers_on_gpu,
    ],
}
