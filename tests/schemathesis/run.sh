#!/usr/bin/env bash
# Schemathesis against the hub's own OpenAPI document: every route, generated valid
# and invalid requests, with an API key. Fails on a 500, a status, content type or
# body the document does not describe, a request the document says is invalid that
# the hub accepts, and an API route that ignores its key.
#
#   tests/schemathesis/run.sh [FLEETWATCH_BINARY]
#
# Installs schemathesis (pinned) into a virtualenv under ~/.cache/fleetwatch and
# starts a hub of its own (embedded broker, temporary SQLite file, free ports).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
binary=${1:-$root/target/debug/fleetwatch}
version=4.32.5
venv=${FLEETWATCH_SCHEMATHESIS_VENV:-$HOME/.cache/fleetwatch/schemathesis}

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==$version"
fi
[ -x "$binary" ] || { echo "run.sh: no hub binary at $binary (cargo build first)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
http_port=$(free_port)
mqtt_port=$(free_port)
key="schemathesis-key-$$"
base="http://127.0.0.1:$http_port"

# A sink, so the notification routes have one to report, switch and test; its
# receiver is a port nobody listens on (every attempt fails and is retried).
cat >"$work/fleetwatch.toml" <<TOML
[[notify.sinks]]
name = "ops"
kind = "webhook"
url = "http://127.0.0.1:$(free_port)/hooks"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TOML

env -i PATH="$PATH" RUST_LOG=warn \
  FLEETWATCH_MQTT__LISTEN="127.0.0.1:$mqtt_port" \
  FLEETWATCH_DATABASE__URL="sqlite://$work/fleetwatch.db" \
  FLEETWATCH_HTTP__LISTEN="127.0.0.1:$http_port" \
  FLEETWATCH_HTTP__API_KEY="$key" \
  "$binary" --config "$work/fleetwatch.toml" serve 2>"$work/hub.log" &
hub=$!
cleanup() {
  kill "$hub" 2>/dev/null || true
  wait "$hub" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  curl -sf "$base/livez" >/dev/null && break
  sleep 0.1
done
curl -sf "$base/livez" >/dev/null || { cat "$work/hub.log" >&2; echo "run.sh: the hub did not start" >&2; exit 1; }

# A few devices, so reads find something: registered, online, in error.
auth=(-H "Authorization: Bearer $key" -H "Content-Type: application/json")
curl -sf "${auth[@]}" -d '{"device_id":"pump-1"}' "$base/api/v1/devices" >/dev/null
curl -sf "${auth[@]}" -d '{"hostname":"srv"}' "$base/api/v1/devices/pump-2/heartbeat" >/dev/null
curl -sf "${auth[@]}" -d '{"status":"error","error":"fan"}' "$base/api/v1/devices/pump-3/heartbeat" >/dev/null

# Run from the scratch directory: schemathesis keeps .hypothesis/ in the current one.
cd "$work"
API_KEY="$key" "$venv/bin/schemathesis" --config-file "${FLEETWATCH_SCHEMATHESIS_CONFIG:-$here/schemathesis.toml}" \
  run "$base/api/v1/openapi.json" --no-color
