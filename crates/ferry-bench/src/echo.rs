//! The UDP echo target: sends every datagram back to where it came from.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(crate::h3client::SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(crate::h3client::SOCKET_BUFFER);
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Bind `listen` (port 0 picks a free port), print the bound address on stdout, and echo on
/// `threads` threads (SO_REUSEPORT spreads the peers over them) until `max_time` has passed.
pub fn run(listen: SocketAddr, threads: usize, max_time: Duration) -> Result<(), String> {
    if !listen.ip().is_loopback() {
        return Err(format!(
            "{listen}: the echo target binds loopback addresses only"
        ));
    }
    let threads = threads.max(1);
    let first = socket(listen, threads > 1).map_err(|e| format!("bind {listen}: {e}"))?;
    let bound = first.local_addr().map_err(|e| e.to_string())?;
    let mut sockets = vec![first];
    for _ in 1..threads {
        sockets.push(socket(bound, true).map_err(|e| format!("bind {bound}: {e}"))?);
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{bound}");
    let _ = out.flush();
    let deadline = Instant::now() + max_time;
    let handles: Vec<_> = sockets
        .into_iter()
        .map(|s| std::thread::spawn(move || echo_loop(&s, deadline)))
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn echo_loop(s: &UdpSocket, deadline: Instant) {
    // The timeout only bounds how late the deadline is noticed.
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match s.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Some(p) = buf.get(..n) {
                    let _ = s.send_to(p, peer);
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}
