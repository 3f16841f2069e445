#!/usr/bin/env bash
# The project's test command: prepares the generated ONNX conformance data
# (a Python venv with the pinned onnx wheel; cached under .venv and data/),
# then runs every Rust test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/gen-conformance.sh
cargo test --workspace "$@"
