//! Storage buffers that go back to a pool when the last tensor using them is dropped.
//!
//! Reusing a buffer while earlier dispatches in the same encoder still read it is safe: wgpu
//! orders the dispatches of one encoder and inserts the barriers between them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Free buffers keyed by their size in bytes.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
}

impl BufferPool {
    /// A free buffer of exactly `size` bytes, if the pool holds one.
    pub(crate) fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        self.free.lock().unwrap().get_mut(&size)?.pop()
    }

    fn give_back(&self, size: u64, buffer: wgpu::Buffer) {
        self.free
            .lock()
            .unwrap()
            .entry(size)
            .or_default()
            .push(buffer);
    }

    /// Bytes held by free buffers.
    pub(crate) fn free_bytes(&self) -> u64 {
        let free = self.free.lock().unwrap();
        free.iter().map(|(size, v)| size * v.len() as u64).sum()
    }

    /// Destroys every free buffer.
    pub(crate) fn trim(&self) {
        self.free.lock().unwrap().clear();
    }
}

struct Pooled {
    buffer: wgpu::Buffer,
    size: u64,
    pool: Weak<BufferPool>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(self.size, self.buffer.clone());
        }
    }
}

/// A storage buffer holding a tensor's f32 elements. Clones share the buffer.
#[derive(Clone)]
pub struct GpuBuffer {
    inner: Arc<Pooled>,
}

impl GpuBuffer {
    pub(crate) fn new(buffer: wgpu::Buffer, size: u64, pool: &Arc<BufferPool>) -> Self {
        GpuBuffer {
            inner: Arc::new(Pooled {
                buffer,
                size,
                pool: Arc::downgrade(pool),
            }),
        }
    }

    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        &self.inner.buffer
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
