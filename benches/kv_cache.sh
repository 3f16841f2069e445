#!/usr/bin/env bash
# What keeping the KV cache in the arena saves: SmolLM2-135M decode ms/token after prompts of
# several lengths, the same artifact run with the cache in the arena (Model::run_cached) and the
# plain way (past in, present out: the cache copied every token), alternating in one process
# (runtime/examples/kv_decode.rs). Prints a Markdown table (also target/bench/kv_cache.md).
# A benchmark, not a test.
#
#   benches/kv_cache.sh [PROMPTS] [TOKENS] [REPEAT]     (defaults 16,256,768  32  3; EDGEC_THREADS)
set -euo pipefail
cd "$(dirname "$0")/.."
models/make-smollm2.sh --no-check
cargo build --release -p edgec -p edgec-runtime --example kv_decode
art=data/bench/smollm2-135m-ctx1024.edgec
mkdir -p data/bench target/bench
if [[ ! -f "$art" || "$art" -ot target/release/edgec ]]; then
  target/release/edgec compile data/models/smollm2-135m/decoder_with_past.onnx --target host --max-seq 1024 -o "$art"
fi
target/release/examples/kv_decode "$art" "${1:-16,256,768}" "${2:-32}" "${3:-3}" | tee target/bench/kv_cache.md
