//! The test harness of every test binary that has GPU tests (`harness = false` in Cargo.toml).
//!
//! It behaves and prints like libtest (filters, `--test-threads`, `--list`), with one
//! difference that matters: a GPU test on a machine without an adapter is reported as
//! *ignored*, with the reason on its line and in a note under the summary — never as a pass.
//! With `CI=true` a missing adapter fails every GPU test instead.
//!
//! A test binary ends with
//! ```ignore
//! tests! {
//!     cpu: [gradients_match_finite_differences, bad_input_is_an_error_on_cpu],
//!     gpu: [forward_and_backward_match_cpu],
//! }
//! ```
//! where CPU tests are `fn()` and GPU tests `fn(&Gpu)`, handed the shared adapter.

use std::process::ExitCode;
use std::sync::OnceLock;

use diffwgpu::Gpu;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

pub type CpuTest = (&'static str, fn());
pub type GpuTest = (&'static str, fn(&'static Gpu));

/// The adapter every GPU test of the binary shares, or why there is none.
fn adapter() -> &'static Result<Gpu, String> {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new().map_err(|e| e.to_string()))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Runs the binary's tests and returns its exit code.
pub fn run(cpu: &[CpuTest], gpu: &[GpuTest]) -> ExitCode {
    let args = Arguments::from_args();
    let mut trials: Vec<Trial> = cpu
        .iter()
        .map(|&(name, f)| {
            Trial::test(name, move || {
                f();
                Ok(())
            })
        })
        .collect();
    let selected = gpu
        .iter()
        .filter(|&&(name, _)| !args.is_filtered_out(&gpu_trial(name, || Ok(Completion::Completed))))
        .count();
    let missing = if args.list || selected == 0 {
        None
    } else {
        match adapter() {
            Ok(g) => {
                eprintln!("GPU tests run on {}", diffwgpu::Backend::name(g));
                None
            }
            Err(e) if in_ci() => {
                eprintln!("CI=true and no GPU adapter ({e}): the GPU tests fail");
                None
            }
            Err(e) => Some(e),
        }
    };
    trials.extend(gpu.iter().map(|&(name, f)| {
        gpu_trial(name, move || match adapter() {
            Ok(g) => {
                f(g);
                Ok(Completion::Completed)
            }
            Err(e) if in_ci() => Err(Failed::from(format!("CI=true and no GPU adapter: {e}"))),
            Err(_) => Ok(Completion::ignored_with("no GPU adapter")),
        })
    }));
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(reason) = missing {
        let tests = if selected == 1 { "test" } else { "tests" };
        eprintln!(
            "note: {selected} GPU {tests} of this binary skipped, counted as ignored: {reason}. \
             CI=true turns a missing adapter into a failure."
        );
    }
    conclusion.exit_code()
}

fn gpu_trial(
    name: &str,
    runner: impl FnOnce() -> Result<Completion, Failed> + Send + 'static,
) -> Trial {
    Trial::ignorable_test(name, runner).with_kind("gpu")
}

/// Declares `main` of a test binary from its CPU and GPU test functions.
#[macro_export]
macro_rules! tests {
    (cpu: [$($c:ident),* $(,)?], gpu: [$($g:ident),* $(,)?] $(,)?) => {
        fn main() -> std::process::ExitCode {
            common::harness::run(
                &[$((stringify!($c), $c as fn())),*],
                &[$((stringify!($g), $g as fn(&'static diffwgpu::Gpu))),*],
            )
        }
    };
}
