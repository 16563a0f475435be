//! routerctl: the operator's CLI for routerd, and the simulated SGLang engine (`sim-worker`)
//! used by tests, benchmarks and demos on machines without GPUs.

pub mod admin;
pub mod bench;
pub mod cli;
pub mod launch;
pub mod ops;
pub mod sim;
pub mod top;
