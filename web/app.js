// diffwgpu in the browser: trains a preset U-Net on the digits built into the WebAssembly
// module and samples from it, or from a pipeline folder the user loads, on WebGPU.
//
// Two rules shape this file. The module's calls on one object must not overlap, so every
// call on a training run goes through that run's Queue (sampling runs one step after
// another anyway). And a page must not block, so training and sampling run in small pieces
// that give the browser back control in between: the page repaints and Stop is heard.

import init, { openGpu, Training, Model } from "./pkg/diffwgpu_web.js";

/** Images in each grid drawn while training. */
const GRID_IMAGES = 16;
/** The loss curve's second line is the mean of the losses of this many steps. */
const MEAN_WINDOW = 50;
/** Seconds of training per call to `train`: short enough for a live curve and a quick Stop. */
const CHUNK_SECONDS = 0.25;
/** The most steps per call to `train`, whatever the GPU's speed. */
const MAX_CHUNK = 100;
/** Pictures are zoomed by the largest whole number that keeps them this wide (CSS pixels). */
const PICTURE_WIDTH = 320;
/** Sampling draws x_t and the predicted x_0 about this many times, at most once a step. */
const SAMPLING_VIEWS = 50;

const $ = (id) => document.getElementById(id);

/** What the page holds and is doing; `refreshControls` derives the buttons from it. */
const page = {
  gpu: null, // the Gpu, once WebGPU gave one
  run: null, // the training run (see `newRun`)
  training: false, // a training loop is running (or a run is starting)
  stopRequested: false, // Stop was pressed; the loop ends after its current chunk
  zipping: false, // a pipeline download is being prepared
  model: null, // the Model the Sample section samples from
  sampling: false, // a reverse process is running
  png: null, // { bytes, seed } of the last samples
};

/** Runs the calls given to it one after another: each starts when the previous has ended. */
class Queue {
  #last = Promise.resolve();

  /** `call()`'s result, once the calls queued before it have finished. */
  run(call) {
    const result = this.#last.then(call);
    this.#last = result.catch(() => {});
    return result;
  }
}

/** WebGPU is missing or gave no adapter; the message says why. */
class NoWebGpu extends Error {}

// ---- Starting up

/** Loads the module and opens the GPU; resolves to the Gpu. */
async function start() {
  try {
    await init();
  } catch (error) {
    throw new Error(`the WebAssembly module did not load: ${messageOf(error)}`);
  }
  if (navigator.gpu === undefined) {
    throw new NoWebGpu("navigator.gpu is undefined");
  }
  try {
    return await openGpu();
  } catch (error) {
    throw new NoWebGpu(messageOf(error));
  }
}

/** The page's state for whoever watches it: loading, idle, training, sampling, sampled, error. */
function setState(state) {
  document.body.dataset.state = state;
}

/** Says which adapter the page got, and enables what needs it. */
function showGpu(gpu) {
  page.gpu = gpu;
  window.diffwgpu.gpu = gpu;
  $("status").textContent = `WebGPU adapter: ${gpu.adapter()}`;
  setState("idle");
  refreshControls();
}

/** Says that the page cannot run here, and why; everything that needs the GPU stays disabled. */
function showStartFailure(error) {
  const status = $("status");
  status.classList.add("warning");
  if (error instanceof NoWebGpu) {
    status.innerHTML = `
      <strong>This browser gives the page no WebGPU</strong> (<span class="reason"></span>).
      Use a recent Chrome or Edge, or Firefox or Safari with WebGPU turned on. For Chromium
      on Linux, start it with <code>--enable-unsafe-webgpu</code> (and
      <code>--enable-features=Vulkan</code>). WebGPU also needs a secure context: open the
      page from <code>localhost</code> or over HTTPS.`;
    status.querySelector(".reason").textContent = error.message;
  } else {
    status.textContent = `The page could not start: ${messageOf(error)}`;
  }
  setState("error");
}

