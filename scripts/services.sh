#!/usr/bin/env bash
# Bring up the local services Herald's tests and demo need, idempotently:
#   - PostgreSQL primary   127.0.0.1:5432 (Debian cluster "<ver> main")
#   - PostgreSQL replica   127.0.0.1:5433 (Debian cluster "<ver> replica", streaming from the primary)
#   - RabbitMQ             127.0.0.1:5672 (guest/guest)
#   - database "herald" on the primary (and so on the replica)
#
# Safe to run any number of times, also concurrently (a lock serialises runs).
# Needs root (or the postgres user for the PostgreSQL part) on a Debian host
# with postgresql-common and rabbitmq-server installed.
set -euo pipefail

PG_VERSION="${HERALD_PG_VERSION:-$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)}"
PG_HOST=127.0.0.1
PRIMARY_CLUSTER=main
PRIMARY_PORT=5432
REPLICA_CLUSTER=replica
REPLICA_PORT=5433
RABBIT_PORT="${HERALD_RABBITMQ_PORT:-5672}"  # the node is RabbitMQ's default (RABBITMQ_NODENAME)
DB_NAME=herald
WAIT_S="${HERALD_SERVICES_WAIT_S:-120}"

export PGCONNECT_TIMEOUT=5

log() { printf '[services] %s\n' "$*"; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

[[ -n "$PG_VERSION" ]] || die "no PostgreSQL cluster configuration under /etc/postgresql"

REPLICA_DATA="/var/lib/postgresql/${PG_VERSION}/${REPLICA_CLUSTER}"
REPLICA_CONF_DIR="/etc/postgresql/${PG_VERSION}/${REPLICA_CLUSTER}"
PRIMARY_CONF_DIR="/etc/postgresql/${PG_VERSION}/${PRIMARY_CLUSTER}"

# Run a command as the postgres OS user (we are usually root).
as_postgres() {
    if [[ "$(id -un)" == postgres ]]; then
        "$@"
    else
        runuser -u postgres -- "$@"
    fi
}

# psql against one of our ports; extra arguments go to psql.
pg_query() {
    local port=$1; shift
    psql -X -q -h "$PG_HOST" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -At "$@"
}

# "online", "online,recovery", "down" or "" (no such cluster).
cluster_status() {
    pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$1" '$1 == v && $2 == c { print $4 }'
}

cluster_exists() { [[ -n "$(cluster_status "$1")" ]]; }

cluster_log_tail() {
    local f="/var/log/postgresql/postgresql-${PG_VERSION}-$1.log"
    if [[ -r "$f" ]]; then
        log "last lines of $f:"
        tail -n 20 "$f" | sed 's/^/    /' >&2
    fi
}

# wait_until SECONDS DESCRIPTION CMD...: retry CMD once a second until it succeeds.
wait_until() {
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${timeout}s waiting for ${what}"
            return 1
        fi
        sleep 1
    done
}

# Serialise concurrent runs (test.sh and demo.sh may start together). Daemons we
# start get "9>&-" so they do not inherit, and keep holding, this lock.
LOCK_FILE=/run/lock/herald-services.lock
[[ -d /run/lock && -w /run/lock ]] || LOCK_FILE="${TMPDIR:-/tmp}/herald-services.lock"
exec 9>"$LOCK_FILE"
if ! flock -n 9; then
    log "another services.sh run holds $LOCK_FILE; waiting"
    flock -w "$WAIT_S" 9 || die "could not take $LOCK_FILE within ${WAIT_S}s"
fi

# ---------------------------------------------------------------- PostgreSQL primary

ensure_primary_running() {
    local status
    status="$(cluster_status "$PRIMARY_CLUSTER")"
    [[ -n "$status" ]] || die "PostgreSQL cluster ${PG_VERSION}/${PRIMARY_CLUSTER} does not exist (pg_lsclusters)"
    if [[ "$status" == online* ]] && pg_isready -q -h "$PG_HOST" -p "$PRIMARY_PORT"; then
        log "postgres primary ${PG_VERSION}/${PRIMARY_CLUSTER} is up on ${PG_HOST}:${PRIMARY_PORT}"
        return
    fi
    if [[ "$status" != online* ]]; then
        log "postgres primary is ${status}; starting: pg_ctlcluster ${PG_VERSION} ${PRIMARY_CLUSTER} start"
        if ! pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PRIMARY_CLUSTER" start 9>&-; then
            cluster_log_tail "$PRIMARY_CLUSTER"
            die "could not start the PostgreSQL primary"
        fi
    fi
    log "waiting for the primary to accept connections on ${PG_HOST}:${PRIMARY_PORT}"
    wait_until "$WAIT_S" "the primary" pg_isready -q -h "$PG_HOST" -p "$PRIMARY_PORT" \
        || { cluster_log_tail "$PRIMARY_CLUSTER"; die "the PostgreSQL primary did not become ready"; }
    log "postgres primary is up"
}

# Trust rules for replication and local connections, placed first (pg_hba is first-match).
HBA_BEGIN='# BEGIN herald (managed by scripts/services.sh; keep above other rules)'
HBA_END='# END herald'
HBA_RULES='local   replication  all                    trust
host    replication  all     127.0.0.1/32   trust
host    replication  all     ::1/128        trust
local   all          all                    trust
host    all          all     127.0.0.1/32   trust
host    all          all     ::1/128        trust'

# ensure_hba FILE: make FILE start with our block. Returns 0 if changed, 1 if already fine.
ensure_hba() {
    local file=$1 wanted current
    [[ -f "$file" ]] || die "$file not found"
    wanted="$(printf '%s\n%s\n%s' "$HBA_BEGIN" "$HBA_RULES" "$HBA_END")"
    current="$(head -n "$(printf '%s\n' "$wanted" | wc -l)" "$file")"
    if [[ "$current" == "$wanted" ]]; then
        return 1
    fi
    local tmp
    tmp="$(mktemp)"
    {
        printf '%s\n' "$wanted"
        # Drop any older copy of our block; keep every other rule after ours.
        awk -v b="$HBA_BEGIN" -v e="$HBA_END" '
            $0 == b { skip = 1; next }
            skip && $0 == e { skip = 0; next }
            !skip { print }' "$file"
    } >"$tmp"
    cp "$file" "${file}.herald-bak" || die "cannot back up $file"
    # Overwrite in place so owner and mode stay as they were.
    cat "$tmp" >"$file" || die "cannot write $file"
    rm -f "$tmp"
    return 0
}

ensure_primary_hba() {
    local hba="${PRIMARY_CONF_DIR}/pg_hba.conf"
    if ensure_hba "$hba"; then
        log "added replication/local trust rules at the top of $hba (backup: ${hba}.herald-bak); reloading the primary"
        pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PRIMARY_CLUSTER" reload
    else
        log "$hba already trusts local replication"
    fi
    local errors
    errors="$(pg_query "$PRIMARY_PORT" -c "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL")"
    [[ -z "$errors" ]] || die "pg_hba.conf of the primary has errors: $errors"
}

check_primary_wal_settings() {
    local wal_level senders
    wal_level="$(pg_query "$PRIMARY_PORT" -c 'SHOW wal_level')"
    senders="$(pg_query "$PRIMARY_PORT" -c 'SHOW max_wal_senders')"
    case "$wal_level" in
        replica | logical) ;;
        *) die "primary has wal_level=${wal_level}; set wal_level = replica in ${PRIMARY_CONF_DIR}/conf.d/ and restart it" ;;
    esac
    # pg_basebackup -X stream needs two senders, the running replica one more.
    ((senders >= 3)) || die "primary has max_wal_senders=${senders}; need at least 3 (set it in ${PRIMARY_CONF_DIR}/conf.d/ and restart it)"
    log "primary wal_level=${wal_level} max_wal_senders=${senders}: ok for streaming replication"
}

