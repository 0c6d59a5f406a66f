//! The page in `web/` in a real browser: headless Chromium with WebGPU on SwiftShader (its
//! software adapter runs compute shaders with no GPU), driven through chromedriver. On fixed
//! seeds the page's tiny model must give what the native CPU backend gives: its forward pass,
//! a few training steps, a DDIM trajectory and the downloaded pipeline folder; and the page's
//! own buttons must train, sample and show the samples (a screenshot is saved); without
//! WebGPU, or given a bad folder, it must say what is wrong.
//!
//! The test builds the page with `web/build.sh` (which installs the wasm32 target and the
//! pinned wasm-bindgen-cli if needed). Without `chromium` and `chromedriver` the tests are
//! reported as ignored; with `CI=true` they fail instead (`.ci/run` installs them).

mod common;
#[path = "web/server.rs"]
mod server;
#[path = "web/webdriver.rs"]
mod webdriver;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assert_close, seeded};
use diffwgpu::checkpoint::{load_pipeline_files, named_weights, save_pipeline, SchedulerConfig};
use diffwgpu::data::{Batcher, Dataset, Split};
use diffwgpu::diffusion::{
    inference_timesteps, sample, Denoiser, NoiseStream, Sampler, TimestepSpacing, UNetDenoiser,
};
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::train::{LrSchedule, TrainHyper, TrainState, Trainer};
use diffwgpu::{Backend, Cpu};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{json, Value};
use server::StaticServer;
use webdriver::{base64_decode, Browser};

/// The run both sides make: the tiny preset, its weights from `SEED`, batches of `BATCH`.
const SEED: u64 = 3;
const BATCH: usize = 4;
const TRAIN_STEPS: usize = 3;
/// The forward pass: `FORWARD_N` images of `seeded` values at timestep `FORWARD_T`.
const FORWARD_N: usize = 2;
const FORWARD_T: f64 = 500.0;
/// The trajectory: `DDIM_COUNT` images from the noise of `DDIM_SEED` in `DDIM_STEPS` steps.
const DDIM_STEPS: usize = 10;
const DDIM_SEED: u64 = 7;
const DDIM_COUNT: usize = 2;

/// `web/`, with the page built into `web/pkg/` once for all tests.
fn page() -> &'static Result<PathBuf, String> {
    static PAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PAGE.get_or_init(|| {
        let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
        let out = Command::new("bash")
            .arg(web.join("build.sh"))
            .output()
            .map_err(|e| format!("cannot run web/build.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "web/build.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(web)
    })
}

/// The browser on the page, served from a local server (returned too: it must outlive the
/// browser's requests), with the page's module loaded and its GPU open.
fn open_page() -> Result<(StaticServer, Browser), Failed> {
    let web = page().as_ref().map_err(|e| Failed::from(e.as_str()))?;
    let server = StaticServer::start(web).map_err(|e| format!("cannot serve web/: {e}"))?;
    let browser = Browser::launch()?;
    browser.goto(&server.url("index.html"))?;
    let adapter = browser.execute_async(
        "const done = arguments[arguments.length - 1];
         window.diffwgpu.ready.then(gpu => done(gpu.adapter()), e => done('error: ' + e.message));",
        json!([]),
        Duration::from_secs(60),
    )?;
    let adapter = adapter.as_str().unwrap_or_default().to_string();
    if adapter.starts_with("error") {
        return Err(format!(
            "the page has no GPU ({adapter}); console: {:?}",
            browser.console()
        )
        .into());
    }
    eprintln!("page adapter: {adapter}");
    Ok((server, browser))
}

/// Asserts the page's values `got` (a JSON array) are within `atol + rtol |want|` of the
/// CPU's, and reports the largest difference.
fn compare(name: &str, got: &Value, want: &[f32], atol: f32, rtol: f32) {
    let got = floats(got, name);
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max);
    eprintln!(
        "{name}: largest difference {worst:.3e} over {} values",
        want.len()
    );
    assert_close(name, &got, want, atol, rtol);
}

