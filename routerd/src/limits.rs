//! Admission control: at most `max_concurrent_requests` proxied at once, up to `queue_size`
//! more waiting (beyond it: 429), each waiting at most `queue_timeout` (then 503). A slot is
//! held until the response body ends, so streams count for their whole length.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RouterError;

pub struct Limiter {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue_size: usize,
    timeout: Duration,
}

impl Limiter {
    pub fn new(max_concurrent: usize, queue_size: usize, timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent)),
            waiting: AtomicUsize::new(0),
            queue_size,
            timeout,
        }
    }

    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, RouterError> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Relaxed) >= self.queue_size {
            self.waiting.fetch_sub(1, Relaxed);
            return Err(RouterError::QueueFull);
        }
        let got = tokio::time::timeout(self.timeout, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Relaxed);
        match got {
            Ok(Ok(p)) => Ok(p),
            _ => Err(RouterError::QueueTimeout),
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_is_429_and_slow_queue_is_503() {
        let l = Arc::new(Limiter::new(1, 1, Duration::from_millis(100)));
        let held = l.acquire().await.unwrap();
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await.map(drop) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(l.waiting(), 1);
        assert!(matches!(l.acquire().await, Err(RouterError::QueueFull)));
        assert!(matches!(waiter.await.unwrap(), Err(RouterError::QueueTimeout)));
        drop(held);
        assert!(l.acquire().await.is_ok());
    }
}
