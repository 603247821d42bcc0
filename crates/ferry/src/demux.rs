//! One reader of QUIC DATAGRAM frames per connection, routing each to its tunnel by
//! quarter stream id.
//!
//! The routing table is owned by the reader task: tunnels register and unregister through
//! a channel, so the per-datagram path takes no lock and makes no allocation.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::datagram;
use tokio::sync::mpsc;

use crate::stats::{ConnectUdpStats, DropReason};

/// Where the datagrams of one tunnel go.
pub trait DatagramSink: Send + Sync {
    /// Deliver one HTTP Datagram payload (context id and what follows; the quarter stream
    /// id already removed). The sink counts what it delivers; `Err` names why the datagram
    /// was dropped, and the demux counts that.
    fn deliver(&self, http_datagram_payload: Bytes) -> Result<(), DropReason>;

    /// The demux dropped a datagram `deliver` refused (for the sink's own totals, such as
    /// a tunnel's access log line). Nothing by default.
    fn dropped(&self, _reason: DropReason) {}
}

pub enum Registration {
    Add {
        stream_id: u64,
        sink: Arc<dyn DatagramSink>,
    },
    Remove {
        stream_id: u64,
    },
}

/// The sending side tunnels use to (un)register.
#[derive(Clone)]
pub struct Registry(mpsc::UnboundedSender<Registration>);

impl Registry {
    pub fn add(&self, stream_id: u64, sink: Arc<dyn DatagramSink>) {
        // The reader is gone only when the connection is gone; nothing to deliver then.
        let _ = self.0.send(Registration::Add { stream_id, sink });
    }

    pub fn remove(&self, stream_id: u64) {
        let _ = self.0.send(Registration::Remove { stream_id });
    }
}

/// Unregisters a tunnel when dropped, whatever way its task ends.
pub struct RegistrationGuard {
    registry: Registry,
    stream_id: u64,
}

impl RegistrationGuard {
    pub fn new(registry: &Registry, stream_id: u64, sink: Arc<dyn DatagramSink>) -> Self {
        registry.add(stream_id, sink);
        RegistrationGuard {
            registry: registry.clone(),
            stream_id,
        }
    }
}

impl Drop for RegistrationGuard {
    fn drop(&mut self) {
        self.registry.remove(self.stream_id);
    }
}

/// Start the reader for `conn`. It ends when the connection closes.
pub fn spawn(conn: quinn::Connection, stats: ConnectUdpStats) -> Registry {
    let (tx, rx) = mpsc::unbounded_channel();
    crate::supervise::spawn("datagram reader", run(conn, rx, stats));
    Registry(tx)
}

async fn run(
    conn: quinn::Connection,
    mut registrations: mpsc::UnboundedReceiver<Registration>,
    stats: ConnectUdpStats,
) {
    // Keyed by quarter stream id, as it arrives on the wire.
    let mut tunnels: HashMap<u64, Arc<dyn DatagramSink>> = HashMap::new();
    loop {
        tokio::select! {
            // Registrations first, so a tunnel registered before its 200 was sent never
            // loses a datagram that raced the registration.
            biased;
            reg = registrations.recv() => match reg {
                Some(Registration::Add { stream_id, sink }) => {
                    tunnels.insert(stream_id / 4, sink);
                }
                Some(Registration::Remove { stream_id }) => {
                    tunnels.remove(&(stream_id / 4));
                }
                None => return,
            },
            dg = conn.read_datagram() => match dg {
                Ok(dg) => route(&tunnels, dg, &stats),
                Err(_) => return,
            },
        }
    }
}

#[inline]
fn route(tunnels: &HashMap<u64, Arc<dyn DatagramSink>>, dg: Bytes, stats: &ConnectUdpStats) {
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# HTTP/3 Datagram {
    //#   Quarter Stream ID (i),
    //#   HTTP Datagram Payload (..),
    //# }
    let (qsid, header_len) = match datagram::decode_h3(&dg) {
        Ok((qsid, payload)) => (qsid, dg.len() - payload.len()),
        Err(_) => return stats.drop(DropReason::Malformed),
    };
    let Some(sink) = tunnels.get(&qsid) else {
        return stats.drop(DropReason::NoSuchStream);
    };
    if let Err(reason) = sink.deliver(dg.slice(header_len..)) {
        stats.drop(reason);
        sink.dropped(reason);
    }
}
