#!/usr/bin/env bash
# engine.cuda_graphs on a GPU, what issue 13 most needs measured (bench/GPU_RUN.md, "Still to
# measure"): one device call of at most 9.5 minutes (usually about 5). Carry .gpu/whl.
# bench/gpu_next2.sh has the rest. Dry run on a CPU:
#   OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next.sh
source bench/gpu_env.sh
{
  echo "== 0: engine.cuda_graphs against eager training (GPU tests), then pinned batches, Triton"
  timeout 170 python -m pytest -q -x -p no:cacheprovider -m gpu \
    tests/unit/engine/test_cuda_graphs.py; echo "0 rc=$?"
  timeout 60 python -m pytest -q -p no:cacheprovider tests/unit/data/test_pinned_batches.py \
    tests/unit/ops/test_deform_attn_triton.py; echo "0b rc=$?"
  echo "== 1: engine.cuda_graphs, fine-tuning and pretraining steps, batch 2 at 800x1088"
  timeout 150 $B --no-hf --no-pretrain-2x --graphed --warmup 3 --steps 6 \
    --out "$OUT/graphs.json"; echo "1 rc=$?"
  echo "== 2: engine.cuda_graphs on COCO-like multi-scale shapes (pad 128, 16 graphs)"
  shapes 60 --variant detr --dtype bf16 --steps 60 --out "$OUT/shapes_detr.json" \
    | tail -25; echo "2 rc=$?"
  shapes 60 --variant deformable --dtype bf16 --steps 40 --warm 16 \
    --out "$OUT/shapes_deform.json" | tail -25; echo "2b rc=$?"
  shapes 60 --task pretrain --variant detr --dtype bf16 --batch 8 --steps 40 --warm 16 \
    --out "$OUT/shapes_pretrain.json" | tail -25; echo "2c rc=$?"
} 2>&1 | tee "$OUT/next.log"
python bench/targets.py "$OUT" | tee "$OUT/targets.txt"  # issue 13's verdicts
