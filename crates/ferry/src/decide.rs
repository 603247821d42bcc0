//! What to do with a request, whatever HTTP version carried it: the one place that turns
//! a request head and the route table into a plan or a refusal (status + Proxy-Status).

use ferry_config::HttpConnectionManager;
use ferry_proto::request::{self, Rejection, RequestHead};
use ferry_proto::template::Target;

use crate::router::{self, Decision, RouteInput};

/// What Ferry will do with an accepted CONNECT-UDP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Terminate: open a UDP socket to a host of `cluster`.
    Terminate { cluster: String, target: Target },
}

pub fn reject(status: u16, error: Option<&'static str>, details: impl Into<String>) -> Rejection {
    Rejection {
        status,
        error,
        details: details.into(),
    }
}

/// Decide a request. Envoy's order: the CONNECT-UDP path check (404), then the virtual host
/// matched against the rewritten authority and the route (404), then whether the route
/// allows CONNECT-UDP (403).
pub fn decide(hcm: &HttpConnectionManager, head: &RequestHead<'_>) -> Result<Plan, Rejection> {
    if !request::is_connect_udp(head) {
        return Err(decide_other(hcm, head));
    }
    let target = request::validate_connect_udp(head)?;
    // Envoy rewrites the Host to `target_host:target_port` and matches virtual hosts
    // against that.
    let authority = target.authority();
    match router::route_connect_udp(hcm, &authority, head.path) {
        Decision::Terminate { cluster } => Ok(Plan::Terminate {
            cluster: cluster.to_owned(),
            target,
        }),
        Decision::Forward { .. } => Err(reject(
            501,
            Some("proxy_configuration_error"),
            "forwarding CONNECT-UDP to an upstream proxy is not implemented yet (route has no connect_config)",
        )),
        Decision::UpgradeNotEnabled => Err(reject(
            403,
            Some("http_request_denied"),
            "CONNECT-UDP is not enabled on the matched route",
        )),
        Decision::NoRoute => Err(reject(
            404,
            Some("destination_not_found"),
            format!("no route for {authority}"),
        )),
    }
}

/// A request that is not CONNECT-UDP. Ferry proxies CONNECT-UDP only: a request that
/// matches no route gets Envoy's 404; one that matches a route gets 403 when it is another
/// CONNECT or upgrade (not enabled on the route), else 501.
fn decide_other(hcm: &HttpConnectionManager, head: &RequestHead<'_>) -> Rejection {
    let authority = head.authority.unwrap_or("");
    let is_connect = head.method.eq_ignore_ascii_case("CONNECT") || head.protocol.is_some();
    let route =
        router::select_virtual_host(&hcm.route_config.virtual_hosts, authority).and_then(|vh| {
            router::select_route(
                vh,
                RouteInput {
                    is_connect,
                    path: head.path,
                },
            )
        });
    match route {
        None => reject(404, Some("destination_not_found"), "no route"),
        Some(_) if is_connect => reject(
            403,
            Some("http_request_denied"),
            "this upgrade is not enabled on the matched route",
        ),
        Some(_) => reject(
            501,
            Some("http_request_denied"),
            "Ferry proxies CONNECT-UDP requests only",
        ),
    }
}
