//! `mpirun -np 2 diffwgpu train` end to end: two ranks of half the batch reproduce one
//! process, a resumed two-rank run continues the uninterrupted one exactly, two ranks on the
//! GPU backend follow the CPU's, and a failing or killed rank ends the job with a clear
//! message and leaves a checkpoint that loads and resumes.
//!
//! The tests build the binary with the `mpi` feature themselves (in their own target folder,
//! so the default build is untouched). Without `mpirun` on the PATH they are reported as
//! ignored; with `CI=true` they fail instead (`.ci/run` installs Open MPI).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assert_close, read_tensors};
use diffwgpu::checkpoint::{TrainingState, TRAINING_STATE_FILE};
use libtest_mimic::{Arguments, Failed, Trial};

/// The `mpi`-featured binary, built once for all tests.
fn binary() -> &'static Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mpi-build");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "--features",
                "mpi",
                "--bin",
                "diffwgpu",
                "--target-dir",
            ])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build --features mpi failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(target.join("debug").join("diffwgpu"))
    })
}

/// Runs the `mpi` build, under `mpirun -np ranks` if `ranks > 0`, or alone.
fn run(ranks: usize, args: &[&str]) -> Output {
    command(ranks, args).output().expect("the binary runs")
}

fn command(ranks: usize, args: &[&str]) -> Command {
    let bin = binary().as_ref().expect("the mpi build");
    let mut c = match ranks {
        0 => Command::new(bin),
        n => {
            let mut c = Command::new("mpirun");
            c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
                .arg(n.to_string())
                .arg(bin);
            c
        }
    };
    // Shared-memory transport without cross-process memory attach, which containers forbid.
    c.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .args(args);
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffwgpu-mpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny conditional run (on the CPU unless `extra` names a device) with a global batch of
/// 8. AdamW's epsilon is 1e-3: two runs' gradients differ by rounding, and a tiny epsilon
/// turns the rounding noise of an element whose exact gradient is zero (the attention's key
/// bias) into a step of +-lr.
fn train(ranks: usize, out: &Path, extra: &[&str]) -> Output {
    let mut args = tiny_train(
        out,
        "--conditional --batch-size 8 --lr 1e-3 --lr-warmup 0 --adam-epsilon 1e-3 \
         --sample-every 0 --num-samples 4 --sample-steps 2",
    );
    args.extend_from_slice(extra);
    if !extra.contains(&"--device") {
        args.extend(["--device", "cpu"]);
    }
    let o = run(ranks, &args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    o
}

/// `train --preset tiny --out OUT` and the space-separated `options`.
fn tiny_train<'a>(out: &'a Path, options: &'a str) -> Vec<&'a str> {
    let mut args = vec!["train", "--preset", "tiny", "--out", out.to_str().unwrap()];
    args.extend(options.split_whitespace());
    args
}

/// The log's columns `step, loss, lr, grad_norm` as numbers (the speed column dropped).
fn log(dir: &Path) -> Vec<[f32; 4]> {
    std::fs::read_to_string(dir.join("train_log.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let v: Vec<f32> = l.split(',').map(|x| x.parse().unwrap()).collect();
            [v[0], v[1], v[2], v[3]]
        })
        .collect()
}

fn state(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    read_tensors(&dir.join(TRAINING_STATE_FILE))
}

/// Two training states within tolerance: the weights and EMA weights within `atol`, the
/// AdamW moments within 1e-4 relative plus 1e-5 of the largest moment of their kind (an
/// element whose exact gradient is zero, such as the attention's key bias, has moments of
/// pure rounding noise, different for each order of the sums).
fn assert_states_close(got: &Path, want: &Path, atol: f32) {
    let (got, want) = (state(got), state(want));
    assert_eq!(got.len(), want.len());
    let largest = |kind: &str| {
        want.iter()
            .filter(|(name, _)| name.starts_with(kind))
            .flat_map(|(_, (_, v))| v)
            .fold(0f32, |m, v| m.max(v.abs()))
    };
    for (name, (shape, w)) in &want {
        let (gshape, g) = &got[name];
        assert_eq!(gshape, shape, "{name}");
        match name.split('.').next().filter(|k| k.starts_with("adam")) {
            Some(kind) => assert_close(name, g, w, 1e-5 * largest(kind), 1e-4),
            None => assert_close(name, g, w, atol, 0.0),
        }
    }
}

/// Two ranks of 4 against one process of 8, six steps: the same loss and gradient norm at
/// every step (1e-5 relative) and the same weights, EMA weights (2e-6) and moments after.
fn two_ranks_reproduce_one_process() -> Result<(), Failed> {
    let dir = scratch("reproduce");
    let (one, two) = (dir.join("one"), dir.join("two"));
    train(0, &one, &["--steps", "6"]);
    let o = train(2, &two, &["--steps", "6"]);
    let err = stderr(&o);
    for want in [
        "rank 0 of 2",
        "rank 1 of 2",
        "data-parallel: 2 ranks of batch 4",
    ] {
        assert!(err.contains(want), "no {want:?} in {err}");
    }
    let (a, b) = (log(&two), log(&one));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_close("step, loss, lr, grad norm", x, y, 0.0, 1e-5);
    }
    assert_states_close(&two, &one, 2e-6);
    Ok(())
}

/// A two-rank run stopped at step 3 and resumed with two ranks ends where the uninterrupted
/// two-rank run does, to the bit; resumed by one process instead, within float tolerance.
fn resumed_runs_continue_exactly() -> Result<(), Failed> {
    let dir = scratch("resume");
    let (whole, parts, alone) = (dir.join("whole"), dir.join("parts"), dir.join("alone"));
    train(2, &whole, &["--steps", "6"]);
    train(2, &parts, &["--steps", "6", "--stop-at", "3"]);
    std::fs::create_dir_all(&alone).unwrap();
    for f in [
        "training_state.safetensors",
        "train_config.json",
        "train_log.csv",
    ] {
        std::fs::copy(parts.join(f), alone.join(f)).unwrap();
    }
    for (ranks, dir) in [(2, &parts), (0, &alone)] {
        let o = run(ranks, &["train", "--resume", dir.to_str().unwrap()]);
        assert!(o.status.success(), "resume failed: {}", stderr(&o));
    }
    assert_eq!(log(&parts), log(&whole));
    assert!(
        state(&parts) == state(&whole),
        "the resumed two-rank run's state differs from the uninterrupted run's"
    );
    assert_states_close(&alone, &whole, 2e-6);
    Ok(())
}

/// Two ranks on the GPU backend (each takes an adapter by its local rank; with one adapter
/// both share it) follow the two-rank CPU run: the same loss and gradient norm within 1e-4
/// relative, the tolerance of the single-process GPU-versus-CPU training tests.
fn two_ranks_train_on_the_gpu() -> Result<(), Failed> {
    let dir = scratch("gpu");
    let (cpu, gpu) = (dir.join("cpu"), dir.join("gpu"));
    train(2, &cpu, &["--steps", "2"]);
    let o = train(2, &gpu, &["--steps", "2", "--device", "gpu"]);
    let err = stderr(&o);
    for rank in 0..2 {
        let want = format!("(--device gpu; local rank {rank} of 2 takes adapter ");
        assert!(err.contains(&want), "no {want:?} in {err}");
    }
    for (x, y) in log(&gpu).iter().zip(&log(&cpu)) {
        assert_close("step, loss, lr, grad norm", x, y, 0.0, 1e-4);
    }
    Ok(())
}

/// A batch that does not split over the ranks ends the job with the rank's error.
fn uneven_batch_ends_the_job_clearly() -> Result<(), Failed> {
    let dir = scratch("uneven");
    let o = run(2, &tiny_train(&dir, "--device cpu --batch-size 7"));
    let err = stderr(&o);
    assert!(!o.status.success(), "an uneven batch trained");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("of 2 on") && err.contains("a batch of 7 does not split into 2 equal slices"),
        "{err}"
    );
    Ok(())
}

