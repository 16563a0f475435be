//! Keeping the router's view of the launched workers true: a worker is registered (source
//! `launch`) while it is up and deregistered when it goes down. Supervisors call this on every
//! transition; a reconcile loop repairs what a failed call or a restarted router left wrong,
//! so the router always converges on the set of launched workers that are up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use routerd::admin::WorkerView;
use routerd::registry::WorkerSource;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::supervise::Slot;
use crate::admin::{encode_segment, Admin, AdminError};

/// How often the router's worker list is compared with the launched workers.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

pub struct Registrar {
    admin: Admin,
    /// The last failure printed, so an unreachable router is reported once, not every pass.
    last_error: Mutex<Option<String>>,
}

impl Registrar {
    pub fn new(admin: Admin) -> Self {
        Self { admin, last_error: Mutex::new(None) }
    }

    pub fn endpoint(&self) -> &str {
        self.admin.base()
    }

    /// Registers the worker of `slot`; one the router already has counts as registered.
    pub async fn register(&self, slot: &Slot) -> Result<(), AdminError> {
        let p = &slot.plan;
        let body = json!({
            "url": p.url,
            "role": p.role.map(|r| r.as_str()),
            "bootstrap_port": p.bootstrap_port,
            "source": "launch",
        });
        let answer = self.admin.post_json::<Value>("/workers", &body).await;
        self.settle(match answer {
            Err(AdminError::Refused { status: 409, .. }) => Ok(()),
            other => other.map(drop),
        })
    }

    /// Removes the worker of `slot` from the router; one it does not have is already removed.
    pub async fn deregister(&self, slot: &Slot) -> Result<(), AdminError> {
        let path = format!("/workers/{}", encode_segment(&slot.plan.url));
        let answer = self.admin.delete::<Value>(&path).await;
        self.settle(match answer {
            Err(AdminError::Refused { status: 404, .. }) => Ok(()),
            other => other.map(drop),
        })
    }

    /// One pass: registers every up worker the router lacks and removes every down one it
    /// still has.
    pub async fn reconcile(&self, slots: &[Arc<Slot>]) {
        let listed = match self.admin.get::<Value>("/workers").await {
            Ok(v) => v,
            Err(e) => {
                let _ = self.settle(Err(e));
                return;
            }
        };
        let views: Vec<WorkerView> =
            serde_json::from_value(listed["workers"].clone()).unwrap_or_default();
        for slot in slots {
            let listed = views.iter().find(|v| v.url == slot.plan.url);
            let result = match (slot.is_up(), listed) {
                (true, None) => self.register(slot).await,
                // A URL another source registered is not launch's to remove.
                (false, Some(v)) if v.source == WorkerSource::Launch => self.deregister(slot).await,
                _ => Ok(()),
            };
            if result.is_err() {
                return;
            }
        }
        let _ = self.settle(Ok(()));
    }

    /// Reports a failure once and the recovery after it, and passes the result on.
    fn settle(&self, r: Result<(), AdminError>) -> Result<(), AdminError> {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        match &r {
            Err(e) => {
                let msg = e.to_string();
                if last.as_deref() != Some(msg.as_str()) {
                    eprintln!("routerctl launch: {msg} (retrying every {RECONCILE_EVERY:?})");
                    *last = Some(msg);
                }
            }
            Ok(()) => {
                if last.take().is_some() {
                    println!("router {} reachable again; registrations in sync", self.endpoint());
                }
            }
        }
        r
    }
}

/// Runs reconcile passes until `stop`.
pub async fn reconcile_loop(r: Arc<Registrar>, slots: Vec<Arc<Slot>>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECONCILE_EVERY) => r.reconcile(&slots).await,
        }
    }
}
