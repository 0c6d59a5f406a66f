//! A tensor is a shape and a handle to f32 data that lives on one backend: a whole storage or
//! a view of a contiguous range of one (the parameters of a model are views of one flat
//! buffer).
//!
//! Tensors are cheap to clone: clones share their storage. Ops return new tensors; the few
//! in-place ops (the optimizer and EMA updates) take `&mut Tensor` and update the storage that
//! every clone of it sees, on both backends alike.

use std::ops::{Deref, DerefMut, Range};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, GpuSlice};

/// Which backend holds a tensor's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Gpu,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        }
    }
}

/// Host memory of a CPU tensor.
pub type CpuStorage = Arc<RwLock<Vec<f32>>>;

#[derive(Clone)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
    Gpu(GpuBuffer),
}

/// An f32 tensor, row-major (NCHW for images).
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    pub(crate) storage: Storage,
    /// Index of the first element in the storage.
    offset: usize,
}

/// Read access to a CPU tensor's elements (its range of the storage).
pub(crate) struct CpuRead<'a> {
    guard: RwLockReadGuard<'a, Vec<f32>>,
    range: Range<usize>,
}

impl Deref for CpuRead<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.guard[self.range.clone()]
    }
}

/// Write access to a CPU tensor's elements.
pub(crate) struct CpuWrite<'a> {
    guard: RwLockWriteGuard<'a, Vec<f32>>,
    range: Range<usize>,
}

impl Deref for CpuWrite<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.guard[self.range.clone()]
    }
}

impl DerefMut for CpuWrite<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.guard[self.range.clone()]
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?} on {})", self.shape, self.device().name())
    }
}

impl Tensor {
    pub(crate) fn from_cpu(shape: &[usize], data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(Arc::new(RwLock::new(data))),
            offset: 0,
        }
    }

    pub(crate) fn from_gpu(shape: &[usize], buffer: GpuBuffer) -> Self {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Gpu(buffer),
            offset: 0,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn device(&self) -> Device {
        match self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Gpu(_) => Device::Gpu,
        }
    }

    /// The same data seen with another shape of the same element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{} elements", self.numel()),
                shape,
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
            offset: self.offset,
        })
    }

    /// The `numel(shape)` elements from element `start` of this tensor, seen with `shape`
    /// (no copy; the view shares the storage). On the GPU a view that a kernel binds must
    /// start at a multiple of 64 elements (256 bytes, WebGPU's storage offset alignment).
    pub fn view(&self, start: usize, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if start + numel > self.numel() {
            return Err(Error::shape(
                "view",
                format!(
                    "at most {} elements from {start}",
                    self.numel() - start.min(self.numel())
                ),
                shape,
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
            offset: self.offset + start,
        })
    }

    /// The tensors of `parts`, which lie one after another in one storage, seen as one tensor
    /// of `shape` (no copy); `None` when they do not.
    pub fn joined(parts: &[&Tensor], shape: &[usize]) -> Option<Tensor> {
        let first = parts.first()?;
        let numel: usize = parts.iter().map(|t| t.numel()).sum();
        let adjacent = parts
            .windows(2)
            .all(|w| w[0].shares_storage(w[1]) && w[0].offset + w[0].numel() == w[1].offset);
        (adjacent && shape.iter().product::<usize>() == numel).then(|| Tensor {
            shape: shape.to_vec(),
            storage: first.storage.clone(),
            offset: first.offset,
        })
    }

    /// The range of the storage this tensor covers.
    fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }

    /// True when both tensors are views of one storage (an in-place update cannot read and
    /// write one buffer through two names).
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        match (&self.storage, &other.storage) {
            (Storage::Cpu(a), Storage::Cpu(b)) => Arc::ptr_eq(a, b),
            (Storage::Gpu(a), Storage::Gpu(b)) => a.same(b),
            _ => false,
        }
    }

    /// Read access to a CPU tensor's data. Several views of one storage may be read at once
    /// (the lock is shared); writes happen only in the in-place optimizer ops, never while
    /// another op of the backend runs.
    pub(crate) fn cpu_read(&self, op: &'static str) -> Result<CpuRead<'_>> {
        match &self.storage {
            Storage::Cpu(data) => Ok(CpuRead {
                guard: data.read().expect("tensor lock poisoned"),
                range: self.range(),
            }),
            Storage::Gpu(_) => Err(Error::WrongBackend {
                op,
                expected: "cpu",
                found: "gpu",
            }),
        }
    }

    /// Write access to a CPU tensor's data (in-place ops).
    pub(crate) fn cpu_write(&mut self, op: &'static str) -> Result<CpuWrite<'_>> {
        let range = self.range();
        match &self.storage {
            Storage::Cpu(data) => Ok(CpuWrite {
                guard: data.write().expect("tensor lock poisoned"),
                range,
            }),
            Storage::Gpu(_) => Err(Error::WrongBackend {
                op,
                expected: "cpu",
                found: "gpu",
            }),
        }
    }

    /// The range of the GPU buffer behind a GPU tensor.
    pub(crate) fn gpu_buffer(&self, op: &'static str) -> Result<GpuSlice<'_>> {
        match &self.storage {
            Storage::Gpu(buffer) => Ok(GpuSlice::new(
                buffer,
                (self.offset * 4) as u64,
                (self.numel().max(1) * 4) as u64,
            )),
            Storage::Cpu(_) => Err(Error::WrongBackend {
                op,
                expected: "gpu",
                found: "cpu",
            }),
        }
    }
}
