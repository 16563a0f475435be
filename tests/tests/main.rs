//! The end-to-end suite as one test executable (one link of the whole stack instead of one per
//! file). Each module is one area; `cargo test -p routerd-e2e -- router_faults::` runs one.

mod bench_tool;
mod router_behaviour;
mod router_cache_aware;
mod router_cost_aware;
mod router_discovery;
mod router_dp;
mod router_dropin;
mod router_faults;
mod router_http1;
mod router_kv_events;
mod router_migration;
mod router_observability;
mod router_pd;
mod router_reload;
mod router_reload_load;
mod router_replicas;
mod router_routes;
mod router_security;
mod router_tls;
mod router_traces;
mod router_watch;
mod router_wire;
mod sim_api;
mod sim_engine;
mod sim_faults;
mod sim_pd;
