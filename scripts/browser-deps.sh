#!/usr/bin/env bash
# Installs Debian's chromium and chromedriver for the /ops browser test
# (crates/herald/tests/ops_page.rs). Idempotent: does nothing when both are there.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "browser-deps: chromium/chromedriver missing and not root; install them with apt-get install chromium chromium-driver" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
have chromium && have chromedriver
