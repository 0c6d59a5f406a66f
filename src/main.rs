//! The `diffwgpu` command line: a thin shell over the library.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "diffwgpu",
    version,
    about = "Denoising diffusion models on any GPU wgpu reaches"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the GPU adapters wgpu finds and the one diffwgpu would use.
    Info,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Info => info(),
    }
}

fn info() -> Result<()> {
    let adapters = diffwgpu::gpu::adapters();
    if adapters.is_empty() {
        println!("no GPU adapter found: diffwgpu would run on the CPU backend");
        println!("(install a Vulkan/Metal/DX12 driver; on Debian `apt-get install mesa-vulkan-drivers libvulkan1`)");
        return Ok(());
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
    println!(
        "the GPU backend would use [0] {} (set DIFFWGPU_ADAPTER=<name part> to choose another)",
        adapters[0].name
    );
    Ok(())
}
