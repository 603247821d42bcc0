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

fn load(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
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
        .unwrap();
    assert!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn load_through_the_quic_floor_gets_every_datagram_back() {
    let c = certs();
    let (cert, key) = (c.join("cert.pem"), c.join("key.pem"));
    let (addr, _floor) = serve(&[
        "quic-echo",
        "--max-secs",
        "60",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    // The target is never contacted: the floor echoes the datagrams itself.
    let j = load(&[
        "--proxy",
        &addr,
        "--ca",
        cert.to_str().unwrap(),
        "--target",
        "127.0.0.1:9",
        "--tunnels",
        "3",
    ]);
    let r = &j["result"];
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent >= 400, "{r}");
    assert_eq!(r["received"].as_u64(), Some(sent), "{r}");
    assert_eq!(r["misrouted"].as_u64(), Some(0), "{r}");
    assert_eq!(r["malformed"].as_u64(), Some(0), "{r}");
}
