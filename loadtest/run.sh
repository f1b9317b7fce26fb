#!/usr/bin/env bash
# Runs a load test against a fresh Herald on this machine:
#
#   loadtest/run.sh [herald-loadtest arguments...]
#   loadtest/run.sh --agents 50 --idle-seconds 10 --duration-s 15 --jobs-per-s 20   # smoke
#   loadtest/run.sh --agents 1000 --jobs-per-s 100 --duration-s 60 --idle-seconds 30 # issue 2
#
# Notification scenarios (issue 3; docs/BENCHMARKS.md has the exact commands):
#
#   loadtest/run.sh --scenario webhooks ...   # deliveries/s to local receivers, latency
#   loadtest/run.sh --scenario storm ...      # dispatch p99 without, then during, a storm
#   HERALD_NOTIFY__THROTTLE__ENABLED=false loadtest/run.sh --scenario storm ...
#
# Every HERALD_* variable of the caller's environment reaches `herald serve` (and the
# load test, which reports the throttle setting); this script only adds the ones below.
# The receivers listen on 127.0.0.x, so HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS=true.
#
# It builds the release binaries, recreates the database herald_loadtest on the
# primary (it streams to the replica), runs `herald migrate`, starts `herald serve`
# (all roles) on 127.0.0.1:18080 with the AMQP prefix "loadtest", waits for /readyz,
# runs herald-loadtest with the arguments given, then stops the server with SIGTERM.
#
# Needs the local services of scripts/services.sh (PostgreSQL primary 5432 + replica
# 5433, RabbitMQ 5672) and psql and curl.
#
# Open files: 1000 agents hold 1000 long polls, i.e. 1000 sockets in the load test and
# 1000 more in Herald, plus database and broker connections. The default soft limit of
# 1024 is not enough, so this script raises it first:
#
#   ulimit -n 65536
#
# (falling back to the hard limit when 65536 is above it).
#
# --agents 10000: 10000 long polls hold 10000 sockets in the load test and 10000 in
# Herald (the limit is per process), plus Herald's database and broker connections:
# 65536 is enough, a hard limit much below 11000 is not (the line "open-files limit"
# says which limit was applied). All those sockets go to one address:port, so they also
# need as many local ports (net.ipv4.ip_local_port_range: 28232 ports by default).
#
# Environment (all optional):
#   HERALD_LOADTEST_PRIMARY   postgres://postgres@127.0.0.1:5432   primary, without database
#   HERALD_LOADTEST_REPLICA   postgres://postgres@127.0.0.1:5433   replica, without database
#   HERALD_LOADTEST_DB        herald_loadtest                      database name
#   HERALD_LOADTEST_LISTEN    127.0.0.1:18080                      Herald's API address
#   HERALD_LOADTEST_OUT       /tmp/herald-loadtest                 server log, /metrics dump
#   HERALD_LOADTEST_PREFIX    loadtest                             broker prefix (HERALD_AMQP__PREFIX):
#                             another one lets two runs share a broker without sharing queues
#   HERALD_LOADTEST_KEEP_QUEUES=1   do not purge the broker's <prefix>.* queues first
#   HERALD_LOADTEST_NOTIFY_NICE=N   run the notify role in a second process at nice N
#                                   (the first runs every other role)
#   HERALD_LOADTEST_PROFILE   release                              or debug (faster to build)
#   HERALD_LOADTEST_RABBITMQCTL  rabbitmqctl                       e.g. "rabbitmqctl -n chaos@localhost"
#
# Chaos (issue 10; docs/RELIABILITY.md):
#
#   loadtest/run.sh --scenario chaos --duration-s 300            # full
#   loadtest/run.sh --scenario chaos --duration-s 45 --drain-s 60 --hang-s 30   # short (test.sh)
#
# herald-loadtest then runs Herald itself: two `api`, two `relay,notify` and one
# `dispatch,maintenance` process on ports 18180-18184 (HERALD_CHAOS_PORT_BASE), kills
# and replaces them, and restarts the services with these commands (sh -c; defaults fit
# the Debian services of scripts/services.sh):
#   HERALD_CHAOS_RABBIT_STOP / HERALD_CHAOS_RABBIT_START   rabbitmqctl stop_app / start_app
#   HERALD_CHAOS_PG_RESTART                                 pg_ctlcluster <ver> main restart
#   HERALD_CHAOS_REPLICA_STOP / HERALD_CHAOS_REPLICA_START  pg_ctlcluster <ver> replica stop/start
#   HERALD_CHAOS_RESTORE      bash scripts/services.sh      run at the end whatever happened
#
# Incident replay (issue 13; docs/BENCHMARKS.md):
#
#   loadtest/run.sh --scenario incident                       # full: 1,000,000 backlog
#   loadtest/run.sh --scenario incident --agents 100 --builds-per-s 4 --baseline-s 15 \
#       --peak-s 15 --degraded-s 15 --backlog 20000 --outage-max-s 60   # smoke
#
# Plots (SVG), CSVs and the summary go to docs/bench-raw/incident-<date>/ (--out-dir).
#
# Ceilings (issue 14): the offered load ramps in steps until a target breaks; a table
# row per step (per-unit costs: primary transactions, WAL bytes, broker messages,
# Herald CPU) on stdout and in docs/bench-raw/ceilings-<date>/<phase>.md and .csv
# (--out-dir). The throttle is a server setting, so the webhook ceiling is two runs:
#
#   loadtest/run.sh --scenario ceilings --phase jobs --agents 1000
#   HERALD_NOTIFY__THROTTLE__ENABLED=false loadtest/run.sh --scenario ceilings --phase webhooks \
#       --agents 200                  # raw pipeline -> webhooks-throttle-off.md
#   loadtest/run.sh --scenario ceilings --phase webhooks --agents 200 \
#       --webhook-jobs-per-s 50       # throttle on, 50 jobs/s beside -> webhooks-throttle-on.md
#
# Steps: --job-steps 50,100,... (jobs/s) or --delivery-steps 1000,2000,... (deliveries/s);
# --step-s 20, --step-grace-s 3, --max-steps 12, --max-total-s 1200 stop it by itself.
# Smoke (debug build, ~2 min):
#   HERALD_LOADTEST_PROFILE=debug loadtest/run.sh --scenario ceilings --phase jobs --agents 50 \
#       --job-steps 5,10,20 --step-s 10 --job-max-ms 100 --max-total-s 60
# Run it with one Herald process (no HERALD_LOADTEST_NOTIFY_NICE): the broker counters and
# herald_notify_deliveries_created_total come from the process serving /metrics only.
# This script passes the server pid(s) in HERALD_LOADTEST_HERALD_PIDS for the CPU figures.
# Point HERALD_LOADTEST_PRIMARY/REPLICA, HERALD_AMQP__URL and those commands at private
# instances to run it without touching the shared services.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[run.sh] %s\n' "$*"; }
die() { printf '[run.sh] ERROR: %s\n' "$*" >&2; exit 1; }

