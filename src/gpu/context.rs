//! The GPU context: adapter choice, device creation with deliberately requested limits, and the
//! public face of the GPU backend (`Gpu`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::buffer::{size_class, BufferPool, Counted, GpuBuffer};
use super::oneshot::oneshot;
use super::pipeline::{Kernel, PipelineCache};
use super::recorder::Recorder;
use super::scope::scoped;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Usage of every tensor buffer.
const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// The most bytes free pooled buffers hold unless `DIFFWGPU_POOL_CAP_MB` says otherwise; on an
/// adapter whose largest buffer is under 4 GiB, a quarter of that buffer instead.
const DEFAULT_POOL_CAP: u64 = 1 << 30;

pub(crate) struct Context {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) limits: wgpu::Limits,
    pub(crate) pipelines: PipelineCache,
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) recorder: Mutex<Recorder>,
    /// Errors wgpu reported outside any error scope, drained at the next flush.
    pub(crate) errors: Arc<Mutex<Vec<String>>>,
    /// The largest tensor buffer made, in bytes ([`Gpu::limit_tensor_bytes`]); at most what
    /// the device can bind.
    tensor_cap: AtomicU64,
}

/// The GPU backend. Cheap to clone; clones share one device.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) ctx: Arc<Context>,
}

/// Counters for profiling the command stream.
#[derive(Debug, Clone, Default)]
pub struct GpuStats {
    /// Compute dispatches recorded since the device was created.
    pub dispatches: u64,
    /// Command buffers submitted since the device was created.
    pub submits: u64,
    /// Distinct pipelines built.
    pub pipelines: usize,
    /// Bytes held by free pooled buffers.
    pub pooled_free_bytes: u64,
    /// The most bytes free pooled buffers may hold ([`Gpu::set_pool_cap`]).
    pub pool_cap_bytes: u64,
    /// Bytes of every live buffer the backend created: tensors' buffers (at their size class),
    /// free pooled buffers, and a readback's staging buffer while the read runs. Not counted:
    /// the command recorder's uniform arena, a fixed buffer created with the device.
    pub allocated_bytes: u64,
    /// The high-water mark of `allocated_bytes` since the device was created or
    /// [`Gpu::reset_peak`].
    pub peak_bytes: u64,
    /// Dispatches per kernel entry point since the device was created.
    pub by_kernel: std::collections::BTreeMap<&'static str, u64>,
}

/// What `diffwgpu info` shows of one adapter.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// True for software rasterizers such as lavapipe.
    pub software: bool,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_storage_buffers_per_shader_stage: u32,
}

/// The APIs wgpu may use: the native ones, or in a web page the browser's WebGPU.
#[cfg(not(target_arch = "wasm32"))]
const BACKENDS: wgpu::Backends = wgpu::Backends::VULKAN
    .union(wgpu::Backends::METAL)
    .union(wgpu::Backends::DX12);
#[cfg(target_arch = "wasm32")]
const BACKENDS: wgpu::Backends = wgpu::Backends::BROWSER_WEBGPU;

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: BACKENDS,
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    })
}

