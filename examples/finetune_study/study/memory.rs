//! The process's peak resident set (Linux): reset before a phase, read after it.

/// Restarts the peak-RSS count from the current resident set, so the next [`peak_rss_mib`]
/// covers only what follows. Returns false where the kernel does not allow it; the peak then
/// covers the whole process.
pub fn reset_peak_rss() -> bool {
    // Writing 5 to clear_refs resets VmHWM (Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident set since the start or the last reset, in MiB (`VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