# --- open files -------------------------------------------------------------------
if ! ulimit -n 65536 2>/dev/null; then
    hard="$(ulimit -Hn)"
    ulimit -n "$hard" || die "cannot raise the open-files limit"
    log "warning: ulimit -n 65536 refused (hard limit ${hard}); running with ${hard}"
fi
log "open-files limit: $(ulimit -n)"

PRIMARY="${HERALD_LOADTEST_PRIMARY:-postgres://postgres@127.0.0.1:5432}"
REPLICA="${HERALD_LOADTEST_REPLICA:-postgres://postgres@127.0.0.1:5433}"
DB="${HERALD_LOADTEST_DB:-herald_loadtest}"
LISTEN="${HERALD_LOADTEST_LISTEN:-127.0.0.1:18080}"
OUT="${HERALD_LOADTEST_OUT:-/tmp/herald-loadtest}"
PREFIX="${HERALD_LOADTEST_PREFIX:-loadtest}"
BASE_URL="http://${LISTEN}"
[[ "$DB" =~ ^[a-z_][a-z0-9_]*$ ]] || die "HERALD_LOADTEST_DB must be a plain lower-case identifier"
[[ "$PREFIX" =~ ^[a-z][a-z0-9_-]*$ ]] || die "HERALD_LOADTEST_PREFIX must be a plain lower-case name"
mkdir -p "$OUT"

# --- build --------------------------------------------------------------------------
PROFILE="${HERALD_LOADTEST_PROFILE:-release}"
case "$PROFILE" in
    release) build_flags=(--release) ;;
    debug) build_flags=() ;;
    *) die "HERALD_LOADTEST_PROFILE must be release or debug" ;;
