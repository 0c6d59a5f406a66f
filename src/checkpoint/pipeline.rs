//! The diffusers pipeline folder: `model_index.json`, `unet/` (config and weights) and
//! `scheduler/` (config), as `DDPMPipeline.save_pretrained` writes it and `from_pretrained`
//! reads it. Loading also takes a bare `UNet2DModel` folder (the `unet/` folder on its own).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{
    error, parse_safetensors, read_safetensors, safetensors_bytes, write_atomic, write_safetensors,
    ClassLabels, NamedTensor, SchedulerConfig,
};
use crate::error::{Error, Result};
use crate::nn::config::UNet2DConfig;

/// The diffusers version written into every config (the format the files follow).
pub const DIFFUSERS_VERSION: &str = "0.31.0";

const MODEL_INDEX: &str = "model_index.json";
const UNET_DIR: &str = "unet";
const SCHEDULER_DIR: &str = "scheduler";
const CONFIG: &str = "config.json";
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const PICKLED_WEIGHTS: &str = "diffusion_pytorch_model.bin";
const SCHEDULER_CONFIG: &str = "scheduler_config.json";

/// A UNet read from disk: its config, its weights (diffusers parameter names, sorted), and
/// the scheduler config that came with it, if any.
#[derive(Debug, Clone)]
pub struct UnetFolder {
    pub config: UNet2DConfig,
    pub weights: Vec<NamedTensor>,
    pub scheduler: Option<SchedulerConfig>,
    /// A class-conditional model's classes (see [`ClassLabels`]).
    pub classes: Option<ClassLabels>,
    /// The folder that was loaded: the pipeline folder, or the bare unet folder.
    pub root: PathBuf,
}

/// Writes the pipeline folder `out` (created if needed): the UNet's config and `weights`, the
/// scheduler config, and `model_index.json`. Each file is replaced atomically, and
/// `model_index.json` comes last, so a folder that has one holds a complete pipeline.
pub fn save_pipeline(
    out: &Path,
    unet: &UNet2DConfig,
    weights: &[NamedTensor],
    scheduler: &SchedulerConfig,
) -> Result<()> {
    unet.validate()?;
    let scheduler_dir = out.join(SCHEDULER_DIR);
    scheduler
        .validate()
        .map_err(|e| in_file(&scheduler_dir.join(SCHEDULER_CONFIG), e))?;
    let unet_dir = out.join(UNET_DIR);
    for dir in [&unet_dir, &scheduler_dir] {
        fs::create_dir_all(dir).map_err(|e| {
            error(
                dir,
                format!("cannot create the folder: {e}; check that the output path is writable"),
            )
        })?;
    }
    write_safetensors(&unet_dir.join(WEIGHTS), weights, &weights_metadata())?;
    write_json_atomic(&unet_dir.join(CONFIG), &unet_config_json(unet))?;
    write_json_atomic(&scheduler_dir.join(SCHEDULER_CONFIG), &scheduler.to_json())?;
    write_json_atomic(&out.join(MODEL_INDEX), &model_index_json(unet, scheduler))
}

/// The files [`save_pipeline`] writes, in memory, by their path inside the folder (for a page
/// that offers the folder as a download): the same bytes.
pub fn pipeline_files(
    unet: &UNet2DConfig,
    weights: &[NamedTensor],
    scheduler: &SchedulerConfig,
) -> Result<Vec<(String, Vec<u8>)>> {
    unet.validate()?;
    scheduler.validate()?;
    let weights_name = format!("{UNET_DIR}/{WEIGHTS}");
    let weights = safetensors_bytes(&weights_name, weights, &weights_metadata())?;
    let json = |text: String| match text.ends_with('\n') {
        true => text.into_bytes(),
        false => format!("{text}\n").into_bytes(),
    };
    Ok(vec![
        (MODEL_INDEX.into(), json(model_index_json(unet, scheduler))),
        (format!("{UNET_DIR}/{CONFIG}"), json(unet_config_json(unet))),
        (weights_name, weights),
        (
            format!("{SCHEDULER_DIR}/{SCHEDULER_CONFIG}"),
            json(scheduler.to_json()),
        ),
    ])
}

