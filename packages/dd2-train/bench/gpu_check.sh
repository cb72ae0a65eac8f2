#!/usr/bin/env bash
# dd2-train's GPU check, from the repository root of a machine with one CUDA GPU:
#   1. bench/csd_step.py: one LlamaGen-L-sized csd step (random weights, ZeRO-2, bf16, largest micro-batch) -> JSON
#   2. the real launch path on CUDA/NCCL: `deepspeed --num_gpus 1 run.py` through every stage on a toy teacher,
#      ZeRO-2 and ZeRO-3 (sharded teacher, activation checkpointing), bf16
# Environment: SKIP_BENCH=1 skips 1; ZEROS="2" picks the toy runs; TOY_EXTRA="--set ..." adds overrides to ZeRO-2's.
# Wheels for missing packages (deepspeed, pydantic, webdataset, ...) are installed from ./.whl when it exists.
# Results go to $OUT (default /tmp/dd2-gpu-check): csd_step.json, bench.log, toy_zero{2,3}.log.
set -uo pipefail
OUT=${OUT:-/tmp/dd2-gpu-check}
mkdir -p "$OUT"
. packages/dd2-train/bench/gpu_env.sh

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== csd step bench"
  timeout "${BENCH_TIMEOUT:-330}" python3 packages/dd2-train/bench/csd_step.py --out "$OUT/csd_step.json" "$@" 2>"$OUT/bench.log"
  echo "bench exit $?"; tail -5 "$OUT/bench.log"
fi

echo "== toy pipeline through deepspeed --num_gpus 1"
TOY=/tmp/dd2-toy
rm -rf "$TOY"
python3 - "$TOY" <<'EOF'
import sys, torch, yaml
from pathlib import Path
from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig
from dd2_train.data import write_shard
root = Path(sys.argv[1])
ToyTeacher(ToyTeacherConfig(codebook_size=8, token_dim=2, num_tokens=4, num_classes=3, dim=32, depth=2, heads=2)).save(root / "teacher")
g = torch.Generator().manual_seed(0)
for j in range(2):
    write_shard(root / "codes" / f"shard-{j:06d}.tar", torch.randint(8, (64, 4), generator=g), torch.randint(3, (64,), generator=g), {"num_tokens": 4, "vocab_size": 8, "num_classes": 3})
cfg = {"run_dir": str(root / "run"), "stage": ["adapt", "gen-data", "gts", "csd", "align", "export"],
       "teacher": {"family": "toy", "size": "toy", "ckpt": str(root / "teacher")}, "head": {"width": 64, "depth": 2},
       "adapt": {"steps": 4, "batch_size": 32, "data": {"shards": str(root / "codes"), "num_workers": 1}},
       "gen_data": {"num_samples": 1024, "shard_size": 128, "batch_size": 128},
       "gts": {"steps": 20, "head_only_steps": 5, "batch_size": 64, "grad_accum": 2, "optim": {"lr": 1e-3, "warmup_steps": 5}},
       "csd": {"steps": 10, "batch_size": 64, "grad_accum": 2, "guidance_updates": 2},
       "align": {"steps": 4, "batch_size": 64}, "checkpoint": {"every": 5, "keep_last": 2}, "log": {"every": 5}}
(root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
EOF
for z in ${ZEROS:-2 3}; do
  extra="${TOY_EXTRA:-}"  # e.g. TOY_EXTRA="--set deepspeed.compile=true" (ZeRO-2 only)
  [ "$z" = 3 ] && extra="--set teacher.shard=true --set deepspeed.activation_checkpointing=true"
  # shellcheck disable=SC2086
  timeout 150 deepspeed --num_gpus 1 packages/dd2-train/run.py --config "$TOY/cfg.yaml" --set run_dir="$TOY/run$z" \
    --set deepspeed.zero_stage=$z $extra >"$OUT/toy_zero$z.log" 2>&1
  echo "toy ZeRO-$z exit $?"
  grep -E "precision|torch.compile|step 0000(04|10|20)/|exported|Error|error:" "$OUT/toy_zero$z.log" | cut -c1-220 | tail -16
  last=$z
done
python3 -c "
from dd2_core.pipeline import OneStepPipeline; import torch
p = OneStepPipeline.from_pretrained('$TOY/run$last/pipeline', device='cuda')
print('pipeline tokens', tuple(p(torch.tensor([0, 1, 2], device='cuda'), seed=0).tokens.shape))"