/// The default build (without MPI) started by `mpirun -np 2` refuses to train rather than
/// run two unrelated trainings into one folder.
fn build_without_mpi_refuses_mpirun() -> Result<(), Failed> {
    let dir = scratch("no-mpi");
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_diffwgpu"))
        .args(tiny_train(&dir, "--device cpu --batch-size 2 --steps 1"))
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "the build without MPI trained under mpirun"
    );
    assert!(
        err.contains("started as one of 2 MPI processes, but this diffwgpu was built without MPI"),
        "{err}"
    );
    assert!(!dir.join("train_log.csv").exists(), "it trained anyway");
    Ok(())
}

/// The processes whose command line mentions `marker`.
fn pids_with(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let line = String::from_utf8_lossy(&c).replace('\0', " ");
                line.contains(marker) && !line.starts_with("mpirun")
            })
        })
        .collect()
}

/// A rank killed mid-run ends the job with a non-zero exit and mpirun's account of it; the
/// folder keeps its last checkpoint, which resumes.
fn killed_rank_ends_the_job() -> Result<(), Failed> {
    let dir = scratch("killed");
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    let options = "--device cpu --batch-size 8 --steps 100000 --sample-every 0 \
                   --checkpoint-every 2";
    let job = command(2, &tiny_train(&out, options))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join(TRAINING_STATE_FILE).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ranks: Vec<u32> = pids_with(out_s)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "diffwgpu")
        })
        .collect();
    assert_eq!(ranks.len(), 2, "ranks found: {ranks:?}");
    // The shell's own `kill`: no procps needed.
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -9 {}", ranks[1])])
        .status();
    assert!(kill.unwrap().success());
    let o = job.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "the job went on after a rank died");
    assert!(err.contains("signal 9"), "{err}");
    let saved = TrainingState::load(&out.join(TRAINING_STATE_FILE)).unwrap();
    let more = (saved.step + 2).to_string();
    let o = run(2, &["train", "--resume", out_s, "--steps", &more]);
    assert!(o.status.success(), "resume failed: {}", stderr(&o));
    assert_eq!(log(&out).last().unwrap()[0], (saved.step + 2) as f32);
    Ok(())
}

