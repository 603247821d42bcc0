//! A tiny shutdown signal: one sender, many waiters.

use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Shutdown(watch::Sender<bool>);

#[derive(Debug, Clone)]
pub struct Waiter(watch::Receiver<bool>);

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown(watch::channel(false).0)
    }
}

impl Shutdown {
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
    /// Resolves once shutdown has been triggered (or the sender is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}
