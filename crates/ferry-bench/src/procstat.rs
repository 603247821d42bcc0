//! CPU time and memory of a process from `/proc` (Linux only; elsewhere every reading is
//! `None`).

use serde::Serialize;

/// Clock ticks per second of `utime`/`stime` in `/proc/PID/stat` (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// User plus system CPU seconds, all threads.
    pub cpu_s: f64,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size (since start or the last [`reset_peak`]), KiB.
    pub hwm_kib: u64,
}

/// `pid` is `None` for this process.
pub fn read(pid: Option<u32>) -> Option<Snapshot> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_string(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing ')' are
    // fixed: state is field 3, utime field 14, stime field 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(Snapshot {
        cpu_s: (utime + stime) / USER_HZ,
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    })
}

/// Reset the peak RSS (VmHWM) of `pid` to its current RSS (`echo 5 > /proc/PID/clear_refs`).
/// Best effort: needs the right to write that file.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"5").is_ok()
}

/// What a process used over an interval.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub cpu_s: f64,
    /// CPU seconds per wall-clock second (1.0 = one core busy).
    pub cpu_cores: f64,
    pub rss_kib_end: u64,
    /// Peak RSS over the interval when the peak could be reset at its start, else the
    /// process's lifetime peak.
    pub peak_rss_kib: u64,
}

pub fn usage(before: Option<Snapshot>, after: Option<Snapshot>, wall_s: f64) -> Option<Usage> {
    let (b, a) = (before?, after?);
    let cpu_s = (a.cpu_s - b.cpu_s).max(0.0);
    Some(Usage {
        cpu_s,
        cpu_cores: if wall_s > 0.0 { cpu_s / wall_s } else { 0.0 },
        rss_kib_end: a.rss_kib,
        peak_rss_kib: a.hwm_kib.max(a.rss_kib),
    })
}

/// Datagrams the kernel dropped on the UDP sockets bound to `port` (any address), from the
/// last column of `/proc/net/udp` and `/proc/net/udp6` (receive buffer overflows, mostly).
pub fn udp_drops(port: u16) -> Option<u64> {
    let mut total = None;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                let drops: u64 = fields.last().and_then(|d| d.parse().ok()).unwrap_or(0);
                *total.get_or_insert(0) += drops;
            }
        }
    }
    total
}
