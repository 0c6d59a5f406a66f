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

pub mod batches;
pub mod embedded;
pub mod folder;
pub mod idx;
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
}

impl Dataset {
    /// Reads the dataset a command line names: `None` is the embedded MNIST training split,
    /// `mnist:PATH` an MNIST IDX images file (or a folder holding one), anything else a
    /// folder of images.
    pub fn open(spec: Option<&str>, size: usize, channels: usize) -> Result<Dataset> {
        let Some(spec) = spec else {
            return Dataset::embedded_mnist(Split::Train, size, channels);
        };
        let (path, is_idx) = match spec.strip_prefix("mnist:") {
            Some(path) => (path, true),
            None => (spec, false),
        };
        if path.trim().is_empty() {
            return Err(Error::Data {
                path: format!("{spec:?}"),
                msg: "no path given; pass a folder of PNG/JPEG images, or mnist:PATH for an \
                      MNIST IDX images file, or no dataset for the embedded MNIST digits"
                    .into(),
            });
        }
        if is_idx {
            Dataset::from_idx(path, size, channels)
        } else {
            Dataset::from_folder(path, size, channels)
        }
    }

    /// Number of pixels in one image: `channels * size * size`.
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Checks that the fields agree: a size and channel count the loaders make, and
    /// `len * channels * size * size` pixels.
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
        Ok(())
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
