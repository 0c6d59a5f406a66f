//! MNIST's IDX label files, and the labelled `mnist:PATH` loader that pairs them with images.
//!
//! An IDX labels file is an 8-byte header, two big-endian u32: the magic number 0x00000801
//! (unsigned bytes, one dimension) and the label count; then the labels, one byte each, in
//! the order of the images they label. Like images files they are usually gzipped, which is
//! recognised by the first two bytes, whatever the file is called.
//!
//! MNIST names each labels file after its images file, `images` becoming `labels` and `idx3`
//! becoming `idx1` (`train-images-idx3-ubyte.gz` and `train-labels-idx1-ubyte.gz`), and that
//! is how [`Dataset::from_idx_labelled`] finds it.

use std::path::{Path, PathBuf};

use super::idx::{gunzip, images_file, IMAGES_MAGIC, LABELS_MAGIC};
use super::{Dataset, IdxImages};
use crate::error::{Error, Result};

/// Length of an IDX labels header.
const HEADER_LEN: usize = 8;

/// Parses the bytes of an IDX labels file, gunzipping them first if they are a gzip stream,
/// and returns the labels; `path` names the file in errors.
pub fn parse_idx_labels(bytes: &[u8], path: &str) -> Result<Vec<u8>> {
    let err = |msg: String| Error::Data {
        path: path.into(),
        msg,
    };
    let bytes = gunzip(bytes, path)?;
    if bytes.len() < HEADER_LEN {
        return Err(err(format!(
            "{} bytes is too short for an IDX labels file (its header alone is {HEADER_LEN}); \
             the file is truncated or not IDX, download it again",
            bytes.len()
        )));
    }
    let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    match word(0) {
        LABELS_MAGIC => {}
        IMAGES_MAGIC => {
            return Err(err(
                "this is an IDX images file (magic 0x00000803), not a labels file; the labels \
                 file is the one named *-labels-idx1-ubyte"
                    .into(),
            ))
        }
        magic => {
            return Err(err(format!(
                "not an IDX labels file: magic number 0x{magic:08x}, expected \
                 0x{LABELS_MAGIC:08x} (bytes, one dimension); use MNIST's labels file, such as \
                 train-labels-idx1-ubyte.gz"
            )))
        }
    }
    let count = word(4) as usize;
    let labels = &bytes[HEADER_LEN..];
    if labels.len() != count {
        return Err(err(format!(
            "the header says {count} labels but {} bytes follow it; the file is truncated or \
             corrupt, download it again",
            labels.len()
        )));
    }
    Ok(labels.to_vec())
}

/// The names of the classes of digit-style labels: "0", "1", ... up to the largest label,
/// so that every label is a class id.
pub(super) fn digit_class_names(labels: &[u8]) -> Vec<String> {
    let classes = labels.iter().max().map_or(0, |&max| usize::from(max) + 1);
    (0..classes).map(|id| id.to_string()).collect()
}

/// The labels file of IDX images file `images`: its name with `images` made `labels` and
/// `idx3` made `idx1`, in the same folder, gzipped or not (a `.gz` on either name is
/// ignored). Errors name the paths it looked for when neither exists.
fn labels_file(images: &Path) -> Result<PathBuf> {
    let err = |msg: String| Error::Data {
        path: images.display().to_string(),
        msg,
    };
    let name = images
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    let labels = stem.replace("images", "labels").replace("idx3", "idx1");
    if labels == stem {
        return Err(err(
            "cannot tell which file holds the labels: the images file's name contains neither \
             `images` nor `idx3`; name the files as MNIST does (train-images-idx3-ubyte with \
             train-labels-idx1-ubyte beside it)"
                .into(),
        ));
    }
    let candidates = [
        images.with_file_name(&labels),
        images.with_file_name(labels + ".gz"),
    ];
    if let Some(found) = candidates.iter().find(|path| path.is_file()) {
        return Ok(found.clone());
    }
    Err(err(format!(
        "no labels file beside the images file (looked for {} and {}); put MNIST's labels \
         file there under that name, or use Dataset::open for unlabelled training",
        candidates[0].display(),
        candidates[1].display()
    )))
}

impl Dataset {
    /// [`Dataset::from_idx`] with class labels, read from the labels file beside the images
    /// file: the images file's name with `images` made `labels` and `idx3` made `idx1`,
    /// gzipped or not. Class `k` is named `"k"`, for every `k` up to the largest label.
    pub fn from_idx_labelled(
        path: impl AsRef<Path>,
        size: usize,
        channels: usize,
    ) -> Result<Dataset> {
        let images = images_file(path.as_ref())?;
        let labels_path = labels_file(&images)?;
        let name = labels_path.display().to_string();
        let bytes = std::fs::read(&labels_path).map_err(|e| Error::Data {
            path: name.clone(),
            msg: format!("cannot read the labels file ({e}); check its permissions"),
        })?;
        let labels = parse_idx_labels(&bytes, &name)?;
        let idx = IdxImages::read(&images)?;
        if labels.len() != idx.count {
            return Err(Error::Data {
                path: name,
                msg: format!(
                    "holds {} labels but the images file {} holds {} images; pair each images \
                     file with its own labels file (train-images with train-labels, t10k-images \
                     with t10k-labels)",
                    labels.len(),
                    images.display(),
                    idx.count
                ),
            });
        }
        let source = format!(
            "MNIST IDX file {} with labels {name} ({} images)",
            images.display(),
            idx.count
        );
        let mut ds = idx.to_dataset(0..idx.count, size, channels, source)?;
        ds.class_names = digit_class_names(&labels);
        ds.labels = Some(labels.into_iter().map(u32::from).collect());
        Ok(ds)
    }
}
