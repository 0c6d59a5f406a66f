//! Every GPU kernel checked without a GPU: naga parses and validates each shader, applies each
//! kernel's override constants, translates it to SPIR-V, and checks the entry point against
//! WebGPU's default limits (the limits the device is created with) and against the bindings
//! and uniform size its launcher declares. A shader that would fail on a smaller device, or a
//! uniform struct that drifted from its Rust twin, fails plain `cargo test` here.

use std::collections::BTreeSet;

use diffwgpu::gpu::{kernel_limits, Access, Kernel};
use naga::back::pipeline_constants::process_overrides;
use naga::proc::Layouter;
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use naga::{AddressSpace, Module, ShaderStage, StorageAccess};

fn kernels() -> Vec<Kernel> {
    diffwgpu::ops::gpu_kernels()
}

fn parse(kernel: &Kernel) -> Result<(Module, ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(kernel.source).map_err(|e| {
        format!(
            "{}.wgsl: {}",
            kernel.shader,
            e.emit_to_string(kernel.source)
        )
    })?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .map_err(|e| {
            format!(
                "{}.wgsl fails validation: {}",
                kernel.shader,
                e.emit_to_string(kernel.source)
            )
        })?;
    Ok((module, info))
}

/// Runs `check` on every kernel and fails with every problem found, one per line.
fn each_kernel(check: impl Fn(&Kernel, &str) -> Result<(), String>) {
    let problems: Vec<String> = kernels()
        .iter()
        .filter_map(|k| check(k, &format!("{}::{}", k.shader, k.entry)).err())
        .collect();
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// What one entry point needs once its override constants are applied.
struct Requirements {
    workgroup_size: [u32; 3],
    workgroup_bytes: u32,
    /// `(binding, uniform size or None, storage access)` of every group-0 resource it uses.
    bindings: Vec<(u32, Option<u32>, Option<StorageAccess>)>,
}

fn requirements(kernel: &Kernel, name: &str) -> Result<Requirements, String> {
    let (module, info) = parse(kernel)?;
    let constants: naga::back::PipelineConstants = kernel
        .constants
        .iter()
        .map(|&(k, v)| (k.to_string(), v))
        .collect();
    let (module, info) = process_overrides(
        &module,
        &info,
        Some((ShaderStage::Compute, kernel.entry)),
        &constants,
    )
    .map_err(|e| format!("{name}: applying the constants {:?}: {e}", kernel.constants))?;
    let (index, entry) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, ep)| ep.name == kernel.entry && ep.stage == ShaderStage::Compute)
        .ok_or_else(|| format!("{name}: no compute entry point of that name"))?;
    let options = naga::back::spv::Options::default();
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: ShaderStage::Compute,
        entry_point: kernel.entry.to_string(),
    };
    naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))
        .map_err(|e| format!("{name}: translation to SPIR-V failed: {e}"))?;

    let mut layouter = Layouter::default();
    layouter.update(module.to_ctx()).unwrap();
    let uses = info.get_entry_point(index);
    let mut workgroup_bytes = 0;
    let mut bindings = Vec::new();
    for (handle, var) in module.global_variables.iter() {
        if uses[handle].is_empty() {
            continue;
        }
        let size = layouter[var.ty].size;
        match var.space {
            AddressSpace::WorkGroup => workgroup_bytes += size,
            AddressSpace::Uniform | AddressSpace::Storage { .. } => {
                let b = var
                    .binding
                    .as_ref()
                    .ok_or_else(|| format!("{name}: a buffer without a binding"))?;
                if b.group != 0 {
                    return Err(format!("{name}: a buffer in bind group {}", b.group));
                }
                let (uniform, access) = match var.space {
                    AddressSpace::Uniform => (Some(size), None),
                    AddressSpace::Storage { access } => (None, Some(access)),
                    _ => unreachable!(),
                };
                bindings.push((b.binding, uniform, access));
            }
            _ => {}
        }
    }
    bindings.sort_by_key(|b| b.0);
    Ok(Requirements {
        workgroup_size: entry.workgroup_size,
        workgroup_bytes,
        bindings,
    })
}

/// Each entry point fits WebGPU's default limits with the constants its launcher passes.
#[test]
fn every_kernel_fits_webgpu_default_limits() {
    let limits = kernel_limits();
    each_kernel(|kernel, name| {
        let r = requirements(kernel, name)?;
        let [x, y, z] = r.workgroup_size;
        let storage = r.bindings.iter().filter(|b| b.2.is_some()).count() as u32;
        let problems = [
            (
                x > limits.max_compute_workgroup_size_x
                    || y > limits.max_compute_workgroup_size_y
                    || z > limits.max_compute_workgroup_size_z,
                format!("workgroup size {:?}", r.workgroup_size),
            ),
            (
                x * y * z > limits.max_compute_invocations_per_workgroup,
                format!(
                    "{} invocations per workgroup, the limit is {}",
                    x * y * z,
                    limits.max_compute_invocations_per_workgroup
                ),
            ),
            (
                r.workgroup_bytes > limits.max_compute_workgroup_storage_size,
                format!(
                    "{} bytes of workgroup memory, the limit is {}",
                    r.workgroup_bytes, limits.max_compute_workgroup_storage_size
                ),
            ),
            (
                storage > limits.max_storage_buffers_per_shader_stage,
                format!(
                    "{storage} storage buffers, the limit is {}",
                    limits.max_storage_buffers_per_shader_stage
                ),
            ),
        ];
        match problems.iter().find(|(bad, _)| *bad) {
            Some((_, what)) => Err(format!("{name}: {what}")),
            None => Ok(()),
        }
    });
}

/// The entry point reads binding 0 as a uniform of exactly the launcher's parameter size,
/// and uses storage bindings 1..=n with the access the launcher binds them with.
#[test]
fn every_kernel_matches_its_launcher() {
    each_kernel(|kernel, name| {
        let r = requirements(kernel, name)?;
        let mut expected = vec![(0, Some(kernel.params as u32), None)];
        for (i, access) in kernel.storage.iter().enumerate() {
            let access = match access {
                Access::Read => StorageAccess::LOAD,
                Access::ReadWrite => StorageAccess::LOAD | StorageAccess::STORE,
            };
            expected.push((i as u32 + 1, None, Some(access)));
        }
        if r.bindings == expected {
            return Ok(());
        }
        Err(format!(
            "{name}: the shader uses (binding, uniform bytes, access) {:?}; the launcher \
             declares a {}-byte uniform and storage {:?}",
            r.bindings, kernel.params, kernel.storage
        ))
    });
}

/// Every compute entry point of every shader is some launcher's kernel (none unchecked).
#[test]
fn every_entry_point_is_a_listed_kernel() {
    let all = kernels();
    let listed: BTreeSet<(&str, &str)> = all.iter().map(|k| (k.shader, k.entry)).collect();
    let mut seen = BTreeSet::new();
    for kernel in &all {
        if !seen.insert(kernel.shader) {
            continue;
        }
        let (module, _) = parse(kernel).unwrap_or_else(|e| panic!("{e}"));
        for ep in &module.entry_points {
            assert!(
                listed.contains(&(kernel.shader, ep.name.as_str())),
                "{}::{} is in the shader but no launcher lists it",
                kernel.shader,
                ep.name
            );
        }
    }
    assert_eq!(
        listed.len(),
        all.len(),
        "a kernel is listed twice with different constants"
    );
}
