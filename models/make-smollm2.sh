#!/usr/bin/env bash
# SmolLM2-135M-Instruct -> data/models/smollm2-135m/ (ONNX graphs, tokenizer.json, config.json) and
# data/models/eval/ (evaluation text). Sets up $REPO/.venv (scripts/python-env.sh), adds the model
# tooling of models/requirements-smollm2.txt (once; a stamp holds the requirements' hash), then runs
# models/smollm2.py with the given arguments (--help lists them). Cached: a re-run with nothing
# changed takes about a second. See models/README.md.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
REQ="$REPO/models/requirements-smollm2.txt"
STAMP="$VENV/.requirements-smollm2.sha256"

"$REPO/scripts/python-env.sh"
HASH="$(cat "$REQ" "$REPO/scripts/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$HASH" ]]; then
    echo "make-smollm2.sh: installing models/requirements-smollm2.txt into .venv" >&2
    log="$(mktemp)"
    trap 'rm -f "$log"' EXIT
    # -c keeps numpy/onnx/onnxruntime at the versions scripts/requirements.txt pins.
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$REQ" -c "$REPO/scripts/requirements.txt" >"$log" 2>&1; then
        echo "make-smollm2.sh: pip install failed (log below)" >&2
        cat "$log" >&2
        exit 1
    fi
    echo "$HASH" >"$STAMP"
fi
exec "$VENV/bin/python" "$REPO/models/smollm2.py" "$@"
