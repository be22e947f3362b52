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

/// CPU time (user + system, all threads) this process has used so far, in seconds, where the
/// OS reports it: on a machine shared with other work it measures the work itself, which wall
/// time does not.
pub fn cpu_seconds() -> Option<f64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: getrusage only writes the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
            return None;
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Some(secs(ru.ru_utime) + secs(ru.ru_stime))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}
