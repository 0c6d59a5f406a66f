//! A folder of class folders: labelled images for class-conditional training.
//!
//! Each subfolder of the root is one class, named after the subfolder (`ROOT/cat/`,
//! `ROOT/dog/`); the sorted names are the class ids, 0 for the first. A class's images are
//! the PNG and JPEG files in its folder and the folders below it, chosen, ordered and fitted
//! to `size` x `size` as [`Dataset::from_folder`] does, and the dataset holds the classes one
//! after the other. Class folders may be symbolic links; below them, linked folders are not
//! entered. Other files in the root (a README) are ignored, but images there are refused:
//! they belong to no class.

use std::path::{Path, PathBuf};

use super::folder::{check_folder, collect_images, is_image, load_images, EXTENSIONS};
use super::{check_shape, Dataset};
use crate::error::{Error, Result};

/// Loose images named in the error about them, at most.
const NAMED: usize = 3;

impl Dataset {
    /// The images under folder `dir`, labelled by the class subfolder each lies in, as
    /// `channels` x `size` x `size` images.
    pub fn from_class_folders(
        dir: impl AsRef<Path>,
        size: usize,
        channels: usize,
    ) -> Result<Dataset> {
        let dir = dir.as_ref();
        let name = dir.display().to_string();
        check_shape(&name, size, channels)?;
        check_folder(dir)?;
        let classes = class_folders(dir)?;
        let (mut files, mut labels) = (Vec::new(), Vec::new());
        for (id, class) in classes.iter().enumerate() {
            let first = files.len();
            collect_images(class, &mut files)?;
            if files.len() == first {
                return Err(Error::Data {
                    path: class.display().to_string(),
                    msg: format!(
                        "this class folder holds no images (looked for files ending in .{}, in \
                         any case, in it and the folders below it); add the class's images, or \
                         remove the folder",
                        EXTENSIONS.join(", .")
                    ),
                });
            }
            files[first..].sort();
            let id = u32::try_from(id).map_err(|_| Error::Data {
                path: name.clone(),
                msg: format!(
                    "{} class folders is more than a u32 class id can count",
                    classes.len()
                ),
            })?;
            labels.resize(files.len(), id);
        }
        Ok(Dataset {
            images: load_images(&files, size, channels)?,
            len: files.len(),
            channels,
            size,
            source: format!(
                "image class folders {name} ({} images, {} classes)",
                files.len(),
                classes.len()
            ),
            labels: Some(labels),
            class_names: classes
                .iter()
                .map(|class| {
                    class
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into()
                })
                .collect(),
        })
    }
}

/// The class folders of `dir`, sorted: its subfolders, or an error if it has none or if
/// images lie in it directly.
fn class_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    let err = |msg: String| Error::Data {
        path: dir.display().to_string(),
        msg,
    };
    let list_err = |e: std::io::Error| {
        err(format!(
            "cannot list the folder ({e}); check its permissions"
        ))
    };
    let (mut classes, mut loose) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).map_err(list_err)? {
        let path = entry.map_err(list_err)?.path();
        if path.is_dir() {
            classes.push(path);
        } else if is_image(&path) {
            loose.push(
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    if !loose.is_empty() {
        loose.sort();
        let more = if loose.len() > NAMED { ", ..." } else { "" };
        return Err(err(format!(
            "{} images lie directly in the folder ({}{more}), outside any class; put each \
             class's images in its own subfolder named after the class (such as cat/{}), or \
             use Dataset::open for unlabelled training",
            loose.len(),
            loose[..loose.len().min(NAMED)].join(", "),
            loose[0]
        )));
    }
    if classes.is_empty() {
        return Err(err(
            "no class subfolders; a labelled image dataset holds one subfolder per class \
             (such as cat/ and dog/), each holding that class's images"
                .into(),
        ));
    }
    classes.sort();
    Ok(classes)
}
