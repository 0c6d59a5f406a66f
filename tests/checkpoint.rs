//! Checkpoint files: safetensors round trips and dtype conversion, atomic writes, scheduler
//! configs as diffusers writes them, the pipeline folder, the training state, and the errors
//! for missing, foreign, corrupt and truncated files.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use diffwgpu::checkpoint::{
    load_pipeline, load_pipeline_files, pipeline_files, read_safetensors, save_pipeline,
    write_json_atomic, write_safetensors, NamedTensor, SchedulerConfig, TrainingState,
};
use diffwgpu::diffusion::{NoiseSchedule, PredictionType, VarianceType};
use diffwgpu::nn::config::UNet2DConfig;
use diffwgpu::Error;
use safetensors::{Dtype, SafeTensors, View};

/// A fresh folder under the system temp folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "diffwgpu-checkpoint-{tag}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tensor(name: &str, shape: &[usize], seed: f32) -> NamedTensor {
    let n = shape.iter().product();
    NamedTensor {
        name: name.into(),
        shape: shape.to_vec(),
        data: (0..n).map(|i| seed + i as f32 * 0.25 - 1.0).collect(),
    }
}

/// The path and message of a checkpoint error.
fn checkpoint_error(e: Error) -> (String, String) {
    match e {
        Error::Checkpoint { path, msg } => (path, msg),
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

/// Every file under `dir` whose name marks it as a leftover temporary file.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(temp_files(&path));
        } else if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains(".tmp-")
        {
            found.push(path);
        }
    }
    found
}

/// A tensor of any dtype, for writing files with the `safetensors` crate.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw_u16(bits: &[u16], dtype: Dtype) -> Raw {
    Raw {
        dtype,
        shape: vec![bits.len()],
        bytes: bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
    }
}

#[test]
fn f32_round_trip_sorts_by_name_and_keeps_metadata() {
    let dir = TempDir::new("f32");
    let path = dir.join("weights.safetensors");
    let tensors = vec![
        tensor("up.weight", &[2, 3], 0.5),
        tensor("conv_in.bias", &[4], -2.0),
        tensor("scalar", &[], 7.0),
        tensor("empty", &[0, 3], 0.0),
    ];
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("seed".to_string(), "42".to_string()),
    ]);
    write_safetensors(&path, &tensors, &metadata).unwrap();

    let (read, read_metadata) = read_safetensors(&path).unwrap();
    let mut want = tensors.clone();
    want.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(read, want);
    assert_eq!(read_metadata, metadata);

    // The file is valid for the reference parser too, with the data 8-byte aligned.
    let bytes = fs::read(&path).unwrap();
    let parsed = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(parsed.len(), 4);
    let view = parsed.tensor("up.weight").unwrap();
    assert_eq!((view.dtype(), view.shape()), (Dtype::F32, &[2usize, 3][..]));
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(header_len.is_multiple_of(8));
}

