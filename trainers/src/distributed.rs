//! Data-parallel training over MPI (`mpirun -np N kiln train RECIPE`, or Slurm's `srun`): MPI
//! starts and connects the ranks and, on the CPU, all-reduces the gradients. Built with the
//! `distributed` cargo feature (rsmpi against the system's OpenMPI or MPICH); without it a job
//! started under an MPI launcher is refused, so N copies never train N unrelated runs into one
//! directory.
//!
//! The recipe's `batch_size` stays the global batch: rank r takes its slice of every global
//! batch, every rank computes the same averaged gradient and makes the same update, and rank 0
//! alone writes the run directory.

use anyhow::Result;

/// The processes training one run: this one's rank among `size`.
pub struct World {
    rank: usize,
    size: usize,
    #[cfg(feature = "distributed")]
    mpi: Option<Mpi>,
}

#[cfg(feature = "distributed")]
struct Mpi {
    /// The GPUs' communicator, once a CUDA job has connected them ([`World::connect_gpus`]).
    #[cfg(feature = "cuda")]
    nccl: std::cell::OnceCell<crate::nccl::Comm>,
    // Dropped last: MPI_Finalize.
    world: mpi::topology::SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "World(rank {} of {})", self.rank, self.size)
    }
}

/// The size of the job an MPI launcher (OpenMPI, MPICH/Hydra, PMIx, Slurm's srun) started this
/// process in, from the variables it sets; `None` when no launcher started it.
pub fn launched_size() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The number of GPUs this process can see (0 without CUDA).
fn visible_gpus() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        // cudarc panics, rather than failing, where the driver library is missing.
        std::panic::catch_unwind(CudaContext::device_count)
            .ok()
            .and_then(Result::ok)
            .map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// This process's rank among the job's ranks on its machine, from the variables the MPI launcher
/// sets (OpenMPI, MPICH/Hydra, Slurm): which of the machine's GPUs is this rank's.
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "PALS_LOCAL_RANKID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

