#!/usr/bin/env bash
# Int4 on SmolLM2-135M with sensitive layers at higher precision (README "Sensitive layers"): for
# each row, compile with its flags, then held-out perplexity (first WINDOWS windows of 512 tokens of
# data/models/eval/heldout.txt; WINDOWS=0: all 29), KL divergence and top-1 agreement against the
# fp32 build, as a Markdown table. Rows with --calibrate / --method gptq take 1-3 min each to
# compile (4096 tokens: ~7 min). The gptq-lm8* rows were measured before GPTQ's defaults became act-order with damping
# 0.1, so they name the old rounding (gptq:damp=0.01:row-order); gptq-d01-ao* rows are the default.
# Artifacts and the fp32 perplexity are cached in data/quant: delete it after a compiler change.
# README's row gptq-lm8-fl8-gauto14 (the scan ranking GPTQ's errors) was measured with
# commit 92b8abb, since reverted, and is not reproduced here.
# Usage: benches/quant-keep.sh [ROW ...]   (ROW: a label below; default: all)
# Needs models/make-smollm2.sh to have run (scripts/run-default.sh does). WINDOWS=8 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS="${WINDOWS:-8}"
M=data/models/smollm2-135m
T=data/models/eval/train.txt
OUT=data/quant
mkdir -p "$OUT"
cargo build --release -q
FL="--keep layers.0.=int8 --keep layers.29.=int8"
# llama.cpp's Q4_K_M rule (use_more_bits): v_proj and down_proj at more bits in the first and last
# eighth of the blocks and every third block between (SmolLM2: blocks 0-2, 5, 8, ..., 26-29).
MORE=""
for i in 0 1 2 5 8 11 14 17 20 23 26 27 28 29; do
    MORE+=" --keep layers.$i.self_attn.v_proj=int8 --keep layers.$i.mlp.down_proj=int8"
done
declare -A flags=(
    [fp32]=""
    [int4]="--quantize int4"
    [int4-auto7]="--quantize int4 --auto-keep 7 --calibrate $T"
    [int4-firstlast8]="--quantize int4 $FL"
    [int4-lmhead8]="--quantize int4 --keep lm_head=int8"
    [int4-lmhead32]="--quantize int4 --keep-fp32 lm_head"
    [int4-lm8-first14]="--quantize int4 --keep lm_head=int8 --keep layers.0.=int8 --keep layers.1.=int8"
    [int4-lm8-firstlast8]="--quantize int4 --keep lm_head=int8 $FL"
    [int4-lm8-auto14]="--quantize int4 --keep lm_head=int8 --auto-keep 14 --calibrate $T"
    [int4-lm8-auto2.7MB]="--quantize int4 --keep lm_head=int8 --auto-keep 2.69MB --calibrate $T"
    [int4-lm8-fl8-auto14]="--quantize int4 --keep lm_head=int8 $FL --auto-keep 14 --calibrate $T"
    [int4-lm8-ends2]="--quantize int4 --keep lm_head=int8 $FL --keep layers.1.=int8 --keep layers.28.=int8"
    [int4-lm8-fl8-auto2.7MB]="--quantize int4 --keep lm_head=int8 $FL --auto-keep 2.69MB --calibrate $T"
    [gptq-lm8]="--quantize int4 --method gptq:damp=0.01:row-order --keep lm_head=int8 --calibrate $T"
    [gptq-lm8-fl8]="--quantize int4 --method gptq:damp=0.01:row-order --keep lm_head=int8 $FL --calibrate $T"
    [gptq-lm8-fl8-auto14]="--quantize int4 --method gptq:damp=0.01:row-order --keep lm_head=int8 $FL --auto-keep 14 --calibrate $T"
    [gptq-lm8-fl8-auto2.7MB]="--quantize int4 --method gptq:damp=0.01:row-order --keep lm_head=int8 $FL --auto-keep 2.69MB --calibrate $T"
    [gptq-lm8-fl8-auto5.4MB]="--quantize int4 --method gptq:damp=0.01:row-order --keep lm_head=int8 $FL --auto-keep 5.4MB --calibrate $T"
    [gptq-d01-lm8]="--quantize int4 --method gptq:damp=0.1:row-order --keep lm_head=int8 --calibrate $T"
    [gptq-ao-lm8]="--quantize int4 --method gptq:damp=0.01:act-order --keep lm_head=int8 --calibrate $T"
    [gptq-d01-ao-lm8]="--quantize int4 --method gptq:damp=0.1:act-order --keep lm_head=int8 --calibrate $T"
    [gptq-d01-ao]="--quantize int4 --method gptq:damp=0.1:act-order --calibrate $T"
    [gptq-d01-ao-lm8-fl8-auto2.7MB]="--quantize int4 --method gptq:damp=0.1:act-order --keep lm_head=int8 $FL --auto-keep 2.69MB --calibrate $T"
    [gptq-d01-ao-2048]="--quantize int4 --method gptq --calibrate $T --calib-tokens 2048"
    [gptq-d01-ao-lm8-fl8]="--quantize int4 --method gptq --keep lm_head=int8 $FL --calibrate $T"
    [int4-lm8-v8]="--quantize int4 --keep lm_head=int8 --keep v_proj=int8"
    [int4-sens]="--quantize int4 --keep-sensitive"
    [gptq-sens]="--quantize int4 --method gptq --keep-sensitive --calibrate $T"
    [int4-lm8-more8]="--quantize int4 --keep lm_head=int8$MORE"
    [gptq-lm8-fl8-4096]="--quantize int4 --method gptq:damp=0.01:row-order --keep lm_head=int8 $FL --calibrate $T --calib-tokens 4096"
)
order=(fp32 int4 int4-auto7 int4-firstlast8 int4-lmhead8 int4-lmhead32 int4-lm8-first14 int4-lm8-firstlast8
    int4-lm8-auto14 int4-lm8-auto2.7MB int4-lm8-fl8-auto14 int4-lm8-ends2 int4-lm8-fl8-auto2.7MB gptq-lm8 gptq-lm8-fl8
    gptq-lm8-fl8-auto14 gptq-lm8-fl8-auto2.7MB gptq-lm8-fl8-auto5.4MB gptq-lm8-fl8-4096 gptq-d01-lm8 gptq-ao-lm8
    gptq-d01-ao-lm8 gptq-d01-ao gptq-d01-ao-lm8-fl8-auto2.7MB gptq-d01-ao-2048 gptq-d01-ao-lm8-fl8
    int4-lm8-v8 int4-lm8-more8 int4-sens gptq-sens)
