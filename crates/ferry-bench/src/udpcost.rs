//! `ferry-bench udp-cost`: what the UDP leg of a relay costs per datagram on this machine
//! when every datagram belongs to its own flow, as with 1,000 tunnels at a modest rate each.
//!
//! A CONNECT-UDP proxy sends each tunnel's datagrams from that tunnel's own connected socket
//! (one flow per tunnel; Envoy does the same), so datagrams of different tunnels cannot share
//! a system call (`sendmmsg` takes one socket) or a trip through the stack (GSO batches one
//! flow). This measures that per-datagram work in one thread, with pairs of connected
//! loopback sockets and nothing that sleeps or wakes anybody: each side's cost with no
//! scheduler in it, a lower bound for what a relay and its target pay per datagram.
//!
//! Each round sends one datagram on every "proxy" socket `a[i]` (the kernel delivers it to
//! `b[i]` in the same call, as loopback does), reads each at `b[i]` (the target), sends it
//! back from `b[i]`, and reads it at `a[i]`. The four phases are timed apart.

use std::io;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procstat;

/// Nanoseconds per datagram of each phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PhaseNs {
    /// `send` on the proxy's socket toward the target (includes loopback delivery).
    pub proxy_send: f64,
    /// `recv` at the target, one datagram per call.
    pub target_recv: f64,
    /// `send` from the target back to the proxy's socket (includes delivery).
    pub target_send: f64,
    /// `recv` on the proxy's socket, one datagram per call.
    pub proxy_recv: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UdpCost {
    pub flows: usize,
    pub payload_bytes: usize,
    pub datagrams: u64,
    pub wall_s: f64,
    /// This process's CPU seconds over the run (user + system), for comparison with the
    /// wall clock: they differ when something else took the core.
    pub cpu_s: Option<f64>,
    pub ns_per_datagram: PhaseNs,
    /// The proxy's share: `proxy_send + proxy_recv`.
    pub proxy_ns: f64,
    /// The target's share: `target_recv + target_send`.
    pub target_ns: f64,
}

/// Pairs of loopback sockets connected to each other.
fn pairs(flows: usize) -> io::Result<Vec<(UdpSocket, UdpSocket)>> {
    let mut out = Vec::with_capacity(flows);
    for _ in 0..flows {
        let a = UdpSocket::bind("127.0.0.1:0")?;
        let b = UdpSocket::bind("127.0.0.1:0")?;
        a.connect(b.local_addr()?)?;
        b.connect(a.local_addr()?)?;
        // Loopback delivers within `send`; a datagram that is not there after this long
        // was dropped, and the run fails instead of hanging.
        a.set_read_timeout(Some(Duration::from_secs(1)))?;
        b.set_read_timeout(Some(Duration::from_secs(1)))?;
        out.push((a, b));
    }
    Ok(out)
}

pub fn run(flows: usize, payload_bytes: usize, datagrams: u64) -> Result<UdpCost, String> {
    if !(1..=20_000).contains(&flows) || !(1..=65_000).contains(&payload_bytes) {
        return Err("--flows must be in 1..=20000 and --size in 1..=65000".into());
    }
    let socks = pairs(flows).map_err(|e| format!("cannot open {flows} socket pairs: {e}"))?;
    let out = vec![0x5au8; payload_bytes];
    let mut buf = vec![0u8; payload_bytes + 1];
    let recv = |s: &UdpSocket, buf: &mut [u8]| -> Result<(), String> {
        match s.recv(buf) {
            Ok(n) if n == payload_bytes => Ok(()),
            Ok(n) => Err(format!("received {n} bytes, sent {payload_bytes}")),
            Err(e) => Err(format!("a datagram did not arrive: {e}")),
        }
    };
    let send = |s: &UdpSocket| -> Result<(), String> {
        s.send(&out)
            .map(|_| ())
            .map_err(|e| format!("send failed: {e}"))
    };
    // One warm-up round outside the figures.
    let rounds = datagrams.div_ceil(flows as u64).max(1) + 1;
    let mut t = [Duration::ZERO; 4];
    let cpu_before = procstat::read(None);
    let start = Instant::now();
    for round in 0..rounds {
        let p0 = Instant::now();
        for (a, _) in &socks {
            send(a)?;
        }
        let p1 = Instant::now();
        for (_, b) in &socks {
            recv(b, &mut buf)?;
        }
        let p2 = Instant::now();
        for (_, b) in &socks {
            send(b)?;
        }
        let p3 = Instant::now();
        for (a, _) in &socks {
            recv(a, &mut buf)?;
        }
        let p4 = Instant::now();
        if round > 0 {
            t[0] += p1 - p0;
            t[1] += p2 - p1;
            t[2] += p3 - p2;
            t[3] += p4 - p3;
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    let cpu_s = procstat::usage(cpu_before, procstat::read(None), wall_s).map(|u| u.cpu_s);
    let measured = (rounds - 1) * flows as u64;
    let per = |d: Duration| d.as_secs_f64() * 1e9 / measured as f64;
    let ns = PhaseNs {
        proxy_send: per(t[0]),
        target_recv: per(t[1]),
        target_send: per(t[2]),
        proxy_recv: per(t[3]),
    };
    Ok(UdpCost {
        flows,
        payload_bytes,
        datagrams: measured,
        wall_s,
        cpu_s,
        ns_per_datagram: ns,
        proxy_ns: ns.proxy_send + ns.proxy_recv,
        target_ns: ns.target_recv + ns.target_send,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_is_measured_over_whole_rounds() {
        let c = run(3, 100, 10).unwrap();
        // 10 datagrams over 3 flows: 4 rounds measured (the warm-up round is not).
        assert_eq!(c.datagrams, 12);
        for v in [
            c.ns_per_datagram.proxy_send,
            c.ns_per_datagram.target_recv,
            c.ns_per_datagram.target_send,
            c.ns_per_datagram.proxy_recv,
        ] {
            assert!(v > 0.0);
        }
        assert!(
            (c.proxy_ns - c.ns_per_datagram.proxy_send - c.ns_per_datagram.proxy_recv).abs() < 1e-6
        );
    }

    #[test]
    fn out_of_range_arguments_are_refused() {
        assert!(run(0, 100, 10).is_err());
        assert!(run(1, 0, 10).is_err());
    }
}
