#!/usr/bin/env bash
# The rest of what issue 13 has not measured on a GPU (after bench/gpu_next.sh): one device
# call of at most 5 minutes. Carry .gpu/loaderdata and .gpu/whl. Dry run on a CPU:
#   OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next2.sh
source bench/gpu_env.sh
{
  echo "== 3: parity checks (deformable location gradients masked near integer pixels)"
  timeout 60 $B --only-check --out "$OUT/checks.json"; echo "3 rc=$?"
  echo "== 4: loader with augment_on=device, 4 and 12 workers (16 cores)"
  loader 50 4 64; echo "4 rc=$?"
  loader 40 12 128 | tail -4; echo "4b rc=$?"
  echo "== 5: pretraining step on augment_on=device loader output, per-GPU paper batch"
  timeout 45 $B --no-hf --no-pretrain-2x --augment-on-device --graphed --batch 8 \
    --size 480x480 --warmup 3 --steps 5 --variants detr,conditional --out "$OUT/pre8aug.json" \
    ${EXTRA:+--batch 2 --size 64x96 --warmup 1 --steps 1}  # a CPU dry run: small
  echo "5 rc=$?"
  echo "== 6: graph memory with one pool per graph (gpu_next.sh step 2 shares one pool)"
  shapes 60 --variant detr --dtype bf16 --steps 60 --pool per_graph \
    --out "$OUT/shapes_detr_per_graph.json" \
    | tail -25; echo "6 rc=$?"
} 2>&1 | tee "$OUT/next2.log"
python bench/targets.py "$OUT" | tee "$OUT/targets.txt"  # issue 13's verdicts