esac
log "cargo build ${build_flags[*]} -p herald -p herald-loadtest"
cargo build "${build_flags[@]}" -p herald -p herald-loadtest
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
BIN="${TARGET_DIR:-${CARGO_TARGET_DIR:-target}}/${PROFILE}"
[[ -x "$BIN/herald" && -x "$BIN/herald-loadtest" ]] || die "release binaries not found in $BIN"
# Write the build's dirty pages back now: left to the kernel, that writeback lands in
# the measurement and PostgreSQL's WAL fsyncs queue behind it (COMMITs of 0.5-1 s).
sync

# --- fresh database -----------------------------------------------------------------
log "recreating database ${DB}"
psql -X -q -v ON_ERROR_STOP=1 "${PRIMARY}/postgres" \
    -c "DROP DATABASE IF EXISTS ${DB} WITH (FORCE)" \
    -c "CREATE DATABASE ${DB}"
# The replica must have replayed the CREATE before Herald connects to it.
for _ in $(seq 1 60); do
    if psql -X -q -At "${REPLICA}/${DB}" -c 'SELECT 1' >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done
psql -X -q -At "${REPLICA}/${DB}" -c 'SELECT 1' >/dev/null || die "database ${DB} did not appear on the replica"

# --- broker: messages left in the queues of an earlier run would feed the new server
# events of a database that no longer exists. Purge (not delete: a queue being deleted
# while the new server subscribes makes RabbitMQ close the connection).
RABBITMQCTL="${HERALD_LOADTEST_RABBITMQCTL:-rabbitmqctl}"
if [[ "${HERALD_LOADTEST_KEEP_QUEUES:-0}" != 1 ]] && command -v rabbitmqctl >/dev/null 2>&1; then
    # shellcheck disable=SC2086 # the command may carry options (-n node)
    if queues="$($RABBITMQCTL list_queues -q --no-table-headers name messages 2>/dev/null)"; then
        while read -r q n; do
            [[ "$q" == "${PREFIX}".* && "${n:-0}" != 0 ]] || continue
            log "purging ${n} messages of an earlier run from broker queue ${q}"
            # shellcheck disable=SC2086
            $RABBITMQCTL purge_queue -q "$q" >/dev/null 2>&1 || log "warning: could not purge queue ${q}"
        done <<<"$queues"
    else
        log "warning: rabbitmqctl list_queues failed; leaving the ${PREFIX}.* queues as they are"
    fi
fi

# --- server -------------------------------------------------------------------------
ADMIN_TOKEN="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
export HERALD_DATABASE__PRIMARY_URL="${PRIMARY}/${DB}"
export HERALD_DATABASE__REPLICA_URL="${REPLICA}/${DB}"
export HERALD_AMQP__PREFIX="$PREFIX"
export HERALD_HTTP__LISTEN="$LISTEN"
export HERALD_AUTH__ADMIN_TOKEN="$ADMIN_TOKEN"
export HERALD_LOG__FILTER=warn
# The load test's webhook receivers are on loopback addresses.
export HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS=true
log "Herald environment: $(env | grep -E '^HERALD_' | grep -v -E 'ADMIN_TOKEN|_URL=' | sort | tr '\n' ' ')"

log "herald migrate"
"$BIN/herald" migrate

# --- chaos: herald-loadtest runs (and kills) the Herald processes itself -------------
chaos=0
incident=0
prev=""
for a in "$@"; do
    [[ "$a" == "--scenario=chaos" || ( "$prev" == "--scenario" && "$a" == chaos ) ]] && chaos=1
    [[ "$a" == "--scenario=incident" || ( "$prev" == "--scenario" && "$a" == incident ) ]] && incident=1
    prev="$a"
done
# Incident (issue 13): one token posts every build's commit statuses to the fake GitHub;
# GitHub's per-token budget (80/min) would be the only thing measured otherwise.
if ((incident)); then
    export HERALD_NOTIFY__GITHUB_PER_TOKEN_PER_MINUTE="${HERALD_NOTIFY__GITHUB_PER_TOKEN_PER_MINUTE:-100000}"
