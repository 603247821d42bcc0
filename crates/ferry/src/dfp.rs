//! The dynamic forward proxy: tunnels to the target named in the path, resolved through a
//! bounded DNS cache, and checked against the destination policy before the reply.
//!
//! As Envoy's `envoy.filters.http.dynamic_forward_proxy` filter and
//! `envoy.clusters.dynamic_forward_proxy` cluster: one cache per `dns_cache_config.name`.
//! Names are resolved through the system resolver (so `/etc/hosts` is honoured), at most
//! once at a time per name (concurrent requests wait for the same answer). An answer is
//! used for `dns_refresh_rate`, then resolved again on the next request; a name unused for
//! `host_ttl` leaves the cache; at most `max_hosts` names are kept, and a new name that
//! finds the cache full of live names is refused (`dns_cache.<name>.host_overflow`).
//! Failures are not cached. IP literals skip the cache.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_config::{DnsCacheConfig, DnsLookupFamily};
use ferry_proto::request::Rejection;
use ferry_proto::template::{Target, TargetHost};

use crate::decide::reject;
use crate::policy::{self, OwnAddrs};
use crate::stats::{Counter, Gauge, Store};

/// How long one resolution may take (Envoy's `dns_query_timeout` default).
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// `dns_cache.<name>.*`, Envoy's names.
#[derive(Clone)]
pub struct DnsCacheStats {
    pub dns_query_attempt: Counter,
    pub dns_query_success: Counter,
    pub dns_query_failure: Counter,
    pub dns_query_timeout: Counter,
    pub host_added: Counter,
    pub host_removed: Counter,
    pub host_overflow: Counter,
    pub num_hosts: Gauge,
}

impl DnsCacheStats {
    fn new(store: &Store, name: &str) -> Self {
        let p = format!("dns_cache.{name}.");
        DnsCacheStats {
            dns_query_attempt: store.counter(&format!("{p}dns_query_attempt")),
            dns_query_success: store.counter(&format!("{p}dns_query_success")),
            dns_query_failure: store.counter(&format!("{p}dns_query_failure")),
            dns_query_timeout: store.counter(&format!("{p}dns_query_timeout")),
            host_added: store.counter(&format!("{p}host_added")),
            host_removed: store.counter(&format!("{p}host_removed")),
            host_overflow: store.counter(&format!("{p}host_overflow")),
            num_hosts: store.gauge(&format!("{p}num_hosts")),
        }
    }
}

/// Addresses, or why there are none (with the DNS rcode when a server gave one).
type Answer = Result<Arc<[IpAddr]>, crate::dns_client::Failure>;

/// One cached name: its answer once resolved, and when it was last used.
struct Slot {
    answer: tokio::sync::OnceCell<Answer>,
    /// When the answer stops being fresh: `dns_refresh_rate` after it arrived, or sooner
    /// when the DNS server's TTL says so.
    fresh_until: OnceLock<Instant>,
    last_used: Mutex<Instant>,
}

impl Slot {
    fn new(now: Instant) -> Arc<Self> {
        Arc::new(Slot {
            answer: tokio::sync::OnceCell::new(),
            fresh_until: OnceLock::new(),
            last_used: Mutex::new(now),
        })
    }

    fn last_used(&self) -> Instant {
        self.last_used
            .lock()
            .map_or_else(|e| *e.into_inner(), |t| *t)
    }

    fn touch(&self, now: Instant) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = now;
        }
    }
}

/// One DNS cache (`dns_cache_config`).
pub struct DnsCache {
    pub config: DnsCacheConfig,
    entries: Mutex<HashMap<String, Arc<Slot>>>,
    pub stats: DnsCacheStats,
}

impl DnsCache {
    pub fn new(config: DnsCacheConfig, store: &Store) -> Self {
        let stats = DnsCacheStats::new(store, &config.name);
        DnsCache {
            config,
            entries: Mutex::new(HashMap::new()),
            stats,
        }
    }

    /// The addresses of `host` (lower-cased name), from the cache or a fresh resolution.
    pub async fn lookup(&self, host: &str) -> Result<Arc<[IpAddr]>, Rejection> {
        let now = Instant::now();
        let slot = self.slot(host, now)?;
        let answer = slot
            .answer
            .get_or_init(|| async {
                self.stats.dns_query_attempt.inc();
                let (r, fresh_for) = self.query(host).await;
                let _ = slot.fresh_until.set(Instant::now() + fresh_for);
                r
            })
            .await
            .clone();
        match answer {
            Ok(addrs) => Ok(addrs),
            Err(f) => {
                // Failures are not cached: the next request asks again.
                self.remove_if_same(host, &slot);
                let mut r = reject(503, Some("dns_error"), format!("{host}: {}", f.message));
                r.rcode = f.rcode;
                Err(r)
            }
        }
    }

