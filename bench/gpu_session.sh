#!/usr/bin/env bash
# The issue-13 GPU session in one call (bench/GPU_RUN.md): each part under its own timeout,
# results written to $OUT as they come. On a CPU, for a dry run:
#   OUT=/tmp/o EXTRA="--device cpu --small" LOADER_IMAGES=8 bash bench/gpu_session.sh
source bench/gpu_env.sh
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
  python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  echo "== A: checks + batch 2 at 800x1088, ours/hf/pretrain/pretrain_2x, fp32+bf16"
  timeout 230 $B --check --profile --out "$OUT/b2.json"; echo "A rc=$?"
  echo "== B: engine.compile, batch 2"
  timeout 130 $B --no-hf --no-pretrain --compile --warmup 3 --steps 5 --variants detr,deformable \
    --out "$OUT/compile.json"; echo "B rc=$?"
  echo "== C: batch 8 at 800x1088, fp32+bf16, NCHW and channels_last backbone"
  timeout 60 $B --no-hf --no-pretrain --channels-last --batch 8 --warmup 1 --steps 4 \
    --out "$OUT/b8.json"; echo "C rc=$?"
  echo "== D: pretraining at the per-GPU paper batch, 480x480 views (loader demand)"
  timeout 40 $B --no-hf --no-pretrain-2x --batch 8 --size 480x480 --warmup 1 --steps 4 \
    --variants detr,conditional --out "$OUT/pre8.json"; echo "D rc=$?"
  timeout 25 $B --no-hf --no-pretrain-2x --batch 4 --size 480x480 --warmup 1 --steps 4 \
    --variants deformable --out "$OUT/pre4.json"; echo "D2 rc=$?"
  echo "== E: loader, 4 workers (toy data prepared with EdgeBoxes proposals in .gpu/loaderdata)"
  loader 60 4 48; echo "E rc=$?"
} 2>&1 | tee "$OUT/run.log"
