//! The `diffwgpu` binary end to end: a short training run writes a complete pipeline folder,
//! a resumed run continues exactly, and bad input gives a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

fn losses(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("train_log.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(2).collect::<Vec<_>>().join(","))
        .collect()
}

#[test]
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

#[test]
fn resumed_run_follows_the_same_loss_curve() {
    let straight = scratch("straight");
    let o = train(&straight, &["--steps", "6", "--sample-every", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let parted = scratch("parted");
    let o = train(
        &parted,
        &["--steps", "6", "--sample-every", "0", "--stop-at", "3"],
    );
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
#[test]
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
    ];
    for (extra, want) in cases {
        let mut args = vec!["train", "--device", "cpu", "--steps", "1", "--out"];
        args.push(out.to_str().unwrap());
        args.extend(extra.iter().copied());
        let o = diffwgpu(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(!err.contains("panicked"), "{extra:?} panicked: {err}");
        assert!(
            err.contains(want),
            "{extra:?}: {err:?} does not mention {want:?}"
        );
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
