//! The command recorder: every op's dispatch goes into one open compute pass of one command
//! encoder; the encoder is submitted only when a result is read back, the uniform arena is
//! full, or the caller synchronizes.
//!
//! Per-dispatch parameters go into a host-side uniform arena; at submit time the arena is
//! written to one uniform buffer with a single `write_buffer`, which the queue orders after
//! all earlier submissions and before this one.

use bytemuck::Pod;

use super::buffer::{BufferPool, Counted, GpuBuffer};
use super::context::{Context, Gpu};
use super::pipeline::{Access, Kernel};
use super::scope::scoped;
use super::slice::GpuSlice;
use crate::error::{Error, Result};

/// Offset alignment of one dispatch's parameters inside the arena (the largest
/// `min_uniform_buffer_offset_alignment` any adapter reports).
const UNIFORM_ALIGN: usize = 256;
/// Dispatches per submission before the arena forces a submit.
const ARENA_SLOTS: usize = 4096;

/// A storage buffer argument of a dispatch, bound at binding `index + 1`.
pub struct Arg<'a> {
    slice: GpuSlice<'a>,
    access: Access,
}

impl<'a> Arg<'a> {
    /// Bound as `var<storage, read>`.
    pub fn read(slice: impl Into<GpuSlice<'a>>) -> Self {
        Arg {
            slice: slice.into(),
            access: Access::Read,
        }
    }

    /// Bound as `var<storage, read_write>`.
    pub fn write(slice: impl Into<GpuSlice<'a>>) -> Self {
        Arg {
            slice: slice.into(),
            access: Access::ReadWrite,
        }
    }
}

/// Splits `workgroups` into an x-by-y grid that respects the 65,535-per-dimension limit.
/// Kernels recover the linear index as `wid.x + wid.y * nwg.x` and must guard against the
/// few extra workgroups at the end.
pub fn grid(workgroups: u32) -> [u32; 3] {
    const MAX: u32 = 65_535;
    if workgroups <= MAX {
        [workgroups.max(1), 1, 1]
    } else {
        let y = workgroups.div_ceil(MAX);
        [workgroups.div_ceil(y), y, 1]
    }
}

pub(crate) struct Recorder {
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: Option<wgpu::CommandEncoder>,
    uniforms: Vec<u8>,
    arena: Counted,
    pub(crate) dispatches: u64,
    pub(crate) submits: u64,
    /// Dispatches per kernel entry point.
    pub(crate) by_kernel: std::collections::BTreeMap<&'static str, u64>,
}

impl Recorder {
    /// A recorder whose uniform arena is counted in `pool`'s allocated bytes.
    pub(crate) fn new(device: &wgpu::Device, pool: &BufferPool) -> Self {
        Recorder {
            pass: None,
            encoder: None,
            uniforms: Vec::new(),
            arena: pool.count(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("uniform arena"),
                size: (UNIFORM_ALIGN * ARENA_SLOTS) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })),
            dispatches: 0,
            submits: 0,
            by_kernel: Default::default(),
        }
    }

    fn encoder(&mut self, ctx: &Context) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder.get_or_insert_with(|| {
            ctx.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        })
    }

    fn pass(&mut self, ctx: &Context) -> &mut wgpu::ComputePass<'static> {
        if self.pass.is_none() {
            let pass = self
                .encoder(ctx)
                .begin_compute_pass(&wgpu::ComputePassDescriptor::default())
                .forget_lifetime();
            self.pass = Some(pass);
        }
        self.pass.as_mut().unwrap()
    }

    pub(crate) fn clear(&mut self, ctx: &Context, buffer: &GpuBuffer) {
        self.encoder(ctx).clear_buffer(buffer.raw(), 0, None);
    }

    pub(crate) fn copy_raw(
        &mut self,
        ctx: &Context,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst: &wgpu::Buffer,
        size: u64,
    ) {
        self.encoder(ctx)
            .copy_buffer_to_buffer(src, src_offset, dst, 0, Some(size));
    }

    /// Submits the recorded commands (and the uniform arena they read).
    pub(crate) fn flush(&mut self, ctx: &Context) {
        self.pass = None;
        if let Some(encoder) = self.encoder.take() {
            if !self.uniforms.is_empty() {
                ctx.queue.write_buffer(self.arena.raw(), 0, &self.uniforms);
                self.uniforms.clear();
            }
            ctx.queue.submit([encoder.finish()]);
            self.submits += 1;
        }
    }

    /// Reserves an arena slot for `params`, returning its offset and bound size.
    fn push_uniform(&mut self, ctx: &Context, params: &[u8]) -> (u64, u64) {
        if self.uniforms.len() + UNIFORM_ALIGN > self.arena.raw().size() as usize {
            self.flush(ctx);
        }
        let offset = self.uniforms.len();
        let size = params.len().max(16).next_multiple_of(16);
        self.uniforms.extend_from_slice(params);
        self.uniforms.resize(offset + UNIFORM_ALIGN, 0);
        (offset as u64, size as u64)
    }
}

impl Gpu {
    /// Records one dispatch of `kernel` with its parameters at binding 0 and `args` at
    /// bindings 1, 2, ...; the arguments must be the ones the kernel declares.
    pub(crate) fn dispatch<P: Pod>(
        &self,
        kernel: &Kernel,
        params: &P,
        args: &[Arg<'_>],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let ctx = &self.ctx;
        let fail = |msg: String| Error::Gpu {
            op: kernel.entry,
            msg,
        };
        let bytes = bytemuck::bytes_of(params);
        if bytes.len() != kernel.params || bytes.len() > UNIFORM_ALIGN {
            return Err(fail(format!(
                "parameter block of {} bytes, but the kernel declares {} (at most {UNIFORM_ALIGN})",
                bytes.len(),
                kernel.params
            )));
        }
        if !args
            .iter()
            .map(|a| a.access)
            .eq(kernel.storage.iter().copied())
        {
            let passed: Vec<Access> = args.iter().map(|a| a.access).collect();
            return Err(fail(format!(
                "storage arguments {passed:?}, but the kernel declares {:?}",
                kernel.storage
            )));
        }
        let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
        if let Some(a) = args.iter().find(|a| a.slice.offset % align != 0) {
            return Err(fail(format!(
                "a tensor view at byte {} is bound, but views must start at a multiple of \
                 {align} bytes",
                a.slice.offset
            )));
        }
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(fail(format!(
                "dispatch of {workgroups:?} workgroups exceeds the limit {max}"
            )));
        }
        let pipeline = ctx.pipelines.get(&ctx.device, kernel)?;
        let mut rec = ctx.recorder.lock().unwrap();
        let (offset, size) = rec.push_uniform(ctx, bytes);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: rec.arena.raw(),
                offset,
                size: std::num::NonZeroU64::new(size),
            }),
        }];
        for (i, arg) in args.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(arg.slice.binding()),
            });
        }
        let (bind_group, error) = scoped(&ctx.device, wgpu::ErrorFilter::Validation, || {
            ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel.entry),
                layout: &pipeline.1,
                entries: &entries,
            })
        });
        if let Some(e) = error {
            return Err(fail(format!("binding the arguments failed: {e}")));
        }
        let pass = rec.pass(ctx);
        pass.set_pipeline(&pipeline.0);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        rec.dispatches += 1;
        *rec.by_kernel.entry(kernel.entry).or_default() += 1;
        Ok(())
    }
}