/// The numbers of a JSON array.
fn floats(v: &Value, what: &str) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
        .collect()
}

/// The page's run, on the browser's GPU: the forward pass and the DDIM trajectory's `x_0` of
/// the initial weights, the training losses, the forward pass of the trained weights, and
/// the pipeline zip.
const PAGE_RUN: &str = r#"
const [seed, batch, steps, x, n, t, ddimSteps, ddimSeed, count, done] = arguments;
(async () => {
    const d = window.diffwgpu;
    const gpu = await d.ready;
    const kernels = await gpu.checkKernels();
    const training = await d.Training.start(gpu, "tiny", seed, batch);
    const initial = await training.model(false);
    const forward = await initial.predict(new Float32Array(x), t, n);
    const sampling = initial.sample("ddim", ddimSteps, ddimSeed, count);
    while (!(await sampling.step())) {}
    const ddim = await sampling.result();
    const started = performance.now();
    const losses = await training.train(steps);
    const msPerStep = (performance.now() - started) / steps;
    const trained = await training.model(false);
    const trainedForward = await trained.predict(new Float32Array(x), t, n);
    const zip = await training.pipelineZip();
    let bytes = "";
    for (let i = 0; i < zip.length; i += 8192) {
        bytes += String.fromCharCode.apply(null, zip.subarray(i, i + 8192));
    }
    done({
        forward: Array.from(forward),
        losses: Array.from(losses),
        ddim: Array.from(ddim),
        trainedForward: Array.from(trainedForward),
        zip: btoa(bytes),
        msPerStep,
        kernels,
    });
})().catch(e => done({ error: String(e && e.message || e) }));
"#;

