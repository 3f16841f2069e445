#!/usr/bin/env bash
# Benchmark: edgec-generated native code vs onnxruntime on the same models and inputs, one run.
#
# Usage: benches/kernels.sh
#   env: MIN_TIME (s, default 0.5) / MAX_TIME (s, default 2) / MIN_RUNS (default 20) steer the run
#        count; ONLY=REGEX restricts the models (e.g. ONLY=matmul); SHAPES=MxKxN,... replaces the
#        matmul shapes (e.g. SHAPES=128x8192x256: a K long enough to be blocked).
#
# Models: float32 MatMul at SmolLM2-135M's MLP shapes, x[M,576] @ W[576,1536] and
# x[M,1536] @ W[1536,576] for M = 1 (token decode), 32 and 128 (prefill), generated (seeded, opset 17,
# weights as initializers) into data/bench/kernels/; plus models/tiny/{llama,gpt2,bert,bert_int8,
# qdq_mlp} with their committed inputs. Per model: `edgec compile --target host` (symbolic dims
# bound to the input sizes), `edgec run` once checked against onnxruntime (rtol 1e-3, atol 1e-4),
# `edgec bench`, and onnxruntime (CPU EP, ORT_ENABLE_ALL) with 1 intra-op thread and with its
# default threading, all over the same number of runs: enough that the fastest engine runs for
# >= MIN_TIME, at least MIN_RUNS, and the slowest for at most MAX_TIME.
#
# Prints a Markdown table (also written to target/bench/kernels.md). A model edgec fails to
# compile, run or match gets a FAIL row instead of aborting; the exit status is then 1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"

"$REPO/scripts/python-env.sh"
(cd "$REPO" && cargo build --release -p edgec --quiet)

exec "$PY" "$REPO/benches/kernels.py" --edgec "$REPO/target/release/edgec" --out "$REPO/target/bench/kernels.md"
