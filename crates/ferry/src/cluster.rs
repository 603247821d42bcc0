//! Clusters: where a terminated tunnel's UDP goes.
//!
//! As in Envoy, a terminating route sends UDP to a host picked from the route's cluster
//! (round robin), not to the target named in the path. STATIC clusters hold IP literals;
//! STRICT_DNS and LOGICAL_DNS clusters resolve their names in the background (through the
//! system resolver, so `/etc/hosts` is honoured) and again every `dns_refresh_rate`.
//! Hosts live in a swappable snapshot: the DNS task replaces it, requests read it without
//! locks.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ferry_config::{Cluster, DiscoveryType, DnsLookupFamily};
use tokio::sync::watch;

/// The resolved state of one cluster.
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    pub addrs: Vec<SocketAddr>,
    /// The last resolution error, when the last attempt failed and no host is known.
    pub dns_error: Option<String>,
}

/// Why no host could be picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickError {
    NoSuchCluster,
    /// DNS failed (the message says how).
    Dns(String),
    /// The cluster resolved, but has no usable host.
    NoHealthyHost,
}

pub struct ClusterState {
    pub config: Cluster,
    /// HTTP/3 connections to the cluster's hosts, for clusters that are next-hop proxies.
    pub upstream: Option<crate::upstream::UpstreamPool>,
    /// HTTP/2 or HTTP/1.1 connections to them, for the other `explicit_http_config`s.
    pub tcp_upstream: Option<crate::upstream_tcp::TcpPool>,
    /// A dynamic forward proxy cluster's DNS cache (shared by name).
    pub dns_cache: Option<Arc<crate::dfp::DnsCache>>,
    hosts: ArcSwap<Hosts>,
    next: AtomicUsize,
    /// Becomes true once the first resolution attempt has finished (success or not).
    initialized: watch::Sender<bool>,
}

impl ClusterState {
    fn new(config: Cluster) -> Arc<Self> {
        let static_hosts = match config.discovery {
            DiscoveryType::Static => Some(
                config
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        e.address
                            .parse::<IpAddr>()
                            .ok()
                            .map(|ip| SocketAddr::new(ip, e.port))
                    })
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        };
        let initialized =
            static_hosts.is_some() || config.discovery == DiscoveryType::DynamicForwardProxy;
        Arc::new(ClusterState {
            config,
            upstream: None,
            tcp_upstream: None,
            dns_cache: None,
            hosts: ArcSwap::from_pointee(Hosts {
                addrs: static_hosts.unwrap_or_default(),
                dns_error: None,
            }),
            next: AtomicUsize::new(0),
            initialized: watch::channel(initialized).0,
        })
    }

    /// Round robin over the current hosts.
    pub fn pick(&self) -> Result<SocketAddr, PickError> {
        let hosts = self.hosts.load();
        if hosts.addrs.is_empty() {
            return Err(match &hosts.dns_error {
                Some(e) => PickError::Dns(e.clone()),
                None => PickError::NoHealthyHost,
            });
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % hosts.addrs.len();
        hosts.addrs.get(i).copied().ok_or(PickError::NoHealthyHost)
    }

    pub fn hosts(&self) -> Arc<Hosts> {
        self.hosts.load_full()
    }

    /// Waits until the first resolution attempt has finished.
    pub async fn initialized(&self) {
        let mut rx = self.initialized.subscribe();
        // An error means the sender is gone: nothing more will change, so stop waiting.
        let _ = rx.wait_for(|v| *v).await;
    }

    async fn resolve_once(&self) {
        let mut addrs = Vec::new();
        let mut errors = Vec::new();
        let endpoints = match self.config.discovery {
            // Envoy's LOGICAL_DNS uses one endpoint, and the first address it resolves to.
            DiscoveryType::LogicalDns => {
                &self.config.endpoints[..self.config.endpoints.len().min(1)]
            }
            _ => &self.config.endpoints[..],
        };
        for ep in endpoints {
            match resolve(&ep.address, ep.port, self.config.dns_lookup_family).await {
                Ok(mut found) => {
                    if self.config.discovery == DiscoveryType::LogicalDns {
                        found.truncate(1);
                    }
                    addrs.extend(found)
                }
                Err(e) => errors.push(format!("{}: {e}", ep.address)),
            }
        }
        let new = if addrs.is_empty() && !errors.is_empty() {
            let old = self.hosts.load();
            if !old.addrs.is_empty() {
                // Keep the last good answer, as Envoy does when a refresh fails.
                tracing::warn!(cluster = %self.config.name, "DNS refresh failed: {}", errors.join("; "));
                None
            } else {
                Some(Hosts {
                    addrs,
                    dns_error: Some(errors.join("; ")),
                })
            }
        } else {
            Some(Hosts {
                addrs,
                dns_error: None,
            })
        };
        if let Some(new) = new {
            tracing::debug!(cluster = %self.config.name, hosts = ?new.addrs, "resolved");
            self.hosts.store(Arc::new(new));
        }
        self.initialized.send_replace(true);
    }
}

