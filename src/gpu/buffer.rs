//! Storage buffers that go back to a pool when the last tensor using them is dropped, and the
//! count of the bytes the backend holds in wgpu buffers.
//!
//! Buffers are created in size classes ([`size_class`]) so that tensors of similar sizes reuse
//! each other's buffers; a tensor's buffer may therefore be larger than its data. Kernels index
//! by their element counts and reads copy the tensor's bytes, so the tail is never seen.
//!
//! Reusing a buffer while earlier dispatches in the same encoder still read it is safe: wgpu
//! orders the dispatches of one encoder and inserts the barriers between them. For the same
//! reason buffers are released by dropping them, never with `destroy`: wgpu keeps a dropped
//! buffer alive until the work recorded with it has run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The smallest buffer the pool creates: every tensor below it shares one class. It is the
/// largest storage offset alignment adapters ask for, the granularity drivers allocate in anyway.
const MIN_CLASS: u64 = 256;

/// The capacity of the buffer that holds `bytes`: `MIN_CLASS`, or the smallest size
/// 2^k·{1, 1.25, 1.5, 1.75} that holds it. Four classes per power of two keep the unused
/// tail below a quarter of the request (above `MIN_CLASS`) while letting tensors whose sizes
/// differ by up to 25 % share buffers. Every class is a multiple of 64 bytes.
pub(crate) fn size_class(bytes: u64) -> u64 {
    if bytes <= MIN_CLASS {
        return MIN_CLASS;
    }
    let step = (1u64 << bytes.ilog2()) / 4;
    bytes.div_ceil(step) * step
}

/// Bytes of the live wgpu buffers of one device, and their high-water mark.
#[derive(Default)]
struct Meter {
    allocated: AtomicU64,
    peak: AtomicU64,
}

/// A wgpu buffer counted in its pool's allocated bytes from creation until it is dropped.
pub(crate) struct Counted {
    buffer: wgpu::Buffer,
    meter: Arc<Meter>,
}

impl Counted {
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.meter
            .allocated
            .fetch_sub(self.buffer.size(), Ordering::Relaxed);
    }
}

/// Free buffers keyed by their capacity, holding at most `cap` bytes.
struct Free {
    by_capacity: BTreeMap<u64, Vec<Counted>>,
    bytes: u64,
    cap: u64,
}

impl Free {
    /// Drops the largest free buffers until the free bytes fit the cap: that frees the bytes
    /// with the fewest buffers to create again, and keeps the most buffers ready for reuse.
    fn evict_to_cap(&mut self) {
        while self.bytes > self.cap {
            let Some(mut largest) = self.by_capacity.last_entry() else {
                break;
            };
            let buffer = largest.get_mut().pop().expect("no empty lists are kept");
            if largest.get().is_empty() {
                largest.remove();
            }
            self.bytes -= buffer.raw().size();
        }
    }
}

/// The free buffers of one device and the count of every buffer created through it.
pub(crate) struct BufferPool {
    free: Mutex<Free>,
    meter: Arc<Meter>,
}

impl BufferPool {
    /// An empty pool whose free buffers may hold up to `cap` bytes.
    pub(crate) fn new(cap: u64) -> Self {
        BufferPool {
            free: Mutex::new(Free {
                by_capacity: BTreeMap::new(),
                bytes: 0,
                cap,
            }),
            meter: Arc::default(),
        }
    }

    /// Counts a buffer just created, until it is dropped.
    pub(crate) fn count(&self, buffer: wgpu::Buffer) -> Counted {
        let allocated = self
            .meter
            .allocated
            .fetch_add(buffer.size(), Ordering::Relaxed)
            + buffer.size();
        self.meter.peak.fetch_max(allocated, Ordering::Relaxed);
        Counted {
            buffer,
            meter: self.meter.clone(),
        }
    }

    /// A free buffer of exactly `capacity` bytes, if the pool holds one.
    pub(crate) fn take(&self, capacity: u64) -> Option<Counted> {
        let mut free = self.free.lock().unwrap();
        let list = free.by_capacity.get_mut(&capacity)?;
        let buffer = list.pop().expect("no empty lists are kept");
        if list.is_empty() {
            free.by_capacity.remove(&capacity);
        }
        free.bytes -= capacity;
        Some(buffer)
    }

