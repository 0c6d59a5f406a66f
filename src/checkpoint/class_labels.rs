//! The classes of a class-conditional model: `unet/class_labels.json` beside the U-Net's
//! config, written by `train` and read by `sample`,
//!
//! ```text
//! {"names": ["0", "1", ..., "9"], "null_class": 10}
//! ```
//!
//! `names[i]` is the class of label `i` (a dataset's folder names, or the digits); the
//! `null_class` is the embedding row that classifier-free guidance's unconditional model was
//! trained under, the table's last. diffusers ignores the file. A conditional diffusers model
//! without it has classes named by their ids and no null class.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{error, write_json_atomic};
use crate::error::Result;
use crate::nn::UNet2DConfig;

/// The file's name, in the unet folder.
pub const CLASS_LABELS_FILE: &str = "class_labels.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassLabels {
    pub names: Vec<String>,
    pub null_class: Option<u32>,
}

impl ClassLabels {
    /// `classes` named classes and a null class after them: the layout `train` gives a
    /// conditional model (`num_class_embeds = classes + 1`).
    pub fn with_null(names: Vec<String>) -> Self {
        let null_class = Some(names.len() as u32);
        ClassLabels { names, null_class }
    }

    /// The classes of a model with `rows` embedding rows and no file: ids as names, no null.
    pub fn ids(rows: usize) -> Self {
        ClassLabels {
            names: (0..rows).map(|i| i.to_string()).collect(),
            null_class: None,
        }
    }

    /// Whether the labels fit a table of `rows` rows: one per name, and the null class after
    /// them (a row that was never trained as one, when the file names no null class).
    pub fn fits(&self, rows: usize) -> bool {
        let k = self.names.len();
        match self.null_class {
            Some(null) => null as usize == k && k + 1 == rows,
            None => k == rows || k + 1 == rows,
        }
    }

    /// The label of a class given by name, or by id when no class has that name.
    pub fn lookup(&self, class: &str) -> Option<u32> {
        if let Some(i) = self.names.iter().position(|n| n == class) {
            return Some(i as u32);
        }
        class
            .parse::<usize>()
            .ok()
            .filter(|&i| i < self.names.len())
            .map(|i| i as u32)
    }

    /// Writes `unet_dir/class_labels.json` atomically.
    pub fn save(&self, unet_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("class labels serialize");
        write_json_atomic(&unet_dir.join(CLASS_LABELS_FILE), &text)
    }

    /// The classes of the model in `unet_dir` with `config`: the file's, checked against
    /// `num_class_embeds`, or ids for a conditional model without one; `None` for an
    /// unconditional model.
    pub fn load(unet_dir: &Path, config: &UNet2DConfig) -> Result<Option<Self>> {
        let path = unet_dir.join(CLASS_LABELS_FILE);
        let rows = config.class_count();
        if !path.is_file() {
            return Ok((rows > 0).then(|| Self::ids(rows)));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| error(&path, format!("cannot read the file: {e}")))?;
        let labels: ClassLabels = serde_json::from_str(&text).map_err(|e| {
            error(
                &path,
                format!("not a class labels file ({e}); expected {{\"names\": [..], \"null_class\": N}}"),
            )
        })?;
        if rows == 0 {
            return Err(error(
                &path,
                "names classes, but the model's config.json has no num_class_embeds; remove \
                 the file or use the config it was written with",
            ));
        }
        if !labels.fits(rows) {
            return Err(error(
                &path,
                format!(
                    "names {} classes{} where the model has {rows} embedding rows \
                     (num_class_embeds); the file belongs to another model",
                    labels.names.len(),
                    match labels.null_class {
                        Some(n) => format!(" and null class {n}"),
                        None => String::new(),
                    }
                ),
            ));
        }
        Ok(Some(labels))
    }
}
