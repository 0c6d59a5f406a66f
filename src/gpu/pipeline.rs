//! Compute pipelines, built once per (shader, entry point, override constants, binding layout)
//! and cached for the life of the device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One entry point of a WGSL shader file.
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
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    shader: &'static str,
    entry: &'static str,
    constants: Vec<(&'static str, u64)>,
    /// Per storage binding: true when read-only.
    layout: Vec<bool>,
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    layouts: Mutex<HashMap<Vec<bool>, wgpu::BindGroupLayout>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<(wgpu::ComputePipeline, wgpu::BindGroupLayout)>>>,
}

impl PipelineCache {
    /// The pipeline and its bind group layout, built on first use.
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        kernel: &Kernel,
        constants: &[(&'static str, f64)],
        layout: &[bool],
    ) -> Arc<(wgpu::ComputePipeline, wgpu::BindGroupLayout)> {
        let key = PipelineKey {
            shader: kernel.shader,
            entry: kernel.entry,
            constants: constants.iter().map(|(k, v)| (*k, v.to_bits())).collect(),
            layout: layout.to_vec(),
        };
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return p.clone();
        }
        let module = self
            .modules
            .lock()
            .unwrap()
            .entry(kernel.shader)
            .or_insert_with(|| {
                device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.shader),
                    source: wgpu::ShaderSource::Wgsl(kernel.source.into()),
                })
            })
            .clone();
        let bind_layout = self
            .layouts
            .lock()
            .unwrap()
            .entry(layout.to_vec())
            .or_insert_with(|| bind_group_layout(device, layout))
            .clone();
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
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
                constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let entry = Arc::new((pipeline, bind_layout));
        self.pipelines.lock().unwrap().insert(key, entry.clone());
        entry
    }

    pub(crate) fn len(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }
}

fn bind_group_layout(device: &wgpu::Device, layout: &[bool]) -> wgpu::BindGroupLayout {
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
    for (i, read_only) in layout.iter().enumerate() {
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: i as u32 + 1,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: *read_only,
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
