//! A folder of PNG and JPEG images, searched recursively.
//!
//! Files are taken by extension (`png`, `jpg`, `jpeg`, in any case) and read in sorted path
//! order, so that the same folder always gives the same dataset. Each image is fitted to
//! `size` x `size` on its own (its largest centered square, resampled), so images of mixed
//! sizes and aspect ratios are fine. Grayscale datasets take each image's luma (Rec. 709
//! weights), RGB datasets its color; alpha is dropped, not composited.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader};
use rayon::prelude::*;

use super::square::Planes;
use super::{check_shape, Dataset};
use crate::error::{Error, Result};

/// The file extensions read, compared case-insensitively.
pub const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

impl Dataset {
    /// Every PNG and JPEG under folder `dir`, as `channels` x `size` x `size` images.
    pub fn from_folder(dir: impl AsRef<Path>, size: usize, channels: usize) -> Result<Dataset> {
        let dir = dir.as_ref();
        let name = dir.display().to_string();
        check_shape(&name, size, channels)?;
        check_folder(dir)?;
        let mut files = Vec::new();
        collect_images(dir, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(Error::Data {
                path: name,
                msg: format!(
                    "no images found (looked for files ending in .{}, in any case, in this \
                     folder and the folders below it); add images or pass another folder",
                    EXTENSIONS.join(", .")
                ),
            });
        }
        Ok(Dataset {
            images: load_images(&files, size, channels)?,
            len: files.len(),
            channels,
            size,
            source: format!("image folder {name} ({} images)", files.len()),
            labels: None,
            class_names: Vec::new(),
        })
    }
}

/// Checks that `dir` is a folder; the error says what is wrong with the path.
pub(super) fn check_folder(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let msg = if dir.exists() {
        "is not a folder; pass a folder of PNG/JPEG images, or mnist:PATH for an MNIST IDX file"
    } else {
        "no such folder; check the path, or leave the dataset out to train on the embedded \
         MNIST digits"
    };
    Err(Error::Data {
        path: dir.display().to_string(),
        msg: msg.into(),
    })
}

/// Whether `path` has one of the [`EXTENSIONS`].
pub(super) fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Adds the image files under `dir` to `files`. Folders reached through symbolic links are
/// not entered, so a link cycle cannot make the walk endless; linked files are read.
pub(super) fn collect_images(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let err = |e: std::io::Error| Error::Data {
        path: dir.display().to_string(),
        msg: format!("cannot list the folder ({e}); check its permissions"),
    };
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let path = entry.path();
        if entry.file_type().map_err(err)?.is_dir() {
            collect_images(&path, files)?;
        } else if is_image(&path) && path.is_file() {
            files.push(path);
        }
    }
    Ok(())
}

/// Decodes `files`, in parallel, and returns their pixels one image after another, as
/// [`load_image`] makes them.
pub(super) fn load_images(files: &[PathBuf], size: usize, channels: usize) -> Result<Vec<f32>> {
    Ok(files
        .par_iter()
        .map(|file| load_image(file, size, channels))
        .collect::<Result<Vec<_>>>()?
        .concat())
}

/// Decodes one image and returns its `channels` planes of `size` x `size` pixels in [-1, 1]:
/// the largest centred square, resampled.
pub fn load_image(file: &Path, size: usize, channels: usize) -> Result<Vec<f32>> {
    let err = |msg: String| Error::Data {
        path: file.display().to_string(),
        msg,
    };
    let image: DynamicImage = ImageReader::open(file)
        .and_then(|reader| reader.with_guessed_format())
        .map_err(|e| err(format!("cannot read the file ({e}); check its permissions")))?
        .decode()
        .map_err(|e| {
            err(format!(
                "cannot decode the image ({e}); replace it with a valid PNG or JPEG, or remove \
                 it from the folder"
            ))
        })?;
    if image.width() == 0 || image.height() == 0 {
        return Err(err(format!(
            "the image is {} x {} pixels, it has no pixels; remove it from the folder",
            image.width(),
            image.height()
        )));
    }
    let (width, height) = (image.width() as usize, image.height() as usize);
    let planes = if channels == 1 {
        Planes::from_interleaved(width, height, 1, image.to_luma32f().as_raw())
    } else {
        Planes::from_interleaved(width, height, 3, image.to_rgb32f().as_raw())
    };
    let mut out = Vec::with_capacity(channels * size * size);
    planes.fit(size).append_scaled(channels, &mut out);
    Ok(out)
}
