"""Benchmark driver for benches/kernels.sh: edgec-generated code vs onnxruntime on the same models.

Models: float32 MatMul kernels at SmolLM2-135M's MLP shapes (x[M,576] @ W[576,1536] and
x[M,1536] @ W[1536,576], M = 1 (decode), 32 and 128 (prefill); generated into
data/bench/kernels/) and the committed tiny models (models/tiny/<name>/).

Per model: `edgec compile` (codegen ms, artifact bytes), `edgec run` once to check the outputs
against onnxruntime (rtol 1e-3, atol 1e-4), `edgec bench`, and onnxruntime (CPU EP, default graph
optimizations = ORT_ENABLE_ALL) with 1 intra-op thread and with its default threading, each timed
over the same number of runs and warm-up runs. Prints a Markdown table and writes it to --out.

Usage: python benches/kernels.py --edgec target/release/edgec [--out target/bench/kernels.md]
       env: MIN_TIME (s, default 0.5), MAX_TIME (s, default 2), MIN_RUNS (default 20), ONLY (regex on model names),
            SHAPES (MxKxN,... instead of the default matmul shapes)
"""

import argparse
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
GEN_VERSION = "kernels-matmul v1"  # bump when the generated models change
MATMUL_SHAPES = [(m, k, n) for m in (1, 32, 128) for (k, n) in ((576, 1536), (1536, 576))]
# SHAPES=MxKxN,... replaces them (e.g. 128x8192x256 for a long K, where codegen blocks K).
if os.environ.get("SHAPES"):
    MATMUL_SHAPES = [tuple(int(v) for v in s.split("x")) for s in os.environ["SHAPES"].split(",")]
TINY = ["llama", "gpt2", "bert", "bert_int8", "qdq_mlp"]
RTOL, ATOL = 1e-3, 1e-4

MIN_TIME = float(os.environ.get("MIN_TIME", "0.5"))  # target seconds for the fastest engine
MAX_TIME = float(os.environ.get("MAX_TIME", "2.0"))  # cap in seconds for the slowest engine
MIN_RUNS = int(os.environ.get("MIN_RUNS", "20"))
MAX_RUNS = 200_000


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# -- models -----------------------------------------------------------------------------------


def make_matmul(d: Path, m: int, k: int, n: int, seed: int) -> None:
    """x[m,k] @ W[k,n] with W an initializer; deterministic (seeded) weights and input x.npy."""
    stamp = f"{GEN_VERSION} m={m} k={k} n={n} seed={seed}"
    if (d / ".stamp").is_file() and (d / ".stamp").read_text() == stamp \
            and (d / "model.onnx").is_file() and (d / "inputs" / "x.npy").is_file():
        return
    (d / "inputs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")],
        f"matmul_{m}x{k}x{n}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgec-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, d / "model.onnx")
    np.save(d / "inputs" / "x.npy", x)
    (d / ".stamp").write_text(stamp)


def models() -> list[dict]:
    out = []
    base = REPO / "data" / "bench" / "kernels"
    for i, (m, k, n) in enumerate(MATMUL_SHAPES):
        d = base / f"matmul_m{m}_{k}x{n}"
        make_matmul(d, m, k, n, seed=1000 + i)
        out.append(dict(name=f"matmul M={m}", dir=d, shape=f"{m}×{k} @ {k}×{n}", flops=2 * m * k * n))
    for name in TINY:
        out.append(dict(name=name, dir=REPO / "models" / "tiny" / name, shape=None, flops=None))
    return out


def load_inputs(d: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted((d / "inputs").glob("*.npy"))}


