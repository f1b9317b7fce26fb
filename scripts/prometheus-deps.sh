#!/usr/bin/env bash
# Installs promtool (Debian's prometheus package) for the alert rule tests
# (config/prometheus/alerts_test.yml). Idempotent: does nothing when it is there.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "prometheus-deps: promtool missing and not root; install it with apt-get install prometheus" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The package's post-install starts no service where there is no systemd.
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null
