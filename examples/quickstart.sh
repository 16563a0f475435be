#!/usr/bin/env bash
# routerd on a simulated fleet: four simulated SGLang workers launched, supervised and
# registered by `routerctl launch`, with routerd in front of them on :30000 (cache_aware, the
# default policy). Ctrl-C stops everything. Needs no GPU.
#   examples/quickstart.sh [ROUTER_PORT=30000]
set -euo pipefail
port=${1:-30000}
cd "$(dirname "$0")/.."
cargo build --release -q -p routerd -p routerctl
exec target/release/routerctl launch --engine sim --dp-size 4 --with-router --router-port "$port"
