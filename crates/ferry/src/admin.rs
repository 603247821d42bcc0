//! The admin endpoint (Envoy's `admin.address`): a small HTTP/1.1 server.
//!
//! Implemented so far: `/ready`, `/listeners` (`?format=json`), `/stats`, `/clusters`,
//! `/server_info`, `/quitquitquit`. The rest of Envoy's admin comes with the admin issue.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::server::ServerState;
use crate::stats::Value;

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
            tokio::spawn(async move {
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

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    r
}

fn json(value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn handle(state: &ServerState, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let want_json = query.split('&').any(|kv| kv == "format=json");
    match path {
        "/ready" => {
            if state.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "LIVE\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n".into())
            }
        }
        "/listeners" => {
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
                json(serde_json::json!({ "listener_statuses": statuses }))
            } else {
                let mut out = String::new();
                for l in &state.listeners {
                    let _ = writeln!(out, "{}::{}", l.name, l.local_addr);
                }
                text(StatusCode::OK, out)
            }
        }
        "/stats" => {
            let mut out = String::new();
            for (name, value) in state.stats.snapshot() {
                let v = match value {
                    Value::Counter(c) => c.to_string(),
                    Value::Gauge(g) => g.to_string(),
                };
                let _ = writeln!(out, "{name}: {v}");
            }
            text(StatusCode::OK, out)
        }
        "/clusters" => {
            let mut out = String::new();
            let clusters = state.clusters.load();
            let mut all: Vec<_> = clusters.iter().collect();
            all.sort_by(|a, b| a.config.name.cmp(&b.config.name));
            for c in all {
                for h in &c.hosts().addrs {
                    let _ = writeln!(out, "{}::{}::health_flags::healthy", c.config.name, h);
                }
            }
            text(StatusCode::OK, out)
        }
        "/server_info" => {
            let uptime = state.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
            let st = if state.ready.load(Ordering::Relaxed) {
                "LIVE"
            } else {
                "PRE_INITIALIZING"
            };
            json(serde_json::json!({
                "version": crate::version(),
                "state": st,
                "uptime_current_epoch": format!("{uptime}s"),
            }))
        }
        "/quitquitquit" => {
            if req.method() != hyper::Method::POST {
                return text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "This endpoint requires POST\n".into(),
                );
            }
            state.shutdown.trigger();
            text(StatusCode::OK, "OK\n".into())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no admin handler for {path}\n"),
        ),
    }
}
