#!/usr/bin/env bash
# Benchmark: the block-sparse f32 matmul kernel (`--sparse always`) against the dense one
# (`--sparse off`) on pruned weights at SmolLM2-135M's MLP shapes, x[M,576] @ W[576,1536] and
# x[M,1536] @ W[1536,576], M = 1 (decode) and 32 (prefill), for 2:4 and 50-95 % unstructured
# magnitude pruning of Gaussian weights. Each artifact's output is checked against numpy first
# (relative 1e-5); then `edgec bench` at 1 thread, the two kernels alternating, 3 rounds.
#
# Usage: benches/sparse.sh   (writes target/bench/sparse.md and .json; models in data/bench/sparse)
# The table's bytes column is what `--sparse auto` decides on (layout::SPARSE_MAX_BYTES_RATIO).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/python-env.sh"
(cd "$REPO" && cargo build --release -p edgec --quiet)
exec "$REPO/.venv/bin/python" "$REPO/benches/sparse.py" --edgec "$REPO/target/release/edgec" \
    --data "$REPO/data/bench/sparse" --out "$REPO/target/bench/sparse.md" "$@"
