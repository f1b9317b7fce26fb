#!/usr/bin/env bash
# Python tools the test suite uses to check Herald against third-party
# implementations: the official Standard Webhooks library (signature verification)
# and jsonschema (the event catalog's schemas). Installed, pinned, into a venv under
# /var/tmp/herald-venv (HERALD_VENV overrides it). Idempotent: a venv that already has
# these versions is left alone. Exits non-zero, saying why, when pip cannot install.
set -euo pipefail

VENV="${HERALD_VENV:-/var/tmp/herald-venv}"
PINS=("standardwebhooks==1.1.0" "jsonschema==4.26.0")
PYTHON="${PYTHON:-python3}"

have() {
    "$VENV/bin/python" - "$@" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
PY
}

if [[ -x "$VENV/bin/python" ]] && have "${PINS[@]}"; then
    exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV" || {
        echo "python-deps: cannot create a venv at $VENV with $PYTHON -m venv" >&2
        exit 1
    }
fi
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"; then
    echo "python-deps: pip could not install ${PINS[*]} (is PyPI reachable?)" >&2
    exit 1
fi
have "${PINS[@]}" || { echo "python-deps: installed versions do not match ${PINS[*]}" >&2; exit 1; }