def bounds_for(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Symbolic dims of the graph inputs bound to the sizes of the given inputs."""
    m = onnx.load(model_path, load_external_data=False)
    init = {t.name for t in m.graph.initializer}
    b: dict[str, int] = {}
    for vi in m.graph.input:
        if vi.name in init:
            continue
        if vi.name not in feeds:
            raise RuntimeError(f"no input file for graph input {vi.name!r}")
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.dim_param:
                size = feeds[vi.name].shape[axis]
                if b.setdefault(dim.dim_param, size) != size:
                    raise RuntimeError(f"inconsistent sizes for symbol {dim.dim_param!r}")
    return b


def shape_of(feeds: dict[str, np.ndarray]) -> str:
    shapes = {"×".join(map(str, a.shape)) for a in feeds.values()}
    n = len(feeds)
    return ", ".join(sorted(shapes)) if len(shapes) > 1 else f"{shapes.pop()} ({n} input{'s' if n > 1 else ''})"


# -- edgec ------------------------------------------------------------------------------------


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def error_line(p: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (p.stderr + "\n" + p.stdout).splitlines() if l.strip()]
    errs = [l for l in lines if "error" in l.lower() or "panick" in l.lower()]
    return (errs[0] if errs else (lines[-1] if lines else f"exit status {p.returncode}"))[:160]


def edgec_compile(edgec: Path, model: Path, out: Path, bounds: dict[str, int]) -> dict:
    cmd = [edgec, "compile", model, "--target", "host", "-o", out]
    for k, v in bounds.items():
        cmd += ["--bound", f"{k}={v}"]
    p = sh(cmd)
    if p.returncode != 0:
        return dict(error=f"compile: {error_line(p)}")
    codegen = re.search(r"codegen ([0-9.]+) ms", p.stdout)
    target = re.search(r"^target\s+(.*)$", p.stdout, re.M)
    return dict(
        codegen_ms=float(codegen.group(1)) if codegen else None,
        bytes=out.stat().st_size,
        target=target.group(1).strip() if target else None,
    )


def input_args(d: Path) -> list[str]:
    args = []
    for p in sorted((d / "inputs").glob("*.npy")):
        args += ["-i", f"{p.stem}={p}"]
    return args


def edgec_bench(edgec: Path, art: Path, d: Path, runs: int, warmup: int, threads: int = 1) -> float:
    p = sh([edgec, "bench", art, *input_args(d), "--runs", runs, "--warmup", warmup, "--threads", threads])
    mt = re.search(r"median ([0-9.]+) ms", p.stdout)
    if p.returncode != 0 or not mt:
        raise RuntimeError(f"bench: {error_line(p)}")
    return float(mt.group(1))


def file_stem(name: str) -> str:  # as compiler/src/main.rs names output files
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in name)


def edgec_check(edgec: Path, art: Path, d: Path, outdir: Path, ref: dict[str, np.ndarray]) -> tuple[bool, str]:
    p = sh([edgec, "run", art, *input_args(d), "--output-dir", outdir])
    if p.returncode != 0:
        return False, f"run: {error_line(p)}"
    worst, worst_name = 0.0, None
    for name, want in ref.items():
        f = outdir / f"{file_stem(name)}.npy"
        if not f.is_file():
            return False, f"no output {name}"
        got = np.load(f)
        if got.shape != want.shape:
            return False, f"{name}: shape {list(got.shape)} vs ORT {list(want.shape)}"
        if not np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=RTOL, atol=ATOL):
            err = np.abs(got.astype(np.float64) - want.astype(np.float64))
            bad = int((err > ATOL + RTOL * np.abs(want)).sum())
            return False, f"{name}: max abs err {err.max():.3g}, {bad}/{want.size} elements off"
        err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0
        if err >= worst:
            worst, worst_name = err, name
    return True, f"ok ({worst:.1e})"


# -- onnxruntime ------------------------------------------------------------------------------


def ort_session(model: Path, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()  # graph_optimization_level defaults to ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = threads
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def ort_time(sess: ort.InferenceSession, feeds: dict, runs: int, warmup: int) -> float:
    """Median ms of `runs` sess.run calls (upper median, as `edgec bench`)."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


# -- main -------------------------------------------------------------------------------------


def fmt_ms(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def fmt_ratio(a, b) -> str:
    if a is None or b is None or b <= 0:
        return "–"
    r = a / b
    s = f"**{r:.2f}**" if r < 1 else f"{r:.2f}"
    return f"~{s}" if b < 0.02 else s  # edgec bench prints 1 µs resolution: imprecise below ~20 µs


def fmt_int(v) -> str:
    return "–" if v is None else f"{v:.0f}"


def gflops(flops, ms) -> str:
    return "–" if flops is None or not ms else f"{flops / (ms * 1e-3) / 1e9:.1f}"


def version_line(edgec: Path) -> str:
    git = sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = sh(["git", "-C", REPO, "status", "--porcelain", "--", "compiler", "runtime", "Cargo.lock"]).stdout.strip()
    rustc = sh(["rustc", "-V"]).stdout.strip()
    ev = sh([edgec, "-V"]).stdout.strip()
    return (f"{ev} (git {git}{'+dirty' if dirty else ''}), {rustc}, onnxruntime {ort.__version__}, "
            f"onnx {onnx.__version__}, numpy {np.__version__}, Python {platform.python_version()}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edgec", type=Path, default=REPO / "target" / "release" / "edgec")
    ap.add_argument("--out", type=Path, default=REPO / "target" / "bench" / "kernels.md")
    args = ap.parse_args()
    work = args.out.parent / "kernels"
    work.mkdir(parents=True, exist_ok=True)
    only = re.compile(os.environ.get("ONLY", ""))

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    rows, target, fails = [], None, 0
    for m in models():
        if not only.search(m["name"]):
            continue
        d, model = m["dir"], m["dir"] / "model.onnx"
        tag = re.sub(r"[^A-Za-z0-9]+", "_", m["name"]).strip("_")
        log(f"== {m['name']}")
        feeds = load_inputs(d)
        row = dict(m, shape=m["shape"] or shape_of(feeds), check="", runs=None)

        # onnxruntime: reference outputs and calibration
        try:
            s1, s2 = ort_session(model, 1), ort_session(model, None)
            names = [o.name for o in s1.get_outputs()]
            ref = dict(zip(names, s1.run(None, feeds)))
        except Exception as e:  # noqa: BLE001 -- report, go on with the next model
            row.update(check=f"**FAIL** onnxruntime: {str(e).splitlines()[0][:160]}", ort1_ms=None, ort2_ms=None)
            rows.append(row)
            fails += 1
            continue
        cal = {k: ort_time(s, feeds, 10, 3) for k, s in (("ort1", s1), ("ort2", s2))}

        # edgec: compile, check, calibrate
        art = work / f"{tag}.edgec"
        try:
            c = edgec_compile(args.edgec, model, art, bounds_for(model, feeds))
        except RuntimeError as e:
            c = dict(error=f"compile: {e}")
        row.update(c)
        target = target or c.get("target")
        if "error" not in c:
            ok, msg = edgec_check(args.edgec, art, d, work / f"{tag}.out", ref)
            row["check"] = msg if ok else f"**FAIL** {msg}"
            fails += not ok
            try:
                cal["edgec"] = max(edgec_bench(args.edgec, art, d, 20, 3), 0.0005)
            except RuntimeError as e:
                row["check"] = f"**FAIL** {e}"
                fails += 1
        else:
            row["check"] = f"**FAIL** {c['error']}"
            fails += 1

        # the same number of runs for every engine: the fastest takes >= MIN_TIME, the slowest <= MAX_TIME
        fastest, slowest = min(cal.values()) * 1e-3, max(cal.values()) * 1e-3
        runs = max(MIN_RUNS, min(math.ceil(MIN_TIME / fastest), int(MAX_TIME / slowest), MAX_RUNS))
        warmup = max(3, min(runs // 20, 100))
        row["runs"] = runs
        if "edgec" in cal:
            try:
                row["edgec_ms"] = edgec_bench(args.edgec, art, d, runs, warmup, 1)
                row["edgec2_ms"] = edgec_bench(args.edgec, art, d, runs, warmup, os.cpu_count() or 1)
            except RuntimeError as e:
                row["check"] = f"**FAIL** {e}"
        row["ort1_ms"] = ort_time(s1, feeds, runs, warmup)
        del s1
        row["ort2_ms"] = ort_time(s2, feeds, runs, warmup)
        del s2
        log(f"   {runs} runs: edgec {row.get('edgec_ms')} ms, ORT 1t {row['ort1_ms']:.4f} ms, "
            f"ORT default {row['ort2_ms']:.4f} ms; {row['check']}")
        rows.append(row)

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# edgec kernels vs onnxruntime ({now})",
        "",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs ({platform.machine()}); edgec target "
        f"`{target or 'host'}`.  ",
        f"Versions: {version_line(args.edgec)}.  ",
        f"Load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f} "
        "(other work on the machine skews the numbers, the 2-thread ones most).  ",
        "Median ms over the same number of runs (after the same warm-up) per engine; edgec is "
        "`edgec bench` (in-process `run_model`, 1 µs resolution) with `--threads 1` (1t) and one thread "
        f"per CPU (nt, {os.cpu_count()}), onnxruntime is one "
        "`InferenceSession.run` from Python (CPU EP, ORT_ENABLE_ALL) with intra_op_num_threads=1 "
        f"(1t) or its default threading (dflt, {os.cpu_count()} CPUs). ratio = ORT time / edgec time at the same threads: "
        "> 1 means edgec is faster (bold when slower; ~ when edgec's median is under 20 µs, so imprecise). GFLOP/s = 2·M·K·N / median. "
        f"Check: edgec outputs vs ORT, rtol {RTOL:g} / atol {ATOL:g} (max abs err).",
        "",
        "| model | shape | edgec 1t ms | ORT 1t ms | ratio 1t | edgec nt ms | ORT dflt ms | ratio nt "
        "| edgec 1t GFLOP/s | ORT 1t GFLOP/s | runs | compile ms | artifact bytes | check |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        e = r.get("edgec_ms")
        name = r["name"] if not r["check"].startswith("**FAIL") else f"**FAIL** {r['name']}"
        lines.append(
            f"| {name} | {r['shape']} | {fmt_ms(e)} | {fmt_ms(r['ort1_ms'])} | {fmt_ratio(r['ort1_ms'], e)} "
            f"| {fmt_ms(r.get('edgec2_ms'))} | {fmt_ms(r['ort2_ms'])} | {fmt_ratio(r['ort2_ms'], r.get('edgec2_ms'))} "
            f"| {gflops(r['flops'], e)} | {gflops(r['flops'], r['ort1_ms'])} | {r['runs'] or '–'} "
            f"| {fmt_int(r.get('codegen_ms'))} "
            f"| {r.get('bytes', '–')} | {r['check'].replace('|', '/')} |"
        )
    lines += ["", f"Total benchmark time {time.perf_counter() - t_start:.0f} s."]
    table = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table, end="")
    log(f"wrote {args.out}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
