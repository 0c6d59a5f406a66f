//! `--device auto|gpu|cpu`: which backend a command runs on, and why.

use anyhow::{Context, Result};
use clap::ValueEnum;
use diffwgpu::{Backend, Cpu, Gpu};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// A hardware GPU if wgpu finds one, else the CPU backend.
    Auto,
    /// The GPU backend (a software adapter such as lavapipe counts).
    Gpu,
    /// The CPU backend.
    Cpu,
}

/// The backend a command runs on.
pub struct Device {
    pub backend: Box<dyn Backend>,
    /// The same backend as the concrete GPU, for its counters; `None` on the CPU.
    pub gpu: Option<Gpu>,
    /// Which backend and why.
    pub why: String,
}

impl Device {
    fn gpu(g: Gpu, why: String) -> Self {
        Device {
            backend: Box::new(g.clone()),
            gpu: Some(g),
            why,
        }
    }

    fn cpu(why: String) -> Self {
        Device {
            backend: Box::new(Cpu),
            gpu: None,
            why,
        }
    }
}

const NO_GPU: &str = "--device gpu: no usable GPU adapter; try --device cpu";

/// Opens the chosen backend; the string says which one and why.
pub fn open(choice: DeviceChoice) -> Result<(Box<dyn Backend>, String)> {
    select(choice).map(|d| (d.backend, d.why))
}

/// Opens the chosen backend, keeping the GPU handle when it is one.
pub fn select(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::cpu(format!("{} (--device cpu)", Cpu.name()))),
        DeviceChoice::Gpu => {
            let g = Gpu::new().context(NO_GPU)?;
            let why = format!("GPU: {} (--device gpu)", g.name());
            Ok(Device::gpu(g, why))
        }
        DeviceChoice::Auto => match Gpu::new() {
            Ok(g) if !g.is_software() => {
                let why = format!("GPU: {} (auto: a hardware adapter was found)", g.name());
                Ok(Device::gpu(g, why))
            }
            Ok(g) => Ok(Device::cpu(format!(
                "{} (auto: the only GPU adapter, {}, is a software renderer, slower than the \
                 CPU backend; --device gpu forces it)",
                Cpu.name(),
                g.name()
            ))),
            Err(e) => Ok(Device::cpu(format!("{} (auto: {e})", Cpu.name()))),
        },
    }
}

/// Opens the chosen backend for the `local_rank`-th of `local_size` data-parallel ranks on one
/// machine: on the GPU each rank takes the next adapter of the best kind, in turn.
pub fn open_for_rank(
    choice: DeviceChoice,
    local_rank: usize,
    local_size: usize,
) -> Result<(Box<dyn Backend>, String)> {
    if local_size < 2 {
        return open(choice);
    }
    let gpu = |g: Gpu, taken: usize, count: usize, how: &str| {
        let why = format!(
            "GPU: {} ({how}; local rank {local_rank} of {local_size} takes adapter {} of {count})",
            g.name(),
            taken + 1
        );
        (Box::new(g) as Box<dyn Backend>, why)
    };
    match choice {
        DeviceChoice::Gpu => {
            let (g, taken, count) = Gpu::for_local_rank(local_rank).context(NO_GPU)?;
            Ok(gpu(g, taken, count, "--device gpu"))
        }
        DeviceChoice::Auto => match Gpu::for_local_rank(local_rank) {
            Ok((g, taken, count)) if !g.is_software() => Ok(gpu(g, taken, count, "auto")),
            _ => open(choice),
        },
        DeviceChoice::Cpu => open(choice),
    }
}
