#!/usr/bin/env bash
# The measurements issue 13 still lacks (bench/GPU_RUN.md, "Still to measure"), as one device
# call of about 5 minutes. Carry .gpu/loaderdata and .gpu/whl. Dry run on a CPU:
#   OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next.sh
source bench/gpu_env.sh
{
  echo "== 0: the GPU-only tests (pinned batches, Triton kernels on CUDA)"
  timeout 90 python -m pytest -q -p no:cacheprovider tests/unit/data/test_pinned_batches.py \
    tests/unit/ops/test_deform_attn_triton.py; echo "0 rc=$?"
  echo "== 1: parity checks (deformable location gradients now masked near integer pixels)"
  timeout 80 $B --only-check --out "$OUT/checks.json"; echo "1 rc=$?"
  echo "== 2: loader with augment_on=device, 4 and 12 workers (16 cores)"
  loader 60 4 64; echo "2 rc=$?"
  loader 45 12 128 | tail -4; echo "2b rc=$?"
  echo "== 3: pretraining step on augment_on=device loader output, per-GPU paper batch"
  timeout 45 $B --no-hf --no-pretrain-2x --augment-on-device --batch 8 --size 480x480 \
    --warmup 2 --steps 5 --variants detr,conditional --out "$OUT/pre8aug.json"; echo "3 rc=$?"
  timeout 30 $B --no-hf --no-pretrain-2x --augment-on-device --batch 4 --size 480x480 \
    --warmup 2 --steps 5 --variants deformable --out "$OUT/pre4aug.json"; echo "3b rc=$?"
  echo "== 4: engine.compile for Deformable DETR"
  timeout 110 $B --no-hf --no-pretrain --compile --warmup 3 --steps 5 --variants deformable \
    --out "$OUT/compile_deform.json"; echo "4 rc=$?"
} 2>&1 | tee "$OUT/next.log"
