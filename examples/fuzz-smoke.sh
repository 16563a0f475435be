#!/usr/bin/env bash
# Fuzzes routerd's parsers of untrusted input with cargo-fuzz (libFuzzer): the configuration
# parser, routing-text extraction from request bodies, the SSE re-framer with the chunked
# decoder under it, the hand-written HTTP/1 wire on arbitrary bytes (request heads, response
# heads, chunked bodies), the KV-event decoder (msgpack batches, ZMQ frames) and chat-template
# rendering of chat request bodies (kv::chat). Each target
# runs for SECONDS (default 60) from the seeds in fuzz/seeds
# (and config/*.toml for the parser); a crash leaves its input in fuzz/artifacts/TARGET/ and
# fails the script. Needs the nightly toolchain; installs cargo-fuzz if it is missing.
#
#   examples/fuzz-smoke.sh            # 60 s per target
#   SECONDS_PER_TARGET=600 examples/fuzz-smoke.sh sse
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${SECONDS_PER_TARGET:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config extract sse request_head response_head chunked kv_wire chat)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz-smoke: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    extra=("seeds/$t")
    [ "$t" = config ] && extra+=("../config")
    log="corpus/$t.log"
    echo "== fuzz $t for ${secs}s"
    set +e
    cargo +nightly fuzz run "$t" "corpus/$t" "${extra[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 -max_len=65536 2>&1 | tee "$log" | grep -E "^#[0-9]+.*(pulse|DONE|NEW)" | tail -n 3
    status=${PIPESTATUS[0]}
    set -e
    execs=$(grep -E "^stat::number_of_executed_units" "$log" | awk '{print $2}')
    if [ "$status" -ne 0 ]; then
        echo "fuzz-smoke: $t FAILED (exit $status); see fuzz/$log and fuzz/artifacts/$t/" >&2
        grep -E "panicked|ERROR|Test unit written" "$log" >&2 || true
        exit "$status"
    fi
    summary+=("$t: ${execs:-?} executions in ${secs}s, corpus $(ls "corpus/$t" | wc -l) inputs, no crash")
done
echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