/// Preference order: discrete, integrated, virtual, then software.
#[cfg(not(target_arch = "wasm32"))]
fn rank(device_type: wgpu::DeviceType) -> u8 {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn summary(adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let limits = adapter.limits();
    AdapterSummary {
        name: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info),
        software: info.device_type == wgpu::DeviceType::Cpu,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// Every adapter wgpu finds, best first (the first is what [`Gpu::new`] picks).
pub fn adapters() -> Vec<AdapterSummary> {
    sorted_adapters(&instance()).iter().map(summary).collect()
}

#[cfg(not(target_arch = "wasm32"))]
fn sorted_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut all = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    all.sort_by_key(|a| rank(a.get_info().device_type));
    all
}

#[cfg(not(target_arch = "wasm32"))]
/// Every adapter, best first, whose name contains `filter` (case-insensitive); at least one.
fn candidates(filter: Option<&str>) -> Result<Vec<wgpu::Adapter>> {
    let all = sorted_adapters(&instance());
    if all.is_empty() {
        return Err(Error::NoAdapter(
            "wgpu found no Vulkan, Metal or DX12 adapter".into(),
        ));
    }
    let Some(f) = filter else {
        return Ok(all);
    };
    let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
    let matching: Vec<wgpu::Adapter> = all
        .into_iter()
        .filter(|a| a.get_info().name.to_lowercase().contains(&f.to_lowercase()))
        .collect();
    if matching.is_empty() {
        return Err(Error::NoAdapter(format!(
            "no adapter name contains {f:?}; found: {}",
            names.join(", ")
        )));
    }
    Ok(matching)
}

/// The limits every kernel is written for: WebGPU's defaults (256 invocations and 16 KiB of
/// workgroup memory per workgroup, 8 storage buffers per stage, ...), so that what runs here runs
/// on any WebGPU-class device. `tests/shaders.rs` checks every kernel against them.
pub fn kernel_limits() -> wgpu::Limits {
    wgpu::Limits::default()
}

/// The limits the device is requested with, stated in one place: [`kernel_limits`], except
/// the buffer sizes, which are the adapter's so that large batches fit.
fn required_limits(adapter: &wgpu::Limits) -> wgpu::Limits {
    wgpu::Limits {
        max_buffer_size: adapter.max_buffer_size,
        max_storage_buffer_binding_size: adapter.max_storage_buffer_binding_size,
        ..kernel_limits()
    }
}

/// The first compute limit of [`kernel_limits`] that the adapter does not reach, if any.
fn unmet_limit(adapter: &wgpu::Limits) -> Option<String> {
    let need = kernel_limits();
    let checks = [
        (
            "storage buffers per shader stage",
            adapter.max_storage_buffers_per_shader_stage,
            need.max_storage_buffers_per_shader_stage,
        ),
        (
            "bytes of workgroup memory",
            adapter.max_compute_workgroup_storage_size,
            need.max_compute_workgroup_storage_size,
        ),
        (
            "invocations per workgroup",
            adapter.max_compute_invocations_per_workgroup,
            need.max_compute_invocations_per_workgroup,
        ),
        (
            "workgroups per dimension",
            adapter.max_compute_workgroups_per_dimension,
            need.max_compute_workgroups_per_dimension,
        ),
    ];
    checks
        .iter()
        .find(|(_, has, needs)| has < needs)
        .map(|(what, has, needs)| format!("it allows {has} {what}; diffwgpu needs {needs}"))
}

impl Gpu {
    #[cfg(not(target_arch = "wasm32"))]
    /// The best adapter available: a hardware GPU before a software one. The environment
    /// variable `DIFFWGPU_ADAPTER` picks the first adapter whose name contains its value.
    pub fn new() -> Result<Gpu> {
        let filter = std::env::var("DIFFWGPU_ADAPTER").ok();
        Self::with_adapter(filter.as_deref())
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// The best adapter whose name contains `filter` (case-insensitive), or the best of all.
    pub fn with_adapter(filter: Option<&str>) -> Result<Gpu> {
        let adapter = candidates(filter)?.into_iter().next().unwrap();
        Self::from_adapter(adapter)
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// The GPU of the `index`-th of several processes on one machine (a data-parallel rank):
    /// the adapters of the best kind (hardware before software; `DIFFWGPU_ADAPTER` filters
    /// them by name as in [`Gpu::new`]) taken in turn, so that ranks spread over the GPUs.
    /// Also returns which of how many adapters it took.
    pub fn for_local_rank(index: usize) -> Result<(Gpu, usize, usize)> {
        let filter = std::env::var("DIFFWGPU_ADAPTER").ok();
        let all = candidates(filter.as_deref())?;
        let best = all[0].get_info().device_type;
        let mut same: Vec<wgpu::Adapter> = all
            .into_iter()
            .filter(|a| a.get_info().device_type == best)
            .collect();
        let (taken, count) = (index % same.len(), same.len());
        Ok((Self::from_adapter(same.swap_remove(taken))?, taken, count))
    }

    /// The adapter the platform recommends for high performance; in a web page, the one the
    /// browser's WebGPU gives (there adapters cannot be listed, and nothing may block).
    pub async fn request() -> Result<Gpu> {
        let adapter = instance()
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter(format!("no WebGPU adapter: {e}")))?;
        Self::from_adapter_async(adapter).await
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn from_adapter(adapter: wgpu::Adapter) -> Result<Gpu> {
        pollster::block_on(Self::from_adapter_async(adapter))
    }

    async fn from_adapter_async(adapter: wgpu::Adapter) -> Result<Gpu> {
        let info = adapter.get_info();
        if let Some(why) = unmet_limit(&adapter.limits()) {
            return Err(Error::NoAdapter(format!(
                "adapter {} is below WebGPU's default limits: {why}",
                info.name
            )));
        }
        let limits = required_limits(&adapter.limits());
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("diffwgpu"),
                required_features: wgpu::Features::empty(),
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Device(format!("{}: {e}", info.name)))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(e.to_string());
        }));
        let pool_cap = match pool_cap_from_env()? {
            Some(cap) => cap,
            None => DEFAULT_POOL_CAP.min(limits.max_buffer_size / 4),
        };
        let pool = Arc::new(BufferPool::new(pool_cap));
        let recorder = Recorder::new(&device, &pool);
        Ok(Gpu {
            ctx: Arc::new(Context {
                device,
                queue,
                info,
                limits,
                pipelines: PipelineCache::default(),
                pool,
                recorder: Mutex::new(recorder),
                errors,
                tensor_cap: AtomicU64::new(u64::MAX),
            }),
        })
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.info
    }

    /// The limits the device was created with.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.ctx.limits
    }

    /// True for a software adapter (lavapipe, WARP, ...).
    pub fn is_software(&self) -> bool {
        self.ctx.info.device_type == wgpu::DeviceType::Cpu
    }

    pub fn stats(&self) -> GpuStats {
        let rec = self.ctx.recorder.lock().unwrap();
        GpuStats {
            dispatches: rec.dispatches,
            submits: rec.submits,
            pipelines: self.ctx.pipelines.len(),
            pooled_free_bytes: self.ctx.pool.free_bytes(),
            pool_cap_bytes: self.ctx.pool.cap(),
            allocated_bytes: self.ctx.pool.allocated_bytes(),
            peak_bytes: self.ctx.pool.peak_bytes(),
            by_kernel: rec.by_kernel.clone(),
        }
    }

    /// Builds the pipelines of `kernels` now instead of at their first dispatch; the first
    /// that the device refuses is an error naming it.
    pub fn build_pipelines(&self, kernels: &[Kernel]) -> Result<()> {
        for kernel in kernels {
            self.ctx.pipelines.get(&self.ctx.device, kernel)?;
        }
        Ok(())
    }

    /// [`Self::build_pipelines`] where the shader compiler answers asynchronously, as a
    /// browser's does: builds them inside one error scope and awaits its answer, the first
    /// error the device reported.
    pub async fn build_pipelines_async(&self, kernels: &[Kernel]) -> Result<()> {
        let scope = self
            .ctx
            .device
            .push_error_scope(wgpu::ErrorFilter::Validation);
        let built = self.build_pipelines(kernels);
        let error = scope.pop().await;
        built?;
        match error {
            Some(e) => Err(Error::Gpu {
                op: "build pipelines",
                msg: e.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Frees the pooled buffers no tensor uses.
    pub fn trim_pool(&self) {
        self.ctx.pool.trim();
    }

    /// Sets the most bytes free pooled buffers may hold, freeing the largest at once until
    /// they fit; a buffer that comes back to a full pool evicts the largest too. The default
    /// is 1 GiB (at most a quarter of the adapter's largest buffer), or
    /// `DIFFWGPU_POOL_CAP_MB` MiB when that variable is set.
    pub fn set_pool_cap(&self, bytes: u64) {
        self.ctx.pool.set_cap(bytes);
    }

    /// Starts a new high-water mark for [`GpuStats::peak_bytes`] at the bytes allocated now,
    /// so that the peak of the work that follows (one training step, say) can be read.
    pub fn reset_peak(&self) {
        self.ctx.pool.reset_peak();
    }

    /// Submits everything recorded so far and waits for the device to finish it.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.recorder.lock().unwrap().flush(&self.ctx);
        self.wait()
    }

    pub(crate) fn wait(&self) -> Result<()> {
        self.ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(e.to_string()))?;
        self.take_errors("synchronize")
    }

    /// Turns errors wgpu reported asynchronously into an `Err`.
    pub(crate) fn take_errors(&self, op: &'static str) -> Result<()> {
        let mut errors = self.ctx.errors.lock().unwrap();
        if errors.is_empty() {
            return Ok(());
        }
        let msg = errors.join("; ");
        errors.clear();
        Err(Error::Gpu { op, msg })
    }

    /// The largest tensor buffer the device can bind, in bytes (or less, when lowered by
    /// [`Self::limit_tensor_bytes`]).
    fn max_tensor_bytes(&self) -> u64 {
        let limits = &self.ctx.limits;
        limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size)
            .min(self.ctx.tensor_cap.load(Ordering::Relaxed))
    }

    /// The most f32 values one tensor can hold.
    pub fn max_tensor_len(&self) -> usize {
        usize::try_from(self.max_tensor_bytes() / 4).unwrap_or(usize::MAX)
    }

    /// Makes no tensor larger than `bytes` from now on, as a device with smaller limits would
    /// (WebGPU's default binds 128 MiB): work that sizes its buffers by
    /// [`Self::max_tensor_len`], such as a training step's gradient parts, then fits that
    /// device too. It never raises the device's own limit.
    pub fn limit_tensor_bytes(&self, bytes: u64) {
        self.ctx.tensor_cap.store(bytes, Ordering::Relaxed);
    }

    /// The capacity of the buffer for a tensor of `bytes`: its size class, clamped to the
    /// largest tensor buffer, so that every request between the last class below that limit
    /// and the limit shares one capacity.
    fn tensor_capacity(&self, bytes: u64) -> u64 {
        size_class(bytes).min(self.max_tensor_bytes() & !3)
    }

    /// Creates the buffer `desc` describes for a request of `bytes` (what an error names; the
    /// buffer may be larger), counted until dropped. Out of memory when `bytes` exceeds `limit`
    /// or the device has no memory left for the buffer; the device stays usable.
    fn create_buffer(
        &self,
        op: &'static str,
        bytes: u64,
        limit: u64,
        desc: &wgpu::BufferDescriptor<'_>,
    ) -> Result<Counted> {
        if bytes > limit {
            return Err(Error::OutOfMemory {
                op,
                bytes,
                limit: Some(limit),
                msg: if desc.usage.contains(wgpu::BufferUsages::STORAGE) {
                    "this adapter binds no larger storage buffer".into()
                } else {
                    "this adapter creates no larger buffer".into()
                },
            });
        }
        let (buffer, error) = scoped(&self.ctx.device, wgpu::ErrorFilter::OutOfMemory, || {
            self.ctx.device.create_buffer(desc)
        });
        if let Some(e) = error {
            return Err(Error::OutOfMemory {
                op,
                bytes,
                limit: None,
                msg: e.to_string(),
            });
        }
        Ok(self.ctx.pool.count(buffer))
    }

    /// A buffer for `numel` f32 values with unspecified contents, from the pool if it holds
    /// one of the size class.
    pub(crate) fn alloc(&self, op: &'static str, numel: usize) -> Result<GpuBuffer> {
        let size = tensor_bytes(numel);
        let capacity = self.tensor_capacity(size);
        let buffer = match self.ctx.pool.take(capacity) {
            Some(buffer) => buffer,
            None => self.create_buffer(
                op,
                size,
                self.max_tensor_bytes(),
                &wgpu::BufferDescriptor {
                    label: Some(op),
                    size: capacity,
                    usage: TENSOR_USAGE,
                    mapped_at_creation: false,
                },
            )?,
        };
        Ok(GpuBuffer::new(buffer, size, &self.ctx.pool))
    }

    /// A buffer of `numel` zeros (cleared in the command stream).
    pub(crate) fn alloc_zeros(&self, op: &'static str, numel: usize) -> Result<GpuBuffer> {
        let buffer = self.alloc(op, numel)?;
        self.ctx.recorder.lock().unwrap().clear(&self.ctx, &buffer);
        Ok(buffer)
    }

    /// A new GPU tensor holding `data`.
    pub fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::shape(
                "upload",
                format!("{} values for shape {shape:?}", numel),
                &[data.len()],
            ));
        }
        // A fresh buffer, written at creation: a pooled one may still be read by recorded work.
        // It is created in its size class so that it can join the pool when dropped.
        let size = tensor_bytes(numel);
        let buffer = self.create_buffer(
            "upload",
            size,
            self.max_tensor_bytes(),
            &wgpu::BufferDescriptor {
                label: Some("upload"),
                size: self.tensor_capacity(size),
                usage: TENSOR_USAGE,
                mapped_at_creation: true,
            },
        )?;
        buffer
            .raw()
            .get_mapped_range_mut(..)
            .map_err(|e| Error::Device(format!("writing an upload buffer failed: {e}")))?
            .slice(..data.len() * 4)
            .copy_from_slice(bytemuck::cast_slice(data));
        buffer.raw().unmap();
        Ok(Tensor::from_gpu(
            shape,
            GpuBuffer::new(buffer, size, &self.ctx.pool),
        ))
    }

    /// Submits the recorded work and reads a GPU tensor back to the host, waiting for the
    /// device. A web page cannot wait: there use [`Self::read_async`].
    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        #[cfg(not(target_arch = "wasm32"))]
        return pollster::block_on(self.read_async(t));
        #[cfg(target_arch = "wasm32")]
        return Err(Error::Device(format!(
            "reading a tensor of {:?} would block the page; read it with Gpu::read_async",
            t.shape()
        )));
    }

    /// Submits the recorded work and reads a GPU tensor back to the host once the device has
    /// finished it: natively at once, in a web page when the browser maps the buffer.
    pub async fn read_async(&self, t: &Tensor) -> Result<Vec<f32>> {
        let slice = t.gpu_buffer("read")?;
        let size = slice.size;
        // Counted while the read runs, so that a step's peak includes it.
        let staging = self.create_buffer(
            "read",
            size,
            self.ctx.limits.max_buffer_size,
            &wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            },
        )?;
        {
            let mut rec = self.ctx.recorder.lock().unwrap();
            rec.copy_raw(
                &self.ctx,
                slice.buffer.raw(),
                slice.offset,
                staging.raw(),
                size,
            );
            rec.flush(&self.ctx);
        }
        let (mapped, map_result) = oneshot();
        staging
            .raw()
            .slice(..)
            .map_async(wgpu::MapMode::Read, mapped);
        #[cfg(not(target_arch = "wasm32"))]
        self.wait()?;
        map_result
            .await
            .map_err(|e| Error::Device(format!("mapping a readback buffer failed: {e}")))?;
        self.take_errors("read")?;
        let view = staging
            .raw()
            .get_mapped_range(..)
            .map_err(|e| Error::Device(e.to_string()))?;
        let mut out: Vec<f32> = bytemuck::cast_slice(&view[..]).to_vec();
        out.truncate(t.numel());
        Ok(out)
    }
}

/// Bytes of a tensor of `numel` f32 values (an empty one still takes 4).
fn tensor_bytes(numel: usize) -> u64 {
    (numel as u64).max(1).saturating_mul(4)
}

/// The pool cap `DIFFWGPU_POOL_CAP_MB` asks for, in bytes; the variable is read once per
/// process.
fn pool_cap_from_env() -> Result<Option<u64>> {
    const VAR: &str = "DIFFWGPU_POOL_CAP_MB";
    static VALUE: OnceLock<Option<String>> = OnceLock::new();
    let Some(value) = VALUE.get_or_init(|| std::env::var(VAR).ok()) else {
        return Ok(None);
    };
    let mib: u64 = value.trim().parse().map_err(|_| {
        Error::invalid(
            VAR,
            format!("{value:?} is not a whole number of MiB (0 keeps no free buffers)"),
        )
    })?;
    Ok(Some(mib.saturating_mul(1 << 20)))
}
