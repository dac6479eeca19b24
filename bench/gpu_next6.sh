#!/usr/bin/env bash
# The device call after gpu_next5.sh (bench/GPU_RUN.md): what the 15 minutes of one session
# could not hold. At most 8.5 minutes (usually about 6); carry .gpu/whl; timeout_s=540.
# Dry run on a CPU:
#   OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next6.sh
source bench/gpu_env.sh
SMALL=${EXTRA:+--batch 2 --size 64x96 --warmup 1 --steps 1}  # a CPU dry run: small
{
  echo "== 0a: cuDNN's fused convolutions against the unfused trunk (their rows need it)"
  timeout 30 python -m pytest -q -p no:cacheprovider -m gpu -k fused \
    tests/unit/models/test_backbone.py
  rc=$?; echo "0a rc=$rc"
  if [ "$rc" = 0 ] || [ -n "$EXTRA" ]; then FUSED=--fused-conv; else FUSED=; fi
  echo "== 1: the Triton deformable-attention kernels at an encoder's size (pretraining: two"
  echo "   views of two images at 800x1088), launch settings swept, bf16 then fp32"
  deform 50 --batch 4 --size 800x1088 --dtype bf16 \
    --out "$OUT/deform_bwd_bf16.json"; echo "1 rc=$?"
  deform 40 --batch 4 --size 800x1088 --dtype fp32 \
    --block-q 32,64,128 --warps 4,8 --out "$OUT/deform_bwd_fp32.json"; echo "1b rc=$?"
  echo "   the backward's merged rows of one pixel (session 10), from level 2 and on every level,"
  echo "   at an encoder's spread and at an untrained layer's offsets"
  deform 40 --batch 4 --size 800x1088 --dtype bf16 \
    --block-q 64,128 --warps 4 --merge-from 99,2,0 --out "$OUT/deform_merge.json"; echo "1c rc=$?"
  deform 40 --batch 4 --size 800x1088 --dtype bf16 \
    --block-q 64,128 --warps 4 --merge-from 99,0 --init-offsets \
    --out "$OUT/deform_merge_init.json"; echo "1d rc=$?"
  echo "== 2: Deformable DETR at batch 2 and 800x1088, graphed, with channels_last and the"
  echo "   fused convolutions (the pretraining target's hardest detector)"
  timeout 120 $B --no-hf --no-pretrain-2x --graphed --channels-last $FUSED \
    --variants deformable --out "$OUT/deformable_b2.json" $SMALL; echo "2 rc=$?"
  echo "== 3: fine-tuning, DETR and Conditional DETR at batch 2 and 800x1088, fp32 and bf16,"
  echo "   with channels_last and the fused convolutions (the bf16 target)"
  timeout 110 $B --no-hf --no-pretrain --graphed --channels-last $FUSED \
    --variants detr,conditional --out "$OUT/finetune_b2.json" $SMALL; echo "3 rc=$?"
  echo "== 4: engine.cudnn_benchmark, DETR bf16 at batch 8 and 480x480"
  timeout 60 $B --no-hf --no-pretrain-2x --graphed --cudnn-benchmark --batch 8 \
    --size 480x480 --variants detr --dtypes bf16 --out "$OUT/cudnn_b8.json" $SMALL
  echo "4 rc=$?"
} 2>&1 | grep -v "UserWarning\|return Variable\|USDT\|gpuGetDevice" | tee "$OUT/next6.log"
python bench/targets.py "$OUT" | tee "$OUT/targets.txt"  # issue 13's verdicts
