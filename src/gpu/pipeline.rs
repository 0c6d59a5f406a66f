//! Compute pipelines, built once per (shader, entry point, override constants) and cached for
//! the life of the device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::scope::scoped;
use crate::error::{Error, Result};

/// How a kernel binds one storage buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// One entry point of a WGSL shader file, with everything its pipeline depends on, declared
/// once beside its launcher so that `tests/shaders.rs` can check it against the shader
/// without a GPU.
///
/// Binding convention: `@group(0) @binding(0)` is the op's uniform parameter struct, then
/// bindings 1, 2, ... are the storage buffers in the order the launcher passes them.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// Shader file name, the cache key for the module (e.g. "conv2d").
    pub shader: &'static str,
    /// WGSL source (usually `include_str!("../../shaders/<shader>.wgsl")`).
    pub source: &'static str,
    /// Entry point name.
    pub entry: &'static str,
    /// Size in bytes of the Rust struct uploaded as the uniform at binding 0.
    pub params: usize,
    /// The storage buffers at bindings 1, 2, ...
    pub storage: &'static [Access],
    /// Values of the shader's `override` constants (tile sizes shared with the launcher).
    pub constants: &'static [(&'static str, f64)],
}

impl Kernel {
    /// True when both name the same pipeline.
    pub fn same(&self, other: &Kernel) -> bool {
        self.shader == other.shader
            && self.entry == other.entry
            && self.constants == other.constants
    }
}

/// Shaders built without wgpu's runtime bounds checks, which cost a compare and a select on
/// every buffer access of the products' inner loops. Each index in them is guarded in the
/// code, and the launchers check the rest before they dispatch:
/// - `conv2d`: the tile loaders read `w`, `x` and `dy` only under `m < m_len`, `k < k_len` or
///   `r < r_end` and the im2col window test; the stores write under `m < m_len` and
///   `n < n_len`; the bias and epilogue operands are read under the same guards and the
///   launcher checks their shapes; the parts' offsets `out_offset + splits Cout K` and
///   `bias_offset + splits Cout` are checked against the arena (`Partials::check`).
/// - `linear`: the tile loaders read under `row < m`, `l < k_end` and `col < n` through the
///   strides the launcher derives from the checked shapes; the stores write under `r < m`
///   and `c < n`, at `c_offset + splits m n`, which the launcher checks against the output.
///
/// Every other runtime check (loop bounding, integer division) stays on.
const GUARDED_SHADERS: &[&str] = &["conv2d", "linear"];

#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    shader: &'static str,
    entry: &'static str,
    constants: Vec<(&'static str, u64)>,
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    layouts: Mutex<HashMap<&'static [Access], wgpu::BindGroupLayout>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<(wgpu::ComputePipeline, wgpu::BindGroupLayout)>>>,
}

impl PipelineCache {
    /// The pipeline and its bind group layout, built on first use. A shader or pipeline that
    /// fails validation is an error that names the kernel.
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        kernel: &Kernel,
    ) -> Result<Arc<(wgpu::ComputePipeline, wgpu::BindGroupLayout)>> {
        let key = PipelineKey {
            shader: kernel.shader,
            entry: kernel.entry,
            constants: kernel
                .constants
                .iter()
                .map(|(k, v)| (*k, v.to_bits()))
                .collect(),
        };
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        if !crate::ops::gpu_kernels().iter().any(|k| k.same(kernel)) {
            return Err(Error::Gpu {
                op: kernel.entry,
                msg: format!(
                    "kernel {}::{} is not in the list of checked kernels (ops::gpu_kernels); \
                     add it there",
                    kernel.shader, kernel.entry
                ),
            });
        }
        let ((pipeline, bind_layout), error) =
            scoped(device, wgpu::ErrorFilter::Validation, || {
                let module = self
                    .modules
                    .lock()
                    .unwrap()
                    .entry(kernel.shader)
                    .or_insert_with(|| {
                        let desc = wgpu::ShaderModuleDescriptor {
                            label: Some(kernel.shader),
                            source: wgpu::ShaderSource::Wgsl(kernel.source.into()),
                        };
                        if GUARDED_SHADERS.contains(&kernel.shader) {
                            let checks = wgpu::ShaderRuntimeChecks {
                                bounds_checks: false,
                                ..wgpu::ShaderRuntimeChecks::checked()
                            };
                            // SAFETY: every buffer and array index of these shaders is guarded in the
                            // code (see GUARDED_SHADERS); only the bounds checks are turned off.
                            unsafe { device.create_shader_module_trusted(desc, checks) }
                        } else {
                            device.create_shader_module(desc)
                        }
                    })
                    .clone();
                let bind_layout = self
                    .layouts
                    .lock()
                    .unwrap()
                    .entry(kernel.storage)
                    .or_insert_with(|| bind_group_layout(device, kernel.storage))
                    .clone();
                let pipeline_layout =
                    device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(kernel.entry),
                        bind_group_layouts: &[Some(&bind_layout)],
                        immediate_size: 0,
                    });
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.entry),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(kernel.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: kernel.constants,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
                (pipeline, bind_layout)
            });
        if let Some(e) = error {
            return Err(Error::Gpu {
                op: kernel.entry,
                msg: format!(
                    "building the pipeline of {}::{} failed: {e}",
                    kernel.shader, kernel.entry
                ),
            });
        }
        let entry = Arc::new((pipeline, bind_layout));
        self.pipelines.lock().unwrap().insert(key, entry.clone());
        Ok(entry)
    }

    pub(crate) fn len(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }
}

fn bind_group_layout(device: &wgpu::Device, layout: &[Access]) -> wgpu::BindGroupLayout {
    let mut entries = vec![wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }];
    for (i, access) in layout.iter().enumerate() {
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: i as u32 + 1,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: *access == Access::Read,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
    }
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: None,
        entries: &entries,
    })
}
