"""Plots a quantization sweep (the CSV benches/quant-sweep.sh writes): artifact size vs perplexity
and decode tokens/s vs perplexity, one point per scheme, as one PNG.

    python benches/plot_sweep.py data/sweep/sweep.csv data/sweep/sweep.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    rows = list(csv.DictReader(open(src)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in [(axes[0], "size_mb", "artifact size (MB)"), (axes[1], "decode_tps", "decode tokens/s (1 thread)")]:
        for r in rows:
            if not r[key]:
                continue
            x, y = float(r[key]), float(r["perplexity"])
            ax.scatter(x, y, color="tab:red" if r["engine"] != "edgec" else "tab:blue")
            ax.annotate(r["scheme"] if r["engine"] == "edgec" else f'{r["engine"]} {r["scheme"]}', (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].set_title("SmolLM2-135M: size vs perplexity")
    axes[1].set_title("SmolLM2-135M: speed vs perplexity")
    fig.text(0.5, 0.01, "Weights arrive rounded to Q4_1 (asym 4-bit, g32): int4 asym g32 can look near-lossless.",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
