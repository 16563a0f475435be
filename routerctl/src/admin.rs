//! routerctl's client of routerd's admin API: one place that knows the endpoint, the admin
//! key, and how failures map to exit codes scripts can rely on (docs/routerctl.md):
//! 0 done, 1 the router answered an error (or a file is invalid), 2 usage error,
//! 3 the router could not be reached.

use std::time::Duration;

use clap::Args;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the router is and how to authenticate to its admin API: global options, accepted
/// before or after the subcommand (`routerctl --endpoint URL workers list`, `routerctl workers
/// list --endpoint URL`).
#[derive(Debug, Clone, Args)]
pub struct Endpoint {
    /// The router's main address; several, comma-separated, for router replicas: `status`,
    /// `top` and `workers` then act on each (a worker added to one replica is not known to the
    /// others).
    #[arg(
        long,
        global = true,
        env = "ROUTERCTL_ENDPOINT",
        default_value = DEFAULT_ENDPOINT
    )]
    pub endpoint: String,
    /// Admin key, sent as `Authorization: Bearer KEY` on admin calls.
    #[arg(long, global = true, env = "ROUTERCTL_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
}

impl Endpoint {
    /// Each replica's endpoint (one unless `--endpoint` lists several).
    pub fn each(&self) -> Vec<Endpoint> {
        let all: Vec<Endpoint> = self
            .endpoint
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| Endpoint { endpoint: e.to_owned(), admin_key: self.admin_key.clone() })
            .collect();
        if all.is_empty() {
            vec![self.clone()]
        } else {
            all
        }
    }
}

impl Default for Endpoint {
    fn default() -> Self {
        Self { endpoint: DEFAULT_ENDPOINT.to_owned(), admin_key: None }
    }
}

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:30000";

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the router at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("the router answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the router's answer is not what routerctl expects: {0}")]
    Malformed(String),
}

impl AdminError {
    pub fn exit_code(&self) -> i32 {
        match self {
            AdminError::Unreachable { .. } => 3,
            AdminError::Refused { .. } | AdminError::Malformed(_) => 1,
        }
    }
}

#[derive(Clone)]
pub struct Admin {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Admin {
    pub fn new(e: &Endpoint) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .expect("the HTTP client builds");
        Self { http, base: e.endpoint.trim_end_matches('/').to_owned(), key: e.admin_key.clone() }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, String), AdminError> {
        let req = match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let resp = req.send().await.map_err(|e| AdminError::Unreachable {
            endpoint: self.base.clone(),
            reason: root_cause(&e),
        })?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| AdminError::Unreachable {
            endpoint: self.base.clone(),
            reason: root_cause(&e),
        })?;
        Ok((status, body))
    }

    /// A successful answer's body, or the router's error message.
    async fn call(&self, req: reqwest::RequestBuilder) -> Result<String, AdminError> {
        let (status, body) = self.send(req).await?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        Err(AdminError::Refused { status, message })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        let body = self.call(self.http.get(format!("{}{path}", self.base))).await?;
        serde_json::from_str(&body).map_err(|e| AdminError::Malformed(e.to_string()))
    }

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, AdminError> {
        let body = self.call(self.http.post(format!("{}{path}", self.base)).json(body)).await?;
        serde_json::from_str(&body).map_err(|e| AdminError::Malformed(e.to_string()))
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        let body = self.call(self.http.delete(format!("{}{path}", self.base))).await?;
        serde_json::from_str(&body).map_err(|e| AdminError::Malformed(e.to_string()))
    }

    /// The status code of `GET path`, whatever it is.
    pub async fn status_of(&self, path: &str) -> Result<(u16, String), AdminError> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }
}

fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A URL path segment with reserved characters escaped (`DELETE /workers/{url}`).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
