//! Which share of the work this process does.
//!
//! The launcher variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, as torchrun sets them) are parsed
//! here once: by `train::dist::rank::RankInfo` for training, and by [`Shard`] for the commands
//! whose work is a list of independent items (`mcld test` pairs, `mcld prepare` photos).
//!
//! A [`Shard`] is `K/N`, K counted from 0. It comes from `--shard K/N`, else from `RANK` and
//! `WORLD_SIZE`, else it is `0/1` (everything). Item lists are split so that the N shards are
//! disjoint and together cover the list exactly once: `mcld test` pair number i (in `test.csv`
//! order, after `--limit`) belongs to shard i mod N; a `prepare` photo belongs to shard
//! FNV-1a-64(file name) mod N, which gives every stage of a photo (split, DensePose, texture,
//! face) to the same shard without any shard having to list the others' files.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// `RANK`, `WORLD_SIZE` and `LOCAL_RANK` of a launcher; absent variables mean one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LauncherRank {
    pub rank: usize,
    pub world: usize,
    /// Index of the process on its node (`LOCAL_RANK`, else `RANK`).
    pub local_rank: usize,
}

impl LauncherRank {
    /// The variables as `get` supplies them; errors name the variable and its value.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::msg(format!("environment {k}={v:?}: expected a whole number"))
                }),
            }
        };
        let world = num("WORLD_SIZE")?.unwrap_or(1);
        let rank = num("RANK")?.unwrap_or(0);
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        if world == 0 {
            return Err(Error::msg("environment WORLD_SIZE=0: expected at least 1"));
        }
        if rank >= world {
            return Err(Error::msg(format!(
                "environment RANK={rank} is not below WORLD_SIZE={world}"
            )));
        }
        Ok(Self {
            rank,
            world,
            local_rank,
        })
    }
}

/// Shard `index` of `count` of a command's items (see the module documentation for the split).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    /// The GPU of this process on its node (`LOCAL_RANK`) when the shard came from a launcher's
    /// variables with more than one process; `--device cuda` then means `cuda:LOCAL_RANK`.
    pub local_rank: Option<usize>,
}

impl Default for Shard {
    fn default() -> Self {
        Self::whole()
    }
}

impl Shard {
    /// Everything: `0/1`.
    pub fn whole() -> Self {
        Self {
            index: 0,
            count: 1,
            local_rank: None,
        }
    }

    /// Shard `index` of `count`; `index` must be below `count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 {
            return Err(Error::msg(format!(
                "shard {index}/{count}: the number of shards N must be at least 1"
            )));
        }
        if index >= count {
            return Err(Error::msg(format!(
                "shard {index}/{count}: K must be below N (shards are numbered 0 to {})",
                count - 1
            )));
        }
        Ok(Self {
            index,
            count,
            local_rank: None,
        })
    }

    /// `K/N` as `--shard` takes it.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::msg(format!(
                "shard {s:?}: expected K/N, two whole numbers with K from 0 to N-1 (e.g. 0/4)"
            ))
        };
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let k = k.trim().parse::<usize>().map_err(|_| bad())?;
        let n = n.trim().parse::<usize>().map_err(|_| bad())?;
        Self::new(k, n)
    }

    /// The shard of a launcher's `RANK` of `WORLD_SIZE` (everything when they are absent).
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let r = LauncherRank::from_vars(get)?;
        let mut s = Self::new(r.rank, r.world)?;
        if r.world > 1 {
            s.local_rank = Some(r.local_rank);
        }
        Ok(s)
    }

    /// `--shard` when given, else this process's `RANK`/`WORLD_SIZE`, else everything.
    pub fn resolve(flag: Option<Shard>) -> Result<Self> {
        match flag {
            Some(s) => Ok(s),
            None => Self::from_vars(&|k| std::env::var(k).ok()),
        }
    }

    /// True for `0/1`.
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// Whether item number `i` of an ordered list is this shard's: `i mod N == K`.
    pub fn owns_index(&self, i: usize) -> bool {
        i % self.count == self.index
    }

    /// Whether the item called `name` is this shard's: FNV-1a-64 of its bytes, mod N.
    pub fn owns_name(&self, name: &str) -> bool {
        (fnv1a64(name.as_bytes()) % self.count as u64) as usize == self.index
    }

    /// `STEM.EXT` for everything, `STEM.shard-K-of-N.EXT` for a shard: the name of a file that
    /// each run writes once (a report, a list), so that shards sharing a folder keep their own.
    pub fn file_name(&self, stem: &str, ext: &str) -> String {
        if self.is_whole() {
            format!("{stem}.{ext}")
        } else {
            format!("{stem}.shard-{}-of-{}.{ext}", self.index, self.count)
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// 64-bit FNV-1a: fixed by its definition, so a name's shard is the same on every machine and
/// in every build (std's hashers promise neither).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
