//! Where this process sits in a data-parallel job: under `mpirun -np N` (a build with the
//! `mpi` feature) one of N ranks; otherwise the only one.

use anyhow::Result;
use diffwgpu::parallel::Collective;

/// This process's rank in the job, and the group it trains with.
pub struct Ranks {
    /// `None` for a command that trains nothing.
    #[cfg(feature = "mpi")]
    world: Option<diffwgpu::parallel::mpi::MpiWorld>,
}

impl Ranks {
    /// Joins the MPI job this process was started in (a world of one without `mpirun`).
    #[cfg(feature = "mpi")]
    pub fn init() -> Result<Ranks> {
        Ok(Ranks {
            world: Some(diffwgpu::parallel::mpi::MpiWorld::init()?),
        })
    }

    /// A build without MPI is always a job of one: started by `mpirun -np N` with N > 1, its
    /// processes would each train alone into the same folder, so that is refused.
    #[cfg(not(feature = "mpi"))]
    pub fn init() -> Result<Ranks> {
        // Open MPI's and MPICH's (Hydra's) launchers say how many processes they started.
        let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
            .iter()
            .filter_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
            .max();
        if let Some(n) = launched.filter(|&n| n > 1) {
            anyhow::bail!(
                "started as one of {n} MPI processes, but this diffwgpu was built without MPI; \
                 build it with `cargo build --release --features mpi` (needs an MPI library and \
                 libclang), or run it without mpirun"
            );
        }
        Ok(Ranks::single())
    }

    /// A process that is the whole job, without joining MPI.
    pub fn single() -> Ranks {
        Ranks {
            #[cfg(feature = "mpi")]
            world: None,
        }
    }

    /// The group to sum gradients over: `None` for a job of one.
    pub fn group(&self) -> Option<&dyn Collective> {
        #[cfg(feature = "mpi")]
        if let Some(world) = self.world.as_ref().filter(|w| w.size() > 1) {
            return Some(world);
        }
        None
    }

    pub fn rank(&self) -> usize {
        self.group().map_or(0, |g| g.rank())
    }

    pub fn size(&self) -> usize {
        self.group().map_or(1, |g| g.size())
    }

    /// Rank 0 writes the log, the sample grids and the checkpoints.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's index among the ranks on its machine, and their number.
    pub fn local(&self) -> (usize, usize) {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            return (w.local_rank, w.local_size);
        }
        (0, 1)
    }

    /// "rank R of N on NODE (local L of M)", or `None` for a job of one.
    pub fn describe(&self) -> Option<String> {
        #[cfg(feature = "mpi")]
        if let Some(w) = self.world.as_ref().filter(|w| w.size() > 1) {
            return Some(format!(
                "rank {} of {} on {} (local rank {} of {})",
                w.rank(),
                w.size(),
                w.node,
                w.local_rank,
                w.local_size
            ));
        }
        None
    }

    /// What `diffwgpu info` says about MPI.
    pub fn build_info(&self) -> String {
        match (cfg!(feature = "mpi"), self.describe()) {
            (false, _) => "MPI: not in this build (cargo build --release --features mpi, with \
                           an MPI library such as Open MPI installed, then mpirun -np N diffwgpu \
                           train)"
                .into(),
            (true, None) => "MPI: in this build; not started by mpirun (a job of one rank)".into(),
            (true, Some(layout)) => format!("MPI: {layout}"),
        }
    }

    /// Worker threads for the CPU backend: the cores this process may run on, shared among the
    /// ranks of its machine unless `mpirun` already bound each rank to its own cores.
    pub fn cpu_threads(&self) -> usize {
        let visible = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (_, on_node) = self.local();
        let bound = online_cpus().is_some_and(|online| visible < online);
        if bound || on_node < 2 {
            visible
        } else {
            (visible / on_node).max(1)
        }
    }

    /// Whether any rank's `flag` is set; every rank gets the same answer (for a stop that all
    /// ranks must make at the same step).
    pub fn any(&self, flag: bool) -> Result<bool> {
        let Some(group) = self.group() else {
            return Ok(flag);
        };
        let mut v = [f32::from(u8::from(flag))];
        group.all_reduce_sum(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// Ends the whole job after this rank failed: its error, named by rank, then `MPI_Abort`,
    /// so the other ranks do not wait for it forever. A job of one just returns the error.
    pub fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        #[cfg(feature = "mpi")]
        if let (Some(layout), Some(w)) = (self.describe(), &self.world) {
            eprintln!("Error on {layout}: {e:?}");
            w.abort(1);
        }
        e
    }
}

/// The number of CPUs the machine has online (Linux), whatever this process is bound to.
fn online_cpus() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    text.trim().split(',').try_fold(0, |n, range| {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        Some(n + b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?)
    })
}
