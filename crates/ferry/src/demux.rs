//! One reader of QUIC DATAGRAM frames per connection, routing each to its tunnel by
//! quarter stream id.
//!
//! The routing table is owned by the reader task: tunnels register and unregister through
//! a channel, so the per-datagram path takes no lock and makes no allocation.
//!
//! After one datagram arrives, the reader takes those already received behind it (up to
//! [`BATCH`], without waiting) and hands each tunnel its consecutive datagrams together, so
//! a tunnel can send them to its target with one system call (UDP GSO, see
//! `TunnelShared::deliver_batch`).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::datagram;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use crate::stats::{ConnectUdpStats, DropReason};

/// One HTTP/3 datagram as it arrived in a QUIC DATAGRAM frame: the quarter stream id
/// (`header_len` bytes) and the HTTP Datagram payload after it, in one buffer.
#[derive(Debug, Clone)]
pub struct H3Datagram {
    pub bytes: Bytes,
    pub header_len: usize,
}

impl H3Datagram {
    /// The HTTP Datagram payload (context id and what follows), uncopied.
    pub fn payload(&self) -> Bytes {
        self.bytes.slice(self.header_len..)
    }
}

/// Where the datagrams of one tunnel go.
pub trait DatagramSink: Send + Sync {
    /// Deliver one HTTP Datagram payload (context id and what follows; the quarter stream
    /// id already removed). The sink counts what it delivers; `Err` names why the datagram
    /// was dropped, and the demux counts that.
    fn deliver(&self, http_datagram_payload: Bytes) -> Result<(), DropReason>;

    /// Deliver one datagram as received, quarter stream id still in front: what the demux
    /// calls. A sink that sends it on as an HTTP/3 datagram can re-tag it in place (see
    /// `forward::retag`); the others take the payload, as `deliver`.
    fn deliver_h3(&self, datagram: H3Datagram) -> Result<(), DropReason> {
        self.deliver(datagram.payload())
    }

    /// Deliver several datagrams of this sink's stream, in order (what the demux calls when
    /// it has more than one in a row for the sink), draining `batch`. Drops are counted
    /// here: in `stats` (the demux's) and through `dropped`. `scratch` is the demux's
    /// reusable buffer. By default, one by one through `deliver_h3`.
    fn deliver_batch(
        &self,
        batch: &mut Vec<H3Datagram>,
        _scratch: &mut Vec<u8>,
        stats: &ConnectUdpStats,
    ) {
        for datagram in batch.drain(..) {
            if let Err(reason) = self.deliver_h3(datagram) {
                stats.drop(reason);
                self.dropped(reason);
            }
        }
    }

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

/// Datagrams that arrive for a stream before its tunnel is ready to take them: a next hop
/// may send one right after its 2xx, and QUIC does not order it after the HEADERS frame.
/// Registered when the request is sent; bounded (overflow counted as `buffer_full` by the
/// demux); handed over to the tunnel's real sink, in order, once the tunnel is up.
pub struct EarlyDatagrams {
    guard: RegistrationGuard,
    rx: mpsc::Receiver<Bytes>,
}

/// How many datagrams may wait for a tunnel that is being set up.
pub const EARLY_DATAGRAMS: usize = 32;

struct EarlySink(mpsc::Sender<Bytes>);

impl DatagramSink for EarlySink {
    fn deliver(&self, payload: Bytes) -> Result<(), DropReason> {
        self.0.try_send(payload).map_err(|_| DropReason::BufferFull)
    }
}

impl EarlyDatagrams {
    pub fn register(registry: &Registry, stream_id: u64) -> Self {
        let (tx, rx) = mpsc::channel(EARLY_DATAGRAMS);
        let guard = RegistrationGuard::new(registry, stream_id, Arc::new(EarlySink(tx)));
        EarlyDatagrams { guard, rx }
    }