ensure_database() {
    if [[ "$(pg_query "$PRIMARY_PORT" -c "SELECT 1 FROM pg_database WHERE datname = '${DB_NAME}'")" == 1 ]]; then
        log "database ${DB_NAME} exists on the primary"
    else
        log "creating database ${DB_NAME} on the primary"
        createdb -h "$PG_HOST" -p "$PRIMARY_PORT" -U postgres "$DB_NAME"
    fi
}

# ---------------------------------------------------------------- PostgreSQL replica

# Write the replica's conf.d file and pg_hba.conf. Returns 0 if either changed, 1 if not.
write_replica_conf() {
    local conf="${REPLICA_CONF_DIR}/conf.d/90-herald-replica.conf"
    local setting value content changed=1
    content="# Managed by scripts/services.sh: streaming replica of ${PG_VERSION}/${PRIMARY_CLUSTER}.
port = ${REPLICA_PORT}
listen_addresses = '${PG_HOST}'
hot_standby = on
# No feedback: with it the primary keeps every row version the standby's oldest
# snapshot might see (as of its last report, up to 10 s old), and dispatch's index
# scans walk the dead versions of every job transition made since (about 500 a second
# under load). Herald's replica reads take milliseconds; a conflicting one makes replay
# wait (up to the delay below), it is not cancelled, and a read whose write has not
# been replayed yet goes to the primary anyway.
hot_standby_feedback = off
wal_receiver_status_interval = 1s
max_standby_streaming_delay = 30s
max_standby_archive_delay = 30s
# A hot standby refuses to start if these are lower than on the primary."
    for setting in max_connections max_worker_processes max_wal_senders max_prepared_transactions max_locks_per_transaction; do
        value="$(pg_query "$PRIMARY_PORT" -c "SELECT setting FROM pg_settings WHERE name = '${setting}'")" || true
        [[ -n "$value" ]] || die "could not read ${setting} from the primary"
        content+=$'\n'"${setting} = ${value}"
    done
    mkdir -p "${REPLICA_CONF_DIR}/conf.d"
    if [[ "$(cat "$conf" 2>/dev/null || true)" != "$content" ]]; then
        printf '%s\n' "$content" >"$conf"
        chown postgres:postgres "${REPLICA_CONF_DIR}/conf.d" "$conf"
        changed=0
    fi
    if ensure_hba "${REPLICA_CONF_DIR}/pg_hba.conf"; then
        changed=0
    fi
    return "$changed"
}

