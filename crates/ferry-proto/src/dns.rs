//! A minimal DNS stub-resolver codec (RFC 1035): A and AAAA queries over UDP and their
//! responses. No I/O: the runtime sends [`encode_query`]'s bytes and feeds what comes back
//! to [`decode_response`], which gives the rcode and the addresses with their TTLs.
//!
//! Decoding never panics and never loops without consuming input: every length is checked
//! against the message, and names are skipped without following compression pointers (a
//! pointer ends a name).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Record types Ferry asks for.
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// The largest response Ferry reads (EDNS is not used, so a server sends at most 512
/// bytes over UDP; a larger buffer costs nothing).
pub const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The name cannot be put in a query (empty label, label over 63 bytes, over 253).
    BadName,
    /// The message is shorter than its own fields say, or malformed.
    Malformed,
    /// Not a response to this query (id, QR bit, opcode).
    NotOurs,
    /// The server set TC: the answer did not fit in UDP (TCP is not used).
    Truncated,
}

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DnsError::BadName => "not a valid DNS name",
            DnsError::Malformed => "malformed DNS response",
            DnsError::NotOurs => "a DNS response to another query",
            DnsError::Truncated => "truncated DNS response (TCP fallback not supported)",
        })
    }
}

/// A decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// RCODE (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, ...).
    pub rcode: u8,
    /// The A or AAAA records of the answer section, with their TTLs in seconds.
    pub addrs: Vec<(IpAddr, u32)>,
}

/// The RFC 1035 / RFC 6895 name of an RCODE.
pub fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        _ => "RCODE_UNKNOWN",
    }
}

/// A recursive query (RD set) for `name` (`qtype` A or AAAA), class IN, id `id`.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, DnsError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(DnsError::BadName);
    }
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00]); // RD
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(DnsError::BadName);
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DnsError> {
        let end = self.pos.checked_add(n).ok_or(DnsError::Malformed)?;
        let s = self.buf.get(self.pos..end).ok_or(DnsError::Malformed)?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, DnsError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DnsError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Skip a name: labels up to a zero byte or a compression pointer.
    fn skip_name(&mut self) -> Result<(), DnsError> {
        loop {
            let len = self.take(1)?[0];
            match len {
                0 => return Ok(()),
                l if l & 0xc0 == 0xc0 => {
                    self.take(1)?;
                    return Ok(());
                }
                l if l & 0xc0 != 0 => return Err(DnsError::Malformed),
                l => {
                    self.take(usize::from(l))?;
                }
            }
        }
    }
}

/// Decode the response to the query `id` for `qtype`. A non-zero rcode is not an error
/// here: the caller reports it.
pub fn decode_response(buf: &[u8], id: u16, qtype: u16) -> Result<Response, DnsError> {
    let mut r = Reader { buf, pos: 0 };
    let got_id = r.u16()?;
    let flags = r.u16()?;
    let qdcount = r.u16()?;
    let ancount = r.u16()?;
    r.u16()?; // NSCOUNT
    r.u16()?; // ARCOUNT
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    if got_id != id || !is_response || opcode != 0 {
        return Err(DnsError::NotOurs);
    }
    if flags & 0x0200 != 0 {
        return Err(DnsError::Truncated);
    }
    let rcode = (flags & 0xf) as u8;
    for _ in 0..qdcount {
        r.skip_name()?;
        r.take(4)?;
    }
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        r.skip_name()?;
        let rtype = r.u16()?;
        let class = r.u16()?;
        let ttl = r.u32()?;
        let len = usize::from(r.u16()?);
        let data = r.take(len)?;
        if class != CLASS_IN || rtype != qtype {
            continue; // CNAMEs and the like: the addresses follow them in the answer.
        }
        let ip = match (rtype, data.len()) {
            (TYPE_A, 4) => IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (TYPE_AAAA, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(data);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(DnsError::Malformed),
        };
        // RFC 2181 section 8: a TTL with the top bit set is treated as zero.
        addrs.push((ip, if ttl > i32::MAX as u32 { 0 } else { ttl }));
    }
    Ok(Response { rcode, addrs })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A response to `query` with the given rcode and answers (name = pointer to the question).
    fn respond(query: &[u8], rcode: u8, answers: &[(u16, u32, &[u8])]) -> Vec<u8> {
        let mut out = query.to_vec();
        out[2] = 0x81;
        out[3] = 0x80 | rcode;
        out[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for (t, ttl, data) in answers {
            out.extend_from_slice(&[0xc0, 12]);
            out.extend_from_slice(&t.to_be_bytes());
            out.extend_from_slice(&[0, 1]);
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn query_layout() {
        let q = encode_query(0x1234, "a.example.", TYPE_A).unwrap();
        assert_eq!(
            q,
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x07example\x00\x00\x01\x00\x01"
        );
        assert_eq!(encode_query(1, "", TYPE_A), Err(DnsError::BadName));
        assert_eq!(encode_query(1, "a..b", TYPE_A), Err(DnsError::BadName));
        assert_eq!(
            encode_query(1, &"x".repeat(64), TYPE_A),
            Err(DnsError::BadName)
        );
    }

    #[test]
    fn answers_rcodes_and_errors() {
        let q = encode_query(7, "host.test", TYPE_A).unwrap();
        let cname: &[u8] = &[0xc0, 12];
        let r = respond(
            &q,
            0,
            &[
                (5, 60, cname),
                (TYPE_A, 30, &[192, 0, 2, 1]),
                (TYPE_A, 0x8000_0000, &[192, 0, 2, 2]),
            ],
        );
        assert_eq!(
            decode_response(&r, 7, TYPE_A).unwrap(),
            Response {
                rcode: 0,
                addrs: vec![
                    ("192.0.2.1".parse().unwrap(), 30),
                    ("192.0.2.2".parse().unwrap(), 0)
                ]
            }
        );
        let nx = respond(&q, 3, &[]);
        assert_eq!(decode_response(&nx, 7, TYPE_A).unwrap().rcode, 3);
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(decode_response(&nx, 8, TYPE_A), Err(DnsError::NotOurs));
        assert_eq!(decode_response(&q, 7, TYPE_A), Err(DnsError::NotOurs));
        for cut in 0..r.len() {
            assert!(decode_response(&r[..cut], 7, TYPE_A).is_err(), "{cut}");
        }
        let mut tc = nx.clone();
        tc[2] |= 0x02;
        assert_eq!(decode_response(&tc, 7, TYPE_A), Err(DnsError::Truncated));
        let bad = respond(&q, 0, &[(TYPE_A, 1, &[1, 2, 3])]);
        assert_eq!(decode_response(&bad, 7, TYPE_A), Err(DnsError::Malformed));
        let q6 = encode_query(9, "host.test", TYPE_AAAA).unwrap();
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        let r6 = respond(&q6, 0, &[(TYPE_AAAA, 5, &v6)]);
        assert_eq!(
            decode_response(&r6, 9, TYPE_AAAA).unwrap().addrs,
            vec![("::1".parse().unwrap(), 5)]
        );
    }
}
