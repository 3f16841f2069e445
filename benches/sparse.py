"""Block-sparse vs dense f32 matmul kernels on pruned weights (see benches/sparse.sh)."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GEN_VERSION = "sparse v1"  # bump when the generated models change


def make(d: Path, m: int, k: int, n: int, mask: str, seed: int) -> None:
    """x[m, k] @ W[k, n], W Gaussian with `mask` applied by magnitude (as `--prune` does)."""
    if (d / "version").exists() and (d / "version").read_text() == GEN_VERSION:
        return
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if mask == "2:4":
        # Per column, the two smallest |w| of every four consecutive k.
        g = np.abs(w).reshape(k // 4, 4, n)
        order = np.argsort(g, axis=1)
        drop = np.zeros_like(g, dtype=bool)
        np.put_along_axis(drop, order[:, :2, :], True, axis=1)
        w[drop.reshape(k, n)] = 0
    elif mask != "dense":
        s = float(mask)
        w[np.abs(w) < np.quantile(np.abs(w), s)] = 0
    x = rng.standard_normal((m, k)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")
    graph = helper.make_graph(
        [node],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "model.onnx")
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", x @ w)
    (d / "version").write_text(GEN_VERSION)


def sh(cmd: list) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{p.stderr}")
    return p.stdout


def auto_choice(edgec: Path, d: Path) -> str:
    """What `--sparse auto` (the default) picks for this weight."""
    out = sh([edgec, "compile", d / "model.onnx", "-o", d / "auto.edgec"])
    return "sparse" if re.search(r"^sparse ", out, re.M) else "dense"


def compile_and_check(edgec: Path, d: Path, mode: str) -> tuple[Path, int]:
    art = d / f"{mode}.edgec"
    out = sh([edgec, "compile", d / "model.onnx", "--sparse", mode, "-o", art])
    weights = int(re.search(r"weights\s+(\d+) bytes", out).group(1))
    od = d / f"out-{mode}"
    sh([edgec, "run", art, "-i", f"x={d / 'x.npy'}", "--output-dir", od, "--threads", "1"])
    y, ref = np.load(od / "y.npy"), np.load(d / "y.npy")
    err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
    if err > 1e-5:
        sys.exit(f"{d.name} --sparse {mode}: relative error {err:.2e} against numpy")
    return art, weights


def bench(edgec: Path, art: Path, d: Path, runs: int, threads: int) -> float:
    out = sh([edgec, "bench", art, "-i", f"x={d / 'x.npy'}", "--runs", runs, "--warmup", 10, "--threads", threads])
    return float(re.search(r"median ([0-9.]+) ms", out).group(1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edgec", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    shapes = [(576, 1536), (1536, 576)]
    masks = ["2:4", "0.5", "0.7", "0.8", "0.9", "0.95"]
    rows = []
    for m in [1, 32]:
        for k, n in shapes:
            for i, mask in enumerate(masks):
                d = a.data / f"m{m}_{k}x{n}_{mask.replace(':', 'of')}"
                make(d, m, k, n, mask, seed=7 + i)
                dense, dense_bytes = compile_and_check(a.edgec, d, "off")
                sparse, sparse_bytes = compile_and_check(a.edgec, d, "always")
                runs = 2000 if m == 1 else 300
                # Alternate the two kernels, `rounds` times each; the median of the medians.
                t = {"off": [], "always": []}
                for _ in range(a.rounds):
                    t["off"].append(bench(a.edgec, dense, d, runs, 1))
                    t["always"].append(bench(a.edgec, sparse, d, runs, 1))
                td, ts = float(np.median(t["off"])), float(np.median(t["always"]))
                chosen = auto_choice(a.edgec, d)
                rows.append(
                    dict(m=m, k=k, n=n, mask=mask, dense_ms=td, sparse_ms=ts, bytes_ratio=sparse_bytes / dense_bytes,
                         auto=chosen)
                )
                r = rows[-1]
                print(f"M={m} {k}x{n} {mask}: bytes {r['bytes_ratio']:.2f}, dense {td:.3f} ms, sparse {ts:.3f} ms,"
                      f" speedup {td / ts:.2f}x, auto picks {chosen}", file=sys.stderr, flush=True)
    lines = [
        "| M | K x N | pruning | sparse bytes / dense | dense ms | sparse ms | sparse speedup | `--sparse auto` |",
        "|--:|---|---|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        mask = r["mask"] if r["mask"] == "2:4" else f"{float(r['mask']) * 100:.0f} %"
        lines.append(
            f"| {r['m']} | {r['k']} x {r['n']} | {mask} | {r['bytes_ratio']:.2f} | {r['dense_ms']:.3f} |"
            f" {r['sparse_ms']:.3f} | {r['dense_ms'] / r['sparse_ms']:.2f}x | {r['auto']} |"
        )
    table = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(table)
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
