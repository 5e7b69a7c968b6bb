#!/usr/bin/env bash
# fleetwatch's benchmarks: builds in release mode, starts what each measurement needs
# (Mosquitto processes on free ports, hub processes, firmware-sim fleets), prints a
# table and writes target/bench/results.json. Every figure is a ratio to a baseline
# measured in the same run, because a shared machine's absolute figures drift.
#
#   bench/run.sh            full run (about 30 minutes)
#   bench/run.sh --quick    everything at a small scale (about 5 minutes; CI smoke test)
#   bench/run.sh --only ingest,lag   a subset (see --help); pgdb needs PostgreSQL
#                                    (--postgres URL or FLEETWATCH_BENCH_POSTGRES);
#                                    http needs wrk (apt-get install -y wrk, which the
#                                    harness runs itself if wrk is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || { echo "bench/run.sh: needs mosquitto (apt-get install mosquitto)" >&2; exit 1; }
# 10,000 embedded-broker connections, plus the simulator's ends of them.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --locked --quiet -p fleetwatch -p firmware-sim -p fleetwatch-bench
exec "${CARGO_TARGET_DIR:-target}/release/fleetwatch-bench" "$@"
