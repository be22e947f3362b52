//! The rank contract of torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT` (the launcher variables themselves are parsed once, in [`crate::rank`]), and
//! the choice of collective a rank uses ([`Backend`]).

use crate::rank::LauncherRank;
use crate::{Error, Result};

/// Where this process stands among the training processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world: usize,
    /// Index of this process on its node: which GPU it drives (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub master_addr: Option<String>,
    /// Where rank 0 listens for the others: `MASTER_PORT`, or the port after it under torchrun,
    /// whose agent already serves its own store on `MASTER_PORT` (it says so to its workers with
    /// `TORCHELASTIC_USE_AGENT_STORE=True`).
    pub master_port: Option<u16>,
}

impl RankInfo {
    /// One process, no launcher.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: None,
            master_port: None,
        }
    }

    /// The torchrun variables of this process's environment (absent = one process).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Like [`RankInfo::from_env`] with the variables supplied by `get`; errors name the
    /// variable and its value.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let LauncherRank {
            rank,
            world,
            local_rank,
        } = LauncherRank::from_vars(&get)?;
        let master_port = match get("MASTER_PORT") {
            None => None,
            Some(v) => Some(v.trim().parse::<u16>().map_err(|_| {
                Error::msg(format!(
                    "environment MASTER_PORT={v:?}: expected a port number"
                ))
            })?),
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let master_port = match master_port {
            Some(p) if agent_store => Some(p.checked_add(1).ok_or_else(|| {
                Error::msg(
                    "environment MASTER_PORT=65535 under torchrun: mcld's rendezvous uses the \
                     port after MASTER_PORT (torchrun's store holds MASTER_PORT itself)",
                )
            })?),
            p => p,
        };
        let info = Self {
            rank,
            world,
            local_rank,
            master_addr: get("MASTER_ADDR"),
            master_port,
        };
        if world > 1 && (info.master_addr.is_none() || info.master_port.is_none()) {
            return Err(Error::msg(format!(
                "WORLD_SIZE={world} needs MASTER_ADDR and MASTER_PORT (as torchrun sets them)"
            )));
        }
        Ok(info)
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// Which [`Collective`] a rank uses. Chosen by [`Backend::from_vars`] from the world size, the
/// device and `MCLD_COLLECTIVE` (`auto`, the default: one process alone, TCP on the CPU, NCCL on
/// CUDA; `nccl`: NCCL even for one process, the single-GPU check of the NCCL path; `tcp`:
/// gradients through host memory over TCP, also on GPUs, slow but without NCCL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Single,
    Tcp,
    /// `timeout`: how long one NCCL operation may take before the run stops with an error
    /// (`MCLD_NCCL_TIMEOUT`, seconds, default [`NCCL_TIMEOUT_S`]).
    Nccl {
        timeout: std::time::Duration,
    },
}

/// Default bound of one NCCL operation, in seconds (PyTorch's default too).
pub const NCCL_TIMEOUT_S: u64 = 600;

impl Backend {
    /// The backend for `world` ranks on a CUDA (`cuda` true) or CPU device, with the variables
    /// supplied by `get`; errors name the variable and its value.
    pub fn from_vars(
        get: impl Fn(&str) -> Option<String>,
        world: usize,
        cuda: bool,
    ) -> Result<Self> {
        let timeout = match get("MCLD_NCCL_TIMEOUT") {
            None => NCCL_TIMEOUT_S,
            Some(v) if v.trim().is_empty() => NCCL_TIMEOUT_S,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(Error::msg(format!(
                        "environment MCLD_NCCL_TIMEOUT={v:?}: expected a number of seconds >= 1"
                    )))
                }
            },
        };
        let nccl = Backend::Nccl {
            timeout: std::time::Duration::from_secs(timeout),
        };
        let requested = get("MCLD_COLLECTIVE").map(|v| v.trim().to_ascii_lowercase());
        match requested.as_deref() {
            None | Some("") | Some("auto") => Ok(if world == 1 {
                Backend::Single
            } else if cuda {
                nccl
            } else {
                Backend::Tcp
            }),
            Some("tcp") => Ok(if world == 1 {
                Backend::Single
            } else {
                Backend::Tcp
            }),
            Some("nccl") if cuda => Ok(nccl),
            Some("nccl") => Err(Error::msg(
                "environment MCLD_COLLECTIVE=nccl needs a CUDA device (--device cuda)",
            )),
            Some(other) => Err(Error::msg(format!(
                "environment MCLD_COLLECTIVE={other:?}: expected auto, nccl or tcp"
            ))),
        }
    }
}
