//! [`NcclCollective`]: gradients summed on the GPUs with NCCL (the `nccl` feature, through the
//! cudarc bindings candle re-exports), one process per GPU.
//!
//! Setup. Every rank joins the TCP rendezvous of [`TcpCollective`] at `MASTER_ADDR:MASTER_PORT`;
//! rank 0 creates the NCCL unique id and sends it over that connection; each rank opens its
//! communicator for its device (`cuda:LOCAL_RANK`) and runs NCCL on candle's stream of that
//! device, so a reduction is ordered after the kernels that computed its gradients and before
//! those that use its result. The TCP connection stays open: it carries the small host exchanges
//! ([`Collective::all_gather_f64`]) and tells a dead rank apart from a slow one.
//!
//! `all_reduce_sum`. The ranks first compare the tensors' count and shapes over TCP (a mismatch
//! would make NCCL wait forever or add unrelated values); then the tensors are flattened into f32
//! buckets of at most [`BUCKET_BYTES`] ([`super::bucket`]), each bucket is summed by one
//! `ncclAllReduce` into a new buffer, and the sums are split back into tensors of the inputs'
//! shapes and dtypes. NCCL reduces each element once and copies the result to every rank, so all
//! ranks get the same bits (not summed in rank order, so not the bits of [`TcpCollective`]).
//!
//! A dead rank. NCCL does not notice by itself that a peer died in the middle of an operation:
//! its kernels wait for data that never comes. So this rank never blocks on NCCL. After each
//! bucket is queued it polls, until a CUDA event says the bucket is done: NCCL's asynchronous
//! error (`ncclCommGetAsyncError`: network and remote errors it saw), the TCP connections (a
//! process that exits or is killed, even by SIGKILL, closes its sockets), and the timeout
//! (`MCLD_NCCL_TIMEOUT`). Any of them aborts the communicator (`ncclCommAbort`, which ends the
//! waiting kernels) and returns an error; the rank then exits, which closes its own sockets, so
//! the ranks connected through it stop too (rank 0 sees any rank die; every rank sees rank 0
//! die). The shape comparison before each reduction is also a barrier: every rank was alive and
//! done with its backward pass when the NCCL operation started, so the timeout bounds the
//! reduction itself, not a slower peer's step. A communicator that was aborted stays unusable:
//! every later operation is an error.
//!
//! Creating the communicator (`ncclCommInitRank`) blocks until every rank has joined, so it runs
//! on a helper thread while this one polls the TCP connections and the same timeout; if they
//! fail, the error returns and the process ends (the helper thread with it).

use std::cell::RefCell;
use std::ffi::{c_int, c_void, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::sys;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Device, Storage, Tensor};

use super::bucket::{self, BUCKET_BYTES};
use super::collective::Collective;
use super::rank::RankInfo;
use super::tcp::TcpCollective;
use crate::{Error, Result};

/// How often a waiting rank looks at its peers' TCP connections.
const PEER_CHECK: Duration = Duration::from_millis(100);

/// An NCCL communicator handle, aborted when dropped (`ncclCommAbort` frees it without waiting
/// for peers, so dropping never hangs).
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use it at
// once; it is created on the init thread and then only used by the thread owning the collective.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful ncclCommInitRank and is aborted once.
        unsafe {
            sys::ncclCommAbort(self.0);
        }
    }
}

/// One rank of a data-parallel run on GPUs. See the module documentation.
pub struct NcclCollective {
    rank: usize,
    world: usize,
    /// The TCP connections to the other ranks (none when alone).
    ctl: Option<TcpCollective>,
    /// `None` once aborted after a failure.
    comm: RefCell<Option<RawComm>>,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    timeout: Duration,
    bucket_elems: usize,
}

