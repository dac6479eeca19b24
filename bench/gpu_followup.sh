#!/usr/bin/env bash
# Second issue-13 GPU call (after bench/gpu_session.sh): the CUDA-graph probe of the host
# overhead, the loader with augment_on=device, and the device cost of that augmentation.
set -u
OUT=${OUT:?set OUT}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
B="python bench/bench_gpu.py $EXTRA"
{
  echo "== F: detector fwd+bwd as CUDA graphs (probe), batch 2 at 800x1088"
  timeout 110 $B --no-hf --no-pretrain --graphed --warmup 2 --steps 5 --out "$OUT/graphed.json"
  echo "F rc=$?"
  echo "== H: loader, paper options, augmentation in the worker vs on the device"
  timeout 45 python bench/bench_loader.py --data .gpu/loaderdata --images 64 --size 448 \
    --rounds 1 --workers 4 --loader-batches 48; echo "H rc=$?"
  timeout 45 python bench/bench_loader.py --data .gpu/loaderdata --images 64 --size 448 \
    --rounds 1 --workers 12 --loader-batches 96 | tail -2; echo "H2 rc=$?"
  echo "== G: pretraining at the paper batch, augment_on=device (pretrain_aug)"
  timeout 40 $B --no-hf --no-pretrain-2x --augment-on-device --batch 8 --size 480x480 --warmup 1 \
    --steps 4 --variants detr --out "$OUT/pre8cc.json"; echo "G rc=$?"
} 2>&1 | tee "$OUT/run2.log"
