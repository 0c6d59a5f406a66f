//! The 10,000 MNIST digits compiled into the library, so that training needs no download.
//!
//! The files are `data/mnist-10k-images-idx3-ubyte.gz` and its labels,
//! `data/mnist-10k-labels-idx1-ubyte.gz` (source and license in `data/README.md`): a shuffled
//! 10k-sample subset of MNIST, whose first 9,000 digits are the training split and last 1,000
//! the test split.

use std::ops::Range;

use super::idx_labels::{digit_class_names, parse_idx_labels};
use super::{Dataset, IdxImages};
use crate::error::{Error, Result};

/// The gzipped IDX images file.
const MNIST_IMAGES: &[u8] = include_bytes!("../../data/mnist-10k-images-idx3-ubyte.gz");
/// The gzipped IDX labels file: the digit each image shows.
const MNIST_LABELS: &[u8] = include_bytes!("../../data/mnist-10k-labels-idx1-ubyte.gz");
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

impl Split {
    /// The digits of the split, and its name for messages.
    fn range(self) -> (Range<usize>, &'static str) {
        match self {
            Split::Train => (0..TRAIN, "training"),
            Split::Test => (TRAIN..TOTAL, "test"),
        }
    }
}

/// The error for an embedded file that does not hold [`TOTAL`] entries.
fn damaged(path: &str, what: &str, count: usize) -> Error {
    Error::Data {
        path: path.into(),
        msg: format!(
            "holds {count} {what}, expected {TOTAL}; the library was built from a damaged copy \
             of data/, rebuild it from a clean checkout"
        ),
    }
}

impl Dataset {
    /// The embedded MNIST digits of `split`: 28 x 28 digits padded with a 2-pixel black
    /// border to 32 x 32, resized to `size` x `size` when that differs (area-averaged when
    /// smaller), the gray channel repeated when `channels` is 3.
    pub fn embedded_mnist(split: Split, size: usize, channels: usize) -> Result<Dataset> {
        let path = "embedded MNIST";
        let idx = IdxImages::parse(MNIST_IMAGES, path)?;
        if idx.count != TOTAL {
            return Err(damaged(path, "digits", idx.count));
        }
        let (range, name) = split.range();
        let source = format!("embedded MNIST, {name} split ({} digits)", range.len());
        idx.to_dataset(range, size, channels, source)
    }

    /// [`Dataset::embedded_mnist`] with class labels: the digit each image shows, classes
    /// named "0" to "9".
    pub fn embedded_mnist_labelled(split: Split, size: usize, channels: usize) -> Result<Dataset> {
        let path = "embedded MNIST labels";
        let labels = parse_idx_labels(MNIST_LABELS, path)?;
        if labels.len() != TOTAL {
            return Err(damaged(path, "labels", labels.len()));
        }
        let mut ds = Dataset::embedded_mnist(split, size, channels)?;
        ds.class_names = digit_class_names(&labels);
        ds.labels = Some(
            labels[split.range().0]
                .iter()
                .map(|&l| u32::from(l))
                .collect(),
        );
        Ok(ds)
    }
}
