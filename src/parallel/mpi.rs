//! [`Collective`] on MPI (`MPI_Allreduce` over `MPI_COMM_WORLD`), for runs started by
//! `mpirun -np N`; a process started without `mpirun` is a world of one.

use std::sync::Mutex;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::CommunicatorCollectives;
use mpi::Threading;

use super::Collective;
use crate::error::{Error, Result};

/// `MPI_COMM_WORLD`, and where this process sits in it.
pub struct MpiWorld {
    /// Every MPI call goes through this lock: MPI is initialised as
    /// `MPI_THREAD_SERIALIZED`, so any thread may call, but one at a time.
    world: Mutex<World>,
    rank: usize,
    size: usize,
    /// This rank's index among the ranks on its own node, and their number.
    pub local_rank: usize,
    pub local_size: usize,
    /// The node's name as MPI reports it.
    pub node: String,
    /// Finalizes MPI when dropped; declared last, so it is dropped after the communicator.
    _universe: Universe,
}

/// The world communicator, movable across threads, and the send buffer of the all-reduce,
/// kept between steps.
struct World {
    comm: SimpleCommunicator,
    send: Vec<f32>,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED (checked in `MpiWorld::init`), which
// allows calls from any thread provided no two run at once; `MpiWorld` only reaches the
// communicator through its mutex.
unsafe impl Send for World {}

impl MpiWorld {
    /// Initialises MPI. Under `mpirun` this joins the job's world; otherwise the world has
    /// one rank.
    pub fn init() -> Result<MpiWorld> {
        let unavailable = |why: &str| Error::invalid("MPI", why.to_string());
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| unavailable("MPI was already initialised in this process"))?;
        if threading < Threading::Serialized {
            return Err(unavailable(
                "this MPI library does not allow calls from more than one thread \
                 (MPI_THREAD_SERIALIZED); build Open MPI or MPICH with thread support",
            ));
        }
        let world = universe.world();
        let local = world.split_shared(world.rank());
        let node = mpi::environment::processor_name().unwrap_or_else(|_| "?".into());
        Ok(MpiWorld {
            rank: world.rank() as usize,
            size: world.size() as usize,
            local_rank: local.rank() as usize,
            local_size: local.size() as usize,
            node,
            world: Mutex::new(World {
                comm: world,
                send: Vec::new(),
            }),
            _universe: universe,
        })
    }

    /// Ends every rank of the job (`MPI_Abort`) with `code`: what a rank that failed does, so
    /// that the others do not wait for it forever.
    pub fn abort(&self, code: i32) -> ! {
        let world = self.world.lock().unwrap_or_else(|e| e.into_inner());
        world.comm.abort(code)
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let mut world = self.world.lock().unwrap_or_else(|e| e.into_inner());
        let World { comm, send } = &mut *world;
        send.clear();
        send.extend_from_slice(values);
        comm.all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }
}