    fn give_back(&self, buffer: Counted) {
        let mut free = self.free.lock().unwrap();
        let capacity = buffer.raw().size();
        free.bytes += capacity;
        free.by_capacity.entry(capacity).or_default().push(buffer);
        free.evict_to_cap();
    }

    /// Bytes held by free buffers.
    pub(crate) fn free_bytes(&self) -> u64 {
        self.free.lock().unwrap().bytes
    }

    /// The most bytes free buffers may hold.
    pub(crate) fn cap(&self) -> u64 {
        self.free.lock().unwrap().cap
    }

    /// Sets the cap, dropping free buffers at once until they fit it.
    pub(crate) fn set_cap(&self, cap: u64) {
        let mut free = self.free.lock().unwrap();
        free.cap = cap;
        free.evict_to_cap();
    }

    /// Bytes of every live buffer counted by this pool.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.meter.allocated.load(Ordering::Relaxed)
    }

    /// The high-water mark of [`Self::allocated_bytes`] since creation or the last reset.
    pub(crate) fn peak_bytes(&self) -> u64 {
        self.meter.peak.load(Ordering::Relaxed)
    }

    /// Starts a new high-water mark at the bytes allocated now.
    pub(crate) fn reset_peak(&self) {
        let allocated = self.meter.allocated.load(Ordering::Relaxed);
        self.meter.peak.store(allocated, Ordering::Relaxed);
    }

    /// Drops every free buffer.
    pub(crate) fn trim(&self) {
        let mut free = self.free.lock().unwrap();
        free.by_capacity.clear();
        free.bytes = 0;
    }
}

struct Pooled {
    /// Always `Some` until the buffer goes back to the pool on drop.
    buffer: Option<Counted>,
    size: u64,
    pool: Weak<BufferPool>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(pool), Some(buffer)) = (self.pool.upgrade(), self.buffer.take()) {
            pool.give_back(buffer);
        }
    }
}

/// A storage buffer holding a tensor's f32 elements. Clones share the buffer.
#[derive(Clone)]
pub struct GpuBuffer {
    inner: Arc<Pooled>,
}

impl GpuBuffer {
    /// Wraps `buffer` for a tensor of `size` bytes; it returns to `pool` when the last clone is
    /// dropped.
    pub(crate) fn new(buffer: Counted, size: u64, pool: &Arc<BufferPool>) -> Self {
        debug_assert!(size <= buffer.raw().size());
        GpuBuffer {
            inner: Arc::new(Pooled {
                buffer: Some(buffer),
                size,
                pool: Arc::downgrade(pool),
            }),
        }
    }

    /// The wgpu buffer, which may be larger than [`Self::size`].
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.inner
            .buffer
            .as_ref()
            .expect("taken only on drop")
            .raw()
    }

    /// Size in bytes of the tensor's data (at least 4, a multiple of 4); the buffer's capacity
    /// is its size class.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// True when both handles name the same buffer.
    pub fn same(&self, other: &GpuBuffer) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_quarter_steps_above_the_floor() {
        assert_eq!(size_class(4), 256);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(260), 320);
        assert_eq!(size_class(4000), 4096);
        assert_eq!(size_class(4096), 4096);
        assert_eq!(size_class(4100), 5120);
        assert_eq!(size_class(7 << 20), 7 << 20);
        assert_eq!(size_class((7 << 20) + 4), 8 << 20);
    }

    #[test]
    fn size_classes_waste_under_a_quarter_and_stay_aligned() {
        let mut classes = std::collections::BTreeSet::new();
        for bytes in (MIN_CLASS..1 << 16).step_by(4).chain([(1 << 40) + 4]) {
            let class = size_class(bytes);
            assert!(
                class >= bytes && class.is_multiple_of(64),
                "{bytes} -> {class}"
            );
            assert!(
                4 * (class - bytes) < bytes,
                "{bytes} -> {class} wastes 25 % or more"
            );
            classes.insert(class);
        }
        // 4 classes per power of two from 256 B to 64 KiB, and 64 KiB itself.
        assert_eq!(classes.len() - 1, 4 * 8 + 1);
    }
}
