//! The 10,000 MNIST digits compiled into the library, so that training needs no download.
//!
//! The file is `data/mnist-10k-images-idx3-ubyte.gz` (source and license in
//! `data/README.md`): a shuffled 10k-sample subset of MNIST, whose first 9,000 digits are the
//! training split and last 1,000 the test split.

use super::{Dataset, IdxImages};
use crate::error::{Error, Result};

/// The gzipped IDX images file.
const MNIST_IMAGES: &[u8] = include_bytes!("../../data/mnist-10k-images-idx3-ubyte.gz");
/// Digits in the embedded file.
const TOTAL: usize = 10_000;
/// Digits in the training split; the rest are the test split.
const TRAIN: usize = 9_000;

/// Which part of the embedded digits to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The first 9,000 digits.
    Train,
    /// The last 1,000 digits.
    Test,
}

impl Dataset {
    /// The embedded MNIST digits of `split`: 28 x 28 digits padded with a 2-pixel black
    /// border to 32 x 32, resized to `size` x `size` when that differs (area-averaged when
    /// smaller), the gray channel repeated when `channels` is 3.
    pub fn embedded_mnist(split: Split, size: usize, channels: usize) -> Result<Dataset> {
        let path = "embedded MNIST";
        let idx = IdxImages::parse(MNIST_IMAGES, path)?;
        if idx.count != TOTAL {
            return Err(Error::Data {
                path: path.into(),
                msg: format!(
                    "holds {} digits, expected {TOTAL}; the library was built from a damaged \
                     copy of data/, rebuild it from a clean checkout",
                    idx.count
                ),
            });
        }
        let (range, name) = match split {
            Split::Train => (0..TRAIN, "training"),
            Split::Test => (TRAIN..TOTAL, "test"),
        };
        let source = format!("embedded MNIST, {name} split ({} digits)", range.len());
        idx.to_dataset(range, size, channels, source)
    }
}