/// The page's forward pass, training steps, DDIM trajectory and pipeline folder equal the CPU
/// backend's on the same seeds. Measured on SwiftShader: forward 4.1e-6, DDIM x_0 1.9e-4 (ten
/// steps from untrained weights amplify), losses bitwise equal, trained forward 3.1e-6; the
/// tolerances leave room for a hardware adapter's fused multiply-adds.
fn page_matches_the_cpu_backend() -> Result<(), Failed> {
    let (_server, browser) = open_page()?;
    let config = UNet2DConfig::preset("tiny")?;
    let (c, s) = (config.in_channels, config.size());
    let x = seeded(FORWARD_N * c * s * s, 11);
    let started = Instant::now();
    let got = browser.execute_async(
        PAGE_RUN,
        json!([
            SEED,
            BATCH,
            TRAIN_STEPS,
            x,
            FORWARD_N,
            FORWARD_T,
            DDIM_STEPS,
            DDIM_SEED,
            DDIM_COUNT
        ]),
        Duration::from_secs(600),
    )?;
    if let Some(e) = got.get("error") {
        return Err(format!("the page failed: {e}; console: {:?}", browser.console()).into());
    }
    eprintln!(
        "page run: {:.1} s, {:.0} ms per training step",
        started.elapsed().as_secs_f64(),
        got["msPerStep"].as_f64().unwrap_or(f64::NAN)
    );

    // Every kernel compiles in the browser, not only those the tiny run uses.
    let kernels = diffwgpu::ops::gpu_kernels().len();
    assert_eq!(
        got["kernels"].as_u64(),
        Some(kernels as u64),
        "kernels built"
    );

    // The same run on the CPU backend, as web/src/training.rs and web/src/model.rs make it.
    let be: &dyn Backend = &Cpu;
    let dataset = Dataset::embedded_mnist(Split::Train, s, c)?;
    let batcher = Batcher::new(dataset.len, BATCH, SEED, false)?;
    let scheduler = SchedulerConfig::default();
    let model = UNet2D::new(&config)?;
    let state = TrainState::new(be, &model, &model.params.initial_values(SEED))?;
    let hyper = TrainHyper {
        batch_size: BATCH,
        seed: SEED,
        lr_schedule: LrSchedule::Constant,
        class_dropout: 0.0,
        ..TrainHyper::default()
    };
    let mut trainer = Trainer::new(be, model, scheduler.schedule()?, hyper, state)?;

    let params = trainer.state.param_views()?;
    let denoiser = UNetDenoiser {
        model: &trainer.model,
        params: &params,
        classes: None,
    };
    let x = be.upload(&[FORWARD_N, c, s, s], &x)?;
    let forward = be.to_vec(&denoiser.predict(be, &x, &[FORWARD_T; FORWARD_N])?)?;
    compare("forward", &got["forward"], &forward, 5e-5, 1e-4);

    let timesteps = inference_timesteps(1000, DDIM_STEPS, TimestepSpacing::Leading, 0)?;
    let noise = NoiseStream::single(DDIM_SEED, DDIM_COUNT);
    let x_t = noise.initial(be, &[DDIM_COUNT, c, s, s])?;
    let ddim = Sampler::Ddim {
        eta: 0.0,
        clip_sample: scheduler.clip(),
    };
    let schedule = scheduler.schedule()?;
    let x0 = sample(
        be,
        &denoiser,
        &schedule,
        trainer.hyper.prediction_type,
        &ddim,
        &timesteps,
        x_t,
        noise,
        &mut |_| Ok(()),
    )?;
    compare("ddim x_0", &got["ddim"], &be.to_vec(&x0)?, 1e-3, 1e-3);

    let mut losses = Vec::new();
    for k in 0..TRAIN_STEPS as u64 {
        losses.push(trainer.step(&batcher.batch(&dataset, k)?, None)?.loss);
    }
    compare("losses", &got["losses"], &losses, 1e-6, 1e-4);

    let params = trainer.state.param_views()?;
    let denoiser = UNetDenoiser {
        model: &trainer.model,
        params: &params,
        classes: None,
    };
    let trained = be.to_vec(&denoiser.predict(be, &x, &[FORWARD_T; FORWARD_N])?)?;
    compare(
        "trained forward",
        &got["trainedForward"],
        &trained,
        5e-5,
        1e-4,
    );

    let zip = base64_decode(got["zip"].as_str().ok_or("no zip")?)?;
    let folder = load_pipeline_files(&unzip(&zip)?)?;
    assert_eq!(folder.config, config);
    assert_eq!(folder.scheduler, Some(scheduler));
    let ema = trainer.state.to_host(be)?.ema;
    let specs = &trainer.model.params.specs;
    for (spec, want) in specs.iter().zip(&ema) {
        let got = folder.weights.iter().find(|t| t.name == spec.name);
        let got = got.ok_or_else(|| format!("the zip has no {}", spec.name))?;
        assert_eq!(got.shape, spec.shape, "{}", spec.name);
        assert_close(&spec.name, &got.data, want, 1e-5, 1e-4);
    }
    Ok(())
}

/// Polls until the JavaScript expression `condition` is true on the page, failing early when
/// the page shows an error (with its text and the console).
fn wait_for(browser: &Browser, condition: &str, timeout: Duration) -> Result<(), Failed> {
    let script = format!(
        "const done = arguments[arguments.length - 1];
         const poll = () => {{
             if (document.body.dataset.state === 'error') {{
                 done('error: ' + document.getElementById('error').textContent);
             }} else if ({condition}) {{
                 done('ok');
             }} else {{
                 setTimeout(poll, 100);
             }}
         }};
         poll();"
    );
    let outcome = browser.execute_async(&script, json!([]), timeout);
    match outcome {
        Ok(v) if v == "ok" => Ok(()),
        Ok(v) => Err(format!(
            "waiting for {condition}: {v}; console: {:?}",
            browser.console()
        )
        .into()),
        Err(e) => Err(format!(
            "waiting for {condition}: {e}; console: {:?}",
            browser.console()
        )
        .into()),
    }
}

/// Sets the inputs and selects of `values` (`[id, value]` pairs) one after another, as a
/// user would (a select's change may reset another input).
fn fill(browser: &Browser, values: Value) -> Result<(), Failed> {
    browser.execute(
        "for (const [id, value] of arguments[0]) {
             const input = document.getElementById(id);
             input.value = value;
             input.dispatchEvent(new Event('change'));
         }",
        json!([values]),
    )?;
    Ok(())
}

