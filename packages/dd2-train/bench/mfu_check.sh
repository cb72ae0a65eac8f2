#!/usr/bin/env bash
# The LlamaGen-L csd-step MFU check on one CUDA GPU, eager vs the trainer's deepspeed.compile (regional
# torch.compile), with torch.profiler tables of one guidance and one generator step of each. From the repo root:
#   OUT=/tmp/mfu bash packages/dd2-train/bench/mfu_check.sh [BATCH] [BIG_BATCH]
# Results in $OUT: eager.json, compiled.json, compiled_big.json (csd_step.py reports), prof_{eager,compiled}/*.txt;
# logs in $LOGS (tails printed).
set -uo pipefail
OUT=${OUT:-/tmp/dd2-mfu}
B=${1:-128}
BIG=${2:-192}
LOGS=${LOGS:-/tmp/dd2-mfu-logs}
mkdir -p "$OUT" "$LOGS"
. packages/dd2-train/bench/gpu_env.sh
bench=packages/dd2-train/bench/csd_step.py
summary() { python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[1].split('/')[-1], 'batch', d['micro_batch'], 'round s', round(d['seconds']['csd_round'], 3),
      'gui s', round(d['seconds']['guidance_step'], 3), 'gen s', round(d['seconds']['generator_step'], 3),
      'MFU', {k: round(v, 3) for k, v in (d['mfu'] or {}).items()}, 'peak GiB', d['peak_memory_gib'],
      'compile s', d.get('compile_seconds'))" "$1" 2>&1; }
echo "== eager, micro-batch $B"
timeout "${T_EAGER:-120}" python3 $bench --batches "$B" --repeats 2 --profile "$OUT/prof_eager" --out "$OUT/eager.json" \
  >/dev/null 2>"$LOGS/eager.log"; echo "exit $?"; tail -3 "$LOGS/eager.log"; summary "$OUT/eager.json"
echo "== compiled, micro-batch $B"
timeout "${T_COMPILED:-240}" python3 $bench --batches "$B" --repeats 2 --compile --profile "$OUT/prof_compiled" \
  --out "$OUT/compiled.json" >/dev/null 2>"$LOGS/compiled.log"; echo "exit $?"; tail -3 "$LOGS/compiled.log"
summary "$OUT/compiled.json"
echo "== compiled, micro-batch $BIG"
timeout "${T_BIG:-120}" python3 $bench --batches "$BIG" --repeats 2 --compile --out "$OUT/compiled_big.json" \
  >/dev/null 2>"$LOGS/big.log"; echo "exit $?"; tail -3 "$LOGS/big.log"; summary "$OUT/compiled_big.json"
