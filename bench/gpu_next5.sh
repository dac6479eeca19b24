#!/usr/bin/env bash
# Session 8, second call: after torchvision's GIoU loss (a host read: boolean-mask indexing)
# was replaced in the criterion, Siamese DETR's losses graph on a real GPU. About 100 s;
# carry .gpu/whl. Dry run on a CPU: OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next5.sh
source bench/gpu_env.sh
SMALL=${EXTRA:+--batch 2 --size 64x96 --warmup 1 --steps 1}
{
  echo "== 0: real graphs (dense part + losses) against eager; a failed capture's aftermath"
  timeout 40 python -m pytest -q -x -p no:cacheprovider -m gpu \
    -k "(pretrain and vanilla) or failed_capture" tests/unit/engine/test_cuda_graphs.py
  echo "0 rc=$?"
  echo "== 1: DETR bf16 at batch 8, losses graph on and off"
  timeout 65 $B --no-hf --no-pretrain-2x --graphed --losses-ab --dtypes bf16 --batch 8 \
    --size 480x480 --warmup 2 --steps 4 --variants detr --out "$OUT/b8.json" $SMALL
  echo "1 rc=$?"
} 2>&1 | grep -v "UserWarning\|return Variable\|USDT\|gpuGetDevice" | tee "$OUT/next5.log"
python bench/targets.py "$OUT" | tee "$OUT/targets.txt"
