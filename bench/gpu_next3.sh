#!/usr/bin/env bash
# Session 7's changes for the graphed pretraining step, on a GPU (bench/GPU_RUN.md): folded
# frozen batch norms (model.backbone.fold_frozen_bn, against *_unfolded rows in the same
# process), the per-image matching cost blocks and the views rendered on the device. One device
# call of at most 9.7 minutes (usually about 5); carry .gpu/whl and .gpu/loaderdata. Dry run
# on a CPU:
#   OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next3.sh
source bench/gpu_env.sh
SMALL=${EXTRA:+--batch 2 --size 64x96 --warmup 1 --steps 1}  # a CPU dry run: small
{
  echo "== 0: every GPU test (engine.cuda_graphs against eager training with folded batch norms"
  echo "   inside captures, device augmentation and rendered views, Triton, pinned batches)"
  timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests; echo "0 rc=$?"
  echo "== 1: graphed steps (folded and unfolded, channels_last), per-GPU paper batch"
  timeout 170 $B --no-hf --no-pretrain-2x --graphed --fold-ab --augment-on-device \
    --channels-last --batch 8 --size 480x480 --warmup 3 --steps 5 --variants detr,conditional \
    --out "$OUT/b8.json" $SMALL
  echo "1 rc=$?"
  echo "== 2: batch 2 at 800x1088, three detectors, transformers alongside"
  timeout 150 $B --no-pretrain-2x --graphed --fold-ab --quick --out "$OUT/b2.json" $SMALL
  echo "2 rc=$?"
  echo "== 3: where the time goes (phases), DETR at batch 8"
  timeout 70 python bench/bench_phases.py --variant detr --batch 8 --size 480x480 \
    --out "$OUT/phases_detr_b8.json" ${EXTRA:+--device cpu --small --warmup 1 --steps 1 \
    --batch 2 --size 64x96}
  echo "3 rc=$?"
  echo "== 4: loader, 4 workers, views rendered on the device (and resized in the worker)"
  loader 50 4 64; echo "4 rc=$?"
} 2>&1 | grep -v "UserWarning\|return Variable\|USDT\|gpuGetDevice" | tee "$OUT/next3.log"
python bench/targets.py "$OUT" | tee "$OUT/targets.txt"  # issue 13's verdicts