    /// One resolution: through the configured DNS servers (rcode and TTL known) or the
    /// system resolver. Returns the answer and how long it stays fresh.
    async fn query(&self, host: &str) -> (Answer, Duration) {
        let refresh = self.config.dns_refresh_rate;
        let family = self.config.dns_lookup_family;
        let result = if self.config.resolvers.is_empty() {
            match tokio::time::timeout(QUERY_TIMEOUT, crate::cluster::resolve(host, 0, family))
                .await
            {
                Ok(Ok(addrs)) => Ok((addrs.iter().map(|a| a.ip()).collect(), refresh)),
                Ok(Err(e)) => Err(Some(crate::dns_client::Failure {
                    message: e,
                    rcode: None,
                })),
                Err(_) => Err(None),
            }
        } else {
            match tokio::time::timeout(
                QUERY_TIMEOUT,
                crate::dns_client::resolve(&self.config.resolvers, host, family, QUERY_TIMEOUT),
            )
            .await
            {
                Ok(Ok(a)) => Ok((a.addrs.into(), a.ttl.min(refresh))),
                Ok(Err(f)) if f.message.starts_with("no answer") => Err(None),
                Ok(Err(f)) => Err(Some(f)),
                Err(_) => Err(None),
            }
        };
        match result {
            Ok((addrs, fresh)) => {
                self.stats.dns_query_success.inc();
                (Ok(addrs), fresh)
            }
            Err(Some(f)) => {
                self.stats.dns_query_failure.inc();
                (Err(f), Duration::ZERO)
            }
            Err(None) => {
                self.stats.dns_query_timeout.inc();
                let f = crate::dns_client::Failure {
                    message: format!("no answer within {}s", QUERY_TIMEOUT.as_secs()),
                    rcode: None,
                };
                (Err(f), Duration::ZERO)
            }
        }
    }

    /// The live slot for `host`, made (and the cache bounded) if needed.
    fn slot(&self, host: &str, now: Instant) -> Result<Arc<Slot>, Rejection> {
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| reject(503, Some("dns_error"), "DNS cache unavailable"))?;
        if let Some(slot) = entries.get(host) {
            let stale = slot.fresh_until.get().is_some_and(|t| now >= *t);
            if !stale {
                slot.touch(now);
                return Ok(slot.clone());
            }
            // Resolved again, in place of the stale answer.
            let fresh = Slot::new(now);
            entries.insert(host.to_owned(), fresh.clone());
            return Ok(fresh);
        }
        if entries.len() >= self.config.max_hosts as usize {
            let ttl = self.config.host_ttl;
            let before = entries.len();
            entries.retain(|_, s| now.duration_since(s.last_used()) < ttl);
            let removed = before - entries.len();
            self.stats.host_removed.add(removed as u64);
            if entries.len() >= self.config.max_hosts as usize {
                self.stats.num_hosts.set(entries.len() as i64);
                self.stats.host_overflow.inc();
                return Err(reject(
                    503,
                    Some("dns_error"),
                    format!(
                        "DNS cache {} is full ({} names, max_hosts)",
                        self.config.name, self.config.max_hosts
                    ),
                ));
            }
        }
        let slot = Slot::new(now);
        entries.insert(host.to_owned(), slot.clone());
        self.stats.host_added.inc();
        self.stats.num_hosts.set(entries.len() as i64);
        Ok(slot)
    }

    fn remove_if_same(&self, host: &str, slot: &Arc<Slot>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.get(host).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                entries.remove(host);
                self.stats.host_removed.inc();
                self.stats.num_hosts.set(entries.len() as i64);
            }
        }
    }

    /// Drop names unused for `host_ttl` (run periodically).
    pub fn sweep(&self) {
        let now = Instant::now();
        if let Ok(mut entries) = self.entries.lock() {
            let before = entries.len();
            let ttl = self.config.host_ttl;
            entries.retain(|_, s| now.duration_since(s.last_used()) < ttl);
            self.stats.host_removed.add((before - entries.len()) as u64);
            self.stats.num_hosts.set(entries.len() as i64);
        }
    }
}

/// Where a dynamic target's UDP goes: its addresses (an IP literal as it is, a name
/// through the cache), the first one the destination policy allows. Refusals: 503
/// `dns_error` when the name does not resolve, 403 `destination_ip_prohibited` when
/// every address is refused (the details name the first and why).
pub async fn resolve_target(
    cache: &DnsCache,
    policy_config: &ferry_config::DestinationPolicy,
    own: &OwnAddrs,
    target: &Target,
) -> Result<SocketAddr, Rejection> {
    let literal = match &target.host {
        TargetHost::Ip(ip) => Some(*ip),
        TargetHost::Name(_) => None,
    };
    let addrs: Arc<[IpAddr]> = match (&target.host, literal) {
        (_, Some(ip)) => Arc::new([ip]),
        (TargetHost::Name(name), None) => {
            let name = name.strip_suffix('.').unwrap_or(name);
            cache.lookup(&name.to_ascii_lowercase()).await?
        }
        (TargetHost::Ip(ip), None) => Arc::new([*ip]),
    };
    let family_ok = |ip: &IpAddr| match cache.config.dns_lookup_family {
        DnsLookupFamily::V4Only => ip.is_ipv4(),
        DnsLookupFamily::V6Only => ip.is_ipv6(),
        _ => true,
    };
    let mut first_refusal = None;
    for ip in addrs.iter().filter(|ip| family_ok(ip)) {
        let addr = SocketAddr::new(*ip, target.port);
        match policy::check(policy_config, own, addr) {
            Ok(()) => return Ok(addr),
            Err(why) => {
                first_refusal.get_or_insert((addr, why));
            }
        }
    }
    Err(match first_refusal {
        Some((addr, why)) => reject(
            403,
            Some("destination_ip_prohibited"),
            if literal.is_some() {
                format!("{addr} is refused: {why}")
            } else {
                format!(
                    "{} resolves to {addr}, which is refused: {why}",
                    target.host_text
                )
            },
        ),
        None => reject(
            503,
            Some("dns_error"),
            format!(
                "{}: no address of the family {:?}",
                target.host_text, cache.config.dns_lookup_family
            ),
        ),
    })
}
