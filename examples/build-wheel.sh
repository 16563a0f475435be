#!/usr/bin/env bash
# Builds the Python wheel (pyproject.toml: maturin, `bindings = "bin"`): the routerd and routerctl
# executables plus the `routerd` Python package (launch_router, launch_server), into
# target/wheels/ (and the two executables into target/release/). Installs maturin with pip if
# missing. A workspace `cargo build --release` unifies other features (the tests package's), so
# after it the routerd and routerctl libraries are compiled again (about 4 minutes on 2 cores).
#   examples/build-wheel.sh          # prints the wheel's path last
set -euo pipefail
cd "$(dirname "$0")/.."
command -v maturin >/dev/null || python3 -m pip install -q "maturin>=1.5,<2"
out=$(maturin build --release --locked 2>&1) || { echo "$out" >&2; exit 1; }
wheel=$(sed -n 's/.*Built wheel to //p' <<<"$out" | tail -1)
[ -f "$wheel" ] || { echo "$out" >&2; echo "build-wheel: no wheel built" >&2; exit 1; }
echo "$wheel"