rows=("$@")
[[ ${#rows[@]} -gt 0 ]] || rows=("${order[@]}")
compile() { # LABEL
    local f="$OUT/$1.edgec"
    [[ -f "$f" ]] && return
    # shellcheck disable=SC2086
    target/release/edgec compile "$M/decoder_with_past.onnx" --target host --max-seq 1024 ${flags[$1]} \
        --report "$OUT/$1.json" -o "$f" > "$OUT/$1.compile.txt"
}
compile fp32
fp32_ppl=$(cat "$OUT/fp32-w$WINDOWS.ppl" 2>/dev/null || true)
echo "| row | flags | artifact MB | perplexity | vs fp32 | KL (nats) | top-1 |"
echo "|---|---|--:|--:|--:|--:|--:|"
for r in fp32 "${rows[@]}"; do
    [[ "$r" == fp32 && -n "$fp32_ppl" ]] && continue
    compile "$r"
    ref=()
    [[ "$r" == fp32 ]] || ref=(--reference "$OUT/fp32.edgec")
    out=$(target/release/edgec eval "$OUT/$r.edgec" --text data/models/eval/heldout.txt --ctx 512 \
        --max-windows "$WINDOWS" "${ref[@]}" 2>/dev/null)
    ppl=$(awk '/^perplexity/ {print $2}' <<< "$out")
    kl=$(awk '/^mean KL/ {print $4}' <<< "$out")
    top1=$(awk '/^top-1/ {print $3}' <<< "$out")
    [[ -n "$fp32_ppl" ]] || { fp32_ppl=$ppl; echo "$ppl" > "$OUT/fp32-w$WINDOWS.ppl"; }
    awk -v r="$r" -v f="${flags[$r]}" -v s="$(stat -c %s "$OUT/$r.edgec")" -v p="$ppl" -v b="$fp32_ppl" \
        -v kl="${kl:--}" -v t="${top1:--}" \
        'BEGIN { printf "| %s | `%s` | %.1f | %.3f | %+.1f %% | %s | %s |\n", r, f, s/1e6, p, 100*(p/b-1), kl, t == "-" ? "-" : t " %" }'
done
