//! routerd: a cache-aware router for fleets of SGLang workers.

pub mod config;
pub mod serve;