/// diffusers (like torch's safetensors writer) marks its weight files as PyTorch tensors.
fn weights_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// `unet/config.json`: through the config's own JSON, which prints its f32 values as written
/// (`1e-5`, not the f64 widening `9.99999974e-6`).
fn unet_config_json(unet: &UNet2DConfig) -> String {
    let mut config: Value =
        serde_json::from_str(&unet.to_json()).expect("a model config's JSON parses");
    config["_diffusers_version"] = json!(DIFFUSERS_VERSION);
    pretty(&config)
}

/// `model_index.json`: a DDPMPipeline of the scheduler and the UNet.
fn model_index_json(unet: &UNet2DConfig, scheduler: &SchedulerConfig) -> String {
    pretty(&json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler.class_name],
        "unet": ["diffusers", unet.class_name],
    }))
}

/// Reads a pipeline folder whose files are in memory, keyed by their paths (a page's picked
/// or dropped files): `unet/config.json` and the weights beside it, with
/// `scheduler/scheduler_config.json` if given; the paths may share a leading folder
/// (`run/unet/config.json`), and a bare unet folder (`config.json` and the weights) works
/// too. A class-conditional model's classes are its label ids.
pub fn load_pipeline_files(files: &BTreeMap<String, Vec<u8>>) -> Result<UnetFolder> {
    let pipeline_config = format!("{UNET_DIR}/{CONFIG}");
    let found = |suffix: &str| {
        files
            .keys()
            .filter(|k| *k == suffix || k.ends_with(&format!("/{suffix}")))
            .min_by_key(|k| k.len())
            .map(|k| k[..k.len() - suffix.len()].to_string())
    };
    let (root, unet_dir) = match (found(&pipeline_config), found(CONFIG)) {
        (Some(root), _) => (root.clone(), format!("{root}{UNET_DIR}/")),
        (None, Some(dir)) => (dir.clone(), dir),
        (None, None) => {
            return Err(error(
                Path::new("the given files"),
                format!(
                    "hold no model; give the files of a pipeline folder ({MODEL_INDEX},                      {UNET_DIR}/{CONFIG}, {UNET_DIR}/{WEIGHTS}, {SCHEDULER_DIR}/{SCHEDULER_CONFIG})                      or of a UNet2DModel folder ({CONFIG} and {WEIGHTS})"
                ),
            ))
        }
    };
    let file = |name: &str| -> Result<(&Path, &[u8])> {
        let (key, bytes) = files
            .get_key_value(name)
            .ok_or_else(|| error(Path::new(name), "is missing; give every file of the folder"))?;
        Ok((Path::new(key.as_str()), bytes.as_slice()))
    };
    let text = |path: &Path, bytes: &[u8]| -> Result<String> {
        String::from_utf8(bytes.to_vec()).map_err(|_| error(path, "is not UTF-8 text"))
    };
    let (config_path, bytes) = file(&format!("{unet_dir}{CONFIG}"))?;
    let config =
        UNet2DConfig::from_json(&text(config_path, bytes)?).map_err(|e| in_file(config_path, e))?;
    let (weights_path, bytes) = file(&format!("{unet_dir}{WEIGHTS}"))?;
    let (weights, _) = parse_safetensors(weights_path, bytes)?;
    let scheduler = match file(&format!("{root}{SCHEDULER_DIR}/{SCHEDULER_CONFIG}")) {
        Ok((path, bytes)) => {
            Some(SchedulerConfig::from_json(&text(path, bytes)?).map_err(|e| in_file(path, e))?)
        }
        Err(_) => None,
    };
    let rows = config.class_count();
    Ok(UnetFolder {
        classes: (rows > 0).then(|| ClassLabels::ids(rows)),
        config,
        weights,
        scheduler,
        root: PathBuf::from(root),
    })
}

