#!/usr/bin/env bash
# Where the graphed pretraining step's time goes against the graphed fine-tuning step
# (bench/bench_phases.py): the cases issue 13's pretraining target missed in session 7. One
# device call of at most 4 minutes; nothing to carry. Dry run on a CPU:
#   OUT=/tmp/o EXTRA=--small bash bench/gpu_phases.sh
source bench/gpu_env.sh
P="python bench/bench_phases.py ${EXTRA:+--device cpu --small --warmup 1 --steps 1}"
{
  timeout 80 $P --variant detr --batch 8 --size 480x480 --out "$OUT/phases_detr_b8.json"
  echo "p1 rc=$?"
  timeout 80 $P --variant deformable --batch 2 --size 800x1088 --out "$OUT/phases_deform_b2.json"
  echo "p2 rc=$?"
  timeout 70 $P --variant detr --batch 2 --size 800x1088 --out "$OUT/phases_detr_b2.json"
  echo "p3 rc=$?"
} 2>&1 | grep -v "UserWarning\|return Variable\|USDT\|gpuGetDevice" | tee "$OUT/phases.log"