drop_replica() {
    log "dropping cluster ${PG_VERSION}/${REPLICA_CLUSTER}: pg_dropcluster --stop"
    pg_dropcluster --stop "$PG_VERSION" "$REPLICA_CLUSTER" || true
    # pg_dropcluster leaves the data directory behind if the config was broken.
    rm -rf "$REPLICA_DATA" "$REPLICA_CONF_DIR"
}

create_replica() {
    log "creating cluster ${PG_VERSION}/${REPLICA_CLUSTER} on port ${REPLICA_PORT}"
    pg_createcluster "$PG_VERSION" "$REPLICA_CLUSTER" -p "$REPLICA_PORT" >/dev/null
    write_replica_conf || true
    log "replacing its data directory with a base backup of the primary (pg_basebackup -R -X stream)"
    find "$REPLICA_DATA" -mindepth 1 -delete
    as_postgres pg_basebackup -h "$PG_HOST" -p "$PRIMARY_PORT" -U postgres \
        -D "$REPLICA_DATA" -R -X stream -c fast
    [[ -f "${REPLICA_DATA}/standby.signal" ]] || die "pg_basebackup -R wrote no standby.signal"
}

start_replica() {
    log "starting the replica: pg_ctlcluster ${PG_VERSION} ${REPLICA_CLUSTER} start"
    if ! pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$REPLICA_CLUSTER" start 9>&-; then
        cluster_log_tail "$REPLICA_CLUSTER"
        return 1
    fi
}

replica_in_recovery() { [[ "$(pg_query "$REPLICA_PORT" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" == t ]]; }
replica_streaming() { [[ "$(pg_query "$REPLICA_PORT" -c 'SELECT status FROM pg_stat_wal_receiver' 2>/dev/null)" == streaming ]]; }

