//! Winograd's transformed filters `U = G g G^T` kept across the evaluations of one model.
//!
//! A sampler evaluates the same weights tens to thousands of times, and on the CPU each 3x3
//! convolution would transform its filters anew every time: `a^2 / 9` (4 for `F(4x4, 3x3)`)
//! times the weights' size written, about an eighth of a batch-16 evaluation of the mnist
//! U-Net (BENCHMARKS.md). Inside [`with_filter_cache`] the forward pass keeps each weight's
//! `U` on the calling thread and reuses it while the weight is bit for bit what was
//! transformed: a weight changed in place (an optimizer step) is transformed again, so the
//! cache never changes a result, only its cost. It holds at most [`CAPACITY_BYTES`] and is
//! emptied when the outermost scope ends.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::Geometry;

/// The most a cache holds (copies of the weights and their transforms), in bytes: the mnist
/// U-Net needs about 80 MB; a model beyond this keeps what fits and transforms the rest.
pub const CAPACITY_BYTES: usize = 1 << 30;

/// Where a weight lives and the convolution's shape: `(address, len, Cout, Cin, a)`.
type Key = (usize, usize, usize, usize, usize);

struct Entry {
    /// The weight that was transformed, to check that it is still the same.
    w: Vec<f32>,
    u: Arc<Vec<f32>>,
}

#[derive(Default)]
struct Cache {
    /// Nesting depth of [`with_filter_cache`] on this thread; 0: no caching.
    depth: usize,
    bytes: usize,
    entries: HashMap<Key, Entry>,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// Ends a scope when dropped, also when `f` panics.
struct Scope;

impl Drop for Scope {
    fn drop(&mut self) {
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            c.depth -= 1;
            if c.depth == 0 {
                *c = Cache::default();
            }
        });
    }
}

/// Runs `f` with the CPU convolutions on this thread reusing their transformed filters from
/// one evaluation to the next (see the module's comment); scopes nest.
pub fn with_filter_cache<R>(f: impl FnOnce() -> R) -> R {
    CACHE.with(|c| c.borrow_mut().depth += 1);
    let _scope = Scope;
    f()
}

/// `U` of the weight `w` of the convolution `g` with `a x a` tiles: the cached one when a
/// scope is open and `w` is unchanged since it was made by `transform`, else `transform(w)`.
pub(super) fn transformed(
    g: &Geometry,
    a: usize,
    w: &[f32],
    transform: impl FnOnce() -> Vec<f32>,
) -> Arc<Vec<f32>> {
    let key = (w.as_ptr() as usize, w.len(), g.cout, g.cin, a);
    let hit = CACHE.with(|c| {
        let c = c.borrow();
        if c.depth == 0 {
            return None;
        }
        let e = c.entries.get(&key)?;
        same_bits(&e.w, w).then(|| e.u.clone())
    });
    if let Some(u) = hit {
        return u;
    }
    let u = Arc::new(transform());
    CACHE.with(|c| {
        let c = &mut *c.borrow_mut();
        if c.depth == 0 {
            return;
        }
        if let Some(old) = c.entries.remove(&key) {
            c.bytes -= bytes(&old);
        }
        let entry = Entry {
            w: w.to_vec(),
            u: u.clone(),
        };
        if c.bytes + bytes(&entry) <= CAPACITY_BYTES {
            c.bytes += bytes(&entry);
            c.entries.insert(key, entry);
        }
    });
    u
}

/// Whether the two weights are identical bit for bit (`-0.0` is not `0.0` here, and a NaN
/// equals itself).
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    bytemuck::cast_slice::<f32, u32>(a) == bytemuck::cast_slice::<f32, u32>(b)
}

fn bytes(e: &Entry) -> usize {
    (e.w.len() + e.u.len()) * std::mem::size_of::<f32>()
}

/// Entries cached on this thread, for the tests.
#[cfg(test)]
pub(super) fn entries() -> usize {
    CACHE.with(|c| c.borrow().entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::{Conv2dParams, CpuAlgorithm};
    use crate::tensor::Tensor;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn conv(x: &Tensor, w: &Tensor) -> Vec<f32> {
        let y = CpuAlgorithm::WinogradF4.conv2d(
            x,
            w,
            None,
            &Conv2dParams::new(1, 1),
            &Default::default(),
        );
        y.unwrap().cpu_read("test").unwrap().to_vec()
    }

    /// Inside a scope the second evaluation reuses the first's filters and gives the same
    /// output bit for bit; a weight changed in place is transformed again; the input
    /// gradient's one-off filters are not kept; the scope's end empties the cache.
    #[test]
    fn reuses_filters_only_while_the_weight_is_unchanged() {
        let (cin, cout) = (9, 12);
        let x = Tensor::from_cpu(&[2, cin, 11, 13], values(2 * cin * 143, 1));
        let mut w = Tensor::from_cpu(&[cout, cin, 3, 3], values(cout * cin * 9, 2));
        let uncached = conv(&x, &w);
        with_filter_cache(|| {
            assert_eq!(entries(), 0);
            assert_eq!(conv(&x, &w), uncached);
            assert_eq!(entries(), 1);
            assert_eq!(conv(&x, &w), uncached);
            w.cpu_write("test").unwrap()[7] += 0.5;
        });
        let changed = conv(&x, &w);
        assert_ne!(changed, uncached);
        with_filter_cache(|| {
            assert_eq!(conv(&x, &w), changed);
            w.cpu_write("test").unwrap()[7] -= 0.5;
            assert_eq!(
                conv(&x, &w),
                uncached,
                "a changed weight used stale filters"
            );
            assert_eq!(entries(), 1);
            let dy = Tensor::from_cpu(&[2, cout, 11, 13], values(2 * cout * 143, 3));
            let p = Conv2dParams::new(1, 1);
            CpuAlgorithm::WinogradF4
                .conv2d_backward(&x, &w, &dy, &p, false)
                .unwrap();
            assert_eq!(entries(), 1, "the input gradient's filters were cached");
            with_filter_cache(|| assert_eq!(conv(&x, &w), uncached));
            assert_eq!(entries(), 1, "an inner scope emptied the outer one's cache");
        });
        assert_eq!(entries(), 0);
    }
}
