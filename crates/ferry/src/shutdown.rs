//! Process-wide signals: one sender, many waiters. The same type serves for shutdown
//! (stop now) and drain (refuse new work, let what runs finish).

use tokio::sync::watch;

/// A one-way signal: once triggered it stays triggered.
#[derive(Debug, Clone)]
pub struct Signal(watch::Sender<bool>);

/// Stop serving now: listeners close, tunnels end.
pub type Shutdown = Signal;

/// Drain: refuse new connections, send GOAWAY on every connection, let open tunnels run.
pub type Drain = Signal;

#[derive(Debug, Clone)]
pub struct Waiter(watch::Receiver<bool>);

impl Default for Signal {
    fn default() -> Self {
        Signal(watch::channel(false).0)
    }
}

impl Signal {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
    pub fn subscribe(&self) -> Waiter {
        Waiter(self.0.subscribe())
    }
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

impl Waiter {
    /// Resolves once the signal has been triggered (or the sender is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

/// How many downstream connections are open (from accept to close), so a drain can wait
/// for the last one.
#[derive(Debug, Clone)]
pub struct ConnectionCount(watch::Sender<usize>);

impl Default for ConnectionCount {
    fn default() -> Self {
        ConnectionCount(watch::channel(0).0)
    }
}

/// One open connection; counted until dropped.
#[derive(Debug)]
pub struct OpenConnection(watch::Sender<usize>);

impl ConnectionCount {
    pub fn open(&self) -> OpenConnection {
        self.0.send_modify(|n| *n += 1);
        OpenConnection(self.0.clone())
    }

    pub fn get(&self) -> usize {
        *self.0.borrow()
    }

    /// Resolves once no connection is open.
    pub async fn wait_zero(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn connection_count_waits_for_the_last_one() {
        let count = ConnectionCount::default();
        count.wait_zero().await;
        let a = count.open();
        let b = count.open();
        assert_eq!(count.get(), 2);
        let waiter = tokio::spawn({
            let count = count.clone();
            async move { count.wait_zero().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(count.get(), 0);
    }
}