# Returns 0 when the replica is up, in recovery and streaming; 1 when it should be recreated.
bring_up_replica() {
    local status
    status="$(cluster_status "$REPLICA_CLUSTER")"
    if [[ "$status" != online* ]]; then
        start_replica || return 1
    else
        log "replica ${PG_VERSION}/${REPLICA_CLUSTER} is ${status}"
        if write_replica_conf; then
            log "replica settings changed; reloading it (restart-only settings apply at its next start)"
            pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$REPLICA_CLUSTER" reload
        fi
    fi
    log "waiting for the replica on ${PG_HOST}:${REPLICA_PORT} to accept read-only connections"
    if ! wait_until "$WAIT_S" "the replica to accept connections" pg_query "$REPLICA_PORT" -c 'SELECT 1'; then
        cluster_log_tail "$REPLICA_CLUSTER"
        return 1
    fi
    if ! replica_in_recovery; then
        log "the cluster on port ${REPLICA_PORT} is not in recovery (not a standby)"
        return 1
    fi
    if ! wait_until 30 "the replica's WAL receiver to stream" replica_streaming; then
        cluster_log_tail "$REPLICA_CLUSTER"
        return 1
    fi
}

ensure_replica() {
    if ! cluster_exists "$REPLICA_CLUSTER"; then
        if [[ -e "$REPLICA_CONF_DIR" || -e "$REPLICA_DATA" ]]; then
            log "leftovers of a broken replica cluster found; removing them"
            rm -rf "$REPLICA_DATA" "$REPLICA_CONF_DIR"
        fi
        create_replica
    fi
    if bring_up_replica; then
        return
    fi
    log "the replica is unusable; recreating it from a fresh base backup"
    drop_replica
    create_replica
    bring_up_replica || die "the recreated replica did not come up in recovery and streaming"
}

replica_replayed() { [[ "$(pg_query "$REPLICA_PORT" -c "SELECT pg_last_wal_replay_lsn() >= '$1'::pg_lsn")" == t ]]; }

# Wait until the replica has replayed everything the primary had written when we asked.
wait_replica_caught_up() {
    local lsn
    lsn="$(pg_query "$PRIMARY_PORT" -c 'SELECT pg_current_wal_lsn()')"
    wait_until 60 "the replica to replay up to ${lsn}" replica_replayed "$lsn" \
        || die "the replica did not catch up with the primary"
    log "replica has replayed the primary's WAL up to ${lsn}"
}

# ---------------------------------------------------------------- RabbitMQ

rabbit_port_open() { timeout 2 bash -c ": </dev/tcp/${PG_HOST}/${RABBIT_PORT}" 2>/dev/null; }
rabbit_ready() { rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1 && rabbit_port_open; }

ensure_rabbitmq() {
    if rabbit_ready; then
        log "rabbitmq is up on ${PG_HOST}:${RABBIT_PORT}"
        return
    fi
    if rabbitmqctl -q ping >/dev/null 2>&1; then
        # The Erlang node runs but the broker app does not (booting, or stop_app).
        log "rabbitmq node is running but the broker is not ready; waiting for it"
        if ! wait_until 20 "rabbitmq to finish booting" rabbit_ready; then
            log "starting the rabbitmq app: rabbitmqctl start_app"
            rabbitmqctl -q start_app 9>&- || true
        fi
    else
        log "rabbitmq is down; starting it: rabbitmq-server -detached"
        rabbitmq-server -detached 9>&-
    fi
    log "waiting for rabbitmq (rabbitmqctl await_startup, up to ${WAIT_S}s)"
    wait_until "$WAIT_S" "rabbitmq" rabbit_ready || die "rabbitmq did not start; see /var/log/rabbitmq/"
    log "rabbitmq is up"
}

# ---------------------------------------------------------------- main

ensure_primary_running
ensure_rabbitmq
ensure_primary_hba
check_primary_wal_settings
ensure_replica
ensure_database
wait_replica_caught_up

log "ready: postgres primary ${PG_HOST}:${PRIMARY_PORT} (database ${DB_NAME}), replica ${PG_HOST}:${REPLICA_PORT} (in recovery, streaming), rabbitmq ${PG_HOST}:${RABBIT_PORT}"
