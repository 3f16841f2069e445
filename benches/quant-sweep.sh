#!/usr/bin/env bash
# Quantization sweep on SmolLM2-135M: for each --quantize scheme, the artifact size, held-out
# perplexity (first WINDOWS windows of 512 tokens of data/models/eval/heldout.txt) and decode speed
# (median of 3 runs of 128 greedy tokens, 1 thread), as a Markdown table, plus data/sweep/sweep.csv
# and the plot data/sweep/sweep.png (size vs perplexity, tokens/s vs perplexity; matplotlib from
# benches/requirements-plot.txt is added to .venv). When benches/llm.sh has built llama.cpp
# (data/bench/venv-llamacpp) and its F32/Q4_0 GGUFs, llama.cpp's perplexity over the same windows
# (benches/llama_ppl.py, edgec's token ids) is added as a peer row.
# Usage: benches/quant-sweep.sh [SCHEME ...]   (default: fp32 int8 int4 int4:g128 int4:g32:asym w8a8 w4a8)
# Each SCHEME is a --quantize value, or fp32, optionally followed by extra compile flags after a
# `+`, e.g. 'int4+--keep lm_head=int8'. Needs models/make-smollm2.sh (scripts/run-default.sh
# runs it). WINDOWS=8 by default.
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
for spec in "${schemes[@]}"; do
    q="${spec%%+*}"
    extra=()
    [[ "$spec" == *+* ]] && read -r -a extra <<< "${spec#*+}"
    f="$OUT/$(echo "$spec" | tr -c 'A-Za-z0-9.\n' '_').edgec"
    args=("${extra[@]}")
    [[ "$q" == fp32 ]] || args+=(--quantize "$q")
    q="$spec"
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
# The CSV and plot, with llama.cpp's perplexity on the same windows as a peer when it is built.
csv="$OUT/sweep.csv"
echo "engine,scheme,size_mb,perplexity,decode_tps" > "$csv"
for r in "${rows[@]}"; do
    IFS='|' read -r q size ppl tps <<< "$r"
    echo "edgec,\"$q\",$(awk -v s="$size" 'BEGIN { printf "%.1f", s/1e6 }'),$ppl,$tps" >> "$csv"
done
llama=data/bench/venv-llamacpp/bin/python
if [[ -x "$llama" && -f data/bench/smollm2-135m-Q4_0.gguf ]]; then
    .venv/bin/python -c "
from tokenizers import Tokenizer
t = Tokenizer.from_file('$M/tokenizer.json')
print(' '.join(map(str, t.encode(open('data/models/eval/heldout.txt').read(), add_special_tokens=False).ids)))" > "$OUT/heldout.ids"
    for q in F32 Q4_0; do
        g=data/bench/smollm2-135m-$q.gguf
        ppl=$("$llama" benches/llama_ppl.py "$g" "$OUT/heldout.ids" --ctx 512 --max-windows "$WINDOWS" 2>/dev/null |
            awk '/^perplexity/ {print $2}')
        echo "llama.cpp,$q,$(awk -v s="$(stat -c %s "$g")" 'BEGIN { printf "%.1f", s/1e6 }'),$ppl," >> "$csv"
        awk -v q="$q" -v p="$ppl" -v bp="$base_ppl" -v s="$(stat -c %s "$g")" \
            'BEGIN { printf "| llama.cpp %s (GGUF) | %.1f | | %.3f | %+.1f %% | | |\n", q, s/1e6, p, 100*(p/bp-1) }'
    done
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-input -r benches/requirements-plot.txt \
    -c scripts/requirements.txt
.venv/bin/python benches/plot_sweep.py "$csv" "$OUT/sweep.png"
echo "wrote $csv and $OUT/sweep.png" >&2
