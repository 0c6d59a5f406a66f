//! A tensor is a shape and a handle to f32 data that lives on one backend.
//!
//! Tensors are cheap to clone: clones share their storage. Ops return new tensors; the few
//! in-place ops (the optimizer and EMA updates) take `&mut Tensor` and update the storage that
//! every clone of it sees, on both backends alike.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::gpu::GpuBuffer;

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
        }
    }

    pub(crate) fn from_gpu(shape: &[usize], buffer: GpuBuffer) -> Self {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Gpu(buffer),
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
        })
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

    /// Read access to a CPU tensor's data.
    pub(crate) fn cpu_read(&self, op: &'static str) -> Result<RwLockReadGuard<'_, Vec<f32>>> {
        match &self.storage {
            Storage::Cpu(data) => Ok(data.read().expect("tensor lock poisoned")),
            Storage::Gpu(_) => Err(Error::WrongBackend {
                op,
                expected: "cpu",
                found: "gpu",
            }),
        }
    }

    /// Write access to a CPU tensor's data (in-place ops).
    pub(crate) fn cpu_write(&mut self, op: &'static str) -> Result<RwLockWriteGuard<'_, Vec<f32>>> {
        match &self.storage {
            Storage::Cpu(data) => Ok(data.write().expect("tensor lock poisoned")),
            Storage::Gpu(_) => Err(Error::WrongBackend {
                op,
                expected: "cpu",
                found: "gpu",
            }),
        }
    }

    /// The GPU buffer behind a GPU tensor.
    pub(crate) fn gpu_buffer(&self, op: &'static str) -> Result<&GpuBuffer> {
        match &self.storage {
            Storage::Gpu(buffer) => Ok(buffer),
            Storage::Cpu(_) => Err(Error::WrongBackend {
                op,
                expected: "gpu",
                found: "cpu",
            }),
        }
    }
}
