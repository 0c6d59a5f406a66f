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

/// Opens the chosen backend; the string says which one and why.
pub fn open(choice: DeviceChoice) -> Result<(Box<dyn Backend>, String)> {
    match choice {
        DeviceChoice::Cpu => Ok((Box::new(Cpu), format!("{} (--device cpu)", Cpu.name()))),
        DeviceChoice::Gpu => {
            let g = Gpu::new().context("--device gpu: no usable GPU adapter; try --device cpu")?;
            let why = format!("GPU: {} (--device gpu)", g.name());
            Ok((Box::new(g), why))
        }
        DeviceChoice::Auto => match Gpu::new() {
            Ok(g) if !g.is_software() => {
                let why = format!("GPU: {} (auto: a hardware adapter was found)", g.name());
                Ok((Box::new(g), why))
            }
            Ok(g) => Ok((
                Box::new(Cpu),
                format!(
                    "{} (auto: the only GPU adapter, {}, is a software renderer, slower than \
                     the CPU backend; --device gpu forces it)",
                    Cpu.name(),
                    g.name()
                ),
            )),
            Err(e) => Ok((Box::new(Cpu), format!("{} (auto: {e})", Cpu.name()))),
        },
    }
}
