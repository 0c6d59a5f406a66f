//! A byte range of a GPU buffer: what a kernel binds for one tensor (a whole buffer, or the
//! view of a parameter inside the flat parameter buffer).

use super::buffer::GpuBuffer;

/// `size` bytes of `buffer` from byte `offset`.
#[derive(Clone, Copy)]
pub struct GpuSlice<'a> {
    pub(crate) buffer: &'a GpuBuffer,
    pub(crate) offset: u64,
    pub(crate) size: u64,
}

impl<'a> GpuSlice<'a> {
    pub(crate) fn new(buffer: &'a GpuBuffer, offset: u64, size: u64) -> Self {
        GpuSlice {
            buffer,
            offset,
            size,
        }
    }

    /// The binding of this range.
    pub(crate) fn binding(&self) -> wgpu::BufferBinding<'a> {
        wgpu::BufferBinding {
            buffer: self.buffer.raw(),
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.size),
        }
    }
}

impl<'a> From<&'a GpuBuffer> for GpuSlice<'a> {
    /// The whole buffer.
    fn from(buffer: &'a GpuBuffer) -> Self {
        GpuSlice::new(buffer, 0, buffer.size())
    }
}
