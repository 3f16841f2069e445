#!/usr/bin/env bash
# Cross-target proof for SmolLM2: compile decoder_with_past.onnx with --emit obj for x86_64 and
# aarch64, link each into tests/harness/lm_generate.c (a C greedy-decoding loop), run the x86_64
# program natively and the aarch64 one under qemu-user, the latter twice: with the KV cache in the
# program's swapped buffers and kept in the arena (--kv-in-arena: NULL past/present pointers, what a
# device does), and check all produce the same tokens for the ChatML prompt "What is the capital
# of France?".
#
# Usage: models/check-smollm2-qemu.sh [N_NEW]   (needs models/make-smollm2.sh and scripts/setup-cross.sh)
#   env: FLAGS (extra `edgec compile` flags for both builds, e.g. "--quantize w4a8"), X86_FLAGS and
#        AARCH64_FLAGS (for one build only). With int8 activations give x86 fma (X86_FLAGS="--cpu
#        x86-64-v3", as aarch64 always has): baseline x86's multiply-then-add rounds differently,
#        an activation can then land on the other side of an int8 rounding boundary, and greedy
#        SmolLM2 w4a8 parts from aarch64's text at the 8th token.
set -euo pipefail
cd "$(dirname "$0")/.."
n_new="${1:-8}"
src=data/models/smollm2-135m
work=data/models/qemu-check
mkdir -p "$work"
scripts/setup-cross.sh >/dev/null
cargo build --release -p edgec
ids=$(.venv/bin/python - <<'PY'
from tokenizers import Tokenizer
t = Tokenizer.from_file("data/models/smollm2-135m/tokenizer.json")
print(" ".join(map(str, t.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").ids)))
PY
)
declare -A out
for arch in x86_64 aarch64; do
  obj="$work/smol-$arch.o"
  extra=(${FLAGS:-})
  if [[ $arch == aarch64 ]]; then extra+=(${AARCH64_FLAGS:-}); else extra+=(${X86_FLAGS:-}); fi
  target/release/edgec compile "$src/decoder_with_past.onnx" --target "$arch" --max-seq 64 --emit obj \
    --weights-file --tokenizer none "${extra[@]}" -o "$obj" | grep -E "^(target|code|time)"
  cc=gcc; run=()
  if [[ $arch == aarch64 ]]; then cc=aarch64-linux-gnu-gcc; run=(qemu-aarch64 -L /usr/aarch64-linux-gnu); fi
  "$cc" -std=c99 -O2 -Wall -Wextra -Werror -static -DMODEL_HEADER="\"$PWD/${obj%.o}.h\"" \
    -DWEIGHTS_PATH="\"$PWD/${obj%.o}.weights.bin\"" tests/harness/lm_generate.c "$obj" -o "$work/lm-$arch"
  modes=("")
  [[ $arch == aarch64 ]] && modes+=(--kv-in-arena)
  for mode in "${modes[@]}"; do
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    out[$arch$mode]=$("${run[@]}" "$work/lm-$arch" $mode 49152 3 64 "$n_new" $ids)
    echo "$arch $mode: ${out[$arch$mode]}  ($(echo "$(date +%s.%N) - $start" | bc) s)"
  done
done
text=$(.venv/bin/python -c "
from tokenizers import Tokenizer
t = Tokenizer.from_file('$src/tokenizer.json')
print(repr(t.decode([int(x) for x in '${out[aarch64]}'.split()], skip_special_tokens=False)))")
echo "aarch64 text: $text"
if [[ "${out[x86_64]}" != "${out[aarch64]}" || "${out[aarch64]}" != "${out[aarch64--kv-in-arena]}" ]]; then
  echo "MISMATCH between x86_64 and aarch64 (buffers / KV cache in the arena)" >&2; exit 1
fi
echo "x86_64 and aarch64 (qemu; KV cache in buffers and in the arena) produce the same $n_new tokens"
