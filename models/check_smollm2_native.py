"""Compiled SmolLM2 vs onnxruntime on the same ONNX graph: logits over a 64-token prompt.

Usage (after models/make-smollm2.sh and `cargo build --release -p edgec`):
    .venv/bin/python models/check_smollm2_native.py [--target host]

Compiles data/models/smollm2-135m/model.onnx with edgec, runs it on the first 64 tokens of the
held-out text with `edgec run`, runs onnxruntime (graph optimisations off) on the same inputs, and
reports the max relative logit error (|a-b| / max|b| per position) and top-1 agreement. Exits 1
unless the error is below 1e-3 and top-1 agrees at every position.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "data/models/smollm2-135m"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="host")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    tok = Tokenizer.from_file(str(SRC / "tokenizer.json"))
    text = (REPO / "data/models/eval/heldout.txt").read_text()
    ids = np.array([tok.encode(text).ids[: args.tokens]], dtype=np.int64)
    n = ids.shape[1]
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((1, n), dtype=np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None, :],
    }
    edgec = REPO / "target/release/edgec"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        art = d / "model.edgec"
        subprocess.run([edgec, "compile", SRC / "model.onnx", "--target", args.target, "--max-seq", "256",
                        "--tokenizer", "none", "-o", art], check=True, stdout=subprocess.DEVNULL)
        cmd = [edgec, "run", art, "--output-dir", d / "out"]
        for k, v in feeds.items():
            np.save(d / f"{k}.npy", v)
            cmd += ["-i", f"{k}={d / f'{k}.npy'}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        got = np.load(d / "out/logits.npy")[0]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(SRC / "model.onnx"), so).run(["logits"], feeds)[0][0]
    rel = (np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)).max()
    top1 = (got.argmax(-1) == want.argmax(-1)).mean()
    print(f"{n} tokens: max relative logit error {rel:.2e} (max abs {np.abs(got - want).max():.2e}), "
          f"top-1 agreement {top1 * 100:.1f}%")
    sys.exit(0 if rel < 1e-3 and top1 == 1.0 else 1)


if __name__ == "__main__":
    main()