fn click(browser: &Browser, id: &str) -> Result<(), Failed> {
    let clicked = browser.execute(
        "const button = document.getElementById(arguments[0]);
         if (button.disabled) { return false; }
         button.click();
         return true;",
        json!([id]),
    )?;
    if clicked != true {
        return Err(format!("#{id} is disabled").into());
    }
    Ok(())
}

/// Fails unless the canvas `id` shows a picture: at least a tenth of its pixels differ from
/// its first.
fn assert_drawn(browser: &Browser, id: &str) -> Result<(), Failed> {
    let counts = browser.execute(
        "const canvas = document.getElementById(arguments[0]);
         const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
         let differ = 0;
         for (let i = 0; i < data.length; i += 4) {
             if (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2]) {
                 differ += 1;
             }
         }
         return [differ, data.length / 4];",
        json!([id]),
    )?;
    let (differ, pixels) = (counts[0].as_u64(), counts[1].as_u64());
    match (differ, pixels) {
        (Some(d), Some(p)) if d * 10 > p => Ok(()),
        _ => Err(format!("#{id} is blank: {counts} (pixels that differ, pixels)").into()),
    }
}

/// Sets the Sample section's `settings` (as [`fill`] takes them), presses Sample and waits
/// until the samples are drawn.
fn sample_on_page(browser: &Browser, settings: Value, timeout: Duration) -> Result<(), Failed> {
    fill(browser, settings)?;
    click(browser, "sample-run")?;
    wait_for(
        browser,
        "document.body.dataset.state === 'sampled'",
        timeout,
    )?;
    assert_drawn(browser, "xt-canvas")
}

/// The page's own controls: Start trains (the step counter climbs), Stop ends the run with a
/// grid of samples, "Use this model for sampling" hands the weights to the Sample section,
/// whose DDIM run draws its images and offers the PNG; a pipeline folder chosen in the file
/// picker samples by DDPM. A screenshot of the whole page at the end is saved as
/// `web-page.png` in Cargo's test temporary directory.
fn page_buttons_train_and_sample() -> Result<(), Failed> {
    let (_server, browser) = open_page()?;
    fill(
        &browser,
        json!([
            ["preset", "tiny"],
            ["seed", "1"],
            ["batch", "2"],
            ["sample-every", "1000"],
            ["grid-steps", "2"]
        ]),
    )?;
    click(&browser, "train-start")?;
    let minutes = Duration::from_secs(300);
    wait_for(
        &browser,
        "document.body.dataset.state === 'training'",
        minutes,
    )?;
    wait_for(
        &browser,
        "Number(document.getElementById('step-count').textContent) >= 2",
        minutes,
    )?;
    click(&browser, "train-stop")?;
    wait_for(&browser, "document.body.dataset.state === 'idle'", minutes)?;
    assert_drawn(&browser, "grid-canvas")?;

    click(&browser, "use-for-sampling")?;
    wait_for(
        &browser,
        "!document.getElementById('sample-run').disabled",
        minutes,
    )?;
    sample_on_page(
        &browser,
        json!([
            ["sampler", "ddim"],
            ["sample-steps", "3"],
            ["sample-seed", "5"],
            ["sample-count", "4"]
        ]),
        minutes,
    )?;
    assert_drawn(&browser, "x0-canvas")?;
    let page = browser.execute(
        "const text = (id) => document.getElementById(id).textContent;
         return {
             png: !document.getElementById('download-png').disabled,
             progress: text('sample-step'),
             model: text('model-info'),
             steps: text('step-count'),
         };",
        json!([]),
    )?;
    eprintln!("page after sampling: {page}");
    assert_eq!(
        page["png"], true,
        "Download PNG stays disabled after sampling"
    );
    let progress = page["progress"].as_str().unwrap_or_default();
    assert!(
        progress.starts_with("step 3 of 3"),
        "progress line: {progress}"
    );

    // A pipeline folder the native side wrote, chosen in the file picker, samples too.
    let folder = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-folder");
    let _ = std::fs::remove_dir_all(&folder);
    let run = folder.join("picked");
    let config = UNet2DConfig::preset("tiny")?;
    let model = UNet2D::new(&config)?;
    let weights = named_weights(&model, model.params.initial_values(SEED));
    save_pipeline(&run, &config, &weights, &SchedulerConfig::default())?;
    browser.choose_files("#folder-input", &run)?;
    wait_for(
        &browser,
        "document.getElementById('model-info').textContent.startsWith('picked: ')",
        minutes,
    )?;
    sample_on_page(
        &browser,
        json!([["sampler", "ddpm"], ["sample-steps", "2"]]),
        minutes,
    )?;

    let height = browser.execute("return document.documentElement.scrollHeight;", json!([]))?;
    // The window is the viewport plus what the browser draws around it.
    browser.resize(1280, height.as_u64().unwrap_or(1024) as u32 + 200)?;
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-page.png");
    std::fs::write(&shot, browser.screenshot_png()?)
        .map_err(|e| format!("{}: {e}", shot.display()))?;
    eprintln!("screenshot: {}", shot.display());
    Ok(())
}

