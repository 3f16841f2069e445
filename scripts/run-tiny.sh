#!/usr/bin/env bash
# The tiny-model job (models/tiny/llama, committed): build edgec, compile the model to
# native code for this machine, run the artifact through the runtime and compare its logits with
# onnxruntime's (stored beside the model), time it, and cross-compile it for aarch64 and riscv64.
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/tiny/llama
scripts/python-env.sh
cargo build --release -p edgec
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
inputs=(-i input_ids="$model/inputs/input_ids.npy"
        -i attention_mask="$model/inputs/attention_mask.npy"
        -i position_ids="$model/inputs/position_ids.npy")
echo "== edgec compile $model/model.onnx --target host"
target/release/edgec compile "$model/model.onnx" --target host --max-batch 2 --max-seq 256 -o "$out/llama.edgec"
echo "== edgec run (native)"
target/release/edgec run "$out/llama.edgec" "${inputs[@]}" --output-dir "$out"
.venv/bin/python - "$out/logits.npy" "$model/expected/logits.npy" <<'PY'
import sys, numpy as np
got, want = np.load(sys.argv[1]), np.load(sys.argv[2])
err = np.abs(got - want).max()
print(f"logits {got.shape}: max |edgec - onnxruntime| = {err:.2e}")
sys.exit(0 if np.allclose(got, want, rtol=1e-4, atol=1e-5) else 1)
PY
echo "== edgec bench"
target/release/edgec bench "$out/llama.edgec" "${inputs[@]}" --runs 200
for t in aarch64 riscv64; do
  echo "== edgec compile --target $t"
  target/release/edgec compile "$model/model.onnx" --target "$t" --max-batch 2 --max-seq 256 -o "$out/llama-$t.edgec" | grep -E "target|code|wrote"
done
