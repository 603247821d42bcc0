//! Ferry's destination policy for dynamic targets (RFC 9298 section 7): which resolved
//! addresses a tunnel may send UDP to.
//!
//! Order: the proxy's own listener and admin addresses are always refused (a tunnel to
//! itself); then the operator's `deny` rules, then `allow` rules (first match wins); then
//! the built-in refusals: loopback, link-local, multicast, broadcast, unspecified (and
//! IPv4-mapped IPv6 forms of these); then `default_action` (ALLOW unless set to DENY).

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use ferry_config::DestinationPolicy;

/// The proxy's own bound addresses (listeners and admin), set once they are bound.
#[derive(Debug, Default)]
pub struct OwnAddrs(OnceLock<Vec<SocketAddr>>);

impl OwnAddrs {
    pub fn set(&self, addrs: Vec<SocketAddr>) {
        let _ = self.0.set(addrs);
    }

    /// Whether `addr` is one of the proxy's own sockets. A socket bound to the unspecified
    /// address counts for the loopback and unspecified addresses of that port (the other
    /// local interface addresses are not enumerated).
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.0.get().is_some_and(|own| {
            own.iter().any(|o| {
                o.port() == addr.port()
                    && (canonical(o.ip()) == ip
                        || (o.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified())))
            })
        })
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why an address is refused by default, if it is.
pub fn builtin_refusal(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else if v4.is_unspecified() || v4.octets()[0] == 0 {
                // 0.0.0.0/8: "this network"; 0.0.0.0 reaches the host itself.
                Some("unspecified")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else {
                None
            }
        }
    }
}

/// Whether a tunnel may send to `addr`; the error says why not.
pub fn check(policy: &DestinationPolicy, own: &OwnAddrs, addr: SocketAddr) -> Result<(), String> {
    if own.contains(addr) {
        return Err("it is one of the proxy's own addresses".into());
    }
    let (ip, port) = (addr.ip(), addr.port());
    if let Some(rule) = policy.deny.iter().find(|r| r.matches(ip, port)) {
        return Err(format!("denied by rule {rule}"));
    }
    if policy.allow.iter().any(|r| r.matches(ip, port)) {
        return Ok(());
    }
    if let Some(kind) = builtin_refusal(ip) {
        return Err(format!("{kind} address"));
    }
    if policy.default_deny {
        return Err("no allow rule matches (default_action DENY)".into());
    }
    Ok(())
}

/// What the policy does, in words (for `--mode validate`).
pub fn describe(policy: &DestinationPolicy) -> String {
    let list = |rules: &[ferry_config::AddressRule]| {
        rules
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from("refuses the proxy's own addresses");
    if !policy.deny.is_empty() {
        out.push_str(&format!("; denies {}", list(&policy.deny)));
    }
    if !policy.allow.is_empty() {
        out.push_str(&format!("; allows {}", list(&policy.allow)));
    }
    out.push_str("; refuses loopback, link-local, multicast, broadcast and unspecified addresses");
    if policy.default_deny {
        out.push_str("; refuses everything else (default_action DENY)");
    } else {
        out.push_str("; allows everything else");
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_config::AddressRule;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn builtins() {
        for refused in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.1.1",
            "fe80::1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.0.1",
        ] {
            assert!(
                builtin_refusal(refused.parse().unwrap()).is_some(),
                "{refused}"
            );
        }
        for ok in [
            "8.8.8.8",
            "10.0.0.1",
            "192.168.1.1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(builtin_refusal(ok.parse().unwrap()).is_none(), "{ok}");
        }
    }

    #[test]
    fn rules_and_own_addresses() {
        let own = OwnAddrs::default();
        own.set(vec![a("127.0.0.1:4433"), a("0.0.0.0:9901")]);
        let policy = DestinationPolicy {
            allow: vec![AddressRule {
                network: "127.0.0.0".parse().unwrap(),
                prefix_len: 8,
                ports: (1, 65535),
            }],
            deny: vec![AddressRule {
                network: "127.0.0.1".parse().unwrap(),
                prefix_len: 32,
                ports: (53, 53),
            }],
            default_deny: false,
        };
        assert!(check(&policy, &own, a("127.0.0.1:9000")).is_ok());
        assert!(check(&policy, &own, a("127.0.0.1:53"))
            .unwrap_err()
            .contains("denied"));
        assert!(check(&policy, &own, a("127.0.0.1:4433"))
            .unwrap_err()
            .contains("own"));
        assert!(check(&policy, &own, a("[::ffff:127.0.0.1]:4433")).is_err());
        assert!(check(&policy, &own, a("127.0.0.5:9901"))
            .unwrap_err()
            .contains("own"));
        assert!(check(&policy, &own, a("[::1]:9000"))
            .unwrap_err()
            .contains("loopback"));
        assert!(check(&policy, &own, a("8.8.8.8:53")).is_ok());
        let strict = DestinationPolicy {
            default_deny: true,
            ..policy
        };
        assert!(check(&strict, &own, a("8.8.8.8:53")).is_err());
        assert!(check(&strict, &own, a("127.0.0.2:9")).is_ok());
    }
}
