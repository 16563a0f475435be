//! Idle keep-alive connections to one worker, reused most-recent first. No task watches them:
//! a connection the worker closed while idle is noticed (without a syscall unless the event
//! loop saw it become readable) and discarded when it is taken.

use std::sync::Mutex;

use crate::tls::Conn;

/// Idle connections kept per worker at most.
const MAX_IDLE: usize = 1024;

#[derive(Debug, Default)]
pub struct IdleConns(Mutex<Vec<Conn>>);

impl IdleConns {
    pub fn take(&self) -> Option<Conn> {
        loop {
            let conn = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            // Closed, reset, or bytes nobody asked for: not reusable.
            if conn.idle_usable() {
                return Some(conn);
            }
        }
    }

    pub fn put(&self, conn: Conn) {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