impl World {
    /// One process: no communication.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            #[cfg(feature = "distributed")]
            mpi: None,
        }
    }

    /// Joins the MPI job this process was launched in, or is [`World::single`] when no MPI
    /// launcher started it.
    pub fn from_launcher() -> Result<World> {
        let Some(size) = launched_size() else {
            return Ok(World::single());
        };
        Self::join(size)
    }

    #[cfg(not(feature = "distributed"))]
    fn join(size: usize) -> Result<World> {
        anyhow::ensure!(
            size <= 1,
            "this kiln was built without MPI, but an MPI launcher started it as one of {size} \
             processes: each would train the whole run on its own. Build it with the \
             `distributed` feature (apt-get install libopenmpi-dev libclang-dev; cargo build \
             --release --features distributed), or run it without mpirun"
        );
        Ok(World::single())
    }

    #[cfg(feature = "distributed")]
    fn join(_size: usize) -> Result<World> {
        use mpi::traits::Communicator;
        // Rayon and candle run worker threads, but only the main thread calls MPI.
        let (universe, _) =
            mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or_else(|| {
                anyhow::anyhow!("MPI could not be initialized (was it initialized already?)")
            })?;
        let world = universe.world();
        Ok(World {
            rank: world.rank() as usize,
            size: world.size() as usize,
            mpi: Some(Mpi {
                #[cfg(feature = "cuda")]
                nccl: std::cell::OnceCell::new(),
                world,
                _universe: universe,
            }),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the one that writes the run directory and prints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The GPU this rank trains on when the recipe says `cuda` or `auto`: one GPU per rank, the
    /// one of its local rank (0 for a single process).
    /// Where the launcher shows each rank only its own GPU (Slurm's `--gpus-per-task=1`), or a
    /// machine has fewer GPUs than ranks, the local rank wraps around the GPUs it can see (ranks
    /// sharing a GPU are then refused by NCCL, saying so).
    pub fn local_gpu(&self) -> usize {
        match (self.size, local_rank()) {
            (1, _) | (_, None) => 0,
            (_, Some(local)) => local % visible_gpus().max(1),
        }
    }

    /// Refuses a job whose ranks opened different kinds of device (`auto` found a GPU on some
    /// ranks only): they would all-reduce through different paths and wait for each other.
    pub fn same_device_kind(&self, device: &candle_core::Device) -> Result<()> {
        let kind = match device {
            candle_core::Device::Cpu => "cpu",
            _ => "gpu",
        };
        anyhow::ensure!(
            self.agree(checksum([kind]))?,
            "the ranks of the job opened different devices (rank {} is on {}): give every rank a \
             GPU of its own, or run on --device cpu",
            self.rank,
            kiln_core::device::device_name(device)
        );
        Ok(())
    }

    /// Connects the ranks' GPUs with NCCL when the job trains on CUDA with more than one rank:
    /// rank 0 makes NCCL's unique id, MPI carries it to the others, and every rank joins on its
    /// `device`. The gradient all-reduce then stays on the GPUs. A no-op otherwise.
    pub fn connect_gpus(&self, device: &candle_core::Device) -> Result<()> {
        #[cfg(all(feature = "distributed", feature = "cuda"))]
        if let (Some(m), candle_core::Device::Cuda(gpu)) = (&self.mpi, device) {
            // KILN_NCCL=none: sum through host memory with MPI, as on the CPU.
            let wanted = std::env::var(crate::nccl::ENV).map_or(true, |v| v != "none");
            if self.size > 1 && wanted && m.nccl.get().is_none() {
                let lib = crate::nccl::library()?;
                let mut id = match self.is_main() {
                    true => lib.unique_id()?,
                    false => Vec::new(),
                };
                self.broadcast_bytes(&mut id)?;
                let comm = crate::nccl::Comm::join(gpu, &id, self.size, self.rank)?;
                say(&format!(
                    "rank {}/{}: {} joined NCCL {} ({})",
                    self.rank,
                    self.size,
                    kiln_core::device::device_name(device),
                    lib.version()?,
                    lib.path()
                ));
                let _ = m.nccl.set(comm);
            }
        }
        let _ = device;
        Ok(())
    }

    /// The GPUs' communicator, when [`Self::connect_gpus`] made one.
    #[cfg(all(feature = "distributed", feature = "cuda"))]
    pub fn nccl(&self) -> Option<&crate::nccl::Comm> {
        self.mpi.as_ref()?.nccl.get()
    }

    /// This rank's rows `[start, end)` of a batch of `n` examples: contiguous, in rank order,
    /// sizes differing by at most one.
    pub fn slice(&self, n: usize) -> (usize, usize) {
        (self.rank * n / self.size, (self.rank + 1) * n / self.size)
    }

    /// Sums `values` over the ranks, in place (element-wise). The order of the sum is MPI's,
    /// fixed for a given job size.
    pub fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.all_reduce(values, Op::Sum);
        Ok(())
    }

    /// [`Self::sum_f32`] in f64 (metric sums, counts).
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.all_reduce(values, Op::Sum);
        Ok(())
    }

    /// The largest of each element over the ranks.
    pub fn max_u64(&self, values: &mut [u64]) -> Result<()> {
        self.all_reduce(values, Op::Max);
        Ok(())
    }

    /// Whether every rank holds the same `value` (a checksum).
    pub fn agree(&self, value: u64) -> Result<bool> {
        let mut v = [value, !value];
        self.max_u64(&mut v)?;
        // max(x) == x and max(!x) == !x ⇔ x is both the largest and the smallest: all equal.
        Ok(v[0] == value && v[1] == !value)
    }

    /// Every rank's `mine` side by side in rank order, on every rank: `counts[r]` values from
    /// rank r (every rank passes the same counts).
    pub fn all_gather_f32(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        self.all_gather(mine, counts)
    }

    /// [`Self::all_gather_f32`] in f64.
    pub fn all_gather_f64(&self, mine: &[f64], counts: &[usize]) -> Result<Vec<f64>> {
        self.all_gather(mine, counts)
    }

    /// Every rank's `mine`, in rank order, on rank 0 (the others get an empty list): rank r's
    /// bytes reach rank 0 in messages of at most 1 GiB, so no count overflows MPI's int.
    pub fn gather_bytes(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        if self.size == 1 {
            return Ok(vec![mine]);
        }
        let mut lens = vec![0u64; self.size];
        lens[self.rank] = mine.len() as u64;
        self.max_u64(&mut lens)?;
        self.gather_to_root(mine, &lens)
    }

    /// Overwrites `values` with rank 0's.
    pub fn broadcast_f32(&self, values: &mut [f32]) -> Result<()> {
        self.broadcast(values);
        Ok(())
    }

    /// Overwrites `bytes` with rank 0's (any length: the length goes first).
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let mut len = [bytes.len() as u64];
        self.broadcast(&mut len);
        bytes.resize(len[0] as usize, 0);
        self.broadcast(bytes);
        Ok(())
    }

    /// Ends the whole job after this rank failed: the others would wait for it forever in their
    /// next all-reduce. The error is printed first.
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "distributed")]
        if let Some(m) = &self.mpi {
            use mpi::traits::Communicator;
            if self.size > 1 {
                m.world.abort(code);
            }
        }
        let _ = code;
    }
}

