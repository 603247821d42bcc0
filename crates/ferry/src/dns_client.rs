//! An asynchronous A/AAAA stub resolver over UDP for a DNS cache's own servers
//! (`typed_dns_resolver_config`, c-ares `resolvers`): unlike the system resolver it gives
//! the DNS rcode of a failure and the TTL of an answer. The codec is
//! `ferry_proto::dns` (no I/O, fuzzed).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferry_config::DnsLookupFamily;
use ferry_proto::dns::{self, TYPE_A, TYPE_AAAA};
use tokio::net::UdpSocket;

/// A failed resolution: what went wrong, and the rcode when a server answered one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    pub rcode: Option<&'static str>,
}

/// An answer: addresses in the family's order of preference, and the smallest TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addrs: Vec<IpAddr>,
    pub ttl: Duration,
}

fn failure(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        rcode: None,
    }
}

/// Ask each server in turn (each gets an equal share of `timeout`) until one answers.
pub async fn resolve(
    servers: &[SocketAddr],
    name: &str,
    family: DnsLookupFamily,
    timeout: Duration,
) -> Result<Answer, Failure> {
    let qtypes: &[u16] = match family {
        DnsLookupFamily::V4Only => &[TYPE_A],
        DnsLookupFamily::V6Only => &[TYPE_AAAA],
        DnsLookupFamily::V4Preferred => &[TYPE_A, TYPE_AAAA],
        DnsLookupFamily::Auto => &[TYPE_AAAA, TYPE_A],
        DnsLookupFamily::All => &[TYPE_A, TYPE_AAAA],
    };
    let share = timeout / u32::try_from(servers.len().max(1)).unwrap_or(1);
    let mut last = failure("no DNS server configured");
    for server in servers {
        match tokio::time::timeout(share, ask(*server, name, qtypes)).await {
            Ok(Ok(answers)) => return pick(answers, family, name),
            Ok(Err(f)) if f.rcode.is_some() => return Err(f),
            Ok(Err(f)) => last = f,
            Err(_) => last = failure(format!("no answer from {server} within {share:?}")),
        }
    }
    Err(last)
}

/// Both queries (or one) to one server on one socket; the responses matched by id.
async fn ask(
    server: SocketAddr,
    name: &str,
    qtypes: &[u16],
) -> Result<Vec<(u16, dns::Response)>, Failure> {
    let local: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local)
        .await
        .map_err(|e| failure(format!("DNS socket: {e}")))?;
    sock.connect(server)
        .await
        .map_err(|e| failure(format!("DNS server {server}: {e}")))?;
    let base: u16 = rand_id();
    let mut pending: Vec<(u16, u16)> = Vec::new();
    for (i, qtype) in qtypes.iter().enumerate() {
        let id = base.wrapping_add(i as u16);
        let q = dns::encode_query(id, name, *qtype).map_err(|e| failure(e.to_string()))?;
        sock.send(&q)
            .await
            .map_err(|e| failure(format!("DNS server {server}: {e}")))?;
        pending.push((id, *qtype));
    }
    let mut buf = vec![0u8; dns::MAX_MESSAGE];
    let mut out = Vec::new();
    while !pending.is_empty() {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| failure(format!("DNS server {server}: {e}")))?;
        let msg = &buf[..n];
        let Some(i) = pending.iter().position(|(id, qtype)| {
            !matches!(
                dns::decode_response(msg, *id, *qtype),
                Err(dns::DnsError::NotOurs)
            )
        }) else {
            continue; // a stray or late datagram
        };
        let (id, qtype) = pending.swap_remove(i);
        let r = dns::decode_response(msg, id, qtype)
            .map_err(|e| failure(format!("DNS server {server}: {e}")))?;
        out.push((qtype, r));
    }
    Ok(out)
}

/// Addresses by the family's preference. A name is unknown only when every answer says
/// so: NXDOMAIN (or another error rcode) from one query is the failure; NOERROR with no
/// address in every query is "no address".
fn pick(
    answers: Vec<(u16, dns::Response)>,
    family: DnsLookupFamily,
    name: &str,
) -> Result<Answer, Failure> {
    if let Some((_, r)) = answers.iter().find(|(_, r)| r.rcode != 0) {
        let rcode = dns::rcode_name(r.rcode);
        return Err(Failure {
            message: format!("{rcode} from the DNS server"),
            rcode: Some(rcode),
        });
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut ttl = u32::MAX;
    for (_, r) in &answers {
        for (ip, t) in &r.addrs {
            ttl = ttl.min(*t);
            if ip.is_ipv4() {
                v4.push(*ip)
            } else {
                v6.push(*ip)
            }
        }
    }
    let addrs = match family {
        DnsLookupFamily::V4Only => v4,
        DnsLookupFamily::V6Only => v6,
        DnsLookupFamily::V4Preferred if !v4.is_empty() => v4,
        DnsLookupFamily::V4Preferred => v6,
        DnsLookupFamily::Auto if !v6.is_empty() => v6,
        DnsLookupFamily::Auto => v4,
        DnsLookupFamily::All => v4.into_iter().chain(v6).collect(),
    };
    if addrs.is_empty() {
        return Err(Failure {
            message: format!("{name} has no address of the family {family:?}"),
            rcode: Some("NOERROR"),
        });
    }
    Ok(Answer {
        addrs,
        ttl: Duration::from_secs(u64::from(ttl)),
    })
}

/// A query id that an off-path attacker cannot guess cheaply (RFC 5452).
fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u16
}
