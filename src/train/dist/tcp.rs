//! [`TcpCollective`]: ranks as processes exchanging through TCP with rank 0, in host memory.

use candle_core::{Device, Tensor};

use super::collective::Collective;
use super::rank::RankInfo;
use crate::{Error, Result};

/// Ranks as processes (one per device, started by torchrun, SLURM or `--nproc-per-node`)
/// exchanging through TCP with rank 0 at `MASTER_ADDR:MASTER_PORT`: every rank sends its part to
/// rank 0, which combines the parts in rank order and sends the result back, so every rank gets
/// the same bits. Host memory and sockets: meant for CPU runs and small models; GPUs want NCCL.
/// A rank that dies closes its socket, and the others' next operation fails.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1.., in rank order. Others: the stream to rank 0.
    peers: Vec<std::net::TcpStream>,
}

const HELLO: &[u8; 8] = b"mcldrank";

impl TcpCollective {
    /// Rendezvous at `MASTER_ADDR:MASTER_PORT`: rank 0 listens, the others connect (retrying
    /// until `timeout`, as rank 0 may start later).
    pub fn connect(info: &RankInfo, timeout: std::time::Duration) -> Result<Self> {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream, ToSocketAddrs};
        let (addr, port) = match (&info.master_addr, info.master_port) {
            (Some(a), Some(p)) => (a.clone(), p),
            _ => return Err(Error::msg("rendezvous needs MASTER_ADDR and MASTER_PORT")),
        };
        let deadline = std::time::Instant::now() + timeout;
        let ctx = |what: &str, e: std::io::Error| {
            Error::msg(format!(
                "rank {} of {}: {what} {addr}:{port}: {e}",
                info.rank, info.world
            ))
        };
        let mut peers = Vec::new();
        if info.rank == 0 {
            let listener =
                TcpListener::bind(("0.0.0.0", port)).map_err(|e| ctx("cannot listen on", e))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| ctx("cannot listen on", e))?;
            let mut slots: Vec<Option<TcpStream>> = (1..info.world).map(|_| None).collect();
            while slots.iter().any(|s| s.is_none()) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(|e| ctx("accept on", e))?;
                        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                            .map_err(|e| ctx("accept on", e))?;
                        let mut hello = [0u8; 24];
                        s.read_exact(&mut hello)
                            .map_err(|e| ctx("no greeting from a rank at", e))?;
                        let r = u64::from_le_bytes(hello[8..16].try_into().unwrap_or_default());
                        let w = u64::from_le_bytes(hello[16..24].try_into().unwrap_or_default());
                        if &hello[..8] != HELLO || w as usize != info.world {
                            return Err(Error::msg(format!(
                                "rank 0: a process at {addr}:{port} is not a rank of this run \
                                 (world {w}, expected {})",
                                info.world
                            )));
                        }
                        let r = r as usize;
                        if r == 0 || r >= info.world || slots[r - 1].is_some() {
                            return Err(Error::msg(format!(
                                "rank 0: rank {r} joined twice or is out of range (world {})",
                                info.world
                            )));
                        }
                        s.set_read_timeout(None).map_err(|e| ctx("accept on", e))?;
                        s.set_nodelay(true).map_err(|e| ctx("accept on", e))?;
                        slots[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            let missing: Vec<usize> = slots
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| i + 1)
                                .collect();
                            return Err(Error::msg(format!(
                                "rank 0: ranks {missing:?} did not join at {addr}:{port} within \
                                 {} s",
                                timeout.as_secs()
                            )));
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => return Err(ctx("accept on", e)),
                }
            }
            peers = slots.into_iter().flatten().collect();
        } else {
            let target = (addr.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| ctx("cannot resolve", e))?
                .next()
                .ok_or_else(|| Error::msg(format!("MASTER_ADDR {addr}: no address")))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) if std::time::Instant::now() > deadline => {
                        return Err(ctx("cannot reach rank 0 at", e))
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            };
            s.set_nodelay(true).map_err(|e| ctx("connect to", e))?;
            let mut hello = HELLO.to_vec();
            hello.extend_from_slice(&(info.rank as u64).to_le_bytes());
            hello.extend_from_slice(&(info.world as u64).to_le_bytes());
            s.write_all(&hello).map_err(|e| ctx("connect to", e))?;
            peers.push(s);
        }
        Ok(Self {
            rank: info.rank,
            world: info.world,
            peers,
        })
    }

    fn lost(&self, peer: usize, e: std::io::Error) -> Error {
        Error::msg(format!(
            "rank {}: lost rank {peer} during a collective operation ({e}); it stopped or died",
            self.rank
        ))
    }

    fn send(&self, i: usize, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let mut s = &self.peers[i];
        s.write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|()| s.write_all(bytes))
            .map_err(|e| self.lost(self.peer_rank(i), e))
    }

    fn recv(&self, i: usize) -> Result<Vec<u8>> {
        use std::io::Read;
        let mut s = &self.peers[i];
        let mut n = [0u8; 8];
        s.read_exact(&mut n)
            .map_err(|e| self.lost(self.peer_rank(i), e))?;
        let mut buf = vec![0u8; u64::from_le_bytes(n) as usize];
        s.read_exact(&mut buf)
            .map_err(|e| self.lost(self.peer_rank(i), e))?;
        Ok(buf)
    }

    /// Rank 0's `bytes` on every rank (the others' `bytes` are ignored), e.g. the NCCL unique id.
    pub fn broadcast_from_root(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mine = if self.rank == 0 {
            bytes.to_vec()
        } else {
            Vec::new()
        };
        self.gather_combine(mine, |mut parts| Ok(std::mem::take(&mut parts[0])))
    }

    /// Whether every peer's connection is still open, without waiting and without taking data
    /// off it: an error names the first peer that closed (a rank that exits or dies, even by
    /// SIGKILL, closes its sockets). A collective that runs outside these sockets (NCCL) polls
    /// this while it waits, so a dead rank ends the wait.
    pub fn check_peers(&self) -> Result<()> {
        for (i, s) in self.peers.iter().enumerate() {
            let peer = self.peer_rank(i);
            let mut probe = [0u8; 1];
            let seen = s.set_nonblocking(true).and_then(|()| s.peek(&mut probe));
            s.set_nonblocking(false).map_err(|e| self.lost(peer, e))?;
            match seen {
                Ok(0) => {
                    return Err(self.lost(
                        peer,
                        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"),
                    ))
                }
                // Data waiting: the peer is ahead of this rank, so alive.
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(self.lost(peer, e)),
            }
        }
        Ok(())
    }

    fn peer_rank(&self, i: usize) -> usize {
        if self.rank == 0 {
            i + 1
        } else {
            0
        }
    }

    /// Rank 0 gets every rank's bytes (rank order) and sends `combine`'s result to all; the
    /// others send theirs and get the result.
    fn gather_combine(
        &self,
        mine: Vec<u8>,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        if self.rank != 0 {
            self.send(0, &mine)?;
            return self.recv(0);
        }
        let mut parts = vec![mine];
        for i in 0..self.peers.len() {
            parts.push(self.recv(i)?);
        }
        let out = combine(parts)?;
        for i in 0..self.peers.len() {
            self.send(i, &out)?;
        }
        Ok(out)
    }
}

