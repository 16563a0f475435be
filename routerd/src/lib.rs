//! routerd: a cache-aware router for fleets of SGLang workers.
//!
//! What exists so far is the HTTP serving foundation shared with `routerctl`'s simulated
//! workers; the request path, policies and control plane land issue by issue (see README).

pub mod serve;