impl NcclCollective {
    /// Joins the run: TCP rendezvous (at most `rendezvous` waiting for the other ranks), the
    /// NCCL id from rank 0, the communicator on `device` (at most `timeout`).
    pub fn connect(
        info: &RankInfo,
        device: &Device,
        rendezvous: Duration,
        timeout: Duration,
    ) -> Result<Self> {
        let cuda = match device {
            Device::Cuda(d) => d.clone(),
            other => {
                return Err(Error::msg(format!(
                    "the NCCL collective needs a CUDA device, not {other:?}"
                )))
            }
        };
        let ctl = if info.world > 1 {
            Some(TcpCollective::connect(info, rendezvous)?)
        } else {
            None
        };
        let id = share_unique_id(info.rank, ctl.as_ref())?;
        let stream = cuda.cuda_stream();
        let comm = init_comm(info, &stream, id, ctl.as_ref(), timeout)?;
        Ok(Self {
            rank: info.rank,
            world: info.world,
            ctl,
            comm: RefCell::new(Some(comm)),
            device: cuda,
            stream,
            timeout,
            bucket_elems: BUCKET_BYTES / std::mem::size_of::<f32>(),
        })
    }

    /// Buckets of at most `bytes` (default [`BUCKET_BYTES`]); small ones let a test cover
    /// several buckets with small tensors.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_elems = (bytes / std::mem::size_of::<f32>()).max(1);
        self
    }

    /// Aborts the communicator (if not yet) and returns the error `msg`.
    fn fail(&self, msg: String) -> Error {
        let comm = self.comm.borrow_mut().take();
        let aborted = comm.is_some();
        drop(comm);
        Error::msg(format!(
            "rank {} of {}: {msg}{}",
            self.rank,
            self.world,
            if aborted {
                "; aborted the NCCL communicator"
            } else {
                ""
            }
        ))
    }

    /// Waits until the work queued on the stream so far is done, watching for NCCL errors,
    /// dead peers and the timeout (see the module documentation).
    fn wait(&self, comm: sys::ncclComm_t, what: &str) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| self.fail(format!("{what}: CUDA error {e}")))?;
        let start = Instant::now();
        let mut next_peer_check = start + PEER_CHECK;
        let mut pause = Duration::from_micros(20);
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(format!("{what}: CUDA error {e}"))),
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is the live handle owned by `self.comm`; `state` is a valid out
            // pointer for the call.
            let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            for res in [r, state] {
                if !ok(res) {
                    return Err(self.fail(format!("{what}: {}", nccl_error(res, Some(comm)))));
                }
            }
            let now = Instant::now();
            if now >= next_peer_check {
                if let Some(ctl) = &self.ctl {
                    ctl.check_peers()
                        .map_err(|e| self.fail(format!("{what}: {e}")))?;
                }
                next_peer_check = now + PEER_CHECK;
            }
            if now.duration_since(start) > self.timeout {
                return Err(self.fail(format!(
                    "{what} did not finish within {} s (MCLD_NCCL_TIMEOUT); a rank may be \
                     stuck, or the network between the nodes broken (NCCL_DEBUG=WARN tells more)",
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Sums one flat f32 bucket over the ranks into a new tensor.
    fn reduce_bucket(&self, comm: sys::ncclComm_t, flat: &Tensor) -> Result<Tensor> {
        let n = flat.elem_count();
        let mut sum = self.device.alloc_zeros::<f32>(n)?;
        {
            let (storage, layout) = flat.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(Error::msg(
                    "NCCL all-reduce: a gradient bucket is not on the GPU",
                ));
            };
            let off = layout.start_offset();
            let src = cs
                .as_cuda_slice::<f32>()?
                .try_slice(off..off + n)
                .ok_or_else(|| Error::msg("NCCL all-reduce: a gradient bucket is out of bounds"))?;
            let (src_ptr, _src_use) = src.device_ptr(&self.stream);
            let (dst_ptr, _dst_use) = sum.device_ptr_mut(&self.stream);
            // SAFETY: both pointers address `n` f32 on this communicator's device, valid until
            // the guards above are dropped, which is after the operation was queued on
            // `self.stream`; the buffers are freed in stream order, so after it completes.
            let r = unsafe {
                sys::ncclAllReduce(
                    src_ptr as *const c_void,
                    dst_ptr as *mut c_void,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )
            };
            if !ok(r) {
                return Err(self.fail(format!(
                    "NCCL all-reduce of {n} values: {}",
                    nccl_error(r, Some(comm))
                )));
            }
        }
        self.wait(comm, "NCCL all-reduce")?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(sum, self.device.clone()));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
    }

    /// Every rank must reduce the same list of shapes: compared over TCP, which also makes sure
    /// every rank is alive and ready before NCCL starts.
    fn agree_on_shapes(&self, tensors: &[Tensor]) -> Result<()> {
        let Some(ctl) = &self.ctl else {
            return Ok(());
        };
        let total: usize = tensors.iter().map(|t| t.elem_count()).sum();
        // FNV-1a over the dims, 52 bits so that the f64 carries it exactly.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for t in tensors {
            for &d in t.dims().iter().chain([usize::MAX].iter()) {
                h = (h ^ d as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        let mine = [tensors.len() as f64, total as f64, (h >> 12) as f64];
        let all = ctl.all_gather_f64(&mine)?;
        for (r, theirs) in all.iter().enumerate() {
            if theirs.as_slice() != mine.as_slice() {
                return Err(Error::msg(format!(
                    "rank {}: rank {r} reduces {} tensors of {} values, this rank {} of {} \
                     (or their shapes differ): the ranks do not train the same model",
                    self.rank,
                    theirs.first().copied().unwrap_or(f64::NAN),
                    theirs.get(1).copied().unwrap_or(f64::NAN),
                    tensors.len(),
                    total
                )));
            }
        }
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        self.agree_on_shapes(tensors)?;
        let comm = match self.comm.borrow().as_ref() {
            Some(c) => c.0,
            None => {
                return Err(Error::msg(format!(
                    "rank {}: the NCCL communicator was aborted after an earlier failure",
                    self.rank
                )))
            }
        };
        let here = Device::Cuda(self.device.clone());
        let sizes: Vec<usize> = tensors.iter().map(|t| t.elem_count()).collect();
        let mut out = Vec::with_capacity(tensors.len());
        for range in bucket::plan(&sizes, self.bucket_elems) {
            let part = &tensors[range];
            // Empty tensors stay out of the buffer (CUDA refuses empty copies); split gives
            // them back as they are.
            let local = part
                .iter()
                .filter(|t| t.elem_count() > 0)
                .map(|t| Ok(t.to_device(&here)?))
                .collect::<Result<Vec<_>>>()?;
            if local.is_empty() {
                out.extend(part.iter().cloned());
                continue;
            }
            let flat = bucket::flatten(&local)?;
            let sum = self.reduce_bucket(comm, &flat)?;
            drop(flat);
            for (s, t) in bucket::split(&sum, part)?.into_iter().zip(part) {
                out.push(s.to_device(t.device())?);
            }
        }
        Ok(out)
    }

    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        match &self.ctl {
            Some(ctl) => ctl.all_gather_f64(values),
            None => Ok(vec![values.to_vec()]),
        }
    }

    /// Host bytes (reports) travel over the TCP control connection, not NCCL.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        match &self.ctl {
            Some(ctl) => ctl.all_gather_bytes(bytes),
            None => Ok(vec![bytes.to_vec()]),
        }
    }
}