#[test]
fn f16_bf16_and_f64_are_converted_to_f32() {
    let dir = TempDir::new("dtypes");
    let path = dir.join("half.safetensors");
    // 1, -2, 0.5, 65504 (largest), 2^-24 (smallest subnormal), -0, +inf.
    let f16 = raw_u16(
        &[0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000, 0x7c00],
        Dtype::F16,
    );
    // 1, -2, 3.140625, 2^-126 (the smallest normal number).
    let bf16 = raw_u16(&[0x3f80, 0xc000, 0x4049, 0x0080], Dtype::BF16);
    let f64_values = [0.1f64, -1e10, 3.5];
    let f64 = Raw {
        dtype: Dtype::F64,
        shape: vec![3, 1],
        bytes: f64_values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let file = safetensors::serialize(
        [("a.half", &f16), ("b.brain", &bf16), ("c.double", &f64)],
        Some([("origin".to_string(), "torch".to_string())].into()),
    )
    .unwrap();
    fs::write(&path, file).unwrap();

    let (read, metadata) = read_safetensors(&path).unwrap();
    assert_eq!(metadata["origin"], "torch");
    let names: Vec<_> = read.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a.half", "b.brain", "c.double"]);
    let half = &read[0].data;
    assert_eq!(
        half[..5],
        [1.0, -2.0, 0.5, 65504.0, 2f32.powi(-24)],
        "{half:?}"
    );
    assert!(half[5] == 0.0 && half[5].is_sign_negative());
    assert_eq!(half[6], f32::INFINITY);
    assert_eq!(read[1].data, [1.0, -2.0, 3.140625, 2f32.powi(-126)]);
    assert_eq!(read[2].shape, [3, 1]);
    assert_eq!(read[2].data, [0.1f32, -1e10, 3.5]);
}

#[test]
fn an_unsupported_dtype_is_named() {
    let dir = TempDir::new("i64");
    let path = dir.join("ints.safetensors");
    let ints = Raw {
        dtype: Dtype::I64,
        shape: vec![2],
        bytes: [5i64, 6].iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    fs::write(
        &path,
        safetensors::serialize([("steps", &ints)], None).unwrap(),
    )
    .unwrap();
    let (_, msg) = checkpoint_error(read_safetensors(&path).unwrap_err());
    assert!(msg.contains("\"steps\"") && msg.contains("I64"), "{msg}");
}

#[test]
fn bad_tensors_are_refused_before_writing() {
    let dir = TempDir::new("badtensors");
    let path = dir.join("bad.safetensors");
    let mut wrong = tensor("w", &[2, 2], 0.0);
    wrong.data.pop();
    let (_, msg) =
        checkpoint_error(write_safetensors(&path, &[wrong], &BTreeMap::new()).unwrap_err());
    assert!(msg.contains("\"w\"") && msg.contains("[2, 2]"), "{msg}");
    let twice = [tensor("w", &[1], 0.0), tensor("w", &[1], 1.0)];
    let (_, msg) =
        checkpoint_error(write_safetensors(&path, &twice, &BTreeMap::new()).unwrap_err());
    assert!(msg.contains("two tensors"), "{msg}");
    assert!(!path.exists());
    assert!(temp_files(&dir.0).is_empty());
}

#[test]
fn writes_are_atomic_and_overwrite() {
    let dir = TempDir::new("atomic");
    let path = dir.join("w.safetensors");
    write_safetensors(&path, &[tensor("a", &[3], 0.0)], &BTreeMap::new()).unwrap();
    let newer = [tensor("a", &[2, 2], 5.0), tensor("b", &[1], 9.0)];
    write_safetensors(&path, &newer, &BTreeMap::new()).unwrap();
    assert_eq!(read_safetensors(&path).unwrap().0, newer);

    let json = dir.join("c.json");
    write_json_atomic(&json, "{\"a\": 1}").unwrap();
    write_json_atomic(&json, "{\"a\": 2}\n").unwrap();
    assert_eq!(fs::read_to_string(&json).unwrap(), "{\"a\": 2}\n");
    assert!(temp_files(&dir.0).is_empty());

    // A write into a missing folder fails cleanly and leaves nothing behind.
    let missing = dir.join("no_such_folder").join("w.safetensors");
    let (path_shown, msg) =
        checkpoint_error(write_safetensors(&missing, &newer, &BTreeMap::new()).unwrap_err());
    assert!(path_shown.ends_with("w.safetensors"), "{path_shown}");
    assert!(msg.contains("folder exists"), "{msg}");
    assert!(temp_files(&dir.0).is_empty());
    assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 2);
}

#[test]
fn scheduler_defaults_are_diffusers_ddpm() {
    let config = SchedulerConfig::from_json("{}").unwrap();
    assert_eq!(config, SchedulerConfig::default());
    assert_eq!(config.class_name, "DDPMScheduler");
    assert_eq!(
        (
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end
        ),
        (1000, 0.0001, 0.02)
    );
    assert_eq!(config.beta_schedule, "linear");
    assert_eq!(config.prediction_type().unwrap(), PredictionType::Epsilon);
    assert_eq!(config.variance_type().unwrap(), VarianceType::FixedSmall);
    assert_eq!(config.clip(), Some(1.0));
    assert_eq!(config.timestep_spacing, "leading");
    assert_eq!(
        config.schedule().unwrap(),
        NoiseSchedule::linear(1000, 1e-4, 0.02).unwrap()
    );

    let json: serde_json::Value = serde_json::from_str(&config.to_json()).unwrap();
    assert!(json["trained_betas"].is_null());
    assert_eq!(json["_class_name"], "DDPMScheduler");
    assert_eq!(json["clip_sample"], true);
    assert!(json.get("set_alpha_to_one").is_none());
    assert_eq!(
        SchedulerConfig::from_json(&config.to_json()).unwrap(),
        config
    );
}

#[test]
fn scheduler_configs_written_by_diffusers_read() {
    // google/ddpm-cifar10-32, from an early diffusers release.
    let old = r#"{
      "_class_name": "DDPMScheduler",
      "_diffusers_version": "0.1.1",
      "beta_end": 0.02,
      "beta_schedule": "linear",
      "beta_start": 0.0001,
      "clip_sample": true,
      "num_train_timesteps": 1000,
      "trained_betas": null,
      "variance_type": "fixed_small"
    }"#;
    let config = SchedulerConfig::from_json(old).unwrap();
    assert_eq!(config.diffusers_version, "0.1.1");
    assert_eq!(config.steps_offset, 0);

    // A recent DDPMScheduler with every key, and keys diffwgpu does not know.
    let recent = r#"{
      "_class_name": "DDPMScheduler",
      "_diffusers_version": "0.31.0",
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "clip_sample": false,
      "clip_sample_range": 1.0,
      "dynamic_thresholding_ratio": 0.995,
      "num_train_timesteps": 1000,
      "prediction_type": "v_prediction",
      "rescale_betas_zero_snr": false,
      "sample_max_value": 1.0,
      "steps_offset": 1,
      "thresholding": false,
      "timestep_spacing": "trailing",
      "trained_betas": null,
      "variance_type": "fixed_large",
      "skip_prk_steps": true,
      "_name_or_path": "somewhere"
    }"#;
    let config = SchedulerConfig::from_json(recent).unwrap();
    assert_eq!(
        config.prediction_type().unwrap(),
        PredictionType::VPrediction
    );
    assert_eq!(config.variance_type().unwrap(), VarianceType::FixedLarge);
    assert_eq!(config.clip(), None);
    assert_eq!(config.steps_offset, 1);
    assert_eq!(
        config.schedule().unwrap(),
        NoiseSchedule::scaled_linear(1000, 0.00085, 0.012).unwrap()
    );

    // A DDIMScheduler: no variance_type, and set_alpha_to_one.
    let ddim = r#"{
      "_class_name": "DDIMScheduler",
      "beta_schedule": "squaredcos_cap_v2",
      "num_train_timesteps": 500,
      "set_alpha_to_one": false
    }"#;
    let config = SchedulerConfig::from_json(ddim).unwrap();
    let schedule = config.schedule().unwrap();
    assert_eq!(schedule.num_train_timesteps(), 500);
    assert_eq!(schedule.final_alpha_cumprod, schedule.alphas_cumprod[0]);
    assert!(config.to_json().contains("\"set_alpha_to_one\": false"));
    let default_ddim = SchedulerConfig::from_json(r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    assert_eq!(default_ddim.schedule().unwrap().final_alpha_cumprod, 1.0);
}

