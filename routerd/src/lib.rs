//! routerd: a cache-aware router for fleets of SGLang workers.
//!
//! Requests flow server → `proxy` (routing text, `policy` choice over the `registry`'s
//! snapshot, in-flight guard, upstream call) → streamed response. `config` turns the TOML file
//! and sgl-router's flags into one typed value; `app` wires state, routes and lifecycle.

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
pub mod limits;
pub mod metrics;

pub mod policy;
pub mod poll;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod secret;
pub mod security;
pub mod serve;
pub mod stats;
