//! The admin endpoint (Envoy's `admin.address`): a small HTTP/1.1 server with Envoy's
//! paths and output formats.
//!
//! `GET`: `/ready`, `/server_info`, `/listeners` (`?format=json`), `/clusters`
//! (`?format=json`), `/stats` (`filter`, `invert_filter`, `usedonly`, `type`,
//! `format=json`), `/stats/prometheus` (same filters), `/config_dump`, `/help`.
//! `POST`: `/healthcheck/fail`, `/healthcheck/ok`, `/drain_listeners`, `/quitquitquit`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::server::ServerState;
use crate::stats_render::{self, query_pairs, StatsQuery};

pub struct AdminServer {
    listener: tokio::net::TcpListener,
    pub local_addr: SocketAddr,
}

impl AdminServer {
    pub fn bind(addr: SocketAddr) -> Result<Self, String> {
        let std = std::net::TcpListener::bind(addr)
            .map_err(|e| format!("admin.address: cannot bind {addr}: {e}"))?;
        std.set_nonblocking(true)
            .map_err(|e| format!("admin.address: {e}"))?;
        let listener =
            tokio::net::TcpListener::from_std(std).map_err(|e| format!("admin.address: {e}"))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| format!("admin.address: {e}"))?;
        Ok(AdminServer {
            listener,
            local_addr,
        })
    }

    pub async fn serve(self, state: Arc<ServerState>) {
        let mut stop = state.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = stop.wait() => return,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let state = state.clone();
            crate::supervise::spawn("admin connection", async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache, max-age=0"),
    );
    h.insert(
        "x-content-type-options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Resp {
    with_type(status, body, "text/plain; charset=UTF-8")
}

fn json(value: &serde_json::Value) -> Resp {
    let body = serde_json::to_string_pretty(value).unwrap_or_default();
    with_type(StatusCode::OK, body, "application/json")
}

/// Every admin path: (path, POST only, help text).
const ENDPOINTS: &[(&str, bool, &str)] = &[
    ("/", false, "Admin home page"),
    ("/clusters", false, "upstream cluster status"),
    (
        "/config_dump",
        false,
        "dump current Ferry configs (the effective bootstrap, in Envoy's shape)",
    ),
    (
        "/drain_listeners",
        true,
        "drain listeners: refuse new connections, GOAWAY on open ones; open tunnels continue",
    ),
    (
        "/healthcheck/fail",
        true,
        "cause the server to fail health checks",
    ),
    (
        "/healthcheck/ok",
        true,
        "cause the server to pass health checks",
    ),
    ("/help", false, "print out list of admin commands"),
    ("/listeners", false, "print listener info"),
    ("/quitquitquit", true, "exit the server"),
    (
        "/ready",
        false,
        "print server state, return 200 if LIVE, otherwise return 503",
    ),
    (
        "/server_info",
        false,
        "print server version/status information",
    ),
    ("/stats", false, "print server stats"),
    (
        "/stats/prometheus",
        false,
        "print server stats in prometheus format",
    ),
];

fn help() -> String {
    let mut out = String::from("admin commands are:\n");
    for (path, post, what) in ENDPOINTS {
        let post = if *post { " (POST)" } else { "" };
        let _ = writeln!(out, "  {path}{post}: {what}");
    }
    out
}

fn handle(state: &ServerState, req: Request<hyper::body::Incoming>) -> Resp {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let pairs = query_pairs(query);
    let want_json = pairs.iter().any(|(k, v)| k == "format" && v == "json");
    let Some((_, post_only, _)) = ENDPOINTS.iter().find(|(p, _, _)| *p == path) else {
        return text(StatusCode::NOT_FOUND, format!("invalid path. {}", help()));
    };
    if *post_only && req.method() != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {} not allowed, POST required.", req.method()),
        );
    }
    match path {
        "/" | "/help" => text(StatusCode::OK, help()),
        "/ready" => {
            let s = state.state_name();
            let code = if s == "LIVE" {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(code, format!("{s}\n"))
        }
        "/listeners" => listeners(state, want_json),
        "/stats" => match StatsQuery::parse(query) {
            Ok(q) => {
                state.refresh_gauges();
                let selected = q.select(state.stats.entries());
                if q.json {
                    json(&stats_render::json(&selected))
                } else {
                    text(StatusCode::OK, stats_render::text(&selected))
                }
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        "/stats/prometheus" => match StatsQuery::parse(query) {
            Ok(q) => {
                state.refresh_gauges();
                let selected = q.select(state.stats.entries());
                with_type(
                    StatusCode::OK,
                    stats_render::prometheus(&selected),
                    "text/plain; version=0.0.4; charset=UTF-8",
                )
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        "/clusters" => clusters(state, want_json),
        "/server_info" => json(&server_info(state)),
        "/config_dump" => json(&crate::config_dump::config_dump(
            &state.bootstrap.load(),
            state.started,
        )),
        "/healthcheck/fail" => {
            state.health_check_failed.store(true, Ordering::Relaxed);
            text(StatusCode::OK, "OK\n".into())
        }
        "/healthcheck/ok" => {
            state.health_check_failed.store(false, Ordering::Relaxed);
            text(StatusCode::OK, "OK\n".into())
        }
        "/drain_listeners" => {
            // Ferry always drains gracefully and never exits here; Envoy's `graceful`,
            // `inboundonly` (every Ferry listener is inbound) and `skip_exit` are accepted.
            for (k, _) in &pairs {
                if !matches!(k.as_str(), "graceful" | "inboundonly" | "skip_exit") {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("unknown query parameter `{k}`\n"),
                    );
                }
            }
            state.start_drain("/drain_listeners");
            text(StatusCode::OK, "OK\n".into())
        }
        "/quitquitquit" => {
            state.shutdown.trigger();
            text(StatusCode::OK, "OK\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, format!("invalid path. {}", help())),
    }
}

fn listeners(state: &ServerState, want_json: bool) -> Resp {
    if want_json {
        let statuses: Vec<_> = state
            .listeners
            .iter()
            .map(|l| {
                let protocol = match l.protocol {
                    ferry_config::SocketProtocol::Udp => "UDP",
                    ferry_config::SocketProtocol::Tcp => "TCP",
                };
                serde_json::json!({
                    "name": l.name,
                    "local_address": {"socket_address": {
                        "address": l.local_addr.ip().to_string(),
                        "port_value": l.local_addr.port(),
                        "protocol": protocol,
                    }}
                })
            })
            .collect();
        json(&serde_json::json!({ "listener_statuses": statuses }))
    } else {
        let mut out = String::new();
        for l in &state.listeners {
            let _ = writeln!(out, "{}::{}", l.name, l.local_addr);
        }
        text(StatusCode::OK, out)
    }
}

/// `/clusters`: Envoy's `cluster::host::field::value` lines, or `?format=json`.
fn clusters(state: &ServerState, want_json: bool) -> Resp {
    let clusters = state.clusters.load();
    let mut all: Vec<_> = clusters.iter().collect();
    all.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    if want_json {
        let statuses: Vec<_> = all
            .iter()
            .map(|c| {
                let hosts: Vec<_> = c
                    .hosts()
                    .addrs
                    .iter()
                    .map(|h| {
                        serde_json::json!({
                            "address": {"socket_address": {
                                "address": h.ip().to_string(),
                                "port_value": h.port(),
                            }},
                            "health_status": {"eds_health_status": "HEALTHY"},
                            "weight": 1,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": c.config.name,
                    "observability_name": c.config.name,
                    "host_statuses": hosts,
                })
            })
            .collect();
        return json(&serde_json::json!({ "cluster_statuses": statuses }));
    }
    let mut out = String::new();
    for c in all {
        let name = &c.config.name;
        let _ = writeln!(out, "{name}::observability_name::{name}");
        let _ = writeln!(out, "{name}::added_via_api::false");
        for h in &c.hosts().addrs {
            let _ = writeln!(out, "{name}::{h}::health_flags::healthy");
            let _ = writeln!(out, "{name}::{h}::weight::1");
        }
    }
    text(StatusCode::OK, out)
}

fn server_info(state: &ServerState) -> serde_json::Value {
    let uptime = state.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    let o = &state.options;
    serde_json::json!({
        "version": format!("ferry/{}", crate::version()),
        "state": state.state_name(),
        "uptime_current_epoch": format!("{uptime}s"),
        "uptime_all_epochs": format!("{uptime}s"),
        "hot_restart_version": "disabled",
        "command_line_options": {
            "concurrency": o.concurrency,
            "config_path": o.config_path.clone().unwrap_or_default(),
            "admin_address_path": o.admin_address_path.clone().unwrap_or_default(),
            "log_level": o.log_level,
            "drain_time": format!("{}s", o.drain_time.as_secs()),
            "mode": "Serve",
            "disable_hot_restart": true,
        },
    })
}