/// In a browser without WebGPU the page says so, with what to do, and leaves every control
/// that needs the GPU disabled.
fn page_without_webgpu_says_why() -> Result<(), Failed> {
    let web = page().as_ref().map_err(|e| Failed::from(e.as_str()))?;
    let server = StaticServer::start(web).map_err(|e| format!("cannot serve web/: {e}"))?;
    let browser = Browser::launch()?;
    browser.before_each_page(
        "Object.defineProperty(Navigator.prototype, 'gpu', { get: () => undefined });",
    )?;
    browser.goto(&server.url("index.html"))?;
    wait_for_state_error(&browser)?;
    let page = browser.execute(
        "return {
             status: document.getElementById('status').textContent,
             start: document.getElementById('train-start').disabled,
             picker: document.getElementById('folder-input').disabled,
         };",
        json!([]),
    )?;
    let status = page["status"].as_str().unwrap_or_default();
    for want in [
        "no WebGPU",
        "navigator.gpu is undefined",
        "--enable-unsafe-webgpu",
    ] {
        assert!(status.contains(want), "status without {want:?}: {status}");
    }
    assert_eq!(page["start"], true, "Start is enabled without a GPU");
    assert_eq!(
        page["picker"], true,
        "the folder picker is enabled without a GPU"
    );
    Ok(())
}

/// Waits until the page is in its error state (and fails if it becomes idle instead).
fn wait_for_state_error(browser: &Browser) -> Result<(), Failed> {
    let state = browser.execute_async(
        "const done = arguments[arguments.length - 1];
         const poll = () => {
             const state = document.body.dataset.state;
             if (state === 'error' || state === 'idle') { done(state); } else { setTimeout(poll, 100); }
         };
         poll();",
        json!([]),
        Duration::from_secs(60),
    )?;
    match state.as_str() {
        Some("error") => Ok(()),
        _ => Err(format!("the page without WebGPU ended {state}, not in its error state").into()),
    }
}

/// A folder that is no pipeline, and a pipeline whose weights file is cut short, each get an
/// error on the page that names the problem, and the page stays usable.
fn page_refuses_bad_folders() -> Result<(), Failed> {
    let (_server, browser) = open_page()?;
    let folder = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-bad-folders");
    let _ = std::fs::remove_dir_all(&folder);
    let notes = folder.join("notes");
    std::fs::create_dir_all(&notes).map_err(|e| e.to_string())?;
    std::fs::write(notes.join("readme.txt"), "not a model").map_err(|e| e.to_string())?;
    browser.choose_files("#folder-input", &notes)?;
    wait_for_error(
        &browser,
        "none of the 1 files given belongs to a pipeline folder",
    )?;

    let cut = folder.join("cut");
    let config = UNet2DConfig::preset("tiny")?;
    let model = UNet2D::new(&config)?;
    let weights = named_weights(&model, model.params.initial_values(SEED));
    save_pipeline(&cut, &config, &weights, &SchedulerConfig::default())?;
    let file = cut.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).map_err(|e| e.to_string())?;
    std::fs::write(&file, &bytes[..bytes.len() / 2]).map_err(|e| e.to_string())?;
    browser.choose_files("#folder-input", &cut)?;
    wait_for_error(&browser, "cut/unet/diffusion_pytorch_model.safetensors")?;
    let ready = browser.execute(
        "return !document.getElementById('folder-input').disabled
             && !document.getElementById('train-start').disabled;",
        json!([]),
    )?;
    assert_eq!(
        ready, true,
        "the page's controls stay disabled after a bad folder"
    );
    Ok(())
}

