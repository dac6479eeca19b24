#!/usr/bin/env bash
# Second issue-13 GPU call (after bench/gpu_session.sh): the CUDA-graph probe of the host
# overhead, the loader with augment_on=device, and the device cost of that augmentation.
source bench/gpu_env.sh
{
  echo "== F: detector fwd+bwd as CUDA graphs (probe), batch 2 at 800x1088"
  timeout 110 $B --no-hf --no-pretrain --graphed --warmup 2 --steps 5 --out "$OUT/graphed.json"
  echo "F rc=$?"
  echo "== H: loader, paper options, augmentation in the worker vs on the device"
  loader 45 4 48; echo "H rc=$?"
  loader 45 12 96 | tail -2; echo "H2 rc=$?"
  echo "== G: pretraining at the paper batch, augment_on=device (pretrain_aug)"
  timeout 40 $B --no-hf --no-pretrain-2x --augment-on-device --batch 8 --size 480x480 --warmup 1 \
    --steps 4 --variants detr --out "$OUT/pre8cc.json"; echo "G rc=$?"
} 2>&1 | tee "$OUT/run2.log"
