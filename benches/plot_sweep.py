"""Plots a quantization sweep (the CSV benches/quant-sweep.sh writes): artifact size vs perplexity
and decode tokens/s vs perplexity, one point per scheme, as one PNG.

    python benches/plot_sweep.py data/sweep/sweep.csv data/sweep/sweep.png
"""
import csv
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def short(scheme: str) -> str:
    """A scheme's flags in a few words: `int4+--method gptq --keep lm_head=int8 --calibrate F`
    becomes `int4 gptq, lm_head int8`."""
    base, _, flags = scheme.partition("+")
    flags = re.sub(r"--calibrate \S+|--calib-tokens \S+", "", flags)
    flags = re.sub(r"--method (\S+)", r"\1,", flags)
    flags = re.sub(r"--keep (\S+)=(\S+)", r"\1 \2,", flags)
    flags = re.sub(r"--keep-fp32 (\S+)", r"\1 fp32,", flags)
    flags = re.sub(r"--auto-keep (\S+)", r"scan \1,", flags)
    words = " ".join(flags.split()).rstrip(",")
    return f"{base} {words}".strip()


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    rows = list(csv.DictReader(open(src)))
    names = [short(r["scheme"]) if r["engine"] == "edgec" else f'{r["engine"]} {r["scheme"]}' for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, key, label in [(axes[0], "size_mb", "artifact size (MB)"), (axes[1], "decode_tps", "decode tokens/s (1 thread)")]:
        for i, r in enumerate(rows):
            if not r[key]:
                continue
            x, y = float(r[key]), float(r["perplexity"])
            ax.scatter(x, y, color="tab:red" if r["engine"] != "edgec" else "tab:blue")
            # Numbers on the points, names in the key below: the flags are too long to print here.
            ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].set_title("SmolLM2-135M: size vs perplexity")
    axes[1].set_title("SmolLM2-135M: speed vs perplexity")
    key = [f"{i + 1}: {n}" for i, n in enumerate(names)]
    half = (len(key) + 1) // 2
    for col, part in enumerate([key[:half], key[half:]]):
        fig.text(0.05 + 0.5 * col, 0.02, "\n".join(part), fontsize=8, va="bottom", family="monospace")
    fig.text(0.5, 0.005, "Weights arrive rounded to Q4_1 (asym 4-bit, g32): int4 asym g32 can look near-lossless.",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.028 * half, 1, 1))
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