/// Resolve `name:port` with the system resolver, keeping the addresses the family allows.
pub(crate) async fn resolve(
    name: &str,
    port: u16,
    family: DnsLookupFamily,
) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let all: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
        .await
        .map_err(|e| e.to_string())?
        .collect();
    filter_family(all, family)
}

/// Keep the addresses `family` allows, in Envoy's order of preference.
fn filter_family(all: Vec<SocketAddr>, family: DnsLookupFamily) -> Result<Vec<SocketAddr>, String> {
    let v4 = all.iter().filter(|a| a.is_ipv4()).copied();
    let v6 = all.iter().filter(|a| a.is_ipv6()).copied();
    let out: Vec<SocketAddr> = match family {
        DnsLookupFamily::V4Only => v4.collect(),
        DnsLookupFamily::V6Only => v6.collect(),
        // Envoy's AUTO prefers IPv6 and falls back to IPv4.
        DnsLookupFamily::Auto => {
            let six: Vec<_> = v6.collect();
            if six.is_empty() {
                v4.collect()
            } else {
                six
            }
        }
        DnsLookupFamily::V4Preferred => {
            let four: Vec<_> = v4.collect();
            if four.is_empty() {
                v6.collect()
            } else {
                four
            }
        }
        DnsLookupFamily::All => all,
    };
    if out.is_empty() {
        return Err(format!("no address of the requested family ({family:?})"));
    }
    Ok(out)
}

/// All clusters, by name. Kept behind a swappable snapshot by the server.
#[derive(Default)]
pub struct ClusterManager {
    clusters: HashMap<String, Arc<ClusterState>>,
    /// The DNS caches of dynamic forward proxy clusters, by cache name.
    dns_caches: HashMap<String, Arc<crate::dfp::DnsCache>>,
    /// The proxy's own addresses, which dynamic targets may never be.
    pub own_addrs: Arc<crate::policy::OwnAddrs>,
}

