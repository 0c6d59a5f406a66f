//! Storage buffers that go back to a pool when the last tensor using them is dropped, and the
//! count of the bytes the backend holds in wgpu buffers.
//!
//! Reusing a buffer while earlier dispatches in the same encoder still read it is safe: wgpu
//! orders the dispatches of one encoder and inserts the barriers between them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

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

/// Free buffers keyed by their size in bytes, and the bytes they hold.
#[derive(Default)]
struct Free {
    by_size: BTreeMap<u64, Vec<Counted>>,
    bytes: u64,
}

/// The free buffers of one device and the count of every buffer created through it.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<Free>,
    meter: Arc<Meter>,
}

impl BufferPool {
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

    /// A free buffer of exactly `size` bytes, if the pool holds one.
    pub(crate) fn take(&self, size: u64) -> Option<Counted> {
        let mut free = self.free.lock().unwrap();
        let list = free.by_size.get_mut(&size)?;
        let buffer = list.pop().expect("no empty lists are kept");
        if list.is_empty() {
            free.by_size.remove(&size);
        }
        free.bytes -= size;
        Some(buffer)
    }

    fn give_back(&self, buffer: Counted) {
        let mut free = self.free.lock().unwrap();
        free.bytes += buffer.raw().size();
        free.by_size
            .entry(buffer.raw().size())
            .or_default()
            .push(buffer);
    }

    /// Bytes held by free buffers.
    pub(crate) fn free_bytes(&self) -> u64 {
        self.free.lock().unwrap().bytes
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
        free.by_size.clear();
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
        GpuBuffer {
            inner: Arc::new(Pooled {
                buffer: Some(buffer),
                size,
                pool: Arc::downgrade(pool),
            }),
        }
    }

    /// The wgpu buffer.
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.inner
            .buffer
            .as_ref()
            .expect("taken only on drop")
            .raw()
    }

    /// Size in bytes (at least 4, a multiple of 4).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// True when both handles name the same buffer.
    pub fn same(&self, other: &GpuBuffer) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
