#!/usr/bin/env bash
# Fuzzes the real server through its own /openapi.json with schemathesis (pinned), once
# with an org API token and once with the admin token: every endpoint, every check.
# Fails on any failed check (5xx, a response that breaks the description, ...) and on
# a panic in the server's log. A fresh database and broker prefix; leaves nothing behind.
#
# Needs the shared PostgreSQL and RabbitMQ (scripts/services.sh) and PyPI (pip).
# HERALD_FUZZ_MAX_TIME: seconds per token (default 60), so the whole run stays < 3 min.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SCHEMATHESIS_VERSION="4.32.5"
VENV="${HERALD_FUZZ_VENV:-/var/tmp/herald-venv-fuzz}"
MAX_TIME="${HERALD_FUZZ_MAX_TIME:-60}"
DB_ADMIN_URL="${HERALD_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
REPLICA_ADMIN_URL="${HERALD_TEST_REPLICA_URL:-postgres://postgres@127.0.0.1:5433/postgres}"
AMQP_URL="${HERALD_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/herald-target}"

say() { printf '==> fuzz: %s\n' "$*"; }
fail() { printf 'fuzz: FAILED: %s\n' "$*" >&2; exit 1; }

# --- schemathesis, pinned, in its own venv
if [[ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != *"$SCHEMATHESIS_VERSION"* ]]; then
    say "installing schemathesis ${SCHEMATHESIS_VERSION} into ${VENV}"
    python3 -m venv "$VENV" || fail "cannot create a Python venv in ${VENV}"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==${SCHEMATHESIS_VERSION}" \
        || fail "pip cannot install schemathesis==${SCHEMATHESIS_VERSION} (is PyPI reachable?)"
fi

say "building herald"
cargo build --quiet -p herald
BIN="${CARGO_TARGET_DIR}/debug/herald"

id="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
DB="herald_fuzz_${id}"
with_db() { printf '%s/%s' "${1%/*}" "$2"; }
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:${PORT}"
WORK="$(mktemp -d /tmp/herald-fuzz.XXXXXX)"
LOG="${WORK}/herald.log"
ADMIN_TOKEN="fuzz-admin-${id}"
PID=""

cleanup() {
    if [[ -n "$PID" ]]; then
        # Only the server this script started, by its pid.
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    psql -X -q "$DB_ADMIN_URL" -c "DROP DATABASE IF EXISTS ${DB} WITH (FORCE)" >/dev/null 2>&1 || true
    # This run's queues on the shared broker (its exchanges hold nothing and stay).
    if command -v rabbitmqctl >/dev/null 2>&1; then
        rabbitmqctl -q list_queues name 2>/dev/null | grep "^fuzz_${id}\." | while read -r q; do
            rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true
        done
    fi
}
trap cleanup EXIT

export HERALD_DATABASE__PRIMARY_URL="$(with_db "$DB_ADMIN_URL" "$DB")"
export HERALD_DATABASE__REPLICA_URL="$(with_db "$REPLICA_ADMIN_URL" "$DB")"
export HERALD_AMQP__URL="$AMQP_URL"
export HERALD_AMQP__PREFIX="fuzz_${id}"
export HERALD_HTTP__LISTEN="127.0.0.1:${PORT}"
export HERALD_AUTH__ADMIN_TOKEN="$ADMIN_TOKEN"
export HERALD_LOG__FILTER="${HERALD_LOG__FILTER:-warn}"

say "database ${DB}, broker prefix ${HERALD_AMQP__PREFIX}, ${BASE}"
psql -X -q -v ON_ERROR_STOP=1 "$DB_ADMIN_URL" -c "CREATE DATABASE ${DB}" >/dev/null
"$BIN" migrate >/dev/null
"$BIN" serve >"$LOG" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
    curl -sf "${BASE}/readyz" >/dev/null 2>&1 && break
    kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; fail "herald exited at start"; }
    sleep 0.2
done
curl -sf "${BASE}/readyz" >/dev/null || fail "herald is not ready"

org="$(curl -sf -X POST "${BASE}/v1/orgs" -H "Authorization: Bearer ${ADMIN_TOKEN}" \
    -H 'content-type: application/json' -d '{"slug": "fuzz"}')" || fail "cannot create the org"
ORG_TOKEN="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["api_token"])' <<<"$org")"
curl -sf -X POST "${BASE}/v1/pipelines" -H "Authorization: Bearer ${ORG_TOKEN}" \
    -H 'content-type: application/json' -d '{"slug": "web", "repository": "fuzz/web"}' >/dev/null \
    || fail "cannot create the pipeline"

status=0
run() {
    local who=$1 token=$2
    say "schemathesis as ${who} (max ${MAX_TIME} s)"
    # Every check, every endpoint (the config file enables them all; `--checks` here
    # would override its per-operation exceptions).
    # From the scratch directory: schemathesis keeps a cache where it runs.
    (cd "$WORK" && "$VENV/bin/schemathesis" --config-file "${ROOT}/scripts/schemathesis.toml" \
        run "${BASE}/openapi.json" \
        --header "Authorization: Bearer ${token}" \
        --max-time "$MAX_TIME" \
        --max-examples "${HERALD_FUZZ_MAX_EXAMPLES:-30}" \
        --request-timeout 35 \
        --workers 1 \
        --seed "${HERALD_FUZZ_SEED:-1}" \
        --suppress-health-check all \
        --report junit --report-junit-path "${WORK}/${who}.xml") \
        || status=1
}
run org "$ORG_TOKEN"
run admin "$ADMIN_TOKEN"

if grep -n "panicked" "$LOG"; then
    fail "the server panicked (log: ${LOG})"
fi
if ! kill -0 "$PID" 2>/dev/null; then
    fail "the server died during the run (log: ${LOG})"
fi
((status == 0)) || fail "schemathesis found failures (server log: ${LOG})"
say "no failures"
rm -rf "$WORK"
