//! Routing a request the way Envoy does: pick the virtual host from the authority, then
//! the first matching route, then decide what the route allows for CONNECT-UDP.

use ferry_config::{HttpConnectionManager, Route, RouteMatch, VirtualHost};

/// What the router decided for a CONNECT-UDP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    /// `connect_config` present on the route: terminate and send UDP to the cluster.
    Terminate { cluster: &'a str },
    /// CONNECT-UDP allowed, no `connect_config`: forward the request to the cluster;
    /// `pass_through` when the route asks for the request to go on unchanged.
    Forward {
        cluster: &'a str,
        pass_through: bool,
    },
    /// A route matched, but CONNECT-UDP is not enabled on it (Envoy: 403).
    UpgradeNotEnabled,
    /// No virtual host or no route (Envoy: 404).
    NoRoute,
}

/// Envoy's virtual host selection: an exact domain first, then the longest `*.suffix`
/// (or `*suffix`) wildcard, then the longest `prefix*` wildcard, then `*`. The authority is
/// compared case-insensitively, port included: `foo.lyft.com:80` matches only a domain
/// written with that port (or a wildcard that covers it).
pub fn select_virtual_host<'a>(
    vhosts: &'a [VirtualHost],
    authority: &str,
) -> Option<&'a VirtualHost> {
    let host = authority.to_ascii_lowercase();
    let mut best_suffix: Option<(usize, &VirtualHost)> = None;
    let mut best_prefix: Option<(usize, &VirtualHost)> = None;
    let mut default = None;
    for vh in vhosts {
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            if d == "*" {
                default.get_or_insert(vh);
            } else if let Some(suffix) = d.strip_prefix('*') {
                // Envoy requires the wildcard to cover at least one character.
                if host.len() > suffix.len()
                    && host.ends_with(suffix)
                    && best_suffix.is_none_or(|(l, _)| suffix.len() > l)
                {
                    best_suffix = Some((suffix.len(), vh));
                }
            } else if let Some(prefix) = d.strip_suffix('*') {
                if host.len() > prefix.len()
                    && host.starts_with(prefix)
                    && best_prefix.is_none_or(|(l, _)| prefix.len() > l)
                {
                    best_prefix = Some((prefix.len(), vh));
                }
            } else if d == host {
                return Some(vh);
            }
        }
    }
    best_suffix
        .map(|(_, v)| v)
        .or(best_prefix.map(|(_, v)| v))
        .or(default)
}

/// The request facts route matching needs.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// CONNECT, or an upgrade / extended CONNECT.
    pub is_connect: bool,
    pub path: Option<&'a str>,
}

fn route_matches(route: &Route, input: RouteInput<'_>) -> bool {
    // Envoy matches the path without its query string.
    let path = input.path.map(|p| p.split('?').next().unwrap_or(p));
    match &route.matcher {
        RouteMatch::Connect => input.is_connect,
        RouteMatch::Prefix(p) => path.is_some_and(|path| path.starts_with(p.as_str())),
        RouteMatch::Path(p) => path.is_some_and(|path| path == p),
    }
}

/// The first route of the virtual host that matches.
pub fn select_route<'a>(vh: &'a VirtualHost, input: RouteInput<'_>) -> Option<&'a Route> {
    vh.routes.iter().find(|r| route_matches(r, input))
}

