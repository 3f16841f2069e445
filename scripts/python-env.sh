#!/usr/bin/env bash
# Idempotently create $REPO/.venv with the pinned packages of scripts/requirements.txt.
# A stamp holding the requirements' hash makes re-runs instant. Quiet unless it fails.
# Usage: scripts/python-env.sh   (then use "$REPO/.venv/bin/python")
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
REQ="$REPO/scripts/requirements.txt"
STAMP="$VENV/.requirements.sha256"
HASH="$(sha256sum "$REQ" | cut -d' ' -f1)"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
    exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
fail() { echo "python-env.sh: $1 (log below)" >&2; cat "$log" >&2; exit 1; }
make_venv() { rm -rf "$VENV" && python3 -m venv "$VENV" >"$log" 2>&1; }

if ! make_venv; then
    # Debian's python3 has no ensurepip until python3-venv is installed.
    [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null \
        || fail "python3 -m venv failed; on Debian install python3-venv as root"
    ver="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    { apt-get update && { apt-get install -y "python$ver-venv" || apt-get install -y python3-venv; }; } \
        >"$log" 2>&1 || fail "apt-get install python3-venv failed"
    make_venv || fail "python3 -m venv failed"
fi

"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$REQ" \
    >"$log" 2>&1 || fail "pip install failed"
echo "$HASH" >"$STAMP"
