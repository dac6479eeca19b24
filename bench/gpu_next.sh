#!/usr/bin/env bash
# The measurements issue 13 still lacks (bench/GPU_RUN.md, "Still to measure"), most
# important first, as one device call of about 7 minutes. Carry .gpu/loaderdata and .gpu/whl.
# Dry run on a CPU:
#   OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next.sh
source bench/gpu_env.sh
GS="python bench/bench_graph_shapes.py ${EXTRA:+--device cpu --small}"
{
  echo "== 0: the GPU-only tests (engine.cuda_graphs against eager; pinned batches; Triton)"
  timeout 150 python -m pytest -q -p no:cacheprovider tests/unit/engine/test_cuda_graphs.py \
    tests/unit/data/test_pinned_batches.py tests/unit/ops/test_deform_attn_triton.py
  echo "0 rc=$?"
  echo "== 1: engine.cuda_graphs, fine-tuning and pretraining steps, batch 2 at 800x1088"
  timeout 150 $B --no-hf --no-pretrain-2x --graphed --warmup 3 --steps 6 \
    --out "$OUT/graphs.json"; echo "1 rc=$?"
  echo "== 2: engine.cuda_graphs on COCO-like multi-scale shapes (pad 128, 16 graphs)"
  timeout 60 $GS --variant detr --dtype bf16 --steps 60 --out "$OUT/shapes_detr.json" \
    | tail -25; echo "2 rc=$?"
  timeout 60 $GS --variant deformable --dtype bf16 --steps 40 --warm 16 \
    --out "$OUT/shapes_deform.json" | tail -25; echo "2b rc=$?"
  echo "== 3: parity checks (deformable location gradients masked near integer pixels)"
  timeout 60 $B --only-check --out "$OUT/checks.json"; echo "3 rc=$?"
  echo "== 4: loader with augment_on=device, 4 and 12 workers (16 cores)"
  loader 50 4 64; echo "4 rc=$?"
  loader 40 12 128 | tail -4; echo "4b rc=$?"
  echo "== 5: pretraining step on augment_on=device loader output, per-GPU paper batch"
  timeout 45 $B --no-hf --no-pretrain-2x --augment-on-device --graphed --batch 8 \
    --size 480x480 --warmup 3 --steps 5 --variants detr,conditional --out "$OUT/pre8aug.json"
  echo "5 rc=$?"
} 2>&1 | tee "$OUT/next.log"
