"""SmolLM2-135M prefill and decode speed: edgec vs onnxruntime vs llama.cpp, one run, one table.

Run through benches/llm.sh (which prepares the model, the artifact and the venvs). Each engine and
thread count runs in its own subprocess (so peak RSS is per configuration): prefill of a 64-token
prompt (tokens/s of the whole prompt pass) and greedy decode of 128 tokens (ignoring end-of-text).
Medians over REPEAT runs. edgec and onnxruntime run the same fp32 ONNX (decoder_with_past.onnx);
edgec's artifacts are built with `--logits last` (benches/llm.sh: the lm_head runs on the last
prompt position only, as llama.cpp does with logits_all=False; onnxruntime computes the exported
graph's logits at every position). llama.cpp runs the same weights as GGUF requantized to F32
(apples to apples) and to Q4_0 (what people ship). The bandwidth row divides a measured copy bandwidth by the bytes of weights read
per decoded token: an upper bound for memory-bound decode.
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "data/models/smollm2-135m"


def prompt_ids(n):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(SRC / "tokenizer.json"))
    return tok.encode((REPO / "data/models/eval/heldout.txt").read_text()).ids[:n]


def worker_ort(threads, prompt, n_new):
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(SRC / "decoder_with_past.onnx"), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    layers = sum(1 for n in names if n.endswith(".key"))
    out_names = [o.name for o in s.get_outputs()]

    def step(ids, past, kv):
        n = len(ids)
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past + n), dtype=np.int64),
            "position_ids": np.arange(past, past + n, dtype=np.int64)[None],
        }
        for l in range(layers):
            feeds[f"past_key_values.{l}.key"], feeds[f"past_key_values.{l}.value"] = kv[l]
        outs = dict(zip(out_names, s.run(None, feeds)))
        kv = [(outs[f"present.{l}.key"], outs[f"present.{l}.value"]) for l in range(layers)]
        return outs["logits"][0, -1], kv

    empty = np.zeros((1, 3, 0, 64), dtype=np.float32)
    kv = [(empty, empty)] * layers
    t0 = time.perf_counter()
    logits, kv = step(prompt, 0, kv)
    t1 = time.perf_counter()
    past = len(prompt)
    for _ in range(n_new):
        logits, kv = step([int(logits.argmax())], past, kv)
        past += 1
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_new / (t2 - t1)


def worker_llamacpp(threads, prompt, n_new, gguf):
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                logits_all=False, verbose=False)
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_new / (t2 - t1)


def run_edgec(edgec, art, threads, prompt_text, n_new):
    cmd = ["/usr/bin/time", "-f", "MAXRSS %M", str(edgec), "generate", str(art), "--prompt", prompt_text, "-n",
           str(n_new), "--threads", str(threads), "--ignore-eos"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"prompt: (\d+) tokens in [0-9.]+ s \(([0-9.]+) tok/s\); generation: (\d+) tokens in [0-9.]+ s "
                  r"\(([0-9.]+) tok/s\)", p.stdout)
    rss = int(re.search(r"MAXRSS (\d+)", p.stderr).group(1)) / 1024
    return float(m.group(2)), float(m.group(4)), rss, int(m.group(1))


def run_worker(engine, threads, prompt, n_new, extra):
    """Runs one configuration in a fresh Python process; returns (prefill, decode, peak RSS MB)."""
    arg = json.dumps(dict(engine=engine, threads=threads, prompt=prompt, n_new=n_new, extra=extra))
    py = extra.get("python", sys.executable)
    p = subprocess.run([py, __file__, "--worker", arg], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def worker_main(arg):
    a = json.loads(arg)
    if a["engine"] == "ort":
        pre, dec = worker_ort(a["threads"], a["prompt"], a["n_new"])
    else:
        pre, dec = worker_llamacpp(a["threads"], a["prompt"], a["n_new"], a["extra"]["gguf"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps([pre, dec, rss]))


def bandwidth_gbs():
    import numpy as np
    a = np.ones(64 * 1024 * 1024, dtype=np.float32)  # 256 MB
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--edgec", type=Path, default=REPO / "target/release/edgec")
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--edgec-extra", action="append", default=[], metavar="LABEL=ARTIFACT",
                    help="more edgec artifacts to time (e.g. quantized builds)")
    ap.add_argument("--llama-python", help="python of the llama-cpp-python venv")
    ap.add_argument("--gguf-f32", type=Path)
    ap.add_argument("--gguf-q4", type=Path)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "target/bench/llm.md")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(SRC / "tokenizer.json"))
    prompt = prompt_ids(64)
    prompt_text = tok.decode(prompt)
    n_new = 128
    rows = []
    configs = [("edgec (fp32)", "edgec", {})]
    for spec in args.edgec_extra:
        label, path = spec.split("=", 1)
        configs.append((f"edgec ({label})", "edgec", dict(artifact=Path(path))))
    configs.append(("onnxruntime (fp32)", "ort", {}))
    if args.llama_python:
        configs.append(("llama.cpp F32", "llama", dict(python=args.llama_python, gguf=str(args.gguf_f32))))
        configs.append(("llama.cpp Q4_0", "llama", dict(python=args.llama_python, gguf=str(args.gguf_q4))))
    for label, engine, extra in configs:
        for threads in [int(t) for t in args.threads.split(",")]:
            res = []
            for _ in range(args.repeat):
                if engine == "edgec":
                    art = extra.get("artifact", args.artifact)
                    pre, dec, rss, n = run_edgec(args.edgec, art, threads, prompt_text, n_new)
                else:
                    pre, dec, rss = run_worker(engine, threads, prompt, n_new, extra)
                res.append((pre, dec, rss))
                print(f"{label} {threads}t: prefill {pre:.1f} tok/s, decode {dec:.1f} tok/s, {rss:.0f} MB", file=sys.stderr)
            rows.append(dict(label=label, threads=threads, pre=statistics.median(r[0] for r in res),
                             dec=statistics.median(r[1] for r in res), rss=max(r[2] for r in res)))
    bw = bandwidth_gbs()
    weights_fp32 = (SRC / "weights.onnx.data").stat().st_size
    base = {r["threads"]: r for r in rows if r["label"] == "edgec (fp32)"}
    lines = [
        f"# SmolLM2-135M generation speed ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Prompt {len(prompt)} tokens (held-out text), greedy decode of {n_new} tokens, median of {args.repeat} "
        f"runs per row, each in a fresh process; load average at the end {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs. Ratios are against edgec at the same thread count (> 1: faster than edgec). "
        "edgec and llama.cpp compute the prompt's logits at its last position only, onnxruntime at every position.",
        "",
        "| engine | threads | prefill tok/s | decode tok/s | prefill vs edgec | decode vs edgec | peak RSS MB |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        b = base.get(r["threads"])
        lines.append(f"| {r['label']} | {r['threads']} | {r['pre']:.1f} | {r['dec']:.1f} | "
                     f"{r['pre'] / b['pre']:.2f} | {r['dec'] / b['dec']:.2f} | {r['rss']:.0f} |")
    lines += ["", f"Memory bandwidth (numpy copy, best of 5): {bw:.1f} GB/s. fp32 weights read per decoded token: "
              f"{weights_fp32 / 1e6:.0f} MB, so fp32 decode is bounded by ~{bw * 1e9 / weights_fp32:.1f} tok/s "
              "(the KV cache and activations add a little)."]
    if args.gguf_q4:
        q4 = args.gguf_q4.stat().st_size
        lines.append(f"Q4_0 GGUF: {q4 / 1e6:.0f} MB per token, bound ~{bw * 1e9 / q4:.0f} tok/s.")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
