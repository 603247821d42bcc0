//! Supervised tasks: a panic in one connection's or tunnel's task is caught, logged and
//! counted (`server.ferry.task_panics`), and takes nothing else down.
//!
//! Tokio already keeps a panicking task from ending the process, but nothing would see
//! it: a `tokio::spawn`ed task's panic vanishes with its `JoinHandle`. Every long-lived task
//! Ferry spawns for a peer (connections, requests, tunnels, datagram readers, upstream
//! connection drivers) goes through [`spawn`] or [`guard`] instead, so each panic is an
//! error log line with the task's role and the panic message, and one count.
//!
//! The counter is process-wide (a panic is a property of the process, not of a listener);
//! every stat [`Store`](crate::stats::Store) built by the server publishes it.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use futures_util::FutureExt;

use crate::stats::Counter;

/// The stat name under which every server's store publishes the panic count.
pub const TASK_PANICS_STAT: &str = "server.ferry.task_panics";

/// The process-wide panic counter.
pub fn panic_counter() -> &'static Counter {
    static PANICS: OnceLock<Counter> = OnceLock::new();
    PANICS.get_or_init(Counter::default)
}

/// Run `fut`; if it panics, log and count the panic and return `None`.
///
/// Not an `async fn`: that would store `fut` twice in its state (once as the argument,
/// once inside the `catch_unwind` it awaits), and every request task would carry the copy
/// for as long as its tunnel lives.
pub fn guard<F>(what: &'static str, fut: F) -> impl Future<Output = Option<F::Output>>
where
    F: Future,
{
    AssertUnwindSafe(fut).catch_unwind().map(move |r| match r {
        Ok(v) => Some(v),
        Err(payload) => {
            record(what, payload.as_ref());
            None
        }
    })
}

/// `tokio::spawn` with [`guard`]: a panic in `fut` is logged and counted.
pub fn spawn<F>(what: &'static str, fut: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(guard(what, fut).map(drop))
}

fn record(what: &'static str, payload: &(dyn Any + Send)) {
    panic_counter().inc();
    let msg = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)");
    tracing::error!(task = what, "task panicked: {msg}; the process goes on");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_counted_and_the_others_go_on() {
        let before = panic_counter().get();
        let bad = spawn("test", async {
            tokio::task::yield_now().await;
            panic!("deliberate panic in a test task");
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let good = spawn("test", async move {
            tokio::task::yield_now().await;
            tx.send(42u32).unwrap();
        });
        // The supervised task itself ends normally: the panic was caught inside it.
        bad.await.unwrap();
        good.await.unwrap();
        assert_eq!(rx.await.unwrap(), 42);
        assert!(panic_counter().get() > before);
        // A String payload (panic! with formatting) is handled too.
        let n = panic_counter().get();
        let v = guard("test", async { panic!("formatted {}", 7) }).await;
        let v: Option<()> = v;
        assert!(v.is_none());
        assert!(panic_counter().get() > n);
        // A future that does not panic returns its value.
        assert_eq!(guard("test", async { 5 }).await, Some(5));
    }

    #[test]
    fn every_server_store_publishes_the_counter() {
        let store = crate::stats::Store::new();
        let _ = crate::stats::ServerStats::new(&store);
        let before = store.value(TASK_PANICS_STAT).unwrap();
        panic_counter().inc();
        assert!(store.value(TASK_PANICS_STAT).unwrap() > before);
    }
}