    /// Route the stream's datagrams to `sink` from now on, after delivering those that
    /// waited. The early queue's only sender lives in the demux's table, so the queue ends
    /// exactly when the demux has switched to `sink`: nothing is lost in between.
    pub async fn hand_over(
        mut self,
        sink: Arc<dyn DatagramSink>,
        stats: &ConnectUdpStats,
    ) -> RegistrationGuard {
        self.guard.registry.add(self.guard.stream_id, sink.clone());
        while let Some(payload) = self.rx.recv().await {
            if let Err(reason) = sink.deliver(payload) {
                stats.drop(reason);
                sink.dropped(reason);
            }
        }
        self.guard
    }
}

/// Start the reader for `conn`. It ends when the connection closes.
pub fn spawn(conn: quinn::Connection, stats: ConnectUdpStats) -> Registry {
    let (tx, rx) = mpsc::unbounded_channel();
    crate::supervise::spawn("datagram reader", run(conn, rx, stats));
    Registry(tx)
}

/// The most datagrams the reader takes from its connection before routing them.
pub const BATCH: usize = 32;

async fn run(
    conn: quinn::Connection,
    mut registrations: mpsc::UnboundedReceiver<Registration>,
    stats: ConnectUdpStats,
) {
    let mut router = Router::default();
    loop {
        tokio::select! {
            // Registrations first, so a tunnel registered before its 200 was sent never
            // loses a datagram that raced the registration.
            biased;
            reg = registrations.recv() => match reg {
                Some(Registration::Add { stream_id, sink }) => {
                    router.tunnels.insert(stream_id / 4, sink);
                }
                Some(Registration::Remove { stream_id }) => {
                    router.tunnels.remove(&(stream_id / 4));
                }
                None => return,
            },
            dg = conn.read_datagram() => match dg {
                Ok(dg) => {
                    router.push(dg, &stats);
                    // Those already received, without waiting; a pending registration
                    // stops the batch (it goes first, as above).
                    let mut closed = false;
                    for _ in 1..BATCH {
                        if !registrations.is_empty() {
                            break;
                        }
                        match conn.read_datagram().now_or_never() {
                            Some(Ok(dg)) => router.push(dg, &stats),
                            Some(Err(_)) => {
                                closed = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    router.flush(&stats);
                    if closed {
                        return;
                    }
                }
                Err(_) => return,
            },
        }
    }
}

/// The routing table and the run of datagrams being gathered for one sink.
#[derive(Default)]
struct Router {
    /// Keyed by quarter stream id, as it arrives on the wire.
    tunnels: HashMap<u64, Arc<dyn DatagramSink>>,
    /// Consecutive datagrams for `run_sink`, not delivered yet.
    run: Vec<H3Datagram>,
    run_sink: Option<(u64, Arc<dyn DatagramSink>)>,
    /// Lent to sinks for batched sends.
    scratch: Vec<u8>,
}

impl Router {
    /// Route one datagram: add it to the current run, or deliver the run and start another.
    fn push(&mut self, dg: Bytes, stats: &ConnectUdpStats) {
        //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
        //# HTTP/3 Datagram {
        //#   Quarter Stream ID (i),
        //#   HTTP Datagram Payload (..),
        //# }
        let (qsid, header_len) = match datagram::decode_h3(&dg) {
            Ok((qsid, payload)) => (qsid, dg.len() - payload.len()),
            Err(_) => return stats.drop(DropReason::Malformed),
        };
        let datagram = H3Datagram {
            bytes: dg,
            header_len,
        };
        if matches!(&self.run_sink, Some((q, _)) if *q == qsid) {
            self.run.push(datagram);
            return;
        }
        self.flush(stats);
        let Some(sink) = self.tunnels.get(&qsid) else {
            return stats.drop(DropReason::NoSuchStream);
        };
        self.run_sink = Some((qsid, sink.clone()));
        self.run.push(datagram);
    }

    /// Deliver the current run.
    fn flush(&mut self, stats: &ConnectUdpStats) {
        let Some((_, sink)) = self.run_sink.take() else {
            return;
        };
        if self.run.len() > 1 {
            sink.deliver_batch(&mut self.run, &mut self.scratch, stats);
        }
        for datagram in self.run.drain(..) {
            if let Err(reason) = sink.deliver_h3(datagram) {
                stats.drop(reason);
                sink.dropped(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::stats::{HttpStats, Store};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Bytes>>);

    impl DatagramSink for Collect {
        fn deliver(&self, payload: Bytes) -> Result<(), DropReason> {
            self.0.lock().unwrap().push(payload);
            Ok(())
        }
    }

    /// Records how the router hands datagrams over: batches and single deliveries.
    #[derive(Default)]
    struct Batches(Mutex<Vec<Vec<Bytes>>>);

    impl DatagramSink for Batches {
        fn deliver(&self, payload: Bytes) -> Result<(), DropReason> {
            self.0.lock().unwrap().push(vec![payload]);
            Ok(())
        }
        fn deliver_batch(
            &self,
            batch: &mut Vec<H3Datagram>,
            _scratch: &mut Vec<u8>,
            _stats: &ConnectUdpStats,
        ) {
            let run = batch.drain(..).map(|d| d.payload()).collect();
            self.0.lock().unwrap().push(run);
        }
    }

    fn h3(qsid: u64, payload: &[u8]) -> Bytes {
        let mut b = bytes::BytesMut::new();
        ferry_proto::varint::put(qsid, &mut b).unwrap();
        b.extend_from_slice(payload);
        b.freeze()
    }

    /// Consecutive datagrams of one stream reach its sink as one batch, in order; a
    /// datagram for another stream ends the run; unknown streams and malformed datagrams
    /// are counted.
    #[test]
    fn router_batches_consecutive_datagrams_per_stream() {
        let stats = HttpStats::new(&Store::new(), "t").connect_udp;
        let a = Arc::new(Batches::default());
        let b = Arc::new(Batches::default());
        let mut router = Router::default();
        router.tunnels.insert(1, a.clone());
        router.tunnels.insert(2, b.clone());
        for dg in [
            h3(1, b"a1"),
            h3(1, b"a2"),
            h3(1, b"a3"),
            h3(2, b"b1"),
            h3(9, b"nobody"),
            Bytes::from_static(&[0x40]),
            h3(1, b"a4"),
        ] {
            router.push(dg, &stats);
        }
        router.flush(&stats);
        let a = a.0.lock().unwrap().clone();
        let b = b.0.lock().unwrap().clone();
        assert_eq!(
            a,
            vec![
                vec![
                    Bytes::from_static(b"a1"),
                    Bytes::from_static(b"a2"),
                    Bytes::from_static(b"a3")
                ],
                vec![Bytes::from_static(b"a4")],
            ]
        );
        assert_eq!(b, vec![vec![Bytes::from_static(b"b1")]]);
        assert_eq!(stats.drops(DropReason::NoSuchStream), 1);
        assert_eq!(stats.drops(DropReason::Malformed), 1);
        assert!(router.run.is_empty() && router.run_sink.is_none());
    }

    /// Datagrams that arrive between the request and the relay are delivered, in order,
    /// once the tunnel's sink takes over; the overflow past the bound is refused.
    #[tokio::test]
    async fn early_datagrams_are_handed_over_in_order() {
        let (tx, mut table) = mpsc::unbounded_channel();
        let registry = Registry(tx);
        let stats = HttpStats::new(&Store::new(), "t").connect_udp;
        let early = EarlyDatagrams::register(&registry, 8);
        let Some(Registration::Add { stream_id: 8, sink }) = table.recv().await else {
            panic!("expected the early registration")
        };
        // The demux delivers to the early sink before the tunnel is up.
        for i in 0..EARLY_DATAGRAMS as u8 {
            sink.deliver(Bytes::from(vec![i])).unwrap();
        }
        assert_eq!(
            sink.deliver(Bytes::from_static(b"over")),
            Err(DropReason::BufferFull)
        );
        let real = Arc::new(Collect::default());
        let handing = tokio::spawn({
            let real = real.clone() as Arc<dyn DatagramSink>;
            async move { early.hand_over(real, &stats).await }
        });
        // The demux switches: the early sink (the queue's only sender) is dropped.
        let Some(Registration::Add { stream_id: 8, .. }) = table.recv().await else {
            panic!("expected the hand-over")
        };
        drop(sink);
        let guard = handing.await.unwrap();
        let got: Vec<u8> = real.0.lock().unwrap().iter().map(|b| b[0]).collect();
        assert_eq!(got, (0..EARLY_DATAGRAMS as u8).collect::<Vec<_>>());
        drop(guard);
        assert!(matches!(
            table.recv().await,
            Some(Registration::Remove { stream_id: 8 })
        ));
    }
}