/// `diffwgpu info` under mpirun: every rank says where it is in the job.
fn info_reports_the_rank_layout() -> Result<(), Failed> {
    let o = run(2, &["info"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    for rank in 0..2 {
        let want = format!("MPI: rank {rank} of 2 on ");
        assert!(text.contains(&want), "no {want:?} in {text}");
    }
    let o = run(0, &["info"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("MPI: in this build; not started by mpirun"),
        "{text}"
    );
    Ok(())
}

fn mpirun_found() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

type MpiTest = fn() -> Result<(), Failed>;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    macro_rules! named {
        ($($f:ident),*) => { [$((stringify!($f), $f as MpiTest)),*] };
    }
    let tests = named![
        two_ranks_reproduce_one_process,
        two_ranks_train_on_the_gpu,
        resumed_runs_continue_exactly,
        uneven_batch_ends_the_job_clearly,
        killed_rank_ends_the_job,
        info_reports_the_rank_layout,
        build_without_mpi_refuses_mpirun
    ];
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let found = mpirun_found();
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            Trial::test(name, move || {
                if !found {
                    return Err("mpirun not found: install Open MPI (openmpi-bin, \
                                libopenmpi-dev, libclang-dev)"
                        .into());
                }
                binary().as_ref().map_err(|e| Failed::from(e.as_str()))?;
                f()
            })
            .with_ignored_flag(!found && !in_ci)
        })
        .collect();
    if !found && !in_ci {
        eprintln!("mpirun not found: the MPI tests are ignored (install Open MPI to run them)");
    }
    libtest_mimic::run(&args, trials).exit_code()
}
