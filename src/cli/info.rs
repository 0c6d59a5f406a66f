//! `diffwgpu info`: the adapters wgpu finds, the device `--device auto` would pick, and
//! whether the build has MPI (under `mpirun`: each rank's place in the job).

use anyhow::Result;

use super::ranks::Ranks;

pub fn run(ranks: &Ranks) -> Result<()> {
    if !ranks.is_root() {
        println!("{}", ranks.build_info());
        return Ok(());
    }
    let adapters = diffwgpu::gpu::adapters();
    if adapters.is_empty() {
        println!("no GPU adapter found");
        println!(
            "(install a Vulkan/Metal/DX12 driver; on Debian `apt-get install mesa-vulkan-drivers \
             libvulkan1` gives the lavapipe software driver)"
        );
    }
    for (i, a) in adapters.iter().enumerate() {
        let kind = if a.software { "software" } else { "hardware" };
        println!(
            "[{i}] {} — {} {} ({kind})",
            a.name, a.backend, a.device_type
        );
        println!("    driver: {}", a.driver.trim());
        println!(
            "    max storage buffer: {} MiB, max buffer: {} MiB, storage buffers/stage: {}, \
             workgroup memory: {} KiB, invocations/workgroup: {}",
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20,
            a.max_storage_buffers_per_shader_stage,
            a.max_compute_workgroup_storage_size >> 10,
            a.max_compute_invocations_per_workgroup
        );
    }
    if let Some(a) = adapters.first() {
        println!(
            "--device gpu would use [0] {} (DIFFWGPU_ADAPTER=<name part> picks another)",
            a.name
        );
        let kernels = diffwgpu::ops::gpu_kernels();
        let built = diffwgpu::Gpu::new().and_then(|g| g.build_pipelines(&kernels));
        match built {
            Ok(()) => println!("    all {} kernels build on it", kernels.len()),
            Err(e) => println!("    a kernel does not build on it: {e}"),
        }
    }
    let (_, why) = super::device::open(super::device::DeviceChoice::Auto)?;
    println!("--device auto would use {why}");
    println!("{}", ranks.build_info());
    Ok(())
}