fn ok(r: sys::ncclResult_t) -> bool {
    matches!(
        r,
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
    )
}

/// NCCL's words for `r`, and its last message for `comm` when there is one.
fn nccl_error(r: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> String {
    let text = |p: *const std::ffi::c_char| -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns NUL-terminated strings that stay valid while the
            // communicator lives (static ones for ncclGetErrorString).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: ncclGetErrorString accepts any result code.
    let mut msg = format!(
        "NCCL error {r:?}: {}",
        text(unsafe { sys::ncclGetErrorString(r) })
    );
    if let Some(c) = comm {
        // SAFETY: `c` is a live communicator handle.
        let last = text(unsafe { sys::ncclGetLastError(c) });
        if !last.is_empty() {
            msg.push_str(&format!(" ({last})"));
        }
    }
    msg
}

/// Rank 0 creates the unique id; the others receive it (or rank 0's reason why there is none).
fn share_unique_id(rank: usize, ctl: Option<&TcpCollective>) -> Result<sys::ncclUniqueId> {
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // The message: 1 and the id's 128 bytes, or 0 and rank 0's error.
    let mut msg = Vec::new();
    if rank == 0 {
        // SAFETY: `id` is a valid out pointer.
        let r = unsafe { sys::ncclGetUniqueId(&mut id) };
        if ok(r) {
            msg.push(1);
            msg.extend(id.internal.iter().map(|&c| c as u8));
        } else {
            msg.push(0);
            msg.extend_from_slice(
                format!("rank 0 cannot create the NCCL id: {}", nccl_error(r, None)).as_bytes(),
            );
        }
    }
    if let Some(ctl) = ctl {
        msg = ctl.broadcast_from_root(&msg)?;
    }
    match msg.split_first() {
        Some((1, bytes)) if bytes.len() == 128 => {
            for (c, &b) in id.internal.iter_mut().zip(bytes) {
                *c = b as std::ffi::c_char;
            }
            Ok(id)
        }
        Some((0, why)) => Err(Error::msg(String::from_utf8_lossy(why).into_owned())),
        _ => Err(Error::msg(format!(
            "rank {rank}: malformed NCCL id from rank 0 ({} bytes)",
            msg.len()
        ))),
    }
}

/// `ncclCommInitRank` on a helper thread (it blocks until every rank joined), bounded by
/// `timeout` and by the peers' TCP connections.
fn init_comm(
    info: &RankInfo,
    stream: &Arc<CudaStream>,
    id: sys::ncclUniqueId,
    ctl: Option<&TcpCollective>,
    timeout: Duration,
) -> Result<RawComm> {
    let (world, rank) = match (c_int::try_from(info.world), c_int::try_from(info.rank)) {
        (Ok(w), Ok(r)) => (w, r),
        _ => {
            return Err(Error::msg(format!(
                "world size {} is too large",
                info.world
            )))
        }
    };
    let ctx = stream.context().clone();
    let (tx, rx) = std::sync::mpsc::channel::<std::result::Result<RawComm, String>>();
    std::thread::Builder::new()
        .name(format!("nccl-init-{}", info.rank))
        .spawn(move || {
            let made = match ctx.bind_to_thread() {
                Err(e) => Err(format!("cannot use the CUDA device: {e}")),
                Ok(()) => {
                    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
                    // SAFETY: `comm` is a valid out pointer; the CUDA device NCCL binds to is the
                    // one made current just above.
                    let r = unsafe { sys::ncclCommInitRank(&mut comm, world, id, rank) };
                    if ok(r) && !comm.is_null() {
                        Ok(RawComm(comm))
                    } else {
                        Err(nccl_error(r, None))
                    }
                }
            };
            // If the caller gave up waiting, the communicator is dropped (aborted) here.
            let _ = tx.send(made);
        })
        .map_err(|e| Error::msg(format!("cannot start the NCCL init thread: {e}")))?;
    let start = Instant::now();
    loop {
        match rx.recv_timeout(PEER_CHECK) {
            Ok(Ok(comm)) => return Ok(comm),
            Ok(Err(e)) => {
                return Err(Error::msg(format!(
                    "rank {} of {}: cannot create the NCCL communicator: {e} (two ranks on one \
                     GPU, or a missing/mismatched libnccl, are common causes; NCCL_DEBUG=WARN \
                     tells more)",
                    info.rank, info.world
                )))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::msg("the NCCL init thread ended without an answer"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(ctl) = ctl {
            ctl.check_peers()?;
        }
        if start.elapsed() > timeout {
            return Err(Error::msg(format!(
                "rank {} of {}: the NCCL communicator was not ready within {} s \
                 (MCLD_NCCL_TIMEOUT)",
                info.rank,
                info.world,
                timeout.as_secs()
            )));
        }
    }
}
