//! The few collective operations the training loop needs ([`Collective`]), and the two
//! implementations without a network: [`SingleProcess`] and [`LocalGroup`].
//!
//! The loop only talks to [`Collective`]. [`LocalGroup`] runs ranks as threads of one process
//! (the CPU tests' "2 ranks x batch B" = "1 rank x batch 2B"); a rank that stops early makes the
//! others' next collective call fail instead of hang. Between processes,
//! [`TcpCollective`](super::tcp::TcpCollective) connects them through rank 0 at
//! `MASTER_ADDR:MASTER_PORT`; on GPUs (`cuda,nccl` build) `NcclCollective` (`super::nccl`)
//! reduces gradients on the devices and keeps a `TcpCollective` for its rendezvous, its small
//! host exchanges and for noticing a dead rank. [`Backend`](super::rank::Backend) picks one.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// The collective operations of data-parallel training. Every rank calls the same operations
/// in the same order; each returns the same values on every rank.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over ranks of each tensor (same shapes on every rank), in rank order,
    /// so that every rank gets bit-identical sums. Results are on the inputs' device.
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Every rank's `values`, indexed by rank.
    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<Vec<f64>>>;
    /// Every rank's `bytes` (any length, each rank its own), indexed by rank: for what is not
    /// numbers, e.g. the pairs each rank skipped, as JSON, for rank 0's report.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// One process alone: the operations are identities.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(tensors.to_vec())
    }
    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        Ok(vec![values.to_vec()])
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
}

#[derive(Clone)]
enum Payload {
    Tensors(Vec<(Vec<usize>, Vec<f32>)>),
    Scalars(Vec<f64>),
    Bytes(Vec<u8>),
}

impl Payload {
    fn kind(&self) -> &'static str {
        match self {
            Payload::Tensors(_) => "tensors",
            Payload::Scalars(_) => "scalars",
            Payload::Bytes(_) => "bytes",
        }
    }
}

struct Round {
    generation: u64,
    arrived: usize,
    slots: Vec<Option<Payload>>,
    /// The deposits of the last completed round, by rank.
    result: Arc<Vec<Payload>>,
    /// A rank that left (returned early, failed, or was dropped) while others may still wait.
    left: Option<usize>,
}

struct Shared {
    world: usize,
    round: Mutex<Round>,
    cv: Condvar,
}

/// Ranks as threads of one process, exchanging through shared memory.
pub struct LocalGroup;

impl LocalGroup {
    /// One handle per rank; move each into its rank's thread.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<LocalRank> {
        let shared = Arc::new(Shared {
            world,
            round: Mutex::new(Round {
                generation: 0,
                arrived: 0,
                slots: vec![None; world],
                result: Arc::new(Vec::new()),
                left: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalRank {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One rank of a [`LocalGroup`]. Dropping it (the rank's thread returned, or unwound) tells the
/// other ranks, so a dead rank stops them with an error instead of a hang.
pub struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalRank {
    /// Deposits `payload`, waits for every rank's, returns them all in rank order.
    fn exchange(&self, payload: Payload) -> Result<Arc<Vec<Payload>>> {
        let sh = &self.shared;
        let mut r = sh
            .round
            .lock()
            .map_err(|_| Error::msg("collective: a rank panicked"))?;
        if let Some(dead) = r.left {
            return Err(self.dead(dead));
        }
        let gen = r.generation;
        r.slots[self.rank] = Some(payload);
        r.arrived += 1;
        if r.arrived == sh.world {
            let all: Vec<Payload> = r.slots.iter_mut().filter_map(|s| s.take()).collect();
            r.result = Arc::new(all);
            r.arrived = 0;
            r.generation += 1;
            sh.cv.notify_all();
            return Ok(r.result.clone());
        }
        loop {
            r = sh
                .cv
                .wait(r)
                .map_err(|_| Error::msg("collective: a rank panicked"))?;
            // A completed round wins over a later departure: this rank's data is in it.
            if r.generation != gen {
                return Ok(r.result.clone());
            }
            if let Some(dead) = r.left {
                return Err(self.dead(dead));
            }
        }
    }

    fn dead(&self, dead: usize) -> Error {
        Error::msg(format!(
            "rank {dead} stopped while rank {} waited for it in a collective operation",
            self.rank
        ))
    }
}

impl Drop for LocalRank {
    fn drop(&mut self) {
        if let Ok(mut r) = self.shared.round.lock() {
            r.left.get_or_insert(self.rank);
            self.shared.cv.notify_all();
        }
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let host = tensors
            .iter()
            .map(|t| {
                Ok((
                    t.dims().to_vec(),
                    t.to_device(&Device::Cpu)?
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let all = self.exchange(Payload::Tensors(host))?;
        let mut out = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let mut sum: Option<Vec<f32>> = None;
            for (rank, p) in all.iter().enumerate() {
                let Payload::Tensors(v) = p else {
                    return Err(Error::msg(format!(
                        "collective: rank {rank} sent {} where tensors were expected",
                        p.kind()
                    )));
                };
                let (dims, data) = v.get(i).ok_or_else(|| {
                    Error::msg(format!("collective: rank {rank} sent {} tensors", v.len()))
                })?;
                if dims.as_slice() != t.dims() {
                    return Err(Error::msg(format!(
                        "collective: tensor {i} is {:?} on rank {} but {dims:?} on rank {rank}",
                        t.dims(),
                        self.rank
                    )));
                }
                match &mut sum {
                    None => sum = Some(data.clone()),
                    Some(s) => s.iter_mut().zip(data).for_each(|(a, b)| *a += b),
                }
            }
            let s = sum.unwrap_or_default();
            out.push(
                Tensor::from_vec(s, t.dims(), &Device::Cpu)?
                    .to_dtype(t.dtype())?
                    .to_device(t.device())?,
            );
        }
        Ok(out)
    }

    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        let all = self.exchange(Payload::Scalars(values.to_vec()))?;
        all.iter()
            .enumerate()
            .map(|(rank, p)| match p {
                Payload::Scalars(v) => Ok(v.clone()),
                _ => Err(Error::msg(format!(
                    "collective: rank {rank} sent {} where scalars were expected",
                    p.kind()
                ))),
            })
            .collect()
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.exchange(Payload::Bytes(bytes.to_vec()))?;
        all.iter()
            .enumerate()
            .map(|(rank, p)| match p {
                Payload::Bytes(v) => Ok(v.clone()),
                _ => Err(Error::msg(format!(
                    "collective: rank {rank} sent {} where bytes were expected",
                    p.kind()
                ))),
            })
            .collect()
    }
}
