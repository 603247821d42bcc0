//! The global downstream connection limit (the overload manager's
//! `envoy.resource_monitors.global_downstream_max_connections`): one count for every
//! HTTP/1.1, HTTP/2 and QUIC connection of every listener; past the limit a new connection
//! is refused at once (TCP: closed on accept; QUIC: CONNECTION_REFUSED) and counted in
//! `listener.<address>.downstream_global_cx_overflow`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct ConnectionLimit {
    /// None: no limit (connections are still counted).
    max: Option<u64>,
    open: Arc<AtomicU64>,
}

/// One admitted connection; counted until dropped.
#[derive(Debug)]
pub struct Admitted(Arc<AtomicU64>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionLimit {
    pub fn new(max: Option<u64>) -> Self {
        ConnectionLimit {
            max,
            open: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Admit one more connection, or None when the limit is reached.
    pub fn try_admit(&self) -> Option<Admitted> {
        let max = self.max.unwrap_or(u64::MAX);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Admitted(self.open.clone()))
    }

    /// Connections admitted and still open.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_then_again_after_a_close() {
        let limit = ConnectionLimit::new(Some(2));
        let a = limit.try_admit();
        let b = limit.try_admit();
        assert!(a.is_some() && b.is_some());
        assert!(limit.try_admit().is_none());
        assert_eq!(limit.open(), 2);
        drop(a);
        assert_eq!(limit.open(), 1);
        assert!(limit.try_admit().is_some());
    }

    #[test]
    fn no_limit_admits_everything() {
        let limit = ConnectionLimit::new(None);
        let all: Vec<_> = (0..1000).filter_map(|_| limit.try_admit()).collect();
        assert_eq!(all.len(), 1000);
    }
}
