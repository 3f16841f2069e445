#!/usr/bin/env bash
# Benchmark: the reference interpreter (`edgec run`) on a Llama forward pass at SmolLM2-135M's
# size (random weights), batch 1, T=32, against onnxruntime on the same model and inputs.
#
# Usage: benches/interp_llama135m.sh      env: RUNS (default 3), NO_ORT=1 to skip onnxruntime
#
# The model is generated once into data/bench/llama135m/ by models/make_tiny_models.py
# --llama-135m (regenerated when that script changes). Prints a Markdown table: medians over
# RUNS runs; "interpreter" is what `edgec run` reports on stderr (Interpreter::new + run),
# wall time covers the whole command (process start, load, passes, interpreter, .npy writes).
# onnxruntime runs in one process per optimization level with 1 intra/inter-op thread; its
# "interpreter" column is the median InferenceSession.run, "load" the session creation.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${RUNS:-3}"
DIR="$REPO/data/bench/llama135m"
GEN="$REPO/models/make_tiny_models.py"
PY="$REPO/.venv/bin/python"
EDGEC="$REPO/target/release/edgec"

"$REPO/scripts/python-env.sh"

# -- model (cached; the stamp is the generator's hash) -------------------------------------
stamp="$(sha256sum "$GEN" | cut -d' ' -f1) seq=32"
if [[ ! -f "$DIR/model.onnx" || ! -f "$DIR/model.onnx.data" || ! -f "$DIR/inputs/position_ids.npy" \
      || "$(cat "$DIR/.stamp" 2>/dev/null)" != "$stamp" ]]; then
    echo "generating $DIR ..." >&2
    rm -f "$DIR/.stamp"
    "$PY" "$GEN" --llama-135m "$DIR" --seq 32 >&2
    echo "$stamp" >"$DIR/.stamp"
fi
params="$(sed -n 's/.*"parameters": \([0-9]*\).*/\1/p' "$DIR/model.json")"
seq="$(sed -n 's/.*"seq": \([0-9]*\).*/\1/p' "$DIR/model.json")"

# -- edgec ---------------------------------------------------------------------------------
(cd "$REPO" && cargo build --release -p edgec --quiet)

TMP="$(mktemp -d /tmp/edgec-bench-llama135m.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
inputs=()
for name in input_ids attention_mask position_ids; do inputs+=(-i "$name=$DIR/inputs/$name.npy"); done
TIME=()
[[ -x /usr/bin/time ]] && TIME=(/usr/bin/time -v -o "$TMP/time")

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
max_rss_mb() { [[ -f "$TMP/time" ]] && awk -F': ' '/Maximum resident set size/ { printf "%.0f\n", $2 / 1024 }' "$TMP/time"; }

: >"$TMP/edgec.wall"; : >"$TMP/edgec.load"; : >"$TMP/edgec.interp"; : >"$TMP/edgec.rss"
for ((i = 1; i <= RUNS; i++)); do
    t0=$(date +%s%N)
    "${TIME[@]}" "$EDGEC" run "$DIR/model.onnx" "${inputs[@]}" --output-dir "$TMP/edgec" >/dev/null 2>"$TMP/stderr" \
        || { cat "$TMP/stderr" >&2; exit 1; }
    t1=$(date +%s%N)
    echo "$(( (t1 - t0) / 1000000 ))" >>"$TMP/edgec.wall"
    read -r load interp < <(sed -n 's/.*load+passes \([0-9.]*\) ms, interpreter \([0-9.]*\) ms.*/\1 \2/p' "$TMP/stderr") \
        || { echo "no timing line from edgec run:" >&2; cat "$TMP/stderr" >&2; exit 1; }
    echo "$load" >>"$TMP/edgec.load"; echo "$interp" >>"$TMP/edgec.interp"
    max_rss_mb >>"$TMP/edgec.rss" || true
    echo "edgec run $i/$RUNS: wall $(tail -1 "$TMP/edgec.wall") ms, load+passes $load ms, interpreter $interp ms" >&2
done

# -- onnxruntime peer ----------------------------------------------------------------------
ort_row() {  # LEVEL: runs onnxruntime in its own process, prints "load run diff" in ms / abs
    rm -f "$TMP/time"
    t0=$(date +%s%N)
    "${TIME[@]}" "$PY" - "$1" "$DIR" "$TMP/edgec/logits.npy" "$RUNS" >"$TMP/ort.out" <<'PY'
import sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort

level, d, edgec_logits, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
opts = ort.SessionOptions()
opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
t0 = time.perf_counter()
sess = ort.InferenceSession(str(d / "model.onnx"), opts, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t0
feeds = {i.name: np.load(d / "inputs" / f"{i.name}.npy") for i in sess.get_inputs()}
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    (logits,) = sess.run(["logits"], feeds)
    times.append(time.perf_counter() - t0)
diff = np.abs(logits - np.load(edgec_logits)).max()
print(f"{load * 1e3:.1f} {np.median(times) * 1e3:.1f} {diff:.3g} {np.abs(logits).max():.3g}")
PY
    t1=$(date +%s%N)
    read -r o_load o_run o_diff o_absmax <"$TMP/ort.out"
    echo "$(( (t1 - t0) / 1000000 )) $o_load $o_run $o_diff $o_absmax $(max_rss_mb || echo -)"
}

fmt_rss() { [[ "$1" == "-" || -z "$1" ]] && echo "-" || echo "$1 MB"; }
echo
echo "Llama forward, SmolLM2-135M shape ($params parameters, random weights), batch 1, T=$seq;" \
     "medians of $RUNS runs on $(nproc) CPUs ($(uname -m))."
echo
echo "| engine | parameters | T | wall, whole command | load (+passes / session) | interpreter / run | peak RSS | max \|logits - edgec\| |"
echo "|---|---|---|---|---|---|---|---|"
rss="$(sort -g "$TMP/edgec.rss" | tail -1)"  # max over runs
echo "| edgec reference interpreter | $params | $seq | $(median <"$TMP/edgec.wall") ms | $(median <"$TMP/edgec.load") ms" \
     "| **$(median <"$TMP/edgec.interp") ms** | $(fmt_rss "$rss") | 0 |"
if [[ "${NO_ORT:-}" != 1 ]]; then
    for level in ORT_DISABLE_ALL ORT_ENABLE_ALL; do
        ort_row "$level" >"$TMP/row"
        read -r wall o_load o_run o_diff o_absmax o_rss <"$TMP/row"
        label="onnxruntime $("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)') $level, 1 thread"
        [[ "$level" == ORT_ENABLE_ALL ]] && label="$label (default)"
        echo "| $label | $params | $seq | $wall ms | $o_load ms | $o_run ms | $(fmt_rss "$o_rss") | $o_diff |"
    done
    echo
    echo "onnxruntime wall time includes Python start-up and $RUNS in-process runs; logits max |x| = $o_absmax."
fi
