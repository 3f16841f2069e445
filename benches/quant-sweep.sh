#!/usr/bin/env bash
# Quantization sweep on SmolLM2-135M: for each --quantize scheme, the artifact size, held-out
# perplexity (first WINDOWS windows of 512 tokens of data/models/eval/heldout.txt) and decode speed
# (median of 3 runs of 128 greedy tokens, 1 thread), as a Markdown table.
# Usage: benches/quant-sweep.sh [SCHEME ...]   (default: fp32 int8 int4 int4:g128 int4:g32:asym w8a8 w4a8)
# Needs models/make-smollm2.sh to have run (scripts/run-default.sh does). WINDOWS=8 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS="${WINDOWS:-8}"
M=data/models/smollm2-135m
OUT=data/sweep
mkdir -p "$OUT"
cargo build --release -q
schemes=("$@")
[[ ${#schemes[@]} -gt 0 ]] || schemes=(fp32 int8 int4 int4:g128 int4:g32:asym w8a8 w4a8)
rows=()
for q in "${schemes[@]}"; do
    f="$OUT/${q//:/_}.edgec"
    args=()
    [[ "$q" == fp32 ]] || args=(--quantize "$q")
    target/release/edgec compile "$M/decoder_with_past.onnx" --max-seq 1024 "${args[@]}" -o "$f" > "$f.compile.txt"
    ppl=$(target/release/edgec eval "$f" --text data/models/eval/heldout.txt --ctx 512 --max-windows "$WINDOWS" \
        --threads 2 2>/dev/null | awk '/^perplexity/ {print $2}')
    speeds=$(for _ in 1 2 3; do
        target/release/edgec generate "$f" --prompt "Once upon a time" -n 128 --ignore-eos --threads 1 2>&1 |
            sed -n 's/.*generation: .*(\([0-9.]*\) tok\/s).*/\1/p'
    done | sort -n | sed -n 2p)
    size=$(stat -c %s "$f")
    rows+=("$q|$size|$ppl|$speeds")
    echo "$q: $size bytes, perplexity $ppl, decode $speeds tok/s" >&2
done
base_size=$(echo "${rows[0]}" | cut -d'|' -f2)
base_ppl=$(echo "${rows[0]}" | cut -d'|' -f3)
base_tps=$(echo "${rows[0]}" | cut -d'|' -f4)
echo "| scheme | artifact MB | size vs ${schemes[0]} | perplexity | vs ${schemes[0]} | decode tok/s (1 thread) | vs ${schemes[0]} |"
echo "|---|--:|--:|--:|--:|--:|--:|"
for r in "${rows[@]}"; do
    IFS='|' read -r q size ppl tps <<< "$r"
    awk -v q="$q" -v s="$size" -v p="$ppl" -v t="$tps" -v bs="$base_size" -v bp="$base_ppl" -v bt="$base_tps" \
        'BEGIN { printf "| %s | %.1f | %.1f %% | %.3f | %+.1f %% | %.1f | %.2fx |\n", q, s/1e6, 100*s/bs, p, 100*(p/bp-1), t, t/bt }'
done
