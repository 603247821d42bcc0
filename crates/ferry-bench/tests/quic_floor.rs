//! The QUIC floor (`ferry-bench quic-echo`) as the benchmarks use it: a real `ferry-bench
//! load` over HTTP/3 against it gets every datagram back, through tunnels it accepted. The
//! binaries run as child processes on loopback, port 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-bench");

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/certs")
}

/// A child killed when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `ferry-bench ARGS` that prints its bound address first; return it and the child.
fn serve(args: &[&str]) -> (String, Killed) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (line.trim().to_string(), Killed(child))
}

/// `ferry-bench quic-echo` with the test certificate, and `extra` arguments.
fn quic_echo(extra: &[&str]) -> (String, Killed) {
    let c = certs();
    let (cert, key) = (c.join("cert.pem"), c.join("key.pem"));
    let mut args = vec![
        "quic-echo",
        "--max-secs",
        "60",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    serve(&args)
}

/// `load` arguments for 3 tunnels through `proxy` to `target`, and `extra`.
fn through(proxy: &str, target: &str, extra: &[&str]) -> Vec<String> {
    let ca = certs().join("cert.pem");
    let mut args: Vec<String> = ["--proxy", proxy, "--ca", ca.to_str().unwrap()]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(["--target", target, "--tunnels", "3"].map(String::from));
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn load(args: &[String]) -> serde_json::Value {
    let out = load_output(args);
    assert!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn load_output(args: &[String]) -> std::process::Output {
    Command::new(BIN)
        .arg("load")
        .args(args)
        .args([
            "--rate",
            "500",
            "--duration",
            "1",
            "--size",
            "1200",
            "--json",
            "-q",
        ])
        .output()
        .unwrap()
}

#[test]
fn load_through_the_quic_floor_gets_every_datagram_back() {
    let (addr, _floor) = quic_echo(&[]);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    // The target is never contacted: the floor echoes the datagrams itself.
    let j = load(&through(&addr, "127.0.0.1:9", &[]));
    let r = &j["result"];
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent >= 400, "{r}");
    assert_eq!(r["received"].as_u64(), Some(sent), "{r}");
    assert_eq!(r["misrouted"].as_u64(), Some(0), "{r}");
    assert_eq!(r["malformed"].as_u64(), Some(0), "{r}");
}

/// The minimal relay (`quic-echo --relay`): every datagram goes to the real UDP target over
/// the tunnel's own socket and comes back from it; with `--target-pid` the load reports the
/// target's CPU. Pointed at a port where nothing answers, nothing comes back: the datagrams
/// really cross the UDP leg, they are not echoed by the server itself.
#[test]
fn load_through_the_minimal_relay_crosses_the_udp_leg() {
    let (echo, echo_child) = serve(&["echo", "--max-secs", "60"]);
    let echo_pid = echo_child.0.id().to_string();
    let (addr, _relay) = quic_echo(&["--relay", &echo]);
    let j = load(&through(&addr, &echo, &["--target-pid", &echo_pid]));
    let r = &j["result"];
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent >= 400, "{r}");
    assert_eq!(r["received"].as_u64(), Some(sent), "{r}");
    assert_eq!(r["misrouted"].as_u64(), Some(0), "{r}");
    assert!(r["target"]["cpu_s"].as_f64().is_some(), "{r}");

    // A UDP port with no socket behind it: the relay's sends go nowhere, so the load's
    // set-up probes never come back and it gives up.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let (addr, _relay) = quic_echo(&["--relay", &dead_addr]);
    let out = load_output(&through(&addr, &dead_addr, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("never echoed"), "{err}");
}
