#!/usr/bin/env bash
# Start the local services, then run `herald demo` against them, reading from the replica.
# Extra arguments go to `herald demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/services.sh

export HERALD_DATABASE__REPLICA_URL="${HERALD_DATABASE__REPLICA_URL:-postgres://postgres@127.0.0.1:5433/herald}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/herald-target}"

exec cargo run --release -p herald -- demo "$@"
