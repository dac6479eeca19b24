#!/usr/bin/env bash
# Session 8: Siamese DETR's losses after the matching as a second CUDA graph (and the matching
# cost computed inside the dense part's graph), on a GPU (bench/GPU_RUN.md). One device call
# of at most about 5.3 minutes; carry .gpu/whl. Steps are ordered by what matters most and
# each writes its own file, so a call cut short still leaves the first ones. Dry run on a CPU:
#   OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next4.sh
source bench/gpu_env.sh
SMALL=${EXTRA:+--batch 2 --size 64x96 --warmup 1 --steps 1}  # a CPU dry run: small
{
  echo "== 0: real CUDA graphs of the Siamese steps (dense part + losses) against eager"
  timeout 90 python -m pytest -q -x -p no:cacheprovider -m gpu -k "pretrain" \
    tests/unit/engine/test_cuda_graphs.py; echo "0 rc=$?"
  echo "== 1: graphed steps at the per-GPU paper batch, losses graph on and off"
  timeout 110 $B --no-hf --no-pretrain-2x --graphed --losses-ab --augment-on-device \
    --channels-last --batch 8 --size 480x480 --warmup 3 --steps 5 --variants detr,conditional \
    --out "$OUT/b8.json" $SMALL
  echo "1 rc=$?"
  echo "== 2: where the time goes (phases), DETR at batch 8"
  timeout 45 python bench/bench_phases.py --variant detr --batch 8 --size 480x480 \
    --out "$OUT/phases_detr_b8.json" ${EXTRA:+--device cpu --small --warmup 1 --steps 1 \
    --batch 2 --size 64x96}
  echo "2 rc=$?"
  echo "== 3: batch 2 at 800x1088, Deformable and DETR"
  timeout 70 $B --no-hf --no-pretrain-2x --graphed --losses-ab --quick \
    --variants deformable,detr --out "$OUT/b2.json" $SMALL
  echo "3 rc=$?"
} 2>&1 | grep -v "UserWarning\|return Variable\|USDT\|gpuGetDevice" | tee "$OUT/next4.log"
python bench/targets.py "$OUT" | tee "$OUT/targets.txt"  # issue 13's verdicts
