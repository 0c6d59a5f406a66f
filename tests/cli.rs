//! The `diffwgpu` binary end to end: a short training run writes a complete pipeline folder,
//! a resumed run continues exactly, sampling is deterministic and reports progress, `bench`
//! reports speed and FLOPs, `eval` reports bits/dim, and bad input gives a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffwgpu::Gpu;

fn diffwgpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffwgpu"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// A fresh, empty folder under the system's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffwgpu-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny CPU run: 4 images a batch, few DDIM steps for the grids.
fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--num-samples",
        "4",
        "--sample-steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    diffwgpu(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the binary with `args` and checks that it fails with a message that contains `want`,
/// without a panic.
fn fails_clearly(args: &[&str], want: &str) {
    let o = diffwgpu(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.contains(want),
        "{args:?}: {err:?} does not mention {want:?}"
    );
}

fn losses(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("train_log.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(2).collect::<Vec<_>>().join(","))
        .collect()
}

fn train_writes_a_pipeline_folder() {
    let out = scratch("train");
    let o = train(
        &out,
        &[
            "--steps",
            "4",
            "--sample-every",
            "2",
            "--checkpoint-every",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "training_state.safetensors",
        "train_config.json",
        "samples/step-000002.png",
        "samples/step-000004.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing; stderr: {}", stderr(&o));
    }
    assert_eq!(losses(&out).len(), 4);
    let grid = image::open(out.join("samples/step-000004.png")).unwrap();
    // 2 x 2 images of 16 pixels with 2-pixel gaps.
    assert_eq!((grid.width(), grid.height()), (38, 38));
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// Settings away from their defaults that change every step after the third: a resumed run
/// that lost any of them would leave the uninterrupted run's loss curve.
const RESUMED_SETTINGS: &[&str] = &[
    "--adam-beta1",
    "0.5",
    "--adam-beta2",
    "0.9",
    "--adam-epsilon",
    "1e-3",
    "--snr-gamma",
    "2",
];

/// A run stopped after 3 of 6 steps and resumed ends as the uninterrupted run, with
/// non-default optimizer and loss settings that the resumed run reads from the checkpoint.
fn resumed_run_follows_the_same_loss_curve() {
    let straight = scratch("straight");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["--steps", "6", "--sample-every", "0"];
        args.extend_from_slice(RESUMED_SETTINGS);
        args.extend_from_slice(extra);
        train(out, &args)
    };
    let o = run(&straight, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let parted = scratch("parted");
    let o = run(&parted, &["--stop-at", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&parted).len(), 3);
    let o = diffwgpu(&[
        "train",
        "--resume",
        parted.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&parted), losses(&straight));
    let weights =
        |d: &Path| std::fs::read(d.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(
        weights(&parted) == weights(&straight),
        "final EMA weights differ"
    );
    for d in [straight, parted] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Each bad input fails with a message naming the problem, never a panic.
fn bad_input_gives_clear_errors() {
    let dir = scratch("bad");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [12, 24],
            "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "norm_num_groups": 8}"#,
    )
    .unwrap();
    let odd = dir.join("odd.json");
    std::fs::write(
        &odd,
        r#"{"sample_size": 18, "block_out_channels": [16, 32, 32],
            "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"], "norm_num_groups": 8}"#,
    )
    .unwrap();
    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(
        corrupt.join("training_state.safetensors"),
        b"not a checkpoint",
    )
    .unwrap();
    let out = dir.join("out");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--data", "/nonexistent/images"], "/nonexistent/images"),
        (vec!["--data", empty.to_str().unwrap()], "no images"),
        (
            vec!["--config", config.to_str().unwrap()],
            "not divisible by norm_num_groups",
        ),
        (vec!["--config", odd.to_str().unwrap()], "cannot be halved"),
        (vec!["--preset", "huge"], "unknown preset"),
        (vec!["--adam-beta1", "1"], "--adam-beta1"),
        (vec!["--adam-beta1", "-0.1"], "--adam-beta1"),
        (vec!["--adam-beta2", "1.5"], "--adam-beta2"),
        (vec!["--adam-beta2", "x"], "--adam-beta2"),
        (vec!["--adam-epsilon", "0"], "--adam-epsilon"),
        (vec!["--adam-epsilon", "-1e-8"], "--adam-epsilon"),
        (vec!["--snr-gamma", "0"], "--snr-gamma"),
        (vec!["--snr-gamma", "-5"], "--snr-gamma"),
        (vec!["--snr-gamma", "inf"], "--snr-gamma"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["train", "--device", "cpu", "--steps", "1", "--out"];
        args.push(out.to_str().unwrap());
        args.extend(extra.iter().copied());
        fails_clearly(&args, want);
    }
    // A resumed run takes its settings from its checkpoint.
    for flag in [
        "--adam-beta1",
        "--adam-beta2",
        "--adam-epsilon",
        "--adam-weight-decay",
        "--snr-gamma",
    ] {
        let resume = ["train", "--resume", out.to_str().unwrap(), flag, "0.5"];
        fails_clearly(&resume, "cannot be used with");
    }
    let o = diffwgpu(&[
        "train",
        "--resume",
        corrupt.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("training_state.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The pipeline's weights (the EMA of the weights of both steps) after two steps at the full
/// learning rate with `extra`.
fn weights_after_two_steps(name: &str, extra: &[&str]) -> Vec<u8> {
    let out = scratch(name);
    let mut args = vec!["--steps", "2", "--lr-warmup", "0", "--sample-every", "0"];
    args.extend_from_slice(extra);
    let o = train(&out, &args);
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    let weights = std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    weights
}

/// The AdamW flags reach the optimizer: their defaults spelled out give the default run's
/// weights byte for byte, and each other value gives others (Adam's first step does not
/// depend on the betas, so two steps are taken).
fn adam_flags_reach_the_optimizer() {
    let default = weights_after_two_steps("adam-default", &[]);
    let spelled_out = weights_after_two_steps(
        "adam-spelled-out",
        &[
            "--adam-beta1",
            "0.95",
            "--adam-beta2",
            "0.999",
            "--adam-epsilon",
            "1e-8",
            "--adam-weight-decay",
            "1e-6",
        ],
    );
    assert!(spelled_out == default, "the defaults spelled out differ");
    for (flag, value) in [
        ("--adam-beta1", "0.5"),
        ("--adam-beta2", "0.9"),
        ("--adam-epsilon", "1e-2"),
        ("--adam-weight-decay", "10"),
    ] {
        let other = weights_after_two_steps("adam-other", &[flag, value]);
        assert!(other != default, "{flag} {value} changed nothing");
    }
}

/// Writes a safetensors file with one f32 tensor.
fn write_tensor(path: &Path, name: &str, shape: &[usize], data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .unwrap();
    safetensors::serialize_to_file([(name, view)], None, path).unwrap();
}

fn sample_writes_deterministic_images() {
    let dir = scratch("sample");
    let model = dir.join("model");
    let o = train(&model, &["--steps", "2", "--sample-every", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = model.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["sample", "--model", m, "--device", "cpu", "--num", "4"];
        args.extend_from_slice(extra);
        let o = diffwgpu(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    };
    let (a, b) = (dir.join("a.png"), dir.join("b.png"));
    let each = dir.join("each");
    let tensor = dir.join("samples.safetensors");
    run(&[
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--output",
        a.to_str().unwrap(),
        "--out-dir",
        each.to_str().unwrap(),
        "--save-tensor",
        tensor.to_str().unwrap(),
    ]);
    run(&[
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--batch",
        "3",
        "--output",
        b.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "same seed, other images"
    );
    // --batch-size is --batch by the name train uses.
    let e = dir.join("e.png");
    run(&[
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--batch-size",
        "3",
        "--output",
        e.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&e).unwrap() == std::fs::read(&b).unwrap());
    let grid = image::open(&a).unwrap();
    assert_eq!((grid.width(), grid.height()), (38, 38));
    for i in 0..4 {
        let img = image::open(each.join(format!("{i:04}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
    let bytes = std::fs::read(&tensor).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("samples").unwrap().shape(), &[4, 1, 16, 16]);

    // A given x_T with DDIM at eta 0: deterministic, whatever the seed.
    let noise = dir.join("noise.safetensors");
    let values: Vec<f32> = (0..3 * 256)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    write_tensor(&noise, "noise", &[3, 1, 16, 16], &values);
    let (c, d) = (dir.join("c.png"), dir.join("d.png"));
    run(&[
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--noise",
        noise.to_str().unwrap(),
        "--seed",
        "1",
        "--output",
        c.to_str().unwrap(),
    ]);
    run(&[
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--noise",
        noise.to_str().unwrap(),
        "--seed",
        "2",
        "--output",
        d.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&c).unwrap() == std::fs::read(&d).unwrap());
    let ddpm = dir.join("ddpm.png");
    run(&[
        "--sampler",
        "ddpm",
        "--steps",
        "4",
        "--output",
        ddpm.to_str().unwrap(),
    ]);
    assert!(ddpm.is_file());

    // Bad input.
    let wrong = dir.join("wrong.safetensors");
    write_tensor(&wrong, "noise", &[2, 3, 16, 16], &vec![0.0; 2 * 3 * 256]);
    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(model.join("unet").join(f), bare.join(f)).unwrap();
    }
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", empty.to_str().unwrap()], "config.json"),
        (
            vec!["--model", bare.to_str().unwrap()],
            "no scheduler config",
        ),
        (
            vec!["--model", m, "--steps", "1001"],
            "between 1 and the model's 1000",
        ),
        (
            vec!["--model", m, "--noise", wrong.to_str().unwrap()],
            "[N, 1, 16, 16]",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["sample", "--device", "cpu", "--output"];
        let out = dir.join("never.png");
        args.push(out.to_str().unwrap());
        args.extend(extra.iter().copied());
        let o = diffwgpu(&args);
        let err = stderr(&o);
        assert!(
            !o.status.success() && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
        assert!(
            err.contains(want),
            "{extra:?}: {err:?} does not mention {want:?}"
        );
        assert!(!out.exists(), "{extra:?} wrote an image");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The continuous-time samplers through the CLI: DPM-Solver++ and the ODE are deterministic
/// given x_T, the SDE draws fresh noise per seed but not per batch, a DPM-Solver++ scheduler
/// config makes DPM-Solver++ the default, and options diffwgpu lacks are named.
fn sample_runs_the_solvers() {
    let dir = scratch("solvers");
    let model = dir.join("model");
    let o = train(&model, &["--steps", "2", "--sample-every", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let noise = dir.join("noise.safetensors");
    let values: Vec<f32> = (0..3 * 256)
        .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
        .collect();
    write_tensor(&noise, "noise", &[3, 1, 16, 16], &values);
    // The samples of a run as raw float32 bytes.
    let run = |model: &Path, name: &str, extra: &[&str]| -> Vec<u8> {
        let png = dir.join(format!("{name}.png"));
        let tensor = dir.join(format!("{name}.safetensors"));
        let mut args = vec![
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--output",
            png.to_str().unwrap(),
            "--save-tensor",
            tensor.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = diffwgpu(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        assert!(png.is_file(), "{extra:?}");
        let bytes = std::fs::read(&tensor).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("samples").unwrap();
        assert_eq!(t.shape(), &[3, 1, 16, 16], "{extra:?}");
        t.data().to_vec()
    };
    let given = ["--noise", noise.to_str().unwrap()];
    for sampler in ["dpm-solver++", "ode"] {
        let with = |seed: &'static str| {
            [
                &["--sampler", sampler, "--steps", "4", "--seed", seed][..],
                &given,
            ]
            .concat()
        };
        let a = run(&model, &format!("{sampler}-a"), &with("1"));
        let b = run(&model, &format!("{sampler}-b"), &with("2"));
        assert!(
            a == b,
            "{sampler}: a given x_T and another seed, other samples"
        );
    }
    let sde = |name: &str, extra: &[&str]| {
        let args = [
            &["--sampler", "sde", "--steps", "5", "--num", "3"][..],
            extra,
        ]
        .concat();
        run(&model, name, &args)
    };
    let whole = sde("sde-whole", &[]);
    assert!(
        whole == sde("sde-batched", &["--batch", "2"]),
        "sde: batches change samples"
    );
    assert!(
        whole != sde("sde-seed", &["--seed", "7"]),
        "sde: the seed is ignored"
    );
    // The trajectory pictures of a sampler that evaluates the model twice per step.
    let traj = dir.join("traj.png");
    let o = diffwgpu(&[
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--num",
        "2",
        "--sampler",
        "ode",
        "--steps",
        "3",
        "--trajectory",
        "3",
        "--output",
        traj.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.join("traj-trajectory.png").is_file());
    assert!(dir.join("traj-trajectory.gif").is_file());

    // A DPMSolverMultistepScheduler config: DPM-Solver++ without --sampler, with its options.
    let config_path = model.join("scheduler/scheduler_config.json");
    let ddpm_config = std::fs::read_to_string(&config_path).unwrap();
    let dpm = dir.join("dpm");
    std::fs::create_dir_all(dpm.join("scheduler")).unwrap();
    std::fs::create_dir_all(dpm.join("unet")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(model.join("unet").join(f), dpm.join("unet").join(f)).unwrap();
    }
    let write_config = |order: u32| {
        let mut config: serde_json::Value = serde_json::from_str(&ddpm_config).unwrap();
        config["_class_name"] = "DPMSolverMultistepScheduler".into();
        config["solver_order"] = order.into();
        config["algorithm_type"] = "dpmsolver++".into();
        let path = dpm.join("scheduler/scheduler_config.json");
        std::fs::write(path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    };
    write_config(1);
    let steps = [&["--steps", "4"][..], &given].concat();
    let default = run(&dpm, "dpm-default", &steps);
    let named = [&["--sampler", "dpm-solver++"][..], &steps].concat();
    assert!(
        default == run(&dpm, "dpm-named", &named),
        "the default is not dpm-solver++"
    );
    // The config's solver_order 1 against the second order of a DDPM config's defaults.
    assert!(
        default != run(&model, "dpm-order2", &named),
        "solver_order is ignored"
    );
    write_config(3);
    let out = dir.join("never.png");
    let o = diffwgpu(&[
        "sample",
        "--model",
        dpm.to_str().unwrap(),
        "--device",
        "cpu",
        "--output",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("solver_order"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `eval` on images of the model's size: the bound (drawn timesteps) and the ODE likelihood
/// in bits/dim, the same for the same seed, the CSV of the terms and their chart; bad input
/// named.
fn eval_reports_bits_per_dim() {
    let dir = scratch("eval");
    let model = dir.join("model");
    let o = train(&model, &["--steps", "2", "--sample-every", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = model.to_str().unwrap();
    // 8-bit images of the model's 16x16: its own samples.
    let images = dir.join("images");
    let grid = dir.join("grid.png");
    let o = diffwgpu(&[
        "sample",
        "--model",
        m,
        "--device",
        "cpu",
        "--num",
        "5",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out-dir",
        images.to_str().unwrap(),
        "--output",
        grid.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (csv, png) = (dir.join("bound.csv"), dir.join("bound.png"));
    let eval = || {
        let o = diffwgpu(&[
            "eval",
            "--model",
            m,
            "--device",
            "cpu",
            "--data",
            images.to_str().unwrap(),
            "--num",
            "4",
            "--batch",
            "3",
            "--t-samples",
            "5",
            "--ode",
            "--ode-steps",
            "2",
            "--csv",
            csv.to_str().unwrap(),
            "--plot",
            png.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = eval();
    assert_eq!(out, eval(), "the same seed, other estimates");
    let bits = |prefix: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{out}"));
        line[prefix.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (bound, ode) = (bits("variational bound: "), bits("ODE likelihood: "));
    assert!(bound > 0.0 && bound.is_finite(), "{out}");
    assert!(ode > 0.0 && ode.is_finite(), "{out}");
    assert!(
        out.contains("over 4 images (5 drawn timesteps per image)"),
        "{out}"
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "term,t,bits_per_dim,std_error,images");
    assert!(rows[1].starts_with("prior,1000,"), "{text}");
    // 4 images x 5 draws, counted per timestep.
    let counted: usize = rows[2..]
        .iter()
        .map(|r| r.rsplit(',').next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(counted, 20, "{text}");
    let chart = image::open(&png).unwrap();
    assert!(chart.width() > 100 && chart.height() > 100);

    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(model.join("unet").join(f), bare.join(f)).unwrap();
    }
    let data = images.to_str().unwrap();
    let never = dir.join("never.csv");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", bare.to_str().unwrap(), "--data", data],
            "no scheduler config",
        ),
        // The embedded digits are 32x32, resampled to 16x16.
        (vec!["--model", m], "not one of the 256 levels"),
        (vec!["--model", m, "--data", data, "--num", "0"], "--num 0"),
        (
            vec!["--model", m, "--data", data, "--num", "9"],
            "holds 5 images",
        ),
        (
            vec!["--model", m, "--data", data, "--t-samples", "0"],
            "--t-samples 0",
        ),
    ];
    for (extra, want) in cases {
        let args = [
            &["eval", "--device", "cpu", "--csv", never.to_str().unwrap()][..],
            &extra,
        ]
        .concat();
        fails_clearly(&args, want);
        assert!(!never.exists(), "{extra:?} wrote its CSV");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without a terminal (stderr is a pipe here) `sample` prints a line every 10 % of the model
/// evaluations instead of its hidden progress bar.
fn sample_without_a_terminal_prints_progress_lines() {
    let dir = scratch("progress");
    let model = dir.join("model");
    let o = train(&model, &["--steps", "1", "--sample-every", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.join("out.png");
    let o = diffwgpu(&[
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--num",
        "4",
        "--batch-size",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "10",
        "--output",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(lines.len(), 10, "{err}");
    assert!(lines[4].starts_with("step 10/20 | 2/4 images | "), "{err}");
    assert!(lines[9].starts_with("step 20/20 | 4/4 images | "), "{err}");
    assert!(lines[9].ends_with(" s"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `diffwgpu bench --json` on `args`: its one JSON object.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec![
        "bench",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--sample-steps",
        "2",
        "--json",
    ];
    all.extend_from_slice(args);
    let o = diffwgpu(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("bench --json prints one JSON object")
}

/// A number of the bench report.
fn number(report: &serde_json::Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {report}"))
}

fn bench_reports_speed_and_flops() {
    let r = bench_json(&["--device", "cpu"]);
    assert_eq!(r["params"], 176_849, "{r}");
    assert_eq!(r["preset"], "tiny", "{r}");
    assert_eq!(r["batch_size"], 2, "{r}");
    for key in [
        "train_ms_per_step",
        "train_ms_min",
        "train_images_per_s",
        "train_tflops",
        "forward_gflop",
        "sample_s",
        "sample_images_per_s",
        "sample_ms_per_eval",
        "sample_tflops",
    ] {
        assert!(number(&r, key) > 0.0, "{key} in {r}");
    }
    for key in ["adapter", "dispatches_per_step", "peak_gpu_bytes"] {
        assert!(r[key].is_null(), "{key} on the CPU in {r}");
    }
    for (extra, want) in [
        (vec!["--preset", "huge"], "unknown preset"),
        (vec!["--sample-steps", "1001"], "--sample-steps 1001"),
    ] {
        let mut args = vec!["bench", "--device", "cpu", "--batch-size", "2"];
        args.extend(extra.iter().copied());
        fails_clearly(&args, want);
    }
}

/// `diffwgpu info` names the adapters and says whether the build has MPI.
fn info_lists_adapters_and_mpi() {
    let o = diffwgpu(&["info"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains("--device auto would use"), "{text}");
    assert!(
        text.contains("MPI: not in this build (cargo build --release --features mpi"),
        "{text}"
    );
}

fn noise_pictures_the_forward_process() {
    let dir = scratch("noise");
    let out = dir.join("noise.png");
    let o = diffwgpu(&[
        "noise",
        "--digit",
        "3",
        "--steps",
        "4",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Two rows (linear, cosine) of x_0 and 4 noisy 32-pixel images.
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (5 * 34 + 2, 2 * 34 + 2));
    let o = diffwgpu(&["noise", "--steps", "0", "--output", out.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("--steps 0"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same commands on the GPU backend (a software adapter in CI).
fn train_and_sample_on_the_gpu(_g: &Gpu) {
    let dir = scratch("gpu");
    let model = dir.join("model");
    let mut args = vec![
        "train",
        "--preset",
        "tiny",
        "--device",
        "gpu",
        "--batch-size",
        "2",
    ];
    args.extend([
        "--steps",
        "2",
        "--num-samples",
        "2",
        "--sample-steps",
        "2",
        "--out",
    ]);
    args.push(model.to_str().unwrap());
    let o = diffwgpu(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("GPU:"), "{}", stderr(&o));
    assert!(model.join("samples/step-000002.png").is_file());
    let out = dir.join("gpu.png");
    let o = diffwgpu(&[
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "gpu",
        "--num",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On the GPU the bench also reports the command stream and the memory of a step.
fn bench_on_the_gpu_counts_dispatches(g: &Gpu) {
    let r = bench_json(&["--device", "gpu"]);
    assert_eq!(r["adapter"], g.adapter_info().name.as_str(), "{r}");
    assert!(number(&r, "dispatches_per_step") > 0.0, "{r}");
    assert!(number(&r, "submits_per_step") <= 2.0, "{r}");
    assert!(number(&r, "dispatches_per_sample_step") > 0.0, "{r}");
    assert!(number(&r, "host_record_ms") > 0.0, "{r}");
    assert!(number(&r, "peak_gpu_bytes") > 0.0, "{r}");
}

/// A folder with one subfolder of 16 x 16 gray images per class: `circle` (a bright disc)
/// and `dark` (all black), 3 images each.
fn class_folder_dataset(root: &Path) {
    for (class, disc) in [("circle", true), ("dark", false)] {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..3u32 {
            let img = image::GrayImage::from_fn(16, 16, |x, y| {
                let (dx, dy) = (x as i32 - 8, y as i32 - 8 + i as i32 - 1);
                image::Luma([if disc && dx * dx + dy * dy < 25 {
                    255
                } else {
                    0
                }])
            });
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// `train --conditional` on a class-folder dataset writes the class names beside the model;
/// `sample --class NAME` draws that class, `--class all` one row per class, guidance 1 and
/// 0 run one model evaluation per step; a resumed conditional run continues; the training
/// grid has a row per class; bad classes are clear errors.
fn conditional_train_and_sample() {
    let dir = scratch("conditional");
    let data = dir.join("shapes");
    class_folder_dataset(&data);
    let out = dir.join("run");
    let o = train(
        &out,
        &[
            "--conditional",
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "3",
            "--stop-at",
            "2",
            "--class-dropout",
            "0.5",
            "--sample-every",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("2 classes"), "{}", stderr(&o));
    let o = diffwgpu(&["train", "--resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("unet/class_labels.json")).unwrap())
            .unwrap();
    assert_eq!(
        labels,
        serde_json::json!({"names": ["circle", "dark"], "null_class": 2})
    );
    let config = std::fs::read_to_string(out.join("unet/config.json")).unwrap();
    assert!(config.contains("\"num_class_embeds\": 3"), "{config}");
    // The training grids: a row per class, of at least 4 images (the first run's 4 samples),
    // or 16 / 2 (the resumed run's default 16): 16 + 2 pixels a tile.
    let grid = image::open(out.join("samples/step-000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (4 * 18 + 2, 2 * 18 + 2));
    let grid = image::open(out.join("samples/step-000003.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (8 * 18 + 2, 2 * 18 + 2));

    let model = out.to_str().unwrap();
    let sample = |name: &str, extra: &[&str]| {
        let png = dir.join(name);
        let mut args = vec![
            "sample",
            "--model",
            model,
            "--device",
            "cpu",
            "--sampler",
            "ddim",
            "--steps",
            "3",
            "--num",
            "2",
            "--output",
        ];
        args.push(png.to_str().unwrap());
        args.extend_from_slice(extra);
        let o = diffwgpu(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        (image::open(&png).unwrap(), stderr(&o))
    };
    let (all, log) = sample("all.png", &[]);
    assert!(log.contains("4 images"), "{log}");
    assert_eq!((all.width(), all.height()), (2 * 18 + 2, 2 * 18 + 2));
    let (by_name, _) = sample("circle.png", &["--class", "circle", "--guidance", "2"]);
    let (by_id, _) = sample("zero.png", &["--class", "0", "--guidance", "2"]);
    assert_eq!(
        by_name.as_bytes(),
        by_id.as_bytes(),
        "class by name and by id differ"
    );
    let (dark, _) = sample("dark.png", &["--class", "dark", "--guidance", "2"]);
    assert_ne!(
        by_name.as_bytes(),
        dark.as_bytes(),
        "the class changes nothing"
    );
    sample("cond.png", &["--class", "dark", "--guidance", "1"]);
    sample("uncond.png", &["--class", "dark", "--guidance", "0"]);

    let sample_args = |extra: &[&'static str]| {
        let mut a = vec![
            "sample", "--model", model, "--device", "cpu", "--steps", "2",
        ];
        a.extend_from_slice(extra);
        a
    };
    fails_clearly(&sample_args(&["--class", "square"]), "circle, dark");
    fails_clearly(&sample_args(&["--class", "2"]), "no such class");
    let plain = dir.join("plain");
    assert!(train(&plain, &["--steps", "1"]).status.success());
    fails_clearly(
        &[
            "sample",
            "--model",
            plain.to_str().unwrap(),
            "--device",
            "cpu",
            "--class",
            "1",
        ],
        "train --conditional",
    );
    // Without class dropout the null row is never trained: no null class, guidance 1 only.
    let no_null = dir.join("no-null");
    let o = train(
        &no_null,
        &[
            "--conditional",
            "--class-dropout",
            "0",
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let labels = std::fs::read_to_string(no_null.join("unet/class_labels.json")).unwrap();
    assert!(labels.contains("\"null_class\": null"), "{labels}");
    let no_null = no_null.to_str().unwrap();
    let png = dir.join("no-null.png");
    let png_path = png.to_str().unwrap();
    let plain_sample = |extra: &[&'static str]| {
        let mut a = vec![
            "sample", "--model", no_null, "--device", "cpu", "--steps", "2",
        ];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--sampler", "ddim", "--num", "1", "--output", png_path]);
        a
    };
    assert!(diffwgpu(&plain_sample(&["--class", "dark"]))
        .status
        .success());
    fails_clearly(&plain_sample(&["--guidance", "2"]), "no null class");
    // A class file that does not fit the model's table.
    let file = out.join("unet/class_labels.json");
    std::fs::write(&file, r#"{"names": ["a", "b", "c"], "null_class": 3}"#).unwrap();
    fails_clearly(&sample_args(&[]), "another model");

    std::fs::create_dir_all(data.join("empty")).unwrap();
    let again = dir.join("again");
    let o = train(&again, &["--conditional", "--data", data.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("empty") && stderr(&o).contains("holds no images"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

tests! {
    cpu: [
        conditional_train_and_sample,
        train_writes_a_pipeline_folder,
        resumed_run_follows_the_same_loss_curve,
        adam_flags_reach_the_optimizer,
        bad_input_gives_clear_errors,
        sample_writes_deterministic_images,
        sample_runs_the_solvers,
        eval_reports_bits_per_dim,
        sample_without_a_terminal_prints_progress_lines,
        bench_reports_speed_and_flops,
        noise_pictures_the_forward_process,
        info_lists_adapters_and_mpi,
    ],
    gpu: [train_and_sample_on_the_gpu, bench_on_the_gpu_counts_dispatches],
}