fn f32s_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_to_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut flat = Vec::new();
        for t in tensors {
            flat.extend(
                t.to_device(&Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        let n = flat.len();
        let out = self.gather_combine(f32s_to_bytes(&flat), |parts| {
            let mut sum: Vec<f32> = Vec::new();
            for (rank, p) in parts.iter().enumerate() {
                let v = bytes_to_f32s(p);
                if v.len() != n {
                    return Err(Error::msg(format!(
                        "collective: rank {rank} sent {} gradient values, rank 0 has {n}",
                        v.len()
                    )));
                }
                if rank == 0 {
                    sum = v;
                } else {
                    sum.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
                }
            }
            Ok(f32s_to_bytes(&sum))
        })?;
        let sum = bytes_to_f32s(&out);
        if sum.len() != n {
            return Err(Error::msg(format!(
                "collective: rank 0 returned {} values, expected {n}",
                sum.len()
            )));
        }
        let mut at = 0;
        tensors
            .iter()
            .map(|t| {
                let k = t.elem_count();
                let v = sum[at..at + k].to_vec();
                at += k;
                Ok(Tensor::from_vec(v, t.dims(), &Device::Cpu)?
                    .to_dtype(t.dtype())?
                    .to_device(t.device())?)
            })
            .collect()
    }

    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        let mine: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(self
            .all_gather_bytes(&mine)?
            .iter()
            .map(|part| {
                part.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect()
            })
            .collect())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let world = self.world;
        let out = self.gather_combine(bytes.to_vec(), |parts| {
            // Each part prefixed by its byte length.
            let mut b = Vec::new();
            for p in parts {
                b.extend_from_slice(&(p.len() as u64).to_le_bytes());
                b.extend_from_slice(&p);
            }
            Ok(b)
        })?;
        let mut all = Vec::with_capacity(world);
        let mut at = 0usize;
        while at + 8 <= out.len() {
            let len = u64::from_le_bytes(out[at..at + 8].try_into().unwrap_or_default()) as usize;
            at += 8;
            let part = out
                .get(at..at + len)
                .ok_or_else(|| Error::msg("collective: truncated gather from rank 0"))?;
            all.push(part.to_vec());
            at += len;
        }
        if all.len() != world {
            return Err(Error::msg(format!(
                "collective: gather returned {} parts for {world} ranks",
                all.len()
            )));
        }
        Ok(all)
    }
}
