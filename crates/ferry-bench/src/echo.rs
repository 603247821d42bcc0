//! The UDP echo target: sends every datagram back to where it came from.
//!
//! It reads with quinn-udp (recvmmsg, and UDP GRO where the sender used GSO) and answers a
//! coalesced batch with one GSO send, so the echo costs as few system calls as the traffic
//! allows: it is shared by every mode (direct, Ferry, Envoy) and should limit none of them.

use std::io::{IoSliceMut, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use tokio::io::Interest;

fn socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(crate::h3client::SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(crate::h3client::SOCKET_BUFFER);
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
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
        .map(|s| {
            std::thread::spawn(move || -> Result<(), String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(echo_loop(s, deadline))
            })
        })
        .collect();
    let mut result = Ok(());
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err("an echo thread failed".into()),
        }
    }
    result
}

async fn echo_loop(s: std::net::UdpSocket, deadline: Instant) -> Result<(), String> {
    let state = UdpSocketState::new((&s).into()).map_err(|e| e.to_string())?;
    let sock = tokio::net::UdpSocket::from_std(s).map_err(|e| e.to_string())?;
    // With GRO one buffer can hold up to 64 KiB of coalesced datagrams.
    let mut bufs: Vec<Vec<u8>> = (0..BATCH_SIZE).map(|_| vec![0u8; 65536]).collect();
    let mut meta = vec![RecvMeta::default(); BATCH_SIZE];
    let until = tokio::time::Instant::from_std(deadline);
    loop {
        let n = tokio::select! {
            r = sock.async_io(Interest::READABLE, || {
                let mut slices: Vec<IoSliceMut<'_>> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                state.recv((&sock).into(), &mut slices, &mut meta)
            }) => match r {
                Ok(n) => n,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
            _ = tokio::time::sleep_until(until) => return Ok(()),
        };
        for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
            let Some(data) = buf.get(..m.len) else {
                continue;
            };
            let stride = m.stride.max(1);
            // At most max_gso_segments datagrams per send.
            let chunk = stride * state.max_gso_segments().max(1);
            for part in data.chunks(chunk) {
                let t = Transmit {
                    destination: m.addr,
                    ecn: None,
                    contents: part,
                    segment_size: (part.len() > stride).then_some(stride),
                    src_ip: None,
                };
                // Wait for room in the socket buffer rather than drop (bounded: the peer's
                // rate is bounded).
                let _ = sock
                    .async_io(Interest::WRITABLE, || state.try_send((&sock).into(), &t))
                    .await;
            }
        }
    }
}
