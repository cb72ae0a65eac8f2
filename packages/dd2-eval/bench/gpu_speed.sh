#!/usr/bin/env bash
# Issue 16's one-step speed check on one CUDA GPU, from the repository root (<= 10 minutes):
#   OUT=/tmp/dd2-speed bash packages/dd2-eval/bench/gpu_speed.sh
# For each size (LlamaGen-L, VAR-d16; random weights, no checkpoint) one `dd2-eval bench --random-init` process
# times, at batch 1 and 64, bf16: the one-step pipeline eager and on its fast path (compiled generator + channels-last
# decoder, CUDA graphs) against the teacher's AR sampler eager and compiled, with and without decoding; then
# speed_targets.py prints the issue's targets next to the measured numbers.
# Results in $OUT: <size>/bench.json (rewritten after every measurement, so a run cut short keeps its numbers),
# <size>/bench.png, <size>.log, targets.json.
# Environment: SIZES (default "llamagen-l var-d16"), T_LLAMAGEN_L / T_VAR_D16 (timeouts, s), DEVICE (cuda),
# BACKEND (inductor), DTYPE (bfloat16), BENCH_ARGS (extra bench options, e.g. --decode-only to skip the
# generator-alone timings). A CPU dry run of every step:
#   SIZES="tiny-llamagen tiny-var" DEVICE=cpu BACKEND=aot_eager BENCH_ARGS="--throughput-batch 4" bash ...
set -uo pipefail
OUT=${OUT:-/tmp/dd2-speed}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
  . packages/dd2-train/bench/gpu_env.sh
else
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/packages/dd2-core/src:$PWD/packages/dd2-teachers/src
  export PYTHONUNBUFFERED=1
fi
export PYTHONPATH=$PYTHONPATH:$PWD/packages/dd2-eval/src
python3 -c "import numpy, tqdm, pydantic, safetensors, einops, PIL" || echo "missing a dd2-eval dependency: put its wheel in ./.whl"
# dd2-eval finds the teacher through the `dd2.teachers` entry point; sources on PYTHONPATH have no package metadata,
# so when dd2-teachers is not installed, a minimal dist-info declares the entry point
EP=/tmp/dd2-speed-ep
python3 - "$EP" <<'PY'
import sys
from importlib.metadata import entry_points
from pathlib import Path
if not [ep for ep in entry_points(group="dd2.teachers") if ep.name == "load"]:
    info = Path(sys.argv[1]) / "dd2_teachers-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dd2-teachers\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[dd2.teachers]\nload = dd2_teachers.registry:load_teacher\n")
    print("registered the dd2.teachers entry point in", info)
PY
export PYTHONPATH=$PYTHONPATH:$EP

reports=()
for size in ${SIZES:-llamagen-l var-d16}; do
  case $size in
    llamagen-l) limit=${T_LLAMAGEN_L:-340} ;;
    var-d16) limit=${T_VAR_D16:-190} ;;
    *) limit=${T_OTHER:-300} ;;
  esac
  echo "== $size (timeout $limit s)"
  # the AR sampler takes seconds per call eagerly: fewer calls of it; CUDA graphs record in the 2nd warm-up call
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m dd2_eval.cli bench --random-init "$size" --device "$DEVICE" --dtype "${DTYPE:-bfloat16}" \
    --compile-backend "${BACKEND:-inductor}" --latency-batch 1 --throughput-batch 64 --warmup 3 --repeats 20 \
    --teacher-warmup 1 --teacher-repeats 2 --out "$OUT/$size" ${BENCH_ARGS:-} >"$OUT/$size.log" 2>&1
  echo "bench exit $? (124 = timed out; bench.json keeps what was measured)"
  grep -E "batch [0-9]+: |Error|error" "$OUT/$size.log" | cut -c1-200 | tail -20
  reports+=("$size=$OUT/$size/bench.json")
done
echo "== targets"
python3 packages/dd2-eval/bench/speed_targets.py "${reports[@]}" --out "$OUT/targets.json"
