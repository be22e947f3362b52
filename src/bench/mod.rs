//! `mcld bench`: timings that need full-size networks, with random weights so they run without
//! any download. Figures are printed, never asserted; README's performance section quotes them.

pub mod densepose;
pub mod pipeline;
pub mod train;

/// Peak resident set size of this process in bytes (Linux `VmHWM`), when the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