/// A reduction MPI computes.
#[derive(Clone, Copy)]
enum Op {
    Sum,
    Max,
}

/// What the collectives carry: MPI's own element types.
#[cfg(feature = "distributed")]
pub trait Element: mpi::datatype::Equivalence + Copy {}
#[cfg(feature = "distributed")]
impl<T: mpi::datatype::Equivalence + Copy> Element for T {}
#[cfg(not(feature = "distributed"))]
pub trait Element: Copy {}
#[cfg(not(feature = "distributed"))]
impl<T: Copy> Element for T {}

#[cfg(feature = "distributed")]
impl World {
    fn all_reduce<T: Element>(&self, values: &mut [T], op: Op) {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        let Some(m) = self.mpi.as_ref().filter(|_| self.size > 1) else {
            return;
        };
        let op = match op {
            Op::Sum => SystemOperation::sum(),
            Op::Max => SystemOperation::max(),
        };
        let send = values.to_vec();
        m.world.all_reduce_into(&send[..], values, op);
    }

    fn broadcast<T: Element>(&self, values: &mut [T]) {
        use mpi::traits::{Communicator, Root};
        if let Some(m) = self.mpi.as_ref().filter(|_| self.size > 1) {
            m.world.process_at_rank(0).broadcast_into(values);
        }
    }

    fn all_gather<T: Element + Default>(&self, mine: &[T], counts: &[usize]) -> Result<Vec<T>> {
        use mpi::collective::CommunicatorCollectives;
        use mpi::datatype::PartitionMut;
        anyhow::ensure!(
            counts.len() == self.size && counts[self.rank] == mine.len(),
            "all-gather: rank {} has {} values, its count says {:?}",
            self.rank,
            mine.len(),
            counts.get(self.rank)
        );
        let Some(m) = self.mpi.as_ref().filter(|_| self.size > 1) else {
            return Ok(mine.to_vec());
        };
        let count = |n: usize| {
            i32::try_from(n).map_err(|_| {
                anyhow::anyhow!("all-gather: {n} values from one rank are more than MPI counts")
            })
        };
        let counts = counts
            .iter()
            .map(|&n| count(n))
            .collect::<Result<Vec<_>>>()?;
        let total = counts.iter().map(|&c| c as usize).sum::<usize>();
        let displs = (counts.iter())
            .scan(0usize, |at, &c| {
                let d = *at;
                *at += c as usize;
                Some(count(d))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![T::default(); total];
        let mut parts = PartitionMut::new(&mut out[..], counts, displs);
        m.world.all_gather_varcount_into(mine, &mut parts);
        Ok(out)
    }

    fn gather_to_root(&self, mine: Vec<u8>, lens: &[u64]) -> Result<Vec<Vec<u8>>> {
        use mpi::point_to_point::{Destination, Source};
        use mpi::traits::Communicator;
        const PIECE: usize = 1 << 30;
        let m = self.mpi.as_ref().expect("a world of several ranks has MPI");
        if self.rank != 0 {
            for piece in mine.chunks(PIECE) {
                m.world.process_at_rank(0).send(piece);
            }
            return Ok(Vec::new());
        }
        let mut all = vec![mine];
        for (r, &len) in lens.iter().enumerate().skip(1) {
            let mut bytes = Vec::with_capacity(len as usize);
            while (bytes.len() as u64) < len {
                let (piece, _) = m.world.process_at_rank(r as i32).receive_vec::<u8>();
                bytes.extend_from_slice(&piece);
            }
            all.push(bytes);
        }
        Ok(all)
    }
}

/// Without MPI a world has one rank: every collective leaves the values as they are.
#[cfg(not(feature = "distributed"))]
impl World {
    fn all_reduce<T: Element>(&self, _values: &mut [T], _op: Op) {}
    fn broadcast<T: Element>(&self, _values: &mut [T]) {}
    fn all_gather<T: Element>(&self, mine: &[T], _counts: &[usize]) -> Result<Vec<T>> {
        Ok(mine.to_vec())
    }
    fn gather_to_root(&self, mine: Vec<u8>, _lens: &[u64]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine])
    }
}

