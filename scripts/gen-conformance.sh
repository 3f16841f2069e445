#!/usr/bin/env bash
# Generate the ONNX backend *node* conformance cases from the onnx wheel's generators
# (onnx/backend/test/case/node) into $REPO/data/onnx-node/test_xxx/{model.onnx,test_data_set_0/*.pb}.
# Skipped when data/onnx-node/.complete matches the installed onnx version.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/python-env.sh"
PY="$REPO/.venv/bin/python"
OUT="$REPO/data/onnx-node"
STAMP="$OUT/.complete"
VERSION="$("$PY" -c 'import onnx; print(onnx.__version__)')"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "onnx $VERSION" ]]; then
    echo "onnx-node: $(find "$OUT" -mindepth 1 -maxdepth 1 -type d | wc -l) cases (onnx $VERSION, cached)"
    exit 0
fi

TMP="$REPO/data/.onnx-node.tmp"
rm -rf "$TMP"
mkdir -p "$TMP"
# onnx's own writer (cmd_tools.generate_data) only collects the model cases in this
# version, so point it at the node generators; it writes $TMP/node/<case>/.
"$PY" -W ignore - "$TMP" <<'PYEOF'
import argparse, sys
import onnx.backend.test.case.node as node
from onnx.backend.test import cmd_tools

cmd_tools.model_test.collect_testcases = node.collect_testcases
cmd_tools.generate_data(argparse.Namespace(output=sys.argv[1]))
PYEOF

rm -rf "$OUT"
mv "$TMP/node" "$OUT"
rm -rf "$TMP"
echo "onnx $VERSION" >"$STAMP"
echo "onnx-node: $(find "$OUT" -mindepth 1 -maxdepth 1 -type d | wc -l) cases (onnx $VERSION)"