fi
if ((chaos)); then
    export HERALD_LOG__FILTER="${HERALD_CHAOS_LOG_FILTER:-warn}"
    # Retries within the run, a lost assignment back soon, GitHub's budget out of the way.
    export HERALD_NOTIFY__RETRY_SCALE="${HERALD_NOTIFY__RETRY_SCALE:-0.05}"
    export HERALD_NOTIFY__WEBHOOK_TIMEOUT_S="${HERALD_NOTIFY__WEBHOOK_TIMEOUT_S:-10}"
    export HERALD_DISPATCH__ACCEPT_TIMEOUT_S="${HERALD_DISPATCH__ACCEPT_TIMEOUT_S:-5}"
    export HERALD_NOTIFY__GITHUB_PER_TOKEN_PER_MINUTE="${HERALD_NOTIFY__GITHUB_PER_TOKEN_PER_MINUTE:-100000}"
    export HERALD_CHAOS_LOG_DIR="${HERALD_CHAOS_LOG_DIR:-${OUT}/chaos}"
    export HERALD_CHAOS_RESTORE="${HERALD_CHAOS_RESTORE:-bash ${ROOT}/scripts/services.sh}"
    rm -rf "$HERALD_CHAOS_LOG_DIR"
    # Whatever happens to herald-loadtest, the services are left running.
    trap 'log "restoring services: ${HERALD_CHAOS_RESTORE}"; sh -c "$HERALD_CHAOS_RESTORE" >/dev/null || log "warning: restore failed"' EXIT
    rc=0
    "$BIN/herald-loadtest" \
        --herald-bin "$BIN/herald" \
        --base-url "$BASE_URL" \
        --admin-token "$ADMIN_TOKEN" \
        --db-url "${PRIMARY}/${DB}" \
        "$@" || rc=$?
    log "process logs: ${HERALD_CHAOS_LOG_DIR}"
    exit "$rc"
fi

SERVER_LOG="${OUT}/herald-serve.log"
NOTIFY_PID=""
if [[ -n "${HERALD_LOADTEST_NOTIFY_NICE:-}" ]]; then
    [[ "$HERALD_LOADTEST_NOTIFY_NICE" =~ ^[0-9]+$ ]] || die "HERALD_LOADTEST_NOTIFY_NICE must be 0-19"
    # The notify role in its own process at a lower CPU priority. It serves no HTTP,
    # so its counters are not in the API process's /metrics.
    log "herald serve --roles notify at nice ${HERALD_LOADTEST_NOTIFY_NICE} (log: ${OUT}/herald-notify.log)"
    nice -n "$HERALD_LOADTEST_NOTIFY_NICE" "$BIN/herald" serve --roles notify >"${OUT}/herald-notify.log" 2>&1 &
    NOTIFY_PID=$!
    log "herald serve --roles api,relay,dispatch,maintenance (log: ${SERVER_LOG})"
    "$BIN/herald" serve --roles api,relay,dispatch,maintenance >"$SERVER_LOG" 2>&1 &
else
    log "herald serve (log: ${SERVER_LOG})"
    "$BIN/herald" serve >"$SERVER_LOG" 2>&1 &
fi
SERVER_PID=$!

stop_one() {
    local pid="$1"
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping herald serve (pid ${pid}) with SIGTERM"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "warning: herald serve still running after 30 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}
stop_server() {
    stop_one "$SERVER_PID"
    stop_one "$NOTIFY_PID"
}
trap stop_server EXIT

ready=0
for _ in $(seq 1 120); do
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 30 "$SERVER_LOG" >&2; die "herald serve exited"; }
    if curl -fsS -o /dev/null "${BASE_URL}/readyz" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.5
done
((ready)) || { tail -n 30 "$SERVER_LOG" >&2; die "herald serve not ready after 60 s"; }
log "herald serve ready at ${BASE_URL}"

# --- load test ------------------------------------------------------------------------
# The ceilings scenario charges the server processes' CPU time to each step.
export HERALD_LOADTEST_HERALD_PIDS="${SERVER_PID}${NOTIFY_PID:+ ${NOTIFY_PID}}"
rc=0
"$BIN/herald-loadtest" \
    --base-url "$BASE_URL" \
    --admin-token "$ADMIN_TOKEN" \
    --db-url "${PRIMARY}/${DB}" \
    --replica-db-url "${REPLICA}/${DB}" \
    "$@" || rc=$?

curl -fsS "${BASE_URL}/metrics" >"${OUT}/metrics.txt" 2>/dev/null \
    && log "Herald's /metrics at the end: ${OUT}/metrics.txt" || true
stop_server
trap - EXIT

warnings="$(grep -c -E 'WARN|ERROR' "$SERVER_LOG" || true)"
log "server log: ${warnings} WARN/ERROR lines in ${SERVER_LOG}"
if [[ "$warnings" != 0 ]]; then
    # `head` closes the pipe early: under pipefail that SIGPIPE would be the exit status.
    { grep -E 'WARN|ERROR' "$SERVER_LOG" | sed -E 's/^[^ ]+ +//' | cut -c1-200 | sort | uniq -c | sort -rn | head -n 10; } || true
fi
exit "$rc"
