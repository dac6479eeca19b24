#!/usr/bin/env bash
# Sessions 8 and 9 on a GPU (bench/GPU_RUN.md): Siamese DETR's losses as a second CUDA graph
# (the matching cost inside the dense graph), the criterion's GIoU loss without torchvision's
# host read (fine-tuning too), a failed capture's reset; cuDNN's fused convolutions for the
# frozen trunk and the loader's steady state (session 9); the deformable attention backward's
# relaxed atomics and fine-tuning's losses graph (session 10). One device call of usually
# about 7-8 minutes (the timeouts add up to 11.3: the last step may be cut); carry .gpu/whl
# and .gpu/loaderdata; timeout_s=600.
# The fused-convolution rows run only if their parity test (0a) passes on the GPU.
# Steps in order of importance, each writing its own file. Dry run on a CPU:
#   OUT=/tmp/o EXTRA="--device cpu --small" bash bench/gpu_next5.sh
source bench/gpu_env.sh
SMALL=${EXTRA:+--batch 2 --size 64x96 --warmup 1 --steps 1}  # a CPU dry run: small
{
  echo "== 0a: cuDNN's fused convolutions for the frozen trunk against the unfused trunk"
  echo "   (model.backbone.fused_conv_relu); their bench rows run only if this passes"
  timeout 30 python -m pytest -q -p no:cacheprovider -m gpu -k fused \
    tests/unit/models/test_backbone.py
  rc=$?; echo "0a rc=$rc"
  if [ "$rc" = 0 ] || [ -n "$EXTRA" ]; then FUSED=--fused-conv; NOFUSED=; else
    FUSED=; NOFUSED=--no-fused; fi
  echo "== 0b: the Deformable DETR attention backward with its atomics relaxed (session 10) and"
  echo "   with Triton's default acq_rel order (a barrier and an L1 invalidation per add)"
  deform 40 --batch 4 --size 800x1088 --dtype bf16 \
    --block-q 64 --warps 4 --sem acq_rel,relaxed --out "$OUT/deform_sem.json"; echo "0b rc=$?"
  echo "== 0: real graphs of the Siamese steps (dense part + losses) against eager, with random"
  echo "   ops on, a failed capture's aftermath, the fused convolutions under graphs"
  timeout 80 python -m pytest -q -p no:cacheprovider -m gpu -k "pretrain or failed_capture or fused" \
    tests/unit/engine/test_cuda_graphs.py; echo "0 rc=$?"
  echo "== 0c: real graphs of the fine-tuning step, its losses now a second graph (session 10:"
  echo "   targets and pairs padded to a power of two)"
  timeout 50 python -m pytest -q -p no:cacheprovider -m gpu -k finetune \
    tests/unit/engine/test_cuda_graphs.py; echo "0c rc=$?"
  echo "== 1: graphed steps at the per-GPU paper batch, bf16: losses graph on and off,"
  echo "   channels_last, cuDNN's fused convolutions, augment_on=device (13 rows)"
  timeout 140 $B --no-hf --no-pretrain-2x --graphed --losses-ab --augment-on-device \
    --channels-last $FUSED --batch 8 --size 480x480 --warmup 3 --steps 5 \
    --variants detr,conditional --dtypes bf16 --out "$OUT/b8.json" $SMALL
  echo "1 rc=$?"
  echo "== 1b: the same in fp32, the rows of the targets only"
  timeout 50 $B --no-hf --no-pretrain-2x --graphed --losses-ab --batch 8 --size 480x480 \
    --warmup 3 --steps 5 --variants detr,conditional --dtypes fp32 --out "$OUT/b8_fp32.json" \
    $SMALL
  echo "1b rc=$?"
  echo "== 2: where the time goes (phases), DETR at batch 8, losses graph on and off"
  timeout 70 python bench/bench_phases.py --variant detr --batch 8 --size 480x480 \
    --out "$OUT/phases_detr_b8.json" $NOFUSED ${EXTRA:+--device cpu --small --warmup 1 --steps 1 \
    --batch 2 --size 64x96}
  echo "2 rc=$?"
  echo "== 3: batch 2 at 800x1088, three detectors, transformers alongside (the fine-tuning"
  echo "   criterion changed: no host read in its GIoU loss)"
  timeout 130 $B --no-pretrain-2x --graphed --losses-ab --quick --out "$OUT/b2.json" $SMALL
  echo "3 rc=$?"
  echo "== 5: the pretraining loader in its steady state (session 9: the start-up of the"
  echo "   workers no longer counts), 4 and 12 workers"
  loader 20 4 64 "pretrain/paper, augment on device"; echo "5 rc=$?"
  loader 20 12 128 "pretrain/paper, augment on device"; echo "5b rc=$?"
  echo "== 4: the other GPU tests (fine-tuning, DETReg, UP-DETR graphs, UP-DETR's query shuffle"
  echo "   captured; Triton); last, as the least likely to have changed"
  timeout 60 python -m pytest -q -p no:cacheprovider -m gpu \
    -k "not pretrain and not fused and not finetune" tests
  echo "4 rc=$?"
} 2>&1 | grep -v "UserWarning\|return Variable\|USDT\|gpuGetDevice" | tee "$OUT/next5.log"
python bench/targets.py "$OUT" | tee "$OUT/targets.txt"  # issue 13's verdicts
