#!/usr/bin/env bash
# (Re)generate models/tiny/ fixtures: sets up the venv, then runs make_tiny_models.py.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/python-env.sh"
exec "$REPO/.venv/bin/python" "$REPO/models/make_tiny_models.py" "$@"