/// Which rank owns each parameter under ZeRO stage 1, for parameters of `sizes` elements:
/// largest first, each to the rank holding the fewest elements so far (the lowest of equals),
/// so the ranks' shares differ by at most the largest parameter, and every rank computes the
/// same owners. (PyTorch's ZeroRedundancyOptimizer also shards by whole parameters; llm.c cuts
/// one flat vector, which needs an optimizer over slices.)
pub fn partition(sizes: &[usize], ranks: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut held = vec![0usize; ranks.max(1)];
    let mut owner = vec![0; sizes.len()];
    for i in order {
        let r = (0..held.len()).min_by_key(|&r| (held[r], r)).unwrap_or(0);
        owner[i] = r;
        held[r] += sizes[i];
    }
    owner
}

/// Prints `line` on stderr in one write, so that the lines of ranks sharing a terminal or a pipe
/// do not interleave (`eprintln!` writes its pieces one by one).
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// A 64-bit checksum of byte chunks (the first 8 bytes of their sha256).
pub fn checksum(chunks: impl IntoIterator<Item = impl AsRef<[u8]>>) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for c in chunks {
        h.update(c.as_ref());
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("sha256 has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_batch_in_rank_order() {
        for (n, size) in [(12, 2), (7, 3), (3, 3), (64, 5)] {
            let mut next = 0;
            for rank in 0..size {
                let w = World {
                    rank,
                    size,
                    #[cfg(feature = "distributed")]
                    mpi: None,
                };
                let (a, b) = w.slice(n);
                assert_eq!(a, next);
                assert!(b - a >= n / size && b - a <= n.div_ceil(size));
                next = b;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn zero_partitions_are_balanced_and_the_same_everywhere() {
        // GPT-2-like: one large embedding, equal blocks, small vectors.
        let mut sizes = vec![38_633_472, 786_432];
        for _ in 0..12 {
            sizes.extend([
                2_359_296, 589_824, 2_359_296, 2_359_296, 768, 768, 2304, 768,
            ]);
        }
        for ranks in [1, 2, 3, 8] {
            let owner = partition(&sizes, ranks);
            assert_eq!(owner, partition(&sizes, ranks), "deterministic");
            let mut held = vec![0usize; ranks];
            for (i, &r) in owner.iter().enumerate() {
                held[r] += sizes[i];
            }
            let (lo, hi) = (held.iter().min().unwrap(), held.iter().max().unwrap());
            let largest = *sizes.iter().max().unwrap();
            // Greedy largest-first: within the largest parameter of each other, and no rank
            // idle while a parameter could go to it.
            assert!(hi - lo <= largest, "{ranks} ranks: {held:?}");
            assert!(*lo > 0, "{ranks} ranks: {held:?}");
        }
        // More ranks than parameters: the extra ranks own nothing.
        assert_eq!(partition(&[5, 3], 3), vec![0, 1]);
        assert_eq!(partition(&[], 4), Vec::<usize>::new());
    }

    #[test]
    fn one_process_needs_no_communication() {
        let w = World::single();
        let mut v = [1.0f32, 2.0];
        w.sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
        assert!(w.agree(42).unwrap());
        assert_eq!(w.all_gather_f32(&v, &[2]).unwrap(), v);
        assert_eq!(w.gather_bytes(vec![7, 8]).unwrap(), vec![vec![7, 8]]);
        assert!(w.is_main());
        assert_ne!(checksum([&b"a"[..]]), checksum([&b"b"[..]]));
    }
}