#[test]
fn unsupported_scheduler_options_are_refused_by_name() {
    let refused = |json: &str, words: &[&str]| {
        let (_, msg) = checkpoint_error(SchedulerConfig::from_json(json).unwrap_err());
        for word in words {
            assert!(msg.contains(word), "{json}: {msg}");
        }
    };
    refused(
        r#"{"trained_betas": [0.1, 0.2]}"#,
        &["trained_betas", "null"],
    );
    refused(
        r#"{"variance_type": "learned"}"#,
        &["variance_type", "\"learned\"", "fixed_small"],
    );
    refused(
        r#"{"variance_type": "learned_range"}"#,
        &["\"learned_range\""],
    );
    refused(r#"{"thresholding": true}"#, &["thresholding", "false"]);
    refused(
        r#"{"rescale_betas_zero_snr": true}"#,
        &["rescale_betas_zero_snr"],
    );
    refused(
        r#"{"beta_schedule": "cosine"}"#,
        &["\"cosine\"", "squaredcos_cap_v2"],
    );
    refused(r#"{"prediction_type": "x0"}"#, &["\"x0\"", "epsilon"]);
    refused(
        r#"{"_class_name": "PNDMScheduler"}"#,
        &["PNDMScheduler", "DDPMScheduler"],
    );
    refused(r#"{"timestep_spacing": "random"}"#, &["timestep_spacing"]);
    refused(r#"{"beta_start": 0.5, "beta_end": 0.1}"#, &["beta_start"]);
    refused(
        r#"{"num_train_timesteps": "many"}"#,
        &["not a valid scheduler config"],
    );
}

/// Stand-in UNet weights: the names and shapes do not matter to the folder code.
fn unet_weights() -> Vec<NamedTensor> {
    vec![
        tensor("conv_in.weight", &[16, 1, 3, 3], 0.1),
        tensor("conv_in.bias", &[16], 0.2),
        tensor("time_embedding.linear_1.weight", &[64, 16], 0.3),
        tensor("conv_out.bias", &[1], 0.4),
    ]
}

fn sorted(mut tensors: Vec<NamedTensor>) -> Vec<NamedTensor> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    tensors
}

#[test]
fn pipeline_round_trip() {
    let dir = TempDir::new("pipeline");
    let out = dir.join("run");
    let unet = UNet2DConfig::preset("tiny").unwrap();
    let scheduler = SchedulerConfig::default();
    let weights = unet_weights();
    save_pipeline(&out, &unet, &weights, &scheduler).unwrap();

    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(
        index,
        serde_json::json!({
            "_class_name": "DDPMPipeline",
            "_diffusers_version": "0.31.0",
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        })
    );
    let config_text = fs::read_to_string(out.join("unet/config.json")).unwrap();
    let config_json: serde_json::Value = serde_json::from_str(&config_text).unwrap();
    assert_eq!(config_json["_diffusers_version"], "0.31.0");
    assert_eq!(config_json["_class_name"], "UNet2DModel");
    // f32 values are written as the config holds them, not widened to f64 digits.
    assert_eq!(config_json["norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(UNet2DConfig::from_json(&config_text).unwrap(), unet);
    let (_, metadata) =
        read_safetensors(&out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(metadata["format"], "pt");
    assert!(out.join("scheduler/scheduler_config.json").is_file());

    let loaded = load_pipeline(&out).unwrap();
    assert_eq!(loaded.config, unet);
    assert_eq!(loaded.weights, sorted(weights.clone()));
    assert_eq!(loaded.scheduler, Some(scheduler.clone()));
    assert_eq!(loaded.root, out);

    // Saving again over the folder replaces the files and leaves no temporary files.
    let mut newer = weights;
    newer[0].data[0] = 123.0;
    save_pipeline(&out, &unet, &newer, &scheduler).unwrap();
    assert_eq!(load_pipeline(&out).unwrap().weights, sorted(newer));
    assert!(temp_files(&dir.0).is_empty());
}

#[test]
fn a_bare_unet_folder_loads() {
    let dir = TempDir::new("bare");
    let out = dir.join("run");
    let unet = UNet2DConfig::preset("tiny").unwrap();
    save_pipeline(&out, &unet, &unet_weights(), &SchedulerConfig::default()).unwrap();

    // The unet/ folder of a pipeline finds its sibling scheduler.
    let inner = load_pipeline(&out.join("unet")).unwrap();
    assert_eq!(inner.config, unet);
    assert_eq!(inner.scheduler, Some(SchedulerConfig::default()));
    assert_eq!(inner.root, out.join("unet"));

    // A UNet2DModel folder on its own has no scheduler.
    let alone = dir.join("alone");
    fs::create_dir(&alone).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        fs::copy(out.join("unet").join(file), alone.join(file)).unwrap();
    }
    let bare = load_pipeline(&alone).unwrap();
    assert_eq!(bare.weights, sorted(unet_weights()));
    assert_eq!(bare.scheduler, None);
}

#[test]
fn pipeline_files_in_memory_are_the_folders_bytes() {
    let dir = TempDir::new("in-memory");
    let out = dir.join("run");
    let unet = UNet2DConfig::preset("tiny").unwrap();
    let scheduler = SchedulerConfig::default();
    save_pipeline(&out, &unet, &unet_weights(), &scheduler).unwrap();
    let files = pipeline_files(&unet, &unet_weights(), &scheduler).unwrap();
    assert_eq!(files.len(), 4);
    for (name, bytes) in &files {
        assert_eq!(*bytes, fs::read(out.join(name)).unwrap(), "{name}");
    }

    // Read back under a leading folder, as a page gets a picked folder's files.
    let under = |prefix: &str, files: &[(String, Vec<u8>)]| -> BTreeMap<String, Vec<u8>> {
        files
            .iter()
            .map(|(name, bytes)| (format!("{prefix}{name}"), bytes.clone()))
            .collect()
    };
    let loaded = load_pipeline_files(&under("run/", &files)).unwrap();
    assert_eq!(loaded.config, unet);
    assert_eq!(loaded.weights, sorted(unet_weights()));
    assert_eq!(loaded.scheduler, Some(scheduler));
    assert_eq!(loaded.classes, None);

    // A bare unet folder's two files: no scheduler.
    let bare: Vec<(String, Vec<u8>)> = files
        .iter()
        .filter_map(|(name, bytes)| Some((name.strip_prefix("unet/")?.to_string(), bytes.clone())))
        .collect();
    let loaded = load_pipeline_files(&under("", &bare)).unwrap();
    assert_eq!(loaded.weights, sorted(unet_weights()));
    assert_eq!(loaded.scheduler, None);

    // Missing weights and files without a model are named.
    let mut no_weights = under("run/", &files);
    no_weights.remove("run/unet/diffusion_pytorch_model.safetensors");
    let (path, msg) = checkpoint_error(load_pipeline_files(&no_weights).unwrap_err());
    assert_eq!(path, "run/unet/diffusion_pytorch_model.safetensors");
    assert!(msg.contains("missing"), "{msg}");
    let only_index = under("run/", &files[..1]);
    let (_, msg) = checkpoint_error(load_pipeline_files(&only_index).unwrap_err());
    assert!(msg.contains("hold no model"), "{msg}");
}

#[test]
fn missing_and_modelless_folders_are_explained() {
    let dir = TempDir::new("missing");
    let (path, msg) = checkpoint_error(load_pipeline(&dir.join("nowhere")).unwrap_err());
    assert!(
        path.ends_with("nowhere") && msg.contains("no such folder"),
        "{msg}"
    );

    let empty = dir.join("empty");
    fs::create_dir(&empty).unwrap();
    fs::write(empty.join("notes.txt"), "not a model").unwrap();
    let (_, msg) = checkpoint_error(load_pipeline(&empty).unwrap_err());
    assert!(
        msg.contains("holds no model")
            && msg.contains("config.json")
            && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );

    let (_, msg) = checkpoint_error(load_pipeline(&empty.join("notes.txt")).unwrap_err());
    assert!(msg.contains("not a folder"), "{msg}");

    let (_, msg) = checkpoint_error(read_safetensors(&dir.join("none.safetensors")).unwrap_err());
    assert!(msg.contains("no such file"), "{msg}");
}

#[test]
fn a_bad_config_or_missing_weights_name_the_file() {
    let dir = TempDir::new("badconfig");
    let out = dir.join("run");
    let unet = UNet2DConfig::preset("tiny").unwrap();
    save_pipeline(&out, &unet, &unet_weights(), &SchedulerConfig::default()).unwrap();

    let config = out.join("unet/config.json");
    fs::write(&config, r#"{"act_fn": "gelu"}"#).unwrap();
    let (path, msg) = checkpoint_error(load_pipeline(&out).unwrap_err());
    assert!(
        path.ends_with("config.json") && msg.contains("act_fn"),
        "{path}: {msg}"
    );
    fs::write(&config, "{ not json").unwrap();
    let (path, msg) = checkpoint_error(load_pipeline(&out).unwrap_err());
    assert!(
        path.ends_with("config.json") && msg.contains("not a valid"),
        "{path}: {msg}"
    );
    fs::write(&config, unet.to_json()).unwrap();

    let scheduler = out.join("scheduler/scheduler_config.json");
    fs::write(&scheduler, r#"{"variance_type": "learned"}"#).unwrap();
    let (path, msg) = checkpoint_error(load_pipeline(&out).unwrap_err());
    assert!(
        path.ends_with("scheduler_config.json") && msg.contains("learned"),
        "{msg}"
    );
    fs::write(&scheduler, SchedulerConfig::default().to_json()).unwrap();

    let weights = out.join("unet/diffusion_pytorch_model.safetensors");
    fs::remove_file(&weights).unwrap();
    let (path, msg) = checkpoint_error(load_pipeline(&out).unwrap_err());
    assert!(
        path.ends_with("diffusion_pytorch_model.safetensors"),
        "{path}"
    );
    assert!(msg.contains("missing"), "{msg}");
    fs::write(out.join("unet/diffusion_pytorch_model.bin"), "pickle").unwrap();
    let (_, msg) = checkpoint_error(load_pipeline(&out).unwrap_err());
    assert!(msg.contains("safe_serialization"), "{msg}");
}

#[test]
fn corrupt_and_truncated_files_are_errors() {
    let dir = TempDir::new("corrupt");
    let garbage = dir.join("garbage.safetensors");
    fs::write(&garbage, b"this is certainly not a safetensors file at all").unwrap();
    let (path, msg) = checkpoint_error(read_safetensors(&garbage).unwrap_err());
    assert!(path.ends_with("garbage.safetensors"), "{path}");
    assert!(
        msg.contains("not a readable safetensors file") && msg.contains("again"),
        "{msg}"
    );

    // A small header length followed by bytes that are not JSON.
    let mut bad_json = 16u64.to_le_bytes().to_vec();
    bad_json.extend_from_slice(b"{{{{{{{{{{{{{{{{");
    fs::write(&garbage, bad_json).unwrap();
    let (_, msg) = checkpoint_error(read_safetensors(&garbage).unwrap_err());
    assert!(msg.contains("header is corrupt"), "{msg}");

    let empty = dir.join("empty.safetensors");
    fs::write(&empty, b"").unwrap();
    let (_, msg) = checkpoint_error(read_safetensors(&empty).unwrap_err());
    assert!(msg.contains("shorter than the 8-byte header"), "{msg}");

    let good = dir.join("good.safetensors");
    write_safetensors(&good, &unet_weights(), &BTreeMap::new()).unwrap();
    let bytes = fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Cut in the data, and cut in the header.
    for cut in [bytes.len() - 5, 8 + header_len / 2] {
        let truncated = dir.join("truncated.safetensors");
        fs::write(&truncated, &bytes[..cut]).unwrap();
        let (_, msg) = checkpoint_error(read_safetensors(&truncated).unwrap_err());
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
    }

    // A pipeline whose weights file is corrupt fails the same way.
    let out = dir.join("run");
    let unet = UNet2DConfig::preset("tiny").unwrap();
    save_pipeline(&out, &unet, &unet_weights(), &SchedulerConfig::default()).unwrap();
    fs::write(
        out.join("unet/diffusion_pytorch_model.safetensors"),
        &bytes[..100],
    )
    .unwrap();
    let (_, msg) = checkpoint_error(load_pipeline(&out).unwrap_err());
    assert!(msg.contains("truncated"), "{msg}");
}

fn training_state() -> TrainingState {
    let params = unet_weights();
    let scaled = |k: f32| {
        params
            .iter()
            .map(|t| NamedTensor {
                data: t.data.iter().map(|v| v * k).collect(),
                ..t.clone()
            })
            .collect::<Vec<_>>()
    };
    TrainingState {
        step: 12345,
        adam_m: scaled(0.1),
        adam_v: scaled(0.01),
        ema: scaled(0.9),
        params: params.clone(),
        meta: BTreeMap::from([
            ("seed".to_string(), "7".to_string()),
            ("lr".to_string(), "0.0002".to_string()),
            (
                "config".to_string(),
                UNet2DConfig::preset("tiny").unwrap().to_json(),
            ),
        ]),
    }
}

fn sorted_state(mut state: TrainingState) -> TrainingState {
    for group in [
        &mut state.params,
        &mut state.adam_m,
        &mut state.adam_v,
        &mut state.ema,
    ] {
        group.sort_by(|a, b| a.name.cmp(&b.name));
    }
    state
}

#[test]
fn training_state_round_trip() {
    let dir = TempDir::new("state");
    let path = dir.join("training_state.safetensors");
    let state = training_state();
    state.save(&path).unwrap();
    assert_eq!(
        TrainingState::load(&path).unwrap(),
        sorted_state(state.clone())
    );

    // The file holds prefixed names and the step as metadata.
    let (tensors, metadata) = read_safetensors(&path).unwrap();
    assert_eq!(metadata["step"], "12345");
    assert!(tensors.iter().any(|t| t.name == "adam_v.conv_in.bias"));
    assert_eq!(tensors.len(), 16);

    // Without EMA or moments (before the first step) the state still loads.
    let bare = TrainingState {
        adam_m: vec![],
        adam_v: vec![],
        ema: vec![],
        step: 0,
        ..state.clone()
    };
    bare.save(&path).unwrap();
    assert_eq!(TrainingState::load(&path).unwrap(), sorted_state(bare));
    assert!(temp_files(&dir.0).is_empty());

    let mut reserved = state;
    reserved.meta.insert("step".into(), "1".into());
    let (_, msg) = checkpoint_error(reserved.save(&path).unwrap_err());
    assert!(msg.contains("\"step\""), "{msg}");
}

#[test]
fn foreign_or_damaged_training_states_are_refused() {
    let dir = TempDir::new("badstate");
    let path = dir.join("training_state.safetensors");

    // Model weights are not a training state.
    write_safetensors(&path, &unet_weights(), &BTreeMap::new()).unwrap();
    let (_, msg) = checkpoint_error(TrainingState::load(&path).unwrap_err());
    assert!(
        msg.contains("not a diffwgpu training state") && msg.contains("no step"),
        "{msg}"
    );

    let step = BTreeMap::from([("step".to_string(), "3".to_string())]);
    write_safetensors(&path, &unet_weights(), &step).unwrap();
    let (_, msg) = checkpoint_error(TrainingState::load(&path).unwrap_err());
    assert!(msg.contains("prefixes"), "{msg}");

    let bad_step = BTreeMap::from([("step".to_string(), "-1".to_string())]);
    write_safetensors(&path, &[tensor("param.w", &[1], 0.0)], &bad_step).unwrap();
    let (_, msg) = checkpoint_error(TrainingState::load(&path).unwrap_err());
    assert!(msg.contains("\"-1\""), "{msg}");

    write_safetensors(&path, &[tensor("ema.w", &[1], 0.0)], &step).unwrap();
    let (_, msg) = checkpoint_error(TrainingState::load(&path).unwrap_err());
    assert!(msg.contains("no param.*"), "{msg}");

    let mut missing = training_state();
    missing.adam_v.pop();
    missing.save(&path).unwrap();
    let (_, msg) = checkpoint_error(TrainingState::load(&path).unwrap_err());
    assert!(msg.contains("has no adam_v.conv_out.bias"), "{msg}");

    let mut reshaped = training_state();
    reshaped.ema[1] = tensor("conv_in.bias", &[4, 4], 0.0);
    reshaped.save(&path).unwrap();
    let (_, msg) = checkpoint_error(TrainingState::load(&path).unwrap_err());
    assert!(msg.contains("ema.conv_in.bias has shape [4, 4]"), "{msg}");

    let mut extra = training_state();
    extra.adam_m.push(tensor("stray", &[1], 0.0));
    extra.save(&path).unwrap();
    let (_, msg) = checkpoint_error(TrainingState::load(&path).unwrap_err());
    assert!(msg.contains("adam_m.stray has no param.stray"), "{msg}");
}
