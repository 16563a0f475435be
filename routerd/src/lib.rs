//! routerd: a cache-aware router for fleets of SGLang workers.
//!
//! A request flows: `serve` (accept) → `front` (read through the `http1` client session, admit)
//! → `proxy` (routing text, the `policy` choice over the `registry`'s snapshot, in-flight guard,
//! the `http1` worker session, `proxy::relay` back to the client) or, for every other route,
//! `routes` (axum). `config` turns the TOML file and sgl-router's flags into one typed value;
//! `app` is the shared state; `run` the lifecycle. docs/development.md has the module map.

pub mod admin;
pub mod app;
pub mod breaker;
pub mod config;
pub mod decisions;
pub mod discovery;
pub mod dp;

pub mod error;
pub mod front;
pub mod health;
pub mod http1;
pub mod info;
pub mod kv;
pub mod limits;
pub mod metrics;
pub mod otel;

pub mod peers;
pub mod policy;
pub mod poll;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod routes;
pub mod run;
pub mod secret;
pub mod security;
pub mod serve;
pub mod stats;
pub mod tls;
