#!/usr/bin/env bash
# The project's whole check, as CI runs it (.ci/run execs this):
#   services (PostgreSQL primary + replica, RabbitMQ), rustfmt, clippy, then the
#   test suite under cargo-nextest in two passes: everything but the tests that
#   restart the shared RabbitMQ, then those alone, one at a time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

step "services"
bash scripts/services.sh

export HERALD_TEST_DATABASE_URL="${HERALD_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export HERALD_TEST_REPLICA_URL="${HERALD_TEST_REPLICA_URL:-postgres://postgres@127.0.0.1:5433/postgres}"
export HERALD_TEST_AMQP_URL="${HERALD_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/herald-target}"

# Drop test databases (herald_test_*) left behind by earlier runs that were killed.
# Only those older than HERALD_TEST_DB_MAX_AGE_MIN minutes (default 60), so that a
# test run going on at the same time on this machine keeps its own.
max_age="${HERALD_TEST_DB_MAX_AGE_MIN:-60}"
[[ "$max_age" =~ ^[0-9]+$ ]] || { echo "HERALD_TEST_DB_MAX_AGE_MIN must be a number of minutes" >&2; exit 2; }
step "dropping leftover herald_test_* databases older than ${max_age} min"
if old_dbs="$(psql -X -At -v ON_ERROR_STOP=1 "$HERALD_TEST_DATABASE_URL" -c "
        SELECT datname FROM pg_database
        WHERE datname LIKE 'herald\_test\_%'
          AND (pg_stat_file('base/' || oid || '/PG_VERSION')).modification
              < now() - make_interval(mins => ${max_age})")"; then
    while IFS= read -r db; do
        [[ -n "$db" ]] || continue
        echo "dropping database ${db}"
        # psql interpolates :"db" (quoted identifier) only in input it reads, not in -c.
        psql -X -q -v ON_ERROR_STOP=1 -v db="$db" "$HERALD_TEST_DATABASE_URL" \
            <<<'DROP DATABASE IF EXISTS :"db" WITH (FORCE);' \
            || echo "warning: could not drop ${db}" >&2
    done <<<"$old_dbs"
else
    echo "warning: could not list old test databases (needs a superuser); carrying on" >&2
fi

# Pinned third-party verifiers (standardwebhooks, jsonschema) in /var/tmp/herald-venv.
# The tests that use them run this again and fail with its message if it cannot install.
step "python test tools (scripts/python-deps.sh)"
bash scripts/python-deps.sh || echo "warning: python-deps.sh failed; the webhook signature and schema tests will fail" >&2

step "test dependencies: promtool (prometheus), chromium and chromedriver"
bash scripts/prometheus-deps.sh
bash scripts/browser-deps.sh

step "promtool check rules / test rules (config/prometheus)"
(cd config/prometheus && promtool check rules alerts.yml && promtool test rules alerts_test.yml)

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Totals of both nextest passes, read from the JUnit report of the "ci" profile
# (.config/nextest.toml). Nextest writes it under the workspace root's target/,
# whatever CARGO_TARGET_DIR says.
JUNIT="${ROOT}/target/nextest/ci/junit.xml"
total_passed=0
total_failed=0
reported=1
failed_passes=()

# run_pass NAME NEXTEST-ARGS...: one cargo nextest pass; never exits, records the outcome.
run_pass() {
    local name=$1 rc=0 tag tests failures errors
    shift
    step "cargo nextest run --workspace --profile ci $*"
    rm -f "$JUNIT"
    cargo nextest run --workspace --profile ci "$@" || rc=$?
    if ((rc != 0)); then
        failed_passes+=("${name} (exit ${rc})")
    fi
    tag="$(grep -o '<testsuites [^>]*>' "$JUNIT" 2>/dev/null | head -n 1 || true)"
    if [[ -z "$tag" ]]; then
        # No report: the build failed, or nextest ran nothing.
        ((rc == 0)) || reported=0
        return 0
    fi
    tests="$(sed -n 's/.* tests="\([0-9]*\)".*/\1/p' <<<"$tag")"
    failures="$(sed -n 's/.* failures="\([0-9]*\)".*/\1/p' <<<"$tag")"
    errors="$(sed -n 's/.* errors="\([0-9]*\)".*/\1/p' <<<"$tag")"
    total_failed=$((total_failed + ${failures:-0} + ${errors:-0}))
    total_passed=$((total_passed + ${tests:-0} - ${failures:-0} - ${errors:-0}))
}

run_pass "main" -E 'not test(broker_restart)'

# Schemathesis against the real server (org token, then admin token): zero 5xx, zero
# responses outside the OpenAPI description, zero panics. Before anything restarts
# the shared services.
fuzz_rc=0
step "scripts/fuzz.sh"
bash scripts/fuzz.sh || fuzz_rc=$?
if ((fuzz_rc != 0)); then
    failed_passes+=("fuzz (exit ${fuzz_rc})")
fi
# These tests stop and start the shared RabbitMQ, so they run alone, one at a time.
run_pass "broker_restart" -E 'test(broker_restart)' --test-threads 1 --no-tests=pass

# Make sure the broker is back whatever those tests left behind.
bash scripts/services.sh >/dev/null || echo "warning: services.sh failed after the broker_restart pass" >&2

# Last and alone: the short chaos scenario restarts the shared RabbitMQ and PostgreSQL
# (primary once, replica stop/start) and kills Herald processes; it leaves the services
# running (its guard and run.sh's trap run scripts/services.sh). docs/RELIABILITY.md.
if [[ "${HERALD_TEST_SKIP_CHAOS:-0}" != 1 ]]; then
    step "chaos (short): loadtest/run.sh --scenario chaos --duration-s 45"
    if ! HERALD_LOADTEST_PROFILE=debug HERALD_LOADTEST_DB=herald_chaos timeout 300 \
        bash loadtest/run.sh --scenario chaos --duration-s 45 --drain-s 60 --heal-timeout-s 60 \
            --jobs-per-s 3 --jobs-per-build 3 --job-min-ms 50 --job-max-ms 300 --kills 10; then
        failed_passes+=("chaos")
    fi
    bash scripts/services.sh >/dev/null || echo "warning: services.sh failed after the chaos step" >&2
fi

echo
if ((${#failed_passes[@]} > 0)); then
    echo "failed nextest passes: ${failed_passes[*]}"
fi
if ((reported)); then
    echo "herald: ${total_passed} passed, ${total_failed} failed"
else
    echo "herald: a nextest pass failed before reporting results (build error?)"
fi
((${#failed_passes[@]} == 0))
