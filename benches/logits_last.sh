#!/usr/bin/env bash
# SmolLM2-135M prefill tok/s with `edgec compile --logits all` (logits at every prompt position)
# vs `--logits last` (the lm_head on the last position only), fp32 and w4a8: a prompt of
# PROMPT_TOKENS tokens of held-out text, `edgec generate -n 1`, the four builds run alternately
# ROUNDS times, medians. A benchmark, not a test.
#
#   benches/logits_last.sh    env: ROUNDS (default 5), PROMPT_TOKENS (382), THREADS (1),
#                             OUT (artifact folder, default data/bench)
set -euo pipefail
cd "$(dirname "$0")/.."
models/make-smollm2.sh --no-check
cargo build --release -p edgec
edgec="${CARGO_TARGET_DIR:-target}/release/edgec"
out="${OUT:-data/bench}"
mkdir -p "$out"
src=data/models/smollm2-135m/decoder_with_past.onnx
builds=()
for q in fp32 w4a8; do
  for l in all last; do
    art="$out/smollm2-135m-$q-logits-$l.edgec"
    if [[ ! -f "$art" || "$art" -ot "$edgec" ]]; then
      quant=()
      [[ $q == fp32 ]] || quant=(--quantize "$q")
      "$edgec" compile "$src" --target host --max-seq 512 "${quant[@]}" --logits "$l" -o "$art" >/dev/null
    fi
    builds+=("$q:$l:$art")
  done
done
prompt="$(.venv/bin/python - "${PROMPT_TOKENS:-382}" <<'PY'
import sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file("data/models/smollm2-135m/tokenizer.json")
print(tok.decode(tok.encode(open("data/models/eval/heldout.txt").read()).ids[:int(sys.argv[1])]))
PY
)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for round in $(seq "${ROUNDS:-5}"); do
  for b in "${builds[@]}"; do
    IFS=: read -r q l art <<<"$b"
    line=$("$edgec" generate "$art" --prompt "$prompt" -n 1 --ignore-eos --threads "${THREADS:-1}" | grep '^prompt: ')
    echo "round $round $q --logits $l: $line" >&2
    echo "$q $l $line" >>"$log"
  done
done
.venv/bin/python - "$log" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    q, l, rest = line.split(" ", 2)
    m = re.search(r"prompt: (\d+) tokens in [0-9.]+ s \(([0-9.]+) tok/s\)", rest)
    rows.setdefault((q, l), []).append((int(m.group(1)), float(m.group(2))))
print("| build | prompt tokens | prefill tok/s (median) | runs | vs --logits all |")
print("|---|--:|--:|--:|--:|")
for q in ["fp32", "w4a8"]:
    base = statistics.median(r[1] for r in rows[(q, "all")])
    for l in ["all", "last"]:
        rs = rows[(q, l)]
        med = statistics.median(r[1] for r in rs)
        runs = ", ".join(f"{r[1]:.1f}" for r in rs)
        print(f"| {q} --logits {l} | {rs[0][0]} | {med:.1f} | {runs} | {med / base:.2f}x |")
PY
