#!/usr/bin/env bash
# The project's test command: prepares the generated ONNX conformance data
# (a Python venv with the pinned onnx wheel; cached under .venv and data/),
# installs qemu-user and the aarch64/riscv64 cross toolchains for the cross-target tests
# (scripts/setup-cross.sh; a no-op once installed), then runs every Rust test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/gen-conformance.sh
scripts/setup-cross.sh
cargo test --workspace "$@"