/// Waits until the page's error box says `want`; fails with what it says otherwise.
fn wait_for_error(browser: &Browser, want: &str) -> Result<(), Failed> {
    let said = browser.execute_async(
        "const [want, done] = arguments;
         const box = document.getElementById('error');
         const started = performance.now();
         const poll = () => {
             if (box.textContent.includes(want) || performance.now() - started > 30000) {
                 done(box.textContent);
             } else {
                 setTimeout(poll, 100);
             }
         };
         poll();",
        json!([want]),
        Duration::from_secs(60),
    )?;
    let said = said.as_str().unwrap_or_default();
    if said.contains(want) {
        eprintln!("the page says: {said}");
        Ok(())
    } else {
        Err(format!("the page's error box says {said:?}, not {want:?}").into())
    }
}

/// The files of a zip archive of stored (uncompressed) files, each checked against its CRC.
fn unzip(zip: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let u16_at = |i: usize| u16::from_le_bytes([zip[i], zip[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(zip[i..i + 4].try_into().unwrap());
    let mut files = BTreeMap::new();
    let mut at = 0;
    while at + 30 <= zip.len() && u32_at(at) == 0x0403_4b50 {
        if u16_at(at + 8) != 0 {
            return Err("a zip entry is compressed; the page stores its files".into());
        }
        let (crc, size) = (u32_at(at + 14), u32_at(at + 22) as usize);
        let (name_len, extra_len) = (u16_at(at + 26), u16_at(at + 28));
        let name = String::from_utf8(zip[at + 30..at + 30 + name_len].to_vec())
            .map_err(|_| "a zip entry's name is not UTF-8")?;
        let start = at + 30 + name_len + extra_len;
        let data = zip[start..start + size].to_vec();
        let mut check = flate2::Crc::new();
        check.update(&data);
        if check.sum() != crc {
            return Err(format!("{name}: CRC mismatch"));
        }
        files.insert(name, data);
        at = start + size;
    }
    if u32_at(at) != 0x0201_4b50 {
        return Err("the zip's central directory does not follow its files".into());
    }
    Ok(files)
}

/// Whether Chromium and chromedriver are installed where [`Browser::launch`] looks.
fn browser_found() -> bool {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
    };
    Path::new("/usr/bin/chromium").is_file() && on_path("chromedriver")
}

type WebTest = fn() -> Result<(), Failed>;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let tests: [(&str, WebTest); 4] = [
        ("page_matches_the_cpu_backend", page_matches_the_cpu_backend),
        (
            "page_buttons_train_and_sample",
            page_buttons_train_and_sample,
        ),
        ("page_without_webgpu_says_why", page_without_webgpu_says_why),
        ("page_refuses_bad_folders", page_refuses_bad_folders),
    ];
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let found = browser_found();
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            Trial::test(name, move || {
                if !found {
                    return Err("chromium or chromedriver not found: install them \
                                (apt-get install chromium chromium-driver)"
                        .into());
                }
                f()
            })
            .with_ignored_flag(!found && !in_ci)
        })
        .collect();
    if !found && !in_ci {
        eprintln!("chromium or chromedriver not found: the browser tests are ignored");
    }
    libtest_mimic::run(&args, trials).exit_code()
}
