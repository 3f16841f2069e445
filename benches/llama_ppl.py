"""Perplexity of a GGUF model under llama.cpp (PyPI llama-cpp-python) over the same windows that
`edgec eval --ctx N --max-windows W` uses: the held-out text tokenized once without special
tokens, cut into consecutive windows of N tokens, each scored from an empty context. The token
ids come from edgec's own tokenizer (ids file written by the caller), so both engines see the
same windows. Prints `perplexity: X`.

    python llama_ppl.py MODEL.gguf IDS.txt --ctx 512 --max-windows 8 [--threads 2]
"""
import argparse
import math
import sys

import numpy as np
import llama_cpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("ids", help="whitespace-separated token ids of the whole text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ids = [int(t) for t in open(a.ids).read().split()]
    windows = [ids[i:i + a.ctx] for i in range(0, len(ids), a.ctx)]
    windows = [w for w in windows if len(w) >= 2]
    if a.max_windows:
        windows = windows[:a.max_windows]
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=a.ctx, n_batch=a.ctx, logits_all=True,
                          n_threads=a.threads, verbose=False)
    nll, count = 0.0, 0
    for i, w in enumerate(windows):
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:len(w)], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= sum(logp[p, w[p + 1]] for p in range(len(w) - 1))
        count += len(w) - 1
        print(f"\rwindow {i + 1}/{len(windows)}: perplexity so far {math.exp(nll / count):.4f}", end="",
              file=sys.stderr)
    print(file=sys.stderr)
    print(f"tokens: {len(ids)} ({len(windows)} windows of up to {a.ctx}), {count} predicted")
    print(f"perplexity: {math.exp(nll / count):.4f}")


if __name__ == "__main__":
    main()