/// Reads a pipeline folder (`unet/` and, if present, `scheduler/`), or a bare unet folder
/// (`config.json` and `diffusion_pytorch_model.safetensors`; its scheduler is the sibling
/// `../scheduler/scheduler_config.json` when there is one).
pub fn load_pipeline(path: &Path) -> Result<UnetFolder> {
    if !path.exists() {
        return Err(error(
            path,
            "no such folder; give the output folder of a training run or a diffusers pipeline \
             or UNet2DModel folder",
        ));
    }
    if !path.is_dir() {
        return Err(error(
            path,
            "is a file, not a folder; give the pipeline folder (or its unet/ folder) that holds it",
        ));
    }
    let (unet_dir, scheduler_path) = if path.join(UNET_DIR).join(CONFIG).is_file() {
        let scheduler = path.join(SCHEDULER_DIR).join(SCHEDULER_CONFIG);
        (path.join(UNET_DIR), scheduler)
    } else if path.join(CONFIG).is_file() {
        (path.to_path_buf(), sibling_scheduler(path)?)
    } else {
        return Err(error(
            path,
            format!(
                "holds no model; expected a pipeline folder ({MODEL_INDEX}, {UNET_DIR}/{CONFIG}, \
                 {UNET_DIR}/{WEIGHTS}, {SCHEDULER_DIR}/{SCHEDULER_CONFIG}) or a UNet2DModel \
                 folder ({CONFIG} and {WEIGHTS})"
            ),
        ));
    };
    let config_path = unet_dir.join(CONFIG);
    let config =
        UNet2DConfig::from_json(&read_text(&config_path)?).map_err(|e| in_file(&config_path, e))?;
    let (weights, _) = read_safetensors(&weights_path(&unet_dir)?)?;
    let scheduler = if scheduler_path.is_file() {
        let text = read_text(&scheduler_path)?;
        Some(SchedulerConfig::from_json(&text).map_err(|e| in_file(&scheduler_path, e))?)
    } else {
        None
    };
    let classes = ClassLabels::load(&unet_dir, &config)?;
    Ok(UnetFolder {
        config,
        weights,
        scheduler,
        classes,
        root: path.to_path_buf(),
    })
}

/// Writes `text` (with a final newline) to `path` atomically.
pub fn write_json_atomic(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, |out| {
        out.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            out.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// JSON as diffusers writes it: indented, keys sorted.
fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("a JSON value always serializes")
}

/// `scheduler/scheduler_config.json` beside the unet folder `unet_dir`.
fn sibling_scheduler(unet_dir: &Path) -> Result<PathBuf> {
    let full = unet_dir
        .canonicalize()
        .map_err(|e| error(unet_dir, format!("cannot resolve the folder: {e}")))?;
    let parent = full.parent().unwrap_or(&full);
    Ok(parent.join(SCHEDULER_DIR).join(SCHEDULER_CONFIG))
}

/// The weights file of `unet_dir`, which must exist.
fn weights_path(unet_dir: &Path) -> Result<PathBuf> {
    let path = unet_dir.join(WEIGHTS);
    if path.is_file() {
        return Ok(path);
    }
    let hint = if unet_dir.join(PICKLED_WEIGHTS).is_file() {
        format!(
            "the folder has only the pickled {PICKLED_WEIGHTS}; convert it with diffusers \
             (`UNet2DModel.from_pretrained(folder).save_pretrained(folder, \
             safe_serialization=True)`)"
        )
    } else {
        "save the model again, or download it again".to_string()
    };
    Err(error(&path, format!("the weights file is missing; {hint}")))
}

/// The text of a config file.
fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => error(path, "no such file; check the path"),
        _ => error(path, format!("cannot read the file: {e}")),
    })
}

/// A config error reported against the file at `path`.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Checkpoint { msg, .. } | Error::Config(msg) => error(path, msg),
        other => other,
    }
}
