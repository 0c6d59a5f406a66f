//! Batches drawn as a pure function of a seed and the step number.
//!
//! Training draws images in epochs: each epoch visits every image once, in an order shuffled
//! anew per epoch. Counting the images drawn over the whole run, draw `j = step * batch + i`
//! (image `i` of batch `step`) is position `j % len` of the shuffle of epoch `j / len`; a
//! batch may straddle two epochs. The shuffle of epoch `e` is a Fisher–Yates shuffle of
//! `0..len` whose swap for position `p` (from `len - 1` down to 1) picks `k = (w (p + 1)) >> 32`
//! in `0..=p` from the 32-bit word `w` at index `e len + p` of the Philox stream
//! [`SHUFFLE_STREAM`] of the seed (see [`crate::rng`]). With horizontal flips on, draw `j` is
//! mirrored when the uniform of word `j` of stream [`FLIP_STREAM`] is below 1/2. The labels
//! of a batch ([`Batcher::batch_labels`]) are those of the images it drew, flipped or not.
//!
//! Nothing is remembered between calls: batch `step` of a resumed run is the batch the
//! uninterrupted run drew. Each call reshuffles the epochs its batch touches, which costs a
//! Philox block per image of the dataset.

use super::Dataset;
use crate::error::{Error, Result};
use crate::rng::{block, uniform_from_bits};

/// Counter word 2 of the Philox stream that shuffles the epochs ("SHUF"), apart from the
/// uniform and normal streams of [`crate::rng`], so that the same seed can drive both.
pub const SHUFFLE_STREAM: u32 = 0x5348_5546;
/// Counter word 2 of the Philox stream that decides the horizontal flips ("FLIP").
pub const FLIP_STREAM: u32 = 0x464c_4950;

/// Word `index` of Philox stream `stream` of `seed`.
fn word(seed: u64, stream: u32, index: u64) -> u32 {
    block(seed, stream, index / 4)[(index % 4) as usize]
}

/// Draws batches of a dataset of `len` images: shuffled epochs, optional horizontal flips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batcher {
    len: usize,
    batch: usize,
    seed: u64,
    hflip: bool,
}

impl Batcher {
    /// A batcher of batches of `batch` images out of `len`, shuffled by `seed`, each image
    /// mirrored left to right with probability 1/2 when `hflip` is on.
    pub fn new(len: usize, batch: usize, seed: u64, hflip: bool) -> Result<Batcher> {
        if len == 0 {
            return Err(Error::invalid(
                "Batcher::new",
                "the dataset has no images; load a dataset that has some",
            ));
        }
        if batch == 0 {
            return Err(Error::invalid(
                "Batcher::new",
                "the batch size is 0; use a batch size of at least 1",
            ));
        }
        Ok(Batcher {
            len,
            batch,
            seed,
            hflip,
        })
    }

    /// Images per batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// The order in which epoch `epoch` visits the images: a permutation of `0..len`.
    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        let base = epoch.wrapping_mul(self.len as u64);
        for p in (1..self.len).rev() {
            let w = word(self.seed, SHUFFLE_STREAM, base.wrapping_add(p as u64));
            let k = ((u64::from(w) * (p as u64 + 1)) >> 32) as usize;
            order.swap(p, k);
        }
        order
    }

    /// The images of batch `step`, in batch order.
    pub fn batch_indices(&self, step: u64) -> Vec<usize> {
        let len = self.len as u64;
        let first = step.wrapping_mul(self.batch as u64);
        let mut epoch = first / len;
        let mut order = self.permutation(epoch);
        (0..self.batch as u64)
            .map(|i| {
                let j = first.wrapping_add(i);
                if j / len != epoch {
                    epoch = j / len;
                    order = self.permutation(epoch);
                }
                order[(j % len) as usize]
            })
            .collect()
    }

    /// Whether draw `j` (counted over the whole run) is mirrored.
    fn flipped(&self, j: u64) -> bool {
        self.hflip && uniform_from_bits(word(self.seed, FLIP_STREAM, j)) < 0.5
    }

    /// Checks that `ds` is sound and has the `len` images the batcher was made for.
    fn check(&self, ds: &Dataset) -> Result<()> {
        ds.check()?;
        if ds.len != self.len {
            return Err(Error::Data {
                path: ds.source.clone(),
                msg: format!(
                    "the batcher was made for {} images but the dataset has {}; make it with \
                     Batcher::new(dataset.len, ...)",
                    self.len, ds.len
                ),
            });
        }
        Ok(())
    }

    /// The pixels of batch `step`, `[batch, channels, size, size]`, from `ds`, which must
    /// have the `len` images the batcher was made for.
    pub fn batch(&self, ds: &Dataset, step: u64) -> Result<Vec<f32>> {
        self.check(ds)?;
        let first = step.wrapping_mul(self.batch as u64);
        let mut out = Vec::with_capacity(self.batch * ds.image_len());
        for (i, index) in self.batch_indices(step).into_iter().enumerate() {
            let image = ds.image(index);
            if self.flipped(first.wrapping_add(i as u64)) {
                for row in image.chunks_exact(ds.size) {
                    out.extend(row.iter().rev());
                }
            } else {
                out.extend_from_slice(image);
            }
        }
        Ok(out)
    }

    /// The class labels of batch `step`, `[batch]`: the label of each image
    /// [`Batcher::batch`] returns for the same step, in the same order (a mirrored image keeps
    /// its label). `ds` must be labelled and have the `len` images the batcher was made for.
    pub fn batch_labels(&self, ds: &Dataset, step: u64) -> Result<Vec<u32>> {
        self.check(ds)?;
        let Some(labels) = &ds.labels else {
            return Err(Error::Data {
                path: ds.source.clone(),
                msg: "has no class labels; load it with Dataset::open_labelled (the embedded \
                      digits, mnist:PATH with its labels file, or a folder of class folders)"
                    .into(),
            });
        };
        Ok(self
            .batch_indices(step)
            .into_iter()
            .map(|i| labels[i])
            .collect())
    }
}