// ---- Errors

/** An error's message, whatever was thrown. */
function messageOf(error) {
  return error instanceof Error ? error.message : String(error);
}

function showError(error) {
  console.error(error);
  const box = $("error");
  box.textContent = messageOf(error);
  box.hidden = false;
  setState("error");
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

/** `action` as an event handler: its errors are shown on the page, and the controls are
 * brought up to date when it ends, however it ends. */
function handler(action) {
  return async (event) => {
    clearError();
    try {
      await action(event);
    } catch (error) {
      showError(error);
    } finally {
      refreshControls();
    }
  };
}

/** Enables exactly the controls that make sense now. */
function refreshControls() {
  const { gpu, run, training, sampling, model } = page;
  $("train-settings").disabled = training;
  $("train-start").disabled = !gpu || training || sampling;
  $("train-stop").disabled = !training || page.stopRequested;
  $("train-continue").disabled = !run || training || sampling;
  $("download-zip").disabled = !run || page.zipping;
  $("use-for-sampling").disabled = !run || sampling;
  $("folder-input").disabled = !gpu || sampling;
  $("drop-zone").classList.toggle("disabled", !gpu || sampling);
  $("sample-settings").disabled = sampling;
  $("sample-run").disabled = !model || training || sampling;
  $("sample-run").title = model && training ? "Stop training first: both need the GPU." : "";
  $("download-png").disabled = !page.png;
}

// ---- Reading the controls

/** The whole number in the input `id`, which must lie within the input's min and max. */
function readInt(id) {
  const input = $(id);
  const value = Number(input.value);
  const [min, max] = [Number(input.min), Number(input.max)];
  if (input.value.trim() === "" || !Number.isInteger(value) || value < min || value > max) {
    const name = input.labels[0].firstChild.textContent.trim();
    throw new Error(`${name}: give a whole number from ${min} to ${max}.`);
  }
  return value;
}

// ---- Drawing

/** Draws `picture` into `canvas` pixel for pixel; CSS zooms it by a whole number, sharply. */
function drawPicture(canvas, picture) {
  const [width, height] = [picture.width(), picture.height()];
  const rgba = picture.rgba();
  canvas.width = width;
  canvas.height = height;
  const pixels = new Uint8ClampedArray(rgba.buffer, rgba.byteOffset, rgba.byteLength);
  canvas.getContext("2d").putImageData(new ImageData(pixels, width, height), 0, 0);
  canvas.style.width = `${width * Math.max(1, Math.floor(PICTURE_WIDTH / width))}px`;
  canvas.classList.add("drawn");
}

/** Draws each picture into its canvas, then frees the pictures (they live in WebAssembly). */
function drawPictures(canvases, pictures) {
  try {
    canvases.forEach((canvas, i) => drawPicture(canvas, pictures[i]));
  } finally {
    pictures.forEach((picture) => picture.free());
  }
}

/** The chart's colours, from the style sheet (they follow the light or dark theme). */
function chartColors() {
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  return {
    grid: color("--chart-grid"),
    text: color("--muted"),
    loss: color("--chart-loss"),
    mean: color("--accent"),
  };
}

/** A round step between ticks (1, 2 or 5 times a power of ten) near `rough`. */
function niceStep(rough) {
  const power = 10 ** Math.floor(Math.log10(rough));
  const multiple = [1, 2, 5, 10].find((m) => m * power >= rough);
  return multiple * power;
}

/** The losses' mean over the last `MEAN_WINDOW` steps, for each step. */
function movingMean(losses) {
  let sum = 0;
  return losses.map((loss, i) => {
    sum += loss - (i >= MEAN_WINDOW ? losses[i - MEAN_WINDOW] : 0);
    return sum / Math.min(i + 1, MEAN_WINDOW);
  });
}

/** The decades [low, high] (log10) the chart shows for these losses: all of them, and at
 * least a third of a decade. */
function logRange(losses) {
  let [low, high] = [Infinity, -Infinity];
  for (const loss of losses) {
    low = Math.min(low, Math.log10(loss));
    high = Math.max(high, Math.log10(loss));
  }
  const pad = Math.max(0, (1 / 3 - (high - low)) / 2);
  return [low - pad, high + pad];
}

/** The loss values that get a line across the chart, [low, high] being the range shown
 * (log10): round steps of the loss itself within a fraction of a decade, and over more, a
 * few round multiples of each power of ten, fewer the more decades there are. */
function lossTicks(low, high) {
  const span = high - low;
  if (span <= 0.7) {
    const [min, max] = [10 ** low, 10 ** high];
    const step = niceStep((max - min) / 6);
    const ticks = [];
    for (let value = Math.ceil(min / step) * step; value <= max; value += step) {
      ticks.push(value);
    }
    return ticks;
  }
  const multiples = span <= 1.2 ? [1, 1.5, 2, 3, 5, 7] : span <= 2.5 ? [1, 2, 5] : [1];
  const ticks = [];
  for (let power = Math.floor(low); power <= Math.ceil(high); power++) {
    for (const value of multiples.map((m) => m * 10 ** power)) {
      const at = Math.log10(value);
      if (at >= low - 1e-9 && at <= high + 1e-9) ticks.push(value);
    }
  }
  return ticks;
}

/** Sizes `canvas` to its box on the screen at the display's resolution; returns a 2D context
 * that draws in CSS pixels, with the box's width and height. */
function fitCanvas(canvas) {
  const { width, height } = canvas.getBoundingClientRect();
  const scale = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  const context = canvas.getContext("2d");
  context.setTransform(scale, 0, 0, scale, 0, 0);
  return { context, width, height };
}

/** Draws the run's loss curve: each step's loss, faint, and their moving mean, over a log
 * scale of loss against steps. */
function drawLossChart(run) {
  const { context: g, width, height } = fitCanvas($("loss-canvas"));
  const colors = chartColors();
  const losses = (run?.losses ?? []).filter((loss) => loss > 0 && Number.isFinite(loss));
  const box = { left: 56, right: width - 16, top: 12, bottom: height - 28 };
  g.font = "12px system-ui, sans-serif";
  g.fillStyle = colors.text;
  if (losses.length === 0) {
    g.textAlign = "center";
    g.fillText("The loss of each training step appears here.", width / 2, height / 2);
    return;
  }

  const [low, high] = logRange(losses);
  const x = (step) => box.left + (step / losses.length) * (box.right - box.left);
  const y = (loss) => box.bottom - ((Math.log10(loss) - low) / (high - low)) * (box.bottom - box.top);

  g.strokeStyle = colors.grid;
  g.lineWidth = 1;
  g.textAlign = "right";
  g.textBaseline = "middle";
  for (const loss of lossTicks(low, high)) {
    g.beginPath();
    g.moveTo(box.left, y(loss));
    g.lineTo(box.right, y(loss));
    g.stroke();
    g.fillText(String(Number(loss.toPrecision(3))), box.left - 6, y(loss));
  }
  g.textAlign = "center";
  g.textBaseline = "top";
  const every = Math.max(1, niceStep(losses.length / 6));
  for (let step = 0; step <= losses.length; step += every) {
    g.fillText(String(step), x(step), box.bottom + 8);
  }

  /** A line through `values`, the value of step i + 1 at values[i]. */
  const line = (values, color, lineWidth) => {
    g.strokeStyle = color;
    g.lineWidth = lineWidth;
    g.beginPath();
    values.forEach((value, i) => g.lineTo(x(i + 1), y(value)));
    g.stroke();
  };
  line(losses, colors.loss, 1);
  line(movingMean(losses), colors.mean, 2);
}

// ---- Training

/** A training run as the page keeps it. */
function newRun(training, settings) {
  return {
    training,
    queue: new Queue(),
    ...settings, // preset, seed, batchSize
    steps: 0,
    losses: [],
    secondsPerStep: null, // of the last chunk
    gridStep: null, // the step of the last grid drawn
  };
}

/** Frees a run's training once the calls queued on it have ended. */
function discardRun(run) {
  run.queue.run(() => run.training.free());
}

/** Starts a new run with the Train section's settings, replacing the last run. */
async function startTraining() {
  const settings = {
    preset: $("preset").value,
    seed: readInt("seed"),
    batchSize: readInt("batch"),
  };
  const grid = gridSettings();
  await whileTraining(async () => {
    if (page.run) {
      discardRun(page.run);
      page.run = null;
    }
    drawLossChart(null);
    showSteps(null);
    $("run-info").textContent = `Starting a ${settings.preset} run (compiling its kernels)…`;
    const training = await Training.start(
      page.gpu, settings.preset, settings.seed, settings.batchSize);
    page.run = newRun(training, settings);
    showRunInfo(page.run);
    refreshControls();
    await trainLoop(page.run, grid);
  });
}

/** Trains the current run further. */
async function continueTraining() {
  const grid = gridSettings();
  await whileTraining(() => trainLoop(page.run, grid));
}

/** How often the run draws a sample grid, and with how many DDIM steps. */
function gridSettings() {
  return { every: readInt("sample-every"), ddimSteps: readInt("grid-steps") };
}

/** Runs `work` with the page in its training state, and leaves that state after it. */
async function whileTraining(work) {
  page.training = true;
  page.stopRequested = false;
  setState("training");
  refreshControls();
  try {
    await work();
  } finally {
    page.training = false;
    setState("idle");
  }
}

/** Trains `run` chunk by chunk until Stop, drawing a grid every `grid.every` steps and once
 * more at the end, so that the last grid shows the weights the run stopped with. */
async function trainLoop(run, grid) {
  while (!page.stopRequested) {
    const steps = chunkSize(run, grid.every);
    const { losses, seconds } = await run.queue.run(async () => {
      const started = performance.now();
      const losses = await run.training.train(steps);
      return { losses, seconds: (performance.now() - started) / 1000 };
    });
    recordLosses(run, losses, seconds);
    if (run.steps % grid.every === 0) {
      await drawTrainingGrid(run, grid.ddimSteps);
    }
    await yieldToBrowser();
  }
  if (run.gridStep !== run.steps) {
    await drawTrainingGrid(run, grid.ddimSteps);
  }
}

/** The steps of the next call to `train`: about `CHUNK_SECONDS` of work at the last chunk's
 * speed (one step to begin with: the first also compiles the kernels), but never past the
 * next grid. */
function chunkSize(run, gridEvery) {
  const wanted = run.secondsPerStep ? Math.round(CHUNK_SECONDS / run.secondsPerStep) : 1;
  const untilGrid = gridEvery - (run.steps % gridEvery);
  return Math.max(1, Math.min(wanted, MAX_CHUNK, untilGrid));
}

/** Resolves after the browser has had the chance to handle input and repaint. */
function yieldToBrowser() {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** Adds a chunk's losses to the run and shows them. */
function recordLosses(run, losses, seconds) {
  run.losses.push(...losses);
  run.steps += losses.length;
  run.secondsPerStep = seconds / losses.length;
  showSteps(run);
  drawLossChart(run);
}

/** The step counter, speed and latest loss of `run` (dashes without a run). */
function showSteps(run) {
  $("step-count").textContent = String(run?.steps ?? 0);
  $("steps-per-second").textContent = run?.secondsPerStep ? (1 / run.secondsPerStep).toFixed(1) : "–";
  $("loss-latest").textContent = run?.losses.length ? run.losses.at(-1).toFixed(4) : "–";
}

function showRunInfo(run) {
  const parameters = (run.training.parameters() / 1e6).toFixed(2);
  const size = run.training.imageSize();
  $("run-info").textContent =
    `Run: ${run.preset}, ${parameters} M parameters, ${size}×${size} images, ` +
    `batches of ${run.batchSize}, seed ${run.seed}.`;
}

/** Samples a grid from the run's EMA weights, from the same noise each time, and shows it. */
async function drawTrainingGrid(run, ddimSteps) {
  const picture = await run.queue.run(() =>
    run.training.sampleGrid(GRID_IMAGES, ddimSteps, run.seed));
  drawPictures([$("grid-canvas")], [picture]);
  run.gridStep = run.steps;
  $("grid-caption").textContent =
    `${GRID_IMAGES} samples of the EMA weights at step ${run.steps} (${ddimSteps} DDIM steps).`;
}

function stopTraining() {
  page.stopRequested = true;
}

/** Downloads the run's EMA weights as a diffusers pipeline folder in a zip file. */
async function downloadPipeline() {
  const run = page.run;
  page.zipping = true;
  refreshControls();
  try {
    const { bytes, step } = await run.queue.run(async () => ({
      step: run.training.stepsDone(),
      bytes: await run.training.pipelineZip(),
    }));
    download(bytes, "application/zip", `diffwgpu-${run.preset}-step${step}.zip`);
  } finally {
    page.zipping = false;
  }
}

/** Saves `bytes` as a file called `name` through the browser's download. */
function download(bytes, type, name) {
  const url = URL.createObjectURL(new Blob([bytes], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** Makes the run's EMA weights, as they are now, the model of the Sample section. */
async function useTrainedModel() {
  const run = page.run;
  setModel(await run.queue.run(() => run.training.model(true)));
}

// ---- Loading a model

/** Makes `model` the one the Sample section samples from, freeing the one it replaces. */
function setModel(model) {
  page.model?.free();
  page.model = model;
  $("model-info").textContent = model.describe();
}

/** Whether the model loader needs a file of a pipeline folder: the configurations, and the
 * U-Net's weights (not, say, a training run's sample pictures or optimizer state). */
function isModelFile(path) {
  const name = path.split("/").at(-1);
  return name.endsWith(".json") || name === "diffusion_pytorch_model.safetensors";
}

/** Loads the model in `files`, each `{ path, file }` with its path in the folder. */
async function loadModel(files) {
  const wanted = files.filter(({ path }) => isModelFile(path));
  if (wanted.length === 0) {
    throw new Error(
      `none of the ${files.length} files given belongs to a pipeline folder ` +
      "(model_index.json, unet/config.json, unet/diffusion_pytorch_model.safetensors, " +
      "scheduler/scheduler_config.json).");
  }
  $("model-info").textContent = `Reading ${wanted.length} files…`;
  const contents = await Promise.all(
    wanted.map(async ({ file }) => new Uint8Array(await file.arrayBuffer())));
  try {
    setModel(Model.load(page.gpu, wanted.map(({ path }) => path), contents));
  } catch (error) {
    $("model-info").textContent = page.model ? page.model.describe() : "No model loaded.";
    throw error;
  }
}

/** Loads the folder chosen in the file input, whose files know their paths in it. */
async function folderChosen(event) {
  const input = event.target;
  const files = [...input.files].map((file) => ({ path: file.webkitRelativePath || file.name, file }));
  input.value = ""; // so that choosing the same folder again loads it again
  await loadModel(files);
}

/** The files dropped, folders walked through, with their paths (`run/unet/config.json`).
 * The entries are taken at once: a drop's items are gone once its event handler returns. */
async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry()).filter(Boolean);
  const files = [];
  for (const entry of entries) {
    await collectFiles(entry, files);
  }
  return files;
}

/** Adds the file `entry`, or every file under the folder `entry`, to `files`. */
async function collectFiles(entry, files) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    files.push({ path: entry.fullPath.replace(/^\//, ""), file });
  } else if (entry.isDirectory) {
    for (const child of await folderEntries(entry)) {
      await collectFiles(child, files);
    }
  }
}

/** A folder's entries: `readEntries` hands them out in batches, until an empty one. */
async function folderEntries(folder) {
  const reader = folder.createReader();
  const entries = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (batch.length === 0) {
      return entries;
    }
    entries.push(...batch);
  }
}

/** Whether a model may be loaded now. */
function canLoad() {
  return page.gpu !== null && !page.sampling;
}

// ---- Sampling

/** Samples with the Sample section's settings, showing x_t and the predicted x_0 as the
 * reverse process goes, and the samples at the end. */
async function runSampling() {
  const kind = $("sampler").value;
  const [steps, seed, count] = ["sample-steps", "sample-seed", "sample-count"].map(readInt);
  page.sampling = true;
  page.png = null;
  setState("sampling");
  refreshControls();
  const started = performance.now();
  let sampling = null;
  try {
    sampling = page.model.sample(kind, steps, seed, count);
    const total = sampling.total();
    const viewEvery = Math.max(1, Math.round(total / SAMPLING_VIEWS));
    showProgress(0, total, "");
    let [done, lastYield] = [false, performance.now()];
    while (!done) {
      done = await sampling.step();
      const taken = sampling.done();
      showProgress(taken, total, ` (t = ${sampling.timestep()})`);
      if (taken % viewEvery === 0 || done) {
        drawPictures([$("xt-canvas"), $("x0-canvas")], await sampling.views());
      }
      // A step is only recorded for the GPU, so many may pass without a pause.
      if (performance.now() - lastYield > 16) {
        await yieldToBrowser();
        lastYield = performance.now();
      }
    }
    const picture = await sampling.picture();
    try {
      page.png = { bytes: picture.png(), seed };
      drawPicture($("xt-canvas"), picture);
    } finally {
      picture.free();
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    showProgress(total, total, `: ${count} samples by ${kind.toUpperCase()} in ${seconds} s`);
    setState("sampled");
  } finally {
    sampling?.free();
    page.sampling = false;
  }
}

/** The progress bar and its line: "step i of n" and `detail`. */
function showProgress(taken, total, detail) {
  $("sample-bar").max = total;
  $("sample-bar").value = taken;
  $("sample-step").textContent = `step ${taken} of ${total}${detail}`;
}

function downloadPng() {
  download(page.png.bytes, "image/png", `diffwgpu-samples-seed${page.png.seed}.png`);
}

/** The default steps of each sampler: DDIM needs few, DDPM walks every training timestep. */
function samplerChanged() {
  $("sample-steps").value = $("sampler").value === "ddpm" ? 1000 : 50;
}

// ---- Wiring

function listen() {
  $("train-start").addEventListener("click", handler(startTraining));
  $("train-stop").addEventListener("click", handler(stopTraining));
  $("train-continue").addEventListener("click", handler(continueTraining));
  $("download-zip").addEventListener("click", handler(downloadPipeline));
  $("use-for-sampling").addEventListener("click", handler(useTrainedModel));
  $("folder-input").addEventListener("change", handler(folderChosen));
  $("sampler").addEventListener("change", samplerChanged);
  $("sample-run").addEventListener("click", handler(runSampling));
  $("download-png").addEventListener("click", handler(downloadPng));
  window.addEventListener("resize", () => drawLossChart(page.run));

  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.toggle("over", canLoad());
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  const drop = handler(async (event) => loadModel(await droppedFiles(event.dataTransfer)));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (canLoad()) {
      drop(event);
    }
  });

  window.addEventListener("error", (event) => showError(event.error ?? event.message));
  window.addEventListener("unhandledrejection", (event) => showError(event.reason));
}

const ready = start();
window.diffwgpu = { ready, gpu: null, Training, Model, openGpu };
listen();
refreshControls();
drawLossChart(null);
ready.then(showGpu, showStartFailure);
