#!/usr/bin/env bash
# Runs each fuzz target for a bounded time from its seed corpus (fuzz/seeds/TARGET)
# and prints libFuzzer's final figures. Stable Rust, no sanitizer: the targets are
# safe Rust, and what they look for is a panic or a broken invariant (an assertion).
# A crash stops the run with a non-zero exit; its input is in fuzz/artifacts/TARGET/.
#
#   fuzz/run.sh              every target, 60 s each
#   fuzz/run.sh 600 config   one target, ten minutes
#
# Builds go to $FLEETWATCH_FUZZ_TARGET_DIR (default ~/.cache/fleetwatch/fuzz-target),
# outside the checkout, so a fresh clone on the same machine reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(heartbeat_payload device_topic config)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
target_dir=${FLEETWATCH_FUZZ_TARGET_DIR:-$HOME/.cache/fleetwatch/fuzz-target}
opts=(--fuzz-dir fuzz --sanitizer none --dev --target-dir "$target_dir")

cargo fuzz build "${opts[@]}"
for target in "${targets[@]}"; do
  corpus=$(mktemp -d)
  log=$(mktemp)
  echo "== fuzz $target for ${seconds}s"
  if ! cargo fuzz run "${opts[@]}" "$target" "$corpus" "fuzz/seeds/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz/run.sh: $target crashed; input in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  # The DONE line: runs, coverage, corpus; then the stats.
  grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log"
  rm -rf "$corpus" "$log"
done
