#!/usr/bin/env bash
# The main job on the bundled default model (models/tiny/llama): build edgec,
# print its optimised IR, run it with the reference interpreter and compare the
# logits with onnxruntime's (stored beside the model).
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/tiny/llama
scripts/python-env.sh
cargo build --release -p edgec
echo "== edgec inspect $model/model.onnx --passes default (first 30 lines)"
target/release/edgec inspect "$model/model.onnx" --passes default | head -n 30
out=$(mktemp -d)
echo "== edgec run"
target/release/edgec run "$model/model.onnx" \
  -i input_ids="$model/inputs/input_ids.npy" \
  -i attention_mask="$model/inputs/attention_mask.npy" \
  -i position_ids="$model/inputs/position_ids.npy" \
  --output-dir "$out"
.venv/bin/python - "$out/logits.npy" "$model/expected/logits.npy" <<'PY'
import sys, numpy as np
got, want = np.load(sys.argv[1]), np.load(sys.argv[2])
err = np.abs(got - want).max()
print(f"logits {got.shape}: max |edgec - onnxruntime| = {err:.2e}")
sys.exit(0 if np.allclose(got, want, rtol=1e-4, atol=1e-5) else 1)
PY
rm -rf "$out"
