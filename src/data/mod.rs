//! Datasets: the embedded MNIST digits, MNIST IDX files and image folders, as batches in [-1, 1].
//!
//! Every loader produces the same thing, a [`Dataset`]: `len` square images of
//! `channels` x `size` x `size` pixels, stored NCHW as f32 in [-1, 1] (`2 v / 255 - 1` for an
//! 8-bit value `v`, so black is -1 and white 1), the range DDPM's Gaussian noise is scaled to.
//! A [`Batcher`] then draws batches from it as a pure function of a seed and the step number,
//! so that a resumed training run sees exactly the batches it would have seen.
//!
//! - [`Dataset::embedded_mnist`]: 10,000 MNIST digits compiled into the library (`data/`).
//! - [`Dataset::from_idx`]: an MNIST IDX images file, gzipped or not.
//! - [`Dataset::from_folder`]: every PNG and JPEG under a folder.
//! - [`Dataset::open`]: one of the three, from a command-line spec.
//!
//! For class-conditional training each has a labelled twin that also gives every image a
//! class id ([`Dataset::labels`], named by [`Dataset::class_names`]):
//! [`Dataset::embedded_mnist_labelled`], [`Dataset::from_idx_labelled`] (with the IDX labels
//! file beside the images), [`Dataset::from_class_folders`] (one subfolder per class) and
//! [`Dataset::open_labelled`].

pub mod batches;
pub mod class_folders;
pub mod embedded;
pub mod folder;
pub mod idx;
pub mod idx_labels;
mod square;

pub use batches::Batcher;
pub use embedded::Split;
pub use idx::IdxImages;

use crate::error::{Error, Result};

/// The largest image side the loaders make (a 4096 x 4096 RGB image is 200 MB of f32).
pub const MAX_SIZE: usize = 4096;

/// Images of one size and channel count, NCHW, pixels in [-1, 1].
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `len * channels * size * size` pixels, image after image, each channel a `size` x
    /// `size` row-major plane.
    pub images: Vec<f32>,
    /// Number of images.
    pub len: usize,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Height and width of every image.
    pub size: usize,
    /// Where the images came from, for logs and model cards.
    pub source: String,
    /// The class id of each image, when the source has labels: `len` ids, each below
    /// `class_names.len()`. `None` for unlabelled data.
    pub labels: Option<Vec<u32>>,
    /// The name of each class id (`class_names[id]`); empty when unlabelled.
    pub class_names: Vec<String>,
}

/// What a command-line dataset spec names.
enum Spec<'a> {
    /// No spec: the embedded MNIST digits.
    Embedded,
    /// `mnist:PATH`: an MNIST IDX images file, or a folder holding one.
    Idx(&'a str),
    /// Any other spec: a folder of images.
    Folder(&'a str),
}

impl<'a> Spec<'a> {
    /// Reads a spec; an empty path is an error.
    fn parse(spec: Option<&'a str>) -> Result<Spec<'a>> {
        let Some(spec) = spec else {
            return Ok(Spec::Embedded);
        };
        let parsed = match spec.strip_prefix("mnist:") {
            Some(path) => Spec::Idx(path),
            None => Spec::Folder(spec),
        };
        if let Spec::Idx(path) | Spec::Folder(path) = parsed {
            if path.trim().is_empty() {
                return Err(Error::Data {
                    path: format!("{spec:?}"),
                    msg: "no path given; pass a folder of PNG/JPEG images, or mnist:PATH for an \
                          MNIST IDX images file, or no dataset for the embedded MNIST digits"
                        .into(),
                });
            }
        }
        Ok(parsed)
    }
}

impl Dataset {
    /// Reads the dataset a command line names: `None` is the embedded MNIST training split,
    /// `mnist:PATH` an MNIST IDX images file (or a folder holding one), anything else a
    /// folder of images. The dataset has no labels.
    pub fn open(spec: Option<&str>, size: usize, channels: usize) -> Result<Dataset> {
        match Spec::parse(spec)? {
            Spec::Embedded => Dataset::embedded_mnist(Split::Train, size, channels),
            Spec::Idx(path) => Dataset::from_idx(path, size, channels),
            Spec::Folder(path) => Dataset::from_folder(path, size, channels),
        }
    }

    /// Reads the dataset a command line names, as [`Dataset::open`] does, with its class
    /// labels: `None` is the embedded MNIST training split labelled with its digits,
    /// `mnist:PATH` an MNIST IDX images file (or a folder holding one) labelled by the IDX
    /// labels file beside it, anything else a folder of class folders, one per class. A source
    /// without labels is an error that says what is missing.
    pub fn open_labelled(spec: Option<&str>, size: usize, channels: usize) -> Result<Dataset> {
        match Spec::parse(spec)? {
            Spec::Embedded => Dataset::embedded_mnist_labelled(Split::Train, size, channels),
            Spec::Idx(path) => Dataset::from_idx_labelled(path, size, channels),
            Spec::Folder(path) => Dataset::from_class_folders(path, size, channels),
        }
    }

    /// Number of classes: the length of [`Dataset::class_names`], 0 when unlabelled.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Number of pixels in one image: `channels * size * size`.
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Checks that the fields agree: a size and channel count the loaders make,
    /// `len * channels * size * size` pixels, and when labelled, `len` labels that are all
    /// class ids (below `class_names.len()`); when unlabelled, no class names.
    pub fn check(&self) -> Result<()> {
        check_shape(&self.source, self.size, self.channels)?;
        if Some(self.images.len()) != self.len.checked_mul(self.image_len()) {
            return Err(Error::Data {
                path: self.source.clone(),
                msg: format!(
                    "holds {} pixel values where {} images of {} x {} x {} need {}; build \
                     datasets with the loaders, or keep `images` and `len` in step",
                    self.images.len(),
                    self.len,
                    self.channels,
                    self.size,
                    self.size,
                    self.len.saturating_mul(self.image_len())
                ),
            });
        }
        self.check_labels()
    }

    /// The label part of [`Dataset::check`].
    fn check_labels(&self) -> Result<()> {
        let msg = match &self.labels {
            None if self.class_names.is_empty() => return Ok(()),
            None => format!(
                "names {} classes but has no labels; set `labels`, or clear `class_names` for \
                 unlabelled data",
                self.class_names.len()
            ),
            Some(labels) if labels.len() != self.len => format!(
                "holds {} labels for {} images; give every image one label, or load labelled \
                 data with Dataset::open_labelled",
                labels.len(),
                self.len
            ),
            Some(labels) => match labels
                .iter()
                .position(|&l| l as usize >= self.class_names.len())
            {
                None => return Ok(()),
                Some(i) => format!(
                    "image {i} has label {} but only {} classes are named, so labels must be \
                     below {}; name every class in `class_names`",
                    labels[i],
                    self.class_names.len(),
                    self.class_names.len()
                ),
            },
        };
        Err(Error::Data {
            path: self.source.clone(),
            msg,
        })
    }

    /// The pixels of image `i`, channel after channel. Panics if `i >= len`, as slice
    /// indexing does.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }
}

/// Checks the image size and channel count a loader was asked for; `path` names the dataset
/// in the error.
fn check_shape(path: &str, size: usize, channels: usize) -> Result<()> {
    let msg = if size == 0 || size > MAX_SIZE {
        format!(
            "image size {size} is out of range; ask for a size from 1 to {MAX_SIZE}, such as \
             32 or 64"
        )
    } else if channels != 1 && channels != 3 {
        format!("{channels} channels asked for; use 1 (grayscale) or 3 (RGB)")
    } else {
        return Ok(());
    };
    Err(Error::Data {
        path: path.into(),
        msg,
    })
}
