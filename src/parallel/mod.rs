//! Data-parallel training: a group of ranks (processes, or GPUs) trains one model, each rank on
//! its own slice of every global batch. Each rank computes the gradient of its slice; one sum
//! over the group (an all-reduce) gives every rank the gradient of the whole batch, and every
//! rank then applies the same clipping, AdamW and EMA update, so the weights stay identical.
//!
//! Since every random number of a step is a function of `(seed, step, index in the global
//! batch)`, rank `r` of `n` draws exactly the timesteps, noise and dropout masks that samples
//! `r B/n .. (r + 1) B/n` get in a single process: data parallelism changes only the order of
//! the gradient's sum.
//!
//! [`Collective`] is the one operation the trainer needs from a communication engine;
//! [`mpi`] (cargo feature `mpi`) implements it on MPI.

#[cfg(feature = "mpi")]
pub mod mpi;

use std::ops::Range;

use crate::error::{Error, Result};

/// A group of ranks that can sum a vector across all of them.
pub trait Collective: Send + Sync {
    /// This rank's index, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces `values` on every rank by their elementwise sum over all ranks; every rank
    /// receives the same sums. Every rank must call it, in the same order, with the same length.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;
}

/// Which part of every global batch one rank trains on: samples
/// `rank * local .. (rank + 1) * local` of a batch of `ranks * local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Shard {
    /// The whole batch: one process.
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    /// The shard of a group's rank.
    pub fn of(group: &dyn Collective) -> Shard {
        Shard {
            rank: group.rank(),
            ranks: group.size(),
        }
    }

    /// The samples this rank takes of a global batch of `batch` (which every rank must split
    /// into equal slices, so that the mean of the ranks' losses is the batch's).
    pub fn local_batch(&self, batch: usize) -> Result<usize> {
        if self.ranks == 0 || self.rank >= self.ranks {
            return Err(Error::invalid(
                "data-parallel",
                format!("rank {} of {} does not exist", self.rank, self.ranks),
            ));
        }
        if batch == 0 || !batch.is_multiple_of(self.ranks) {
            return Err(Error::invalid(
                "data-parallel",
                format!(
                    "a batch of {batch} does not split into {} equal slices, one per rank; use \
                     a batch size that is a multiple of {}",
                    self.ranks, self.ranks
                ),
            ));
        }
        Ok(batch / self.ranks)
    }

    /// The indices in the global batch of this rank's samples.
    pub fn range(&self, batch: usize) -> Result<Range<usize>> {
        let local = self.local_batch(batch)?;
        Ok(self.rank * local..(self.rank + 1) * local)
    }

    /// This rank's slice of a global batch laid out sample by sample (`[B, ...]`).
    pub fn slice<'a, T>(&self, global: &'a [T], batch: usize) -> Result<&'a [T]> {
        let range = self.range(batch)?;
        if !global.len().is_multiple_of(batch) {
            return Err(Error::invalid(
                "data-parallel",
                format!("{} values are not a batch of {batch}", global.len()),
            ));
        }
        let per = global.len() / batch;
        Ok(&global[range.start * per..range.end * per])
    }
}
