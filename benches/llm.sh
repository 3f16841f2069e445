#!/usr/bin/env bash
# SmolLM2-135M prefill/decode tok/s: edgec vs onnxruntime vs llama.cpp (benches/llm.py), with 1 and
# 2 threads, peak RSS and the machine's memory-bandwidth bound, as one Markdown table
# (target/bench/llm.md). A benchmark, not a test. The edgec builds compute logits for the last
# position only (`--logits last`), as llama.cpp does (logits_all=False); onnxruntime runs the ONNX
# as exported, with logits at every prompt position.
#
#   benches/llm.sh            env: NO_LLAMA=1 skips llama.cpp, REPEAT (default 3), QUANT (edgec
#                             --quantize schemes timed too; default "int4 w4a8 w8a8", "" for none;
#                             SCHEME+FLAG+FLAG adds compile flags, e.g. w4a8+--keep-sensitive)
#
# llama.cpp comes from PyPI llama-cpp-python (builds llama.cpp from source, ~8.5 min on 2 cores
# the first time) in its own cached venv, data/bench/venv-llamacpp; the GGUF is the one
# models/make-smollm2.sh downloaded, requantized to F32 and Q4_0 with llama.cpp's own tool.
set -euo pipefail
cd "$(dirname "$0")/.."
models/make-smollm2.sh --no-check
cargo build --release -p edgec
art=data/bench/smollm2-135m.edgec
mkdir -p data/bench
if [[ ! -f "$art" || "$art" -ot target/release/edgec ]]; then
  target/release/edgec compile data/models/smollm2-135m/decoder_with_past.onnx --target host --max-seq 512 \
    --logits last -o "$art"
fi
args=(--artifact "$art" --repeat "${REPEAT:-3}")
# Quantized builds of the same decoder (QUANT="" skips them).
for q in ${QUANT-int4 w4a8 w8a8}; do
  qa=data/bench/smollm2-135m-$(tr -c 'A-Za-z0-9.\n' '_' <<< "$q").edgec
  IFS=+ read -r -a flags <<< "$q"
  if [[ ! -f "$qa" || "$qa" -ot target/release/edgec ]]; then
    target/release/edgec compile data/models/smollm2-135m/decoder_with_past.onnx --target host --max-seq 512 \
      --logits last --quantize "${flags[0]}" "${flags[@]:1}" -o "$qa"
  fi
  args+=(--edgec-extra "$q=$qa")
done
if [[ -z "${NO_LLAMA:-}" ]]; then
  venv=data/bench/venv-llamacpp
  # Built for this CPU (-march=native) but without AMX: on a Xeon with AMX (this VM's, 2026-12)
  # llama.cpp's AMX kernels segfault on the first Q4_0 matmul (llama.cpp issue 20824); its
  # AVX-512/VNNI kernels run instead. The flags are recorded so a venv built otherwise is rebuilt.
  build_flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null ||
    [[ "$(cat "$venv/edgec-build-flags" 2>/dev/null)" != "$build_flags" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    echo "building llama-cpp-python (llama.cpp from source, several minutes) ..." >&2
    CMAKE_ARGS="-DCMAKE_C_FLAGS='$build_flags' -DCMAKE_CXX_FLAGS='$build_flags'" \
      "$venv/bin/pip" install -q --no-cache-dir "llama-cpp-python==0.3.36" "numpy==2.4.6"
    echo "$build_flags" > "$venv/edgec-build-flags"
  fi
  gguf=$(find data/models/download -name '*.gguf' | head -n 1)
  for q in F32 Q4_0; do
    out="data/bench/smollm2-135m-$q.gguf"
    if [[ ! -f "$out" ]]; then
      "$venv/bin/python" - "$gguf" "$out" "$q" <<'PY'
import ctypes, sys
import llama_cpp
src, dst, q = sys.argv[1:]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[q]
p.allow_requantize = True
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
sys.exit(rc)
PY
    fi
  done
  args+=(--llama-python "$venv/bin/python" --gguf-f32 data/bench/smollm2-135m-F32.gguf --gguf-q4 data/bench/smollm2-135m-Q4_0.gguf)
fi
.venv/bin/python benches/llm.py "${args[@]}"
