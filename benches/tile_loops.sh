#!/usr/bin/env bash
# The register tiles per target (`compiler/src/codegen/tiles.rs`), read from the generated code:
# compiles one matmul (x[128,576] @ W[576,1536], benches/kernels.py's model) as f32, w4a8 and int4
# for x86_64 (x86-64-v3), aarch64 (cortex-a76: SDOT; and baseline NEON, without w4a8) and riscv64
# with V (without w4a8), with
# `edgec compile --listing`, and prints each hot loop body (a block with 8 or more multiply-accumulate
# instructions): its instructions, multiply-accumulates, instructions per multiply-accumulate and
# stack accesses (spills). A count of instructions, not a speed: aarch64 and riscv64 run only
# under qemu here.
#
# Usage: benches/tile_loops.sh   (writes target/bench/tile_loops.md)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/python-env.sh
cargo build --release -p edgec --quiet
exec .venv/bin/python - "$REPO" <<'PY'
import re, subprocess, sys
from pathlib import Path
repo = Path(sys.argv[1])
sys.path.insert(0, str(repo / "benches"))
import kernels
model_dir = repo / "data" / "bench" / "kernels" / "matmul_m128_576x1536"
kernels.make_matmul(model_dir, 128, 576, 1536, seed=1004)
out_dir = repo / "target" / "bench" / "tile_loops"
out_dir.mkdir(parents=True, exist_ok=True)
edgec = repo / "target" / "release" / "edgec"
# (target, flags, whether it has integer dot-product instructions for w4a8's loops to count)
targets = [("x86_64", ["--cpu", "x86-64-v3"], True), ("aarch64", ["--cpu", "cortex-a76"], True),
           ("aarch64", [], False), ("riscv64", ["--features", "+v"], False)]
variants = [("f32", []), ("w4a8", ["--quantize", "w4a8"]), ("int4", ["--quantize", "int4"])]
mac = re.compile(r"^\s*(v?fmadd\d*ps|fmla|vfmacc\.v[vf]|sdot|v?pmaddubsw|v?pmaddwd|vwmacc\S*)\b")
stack = re.compile(r"\(%rsp\)|\[sp|\(sp\)|slot")
rows = []
for arch, tflags, dots in targets:
    for vname, vflags in variants:
        if vname == "w4a8" and not dots:
            continue  # its dot products are widening trees: nothing to count as one instruction
        art = out_dir / f"{arch}{''.join(tflags)}-{vname}.edgec"
        subprocess.run([str(edgec), "compile", str(model_dir / "model.onnx"), "--target", arch, *tflags, *vflags,
                        "--listing", "-o", str(art)], check=True, capture_output=True)
        func, block, body = None, None, []
        seen = set()
        def flush():
            if block is None:
                return
            macs = sum(bool(mac.match(l)) for l in body)
            if macs >= 8:
                key = (func, len(body), macs)
                if key not in seen:
                    seen.add(key)
                    spills = sum(bool(stack.search(l)) for l in body)
                    rows.append((f"{arch} {' '.join(tflags)}".strip(), vname, func, len(body), macs, spills))
        for line in (art.parent / (art.name + ".listing")).read_text().splitlines():
            if line.startswith("=== "):
                flush(); func, block, body = line[4:], None, []
            elif re.match(r"^block\d+:", line):
                flush(); block, body = line[:-1], []
            elif line.strip() and block is not None:
                body.append(line)
        flush()
lines = ["| target | model | function | loop instructions | multiply-accumulates | per MAC | stack accesses |",
         "|---|---|---|--:|--:|--:|--:|"]
for t, v, f, n, m, s in rows:
    lines.append(f"| {t} | {v} | {f} | {n} | {m} | {n / m:.2f} | {s} |")
text = "\n".join(lines) + "\n"
(repo / "target" / "bench" / "tile_loops.md").write_text(text)
print(text)
PY