/// Route a CONNECT-UDP request whose Host has already been rewritten to `target:port`.
///
/// Envoy's rule: an upgrade is allowed when the route's `upgrade_configs` enables it, or,
/// when the route says nothing about it, when the HCM's `upgrade_configs` enables it.
/// Only a route-level entry can carry `connect_config` (terminate).
pub fn route_connect_udp<'a>(
    hcm: &'a HttpConnectionManager,
    authority: &str,
    path: Option<&str>,
) -> Decision<'a> {
    const UPGRADE: &str = "connect-udp";
    let Some(vh) = select_virtual_host(&hcm.route_config.virtual_hosts, authority) else {
        return Decision::NoRoute;
    };
    let input = RouteInput {
        is_connect: true,
        path,
    };
    let Some(route) = select_route(vh, input) else {
        return Decision::NoRoute;
    };
    let cluster = route.action.cluster.as_str();
    let pass_through = route.pass_through;
    match route
        .action
        .upgrade_configs
        .iter()
        .find(|u| u.upgrade_type == UPGRADE)
    {
        Some(u) if !u.enabled => Decision::UpgradeNotEnabled,
        Some(u) if u.connect_config.is_some() => Decision::Terminate { cluster },
        Some(_) => Decision::Forward {
            cluster,
            pass_through,
        },
        None => {
            if hcm
                .upgrade_configs
                .iter()
                .any(|u| u.upgrade_type == UPGRADE && u.enabled)
            {
                Decision::Forward {
                    cluster,
                    pass_through,
                }
            } else {
                Decision::UpgradeNotEnabled
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_config::{RouteAction, RouteConfiguration, RouteUpgradeConfig};

    fn vh(name: &str, domains: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![],
        }
    }

    #[test]
    fn vhost_precedence() {
        let vhs = vec![
            vh("default", &["*"]),
            vh("prefix", &["foo.*"]),
            vh("suffix", &["*.lyft.com:80"]),
            vh("longer_suffix", &["*.foo.lyft.com:80"]),
            vh("exact", &["foo.lyft.com:80"]),
        ];
        let pick = |a: &str| select_virtual_host(&vhs, a).map(|v| v.name.as_str());
        assert_eq!(pick("foo.lyft.com:80"), Some("exact"));
        assert_eq!(pick("FOO.lyft.com:80"), Some("exact"));
        assert_eq!(pick("bar.lyft.com:80"), Some("suffix"));
        assert_eq!(pick("a.foo.lyft.com:80"), Some("longer_suffix"));
        assert_eq!(pick("foo.example:443"), Some("prefix"));
        assert_eq!(pick("elsewhere:1"), Some("default"));
        let no_default = &vhs[2..];
        assert_eq!(
            select_virtual_host(no_default, "foo.lyft.com:81").map(|v| v.name.as_str()),
            None
        );
        // The wildcard must cover at least one character.
        assert_eq!(
            select_virtual_host(&vhs[2..3], ".lyft.com:80").map(|v| v.name.as_str()),
            None
        );
    }

    fn hcm(
        routes: Vec<Route>,
        hcm_upgrades: Vec<ferry_config::HcmUpgradeConfig>,
    ) -> HttpConnectionManager {
        HttpConnectionManager {
            codec_type: ferry_config::CodecType::Http3,
            stat_prefix: "t".into(),
            route_config: RouteConfiguration {
                name: "r".into(),
                virtual_hosts: vec![VirtualHost {
                    name: "v".into(),
                    domains: vec!["foo.lyft.com:80".into()],
                    routes,
                }],
            },
            upgrade_configs: hcm_upgrades,
            allow_extended_connect: true,
            allow_connect: false,
            stream_idle_timeout: None,
            http2_max_concurrent_streams: 100,
            h3_max_concurrent_streams: None,
            max_stream_duration: None,
            http_filters: vec!["envoy.filters.http.router".into()],
            access_log: vec![],
            dynamic_forward_proxy: None,
            destination_policy: Default::default(),
            basic_auth: None,
        }
    }

    fn route(matcher: RouteMatch, upgrades: Vec<RouteUpgradeConfig>) -> Route {
        Route {
            name: None,
            pass_through: false,
            matcher,
            action: RouteAction {
                cluster: "c".into(),
                upgrade_configs: upgrades,
            },
        }
    }

    fn up(enabled: bool, terminate: bool) -> RouteUpgradeConfig {
        RouteUpgradeConfig {
            upgrade_type: "connect-udp".into(),
            enabled,
            connect_config: terminate.then(Default::default),
        }
    }

    #[test]
    fn decisions() {
        let p = Some("/.well-known/masque/udp/foo.lyft.com/80/");
        let h = hcm(
            vec![route(RouteMatch::Connect, vec![up(true, true)])],
            vec![],
        );
        assert_eq!(
            route_connect_udp(&h, "foo.lyft.com:80", p),
            Decision::Terminate { cluster: "c" }
        );
        assert_eq!(
            route_connect_udp(&h, "bar.lyft.com:80", p),
            Decision::NoRoute
        );
        assert_eq!(
            route_connect_udp(&h, "foo.lyft.com:81", p),
            Decision::NoRoute
        );

        let h = hcm(
            vec![route(RouteMatch::Connect, vec![up(true, false)])],
            vec![],
        );
        assert_eq!(
            route_connect_udp(&h, "foo.lyft.com:80", p),
            Decision::Forward {
                cluster: "c",
                pass_through: false
            }
        );
        let h = hcm(
            vec![route(RouteMatch::Connect, vec![up(false, true)])],
            vec![],
        );
        assert_eq!(
            route_connect_udp(&h, "foo.lyft.com:80", p),
            Decision::UpgradeNotEnabled
        );
        let h = hcm(vec![route(RouteMatch::Connect, vec![])], vec![]);
        assert_eq!(
            route_connect_udp(&h, "foo.lyft.com:80", p),
            Decision::UpgradeNotEnabled
        );
        let h = hcm(
            vec![route(RouteMatch::Prefix("/.well-known/".into()), vec![])],
            vec![ferry_config::HcmUpgradeConfig {
                upgrade_type: "connect-udp".into(),
                enabled: true,
            }],
        );
        assert_eq!(
            route_connect_udp(&h, "foo.lyft.com:80", p),
            Decision::Forward {
                cluster: "c",
                pass_through: false
            }
        );
        let h = hcm(
            vec![route(
                RouteMatch::Path("/other".into()),
                vec![up(true, true)],
            )],
            vec![],
        );
        assert_eq!(
            route_connect_udp(&h, "foo.lyft.com:80", p),
            Decision::NoRoute
        );
    }
}
