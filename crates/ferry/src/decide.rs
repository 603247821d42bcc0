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
    /// Forward the request to a next-hop proxy of `cluster`. `authority` is the `:authority`
    /// to send: the rewritten `target_host:target_port` (Envoy's behaviour), or None to
    /// send the request's own (pass-through).
    Forward {
        cluster: String,
        authority: Option<String>,
    },
}

pub fn reject(status: u16, error: Option<&'static str>, details: impl Into<String>) -> Rejection {
    Rejection {
        status,
        error,
        details: details.into(),
        rcode: None,
        challenge: None,
    }
}

/// Whether Envoy would make this refusal only after its HTTP filters ran (so that an
/// authentication filter answers first): no route (its router filter's 404) and requests
/// other than CONNECT-UDP on a matched route (which Envoy would proxy; Ferry's 501). The
/// refusals before the filters are the malformed request (400), the CONNECT-UDP path check
/// (404 `http_request_error`) and an upgrade the route does not enable (403).
pub fn refused_after_filters(r: &Rejection) -> bool {
    matches!(
        (r.status, r.error),
        (404, Some("destination_not_found")) | (501, _)
    )
}

/// Decide a request. Envoy's order: the CONNECT-UDP path check (404), then the virtual host
/// matched against the rewritten authority and the route (404), then whether the route
/// allows CONNECT-UDP (403).
pub fn decide(hcm: &HttpConnectionManager, head: &RequestHead<'_>) -> Result<Plan, Rejection> {
    if !request::is_connect_udp(head) {
        return Err(decide_other(hcm, head));
    }
    let target = match request::validate_connect_udp(head) {
        Ok(t) => t,
        // Not the default template: a pass-through route may still forward it unchanged.
        Err(rejection) => return pass_through(hcm, head).ok_or(rejection),
    };
    // Envoy rewrites the Host to `target_host:target_port` and matches virtual hosts
    // against that.
    let authority = target.authority();
    match router::route_connect_udp(hcm, &authority, head.path) {
        Decision::Terminate { cluster } => Ok(Plan::Terminate {
            cluster: cluster.to_owned(),
            target,
        }),
        Decision::Forward {
            cluster,
            pass_through,
        } => Ok(Plan::Forward {
            cluster: cluster.to_owned(),
            authority: (!pass_through).then_some(authority),
        }),
        Decision::UpgradeNotEnabled => Err(reject(
            403,
            Some("http_request_denied"),
            "CONNECT-UDP is not enabled on the matched route",
        )),
        Decision::NoRoute => {
            // A pass-through route is matched on the request's own authority.
            pass_through(hcm, head).ok_or_else(|| {
                reject(
                    404,
                    Some("destination_not_found"),
                    format!("no route for {authority}"),
                )
            })
        }
    }
}

/// Ferry's pass-through (a route with `metadata.filter_metadata["ferry.connect_udp"]
/// .pass_through: true`): a well-formed extended CONNECT-UDP request whose path Ferry need
/// not understand is routed on its own `:authority` and path and forwarded unchanged, so
/// next hops with their own URI templates work (Envoy cannot do this: issue #42221).
fn pass_through(hcm: &HttpConnectionManager, head: &RequestHead<'_>) -> Option<Plan> {
    let authority = head.authority?;
    let path = head.path.filter(|p| p.starts_with('/'))?;
    match router::route_connect_udp(hcm, authority, Some(path)) {
        Decision::Forward {
            cluster,
            pass_through: true,
        } => Some(Plan::Forward {
            cluster: cluster.to_owned(),
            authority: None,
        }),
        _ => None,
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