impl ClusterManager {
    pub fn new(configs: &[Cluster], store: &Arc<crate::stats::Store>) -> Self {
        let mut dns_caches: HashMap<String, Arc<crate::dfp::DnsCache>> = HashMap::new();
        let clusters = configs
            .iter()
            .map(|c| {
                let (upstream, tcp_upstream) = match c.upstream.clone() {
                    Some(
                        u @ ferry_config::UpstreamHttp {
                            protocol: ferry_config::UpstreamProtocol::Http3 { .. },
                            ..
                        },
                    ) => (
                        Some(crate::upstream::UpstreamPool::new(
                            &c.name,
                            u,
                            c.connect_timeout,
                            store,
                        )),
                        None,
                    ),
                    Some(u) => (
                        None,
                        Some(crate::upstream_tcp::TcpPool::new(
                            &c.name,
                            u,
                            c.connect_timeout,
                            store,
                        )),
                    ),
                    None => (None, None),
                };
                let dns_cache = c.dns_cache.as_ref().map(|d| {
                    dns_caches
                        .entry(d.name.clone())
                        .or_insert_with(|| Arc::new(crate::dfp::DnsCache::new(d.clone(), store)))
                        .clone()
                });
                let mut state = ClusterState::new(c.clone());
                if let Some(s) = Arc::get_mut(&mut state) {
                    s.upstream = upstream;
                    s.tcp_upstream = tcp_upstream;
                    s.dns_cache = dns_cache;
                }
                (c.name.clone(), state)
            })
            .collect();
        ClusterManager {
            clusters,
            dns_caches,
            own_addrs: Default::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ClusterState>> {
        self.clusters.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ClusterState>> {
        self.clusters.values()
    }

    /// Start the DNS refresh tasks; they stop when `shutdown` fires.
    pub fn start(&self, shutdown: &crate::shutdown::Shutdown) {
        for cache in self.dns_caches.values() {
            let cache = cache.clone();
            let mut stop = shutdown.subscribe();
            let every = cache.config.host_ttl.max(std::time::Duration::from_secs(1));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => cache.sweep(),
                        _ = stop.wait() => return,
                    }
                }
            });
        }
        for state in self.clusters.values() {
            if matches!(
                state.config.discovery,
                DiscoveryType::Static | DiscoveryType::DynamicForwardProxy
            ) {
                continue;
            }
            let state = state.clone();
            let mut stop = shutdown.subscribe();
            crate::supervise::spawn("dns refresh", async move {
                loop {
                    state.resolve_once().await;
                    tokio::select! {
                        _ = tokio::time::sleep(state.config.dns_refresh_rate) => {}
                        _ = stop.wait() => return,
                    }
                }
            });
        }
    }

    /// Waits until every cluster has finished its first resolution attempt.
    pub async fn initialized(&self) {
        for c in self.clusters.values() {
            c.initialized().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_config::Endpoint;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn family_filtering() {
        let both = addrs(&["127.0.0.1:1", "[::1]:1", "10.0.0.1:1"]);
        let v4 = addrs(&["127.0.0.1:1", "10.0.0.1:1"]);
        let v6 = addrs(&["[::1]:1"]);
        assert_eq!(
            filter_family(both.clone(), DnsLookupFamily::V4Only).unwrap(),
            v4
        );
        assert_eq!(
            filter_family(both.clone(), DnsLookupFamily::V6Only).unwrap(),
            v6
        );
        assert_eq!(
            filter_family(both.clone(), DnsLookupFamily::Auto).unwrap(),
            v6
        );
        assert_eq!(
            filter_family(v4.clone(), DnsLookupFamily::Auto).unwrap(),
            v4
        );
        assert_eq!(
            filter_family(both.clone(), DnsLookupFamily::V4Preferred).unwrap(),
            v4
        );
        assert_eq!(
            filter_family(v6.clone(), DnsLookupFamily::V4Preferred).unwrap(),
            v6
        );
        assert_eq!(
            filter_family(both.clone(), DnsLookupFamily::All).unwrap(),
            both
        );
        assert!(filter_family(v4, DnsLookupFamily::V6Only).is_err());
    }

    fn cluster(discovery: DiscoveryType, endpoints: &[(&str, u16)]) -> Cluster {
        Cluster {
            name: "c".into(),
            discovery,
            dns_lookup_family: DnsLookupFamily::V4Only,
            dns_refresh_rate: std::time::Duration::from_secs(5),
            connect_timeout: std::time::Duration::from_secs(5),
            upstream: None,
            dns_cache: None,
            endpoints: endpoints
                .iter()
                .map(|(a, p)| Endpoint {
                    address: a.to_string(),
                    port: *p,
                })
                .collect(),
        }
    }

    #[test]
    fn static_round_robin() {
        let c = ClusterState::new(cluster(
            DiscoveryType::Static,
            &[("127.0.0.1", 1), ("127.0.0.2", 2)],
        ));
        let picks: Vec<_> = (0..4).map(|_| c.pick().unwrap().port()).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
        let empty = ClusterState::new(cluster(DiscoveryType::Static, &[]));
        assert_eq!(empty.pick(), Err(PickError::NoHealthyHost));
    }

    #[test]
    fn dns_failure_is_reported_until_an_answer_arrives() {
        let c = ClusterState::new(cluster(DiscoveryType::StrictDns, &[("x", 1)]));
        c.hosts.store(Arc::new(Hosts {
            addrs: vec![],
            dns_error: Some("x: no address".into()),
        }));
        assert_eq!(c.pick(), Err(PickError::Dns("x: no address".into())));
    }

    /// IP literals in DNS clusters resolve without any lookup.
    #[tokio::test]
    async fn dns_cluster_with_ip_literal() {
        let c = ClusterState::new(cluster(DiscoveryType::LogicalDns, &[("127.0.0.1", 7)]));
        c.resolve_once().await;
        c.initialized().await;
        assert_eq!(c.pick().unwrap(), "127.0.0.1:7".parse().unwrap());
    }
}
