//! A tiny authoritative DNS server on loopback for tests: answers A/AAAA queries from a
//! fixed zone, NXDOMAIN for unknown names, SERVFAIL for names starting with `servfail`.
//! Written from RFC 1035 directly (it shares no code with Ferry's decoder).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

pub struct DnsServer {
    pub addr: SocketAddr,
    /// Queries received, by name (lower-case, no trailing dot).
    pub queries: Arc<Mutex<HashMap<String, usize>>>,
}

impl DnsServer {
    /// `zone`: name -> (addresses, TTL).
    pub async fn start(zone: Vec<(&str, Vec<IpAddr>, u32)>) -> DnsServer {
        let zone: HashMap<String, (Vec<IpAddr>, u32)> = zone
            .into_iter()
            .map(|(n, a, t)| (n.to_string(), (a, t)))
            .collect();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let queries = Arc::new(Mutex::new(HashMap::new()));
        let q = queries.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let Some((name, qtype, qend)) = question(&buf[..n]) else {
                    continue;
                };
                *q.lock().unwrap().entry(name.clone()).or_insert(0) += 1;
                let mut out = buf[..qend].to_vec();
                out[2] = 0x84 | (buf[2] & 0x01); // QR, AA, RD copied
                out[3] = 0x80; // RA, rcode 0
                out[6..12].fill(0);
                match zone.get(&name) {
                    _ if name.starts_with("servfail") => out[3] |= 2,
                    None => out[3] |= 3,
                    Some((addrs, ttl)) => {
                        let mut count = 0u16;
                        for ip in addrs {
                            let data: Vec<u8> = match (ip, qtype) {
                                (IpAddr::V4(v4), 1) => v4.octets().to_vec(),
                                (IpAddr::V6(v6), 28) => v6.octets().to_vec(),
                                _ => continue,
                            };
                            out.extend_from_slice(&[0xc0, 12]);
                            out.extend_from_slice(&qtype.to_be_bytes());
                            out.extend_from_slice(&[0, 1]);
                            out.extend_from_slice(&ttl.to_be_bytes());
                            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
                            out.extend_from_slice(&data);
                            count += 1;
                        }
                        out[6..8].copy_from_slice(&count.to_be_bytes());
                    }
                }
                let _ = sock.send_to(&out, from).await;
            }
        });
        DnsServer { addr, queries }
    }

    pub fn queries(&self, name: &str) -> usize {
        self.queries.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// (name, qtype, end of the question section) of a one-question query.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    if msg.len() < 12 || msg[4..6] != [0, 1] {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(pos..pos + len)?).to_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
    Some((labels.join("."), qtype, pos + 4))
}
