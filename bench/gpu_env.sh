# Sourced by the bench/gpu_*.sh device calls: checks OUT, installs the carried wheels, sets
# PYTHONPATH, and defines B (bench_gpu.py with $EXTRA) and `loader SECONDS WORKERS BATCHES`
# (bench_loader.py on the carried toy data), `shapes SECONDS ARGS...` (bench_graph_shapes.py) and
# `deform SECONDS ARGS...` (bench_deform_bwd.py).
# EXTRA="--device cpu --small" for a CPU dry run.
set -u -o pipefail  # a step's rc is its command's (a timeout: 124), not that of its | tail
OUT=${OUT:?set OUT}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# pycocotools (the loader bench's fine-tuning set) is not in the GPU image: carry a wheel
if ls .gpu/whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
# the proposal store prepared here records its image folder under /work/main
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
B="python bench/bench_gpu.py $EXTRA"

loader() {  # loader SECONDS WORKERS BATCHES [SETS]: one round, per worker and the real loader
  local batches=$3
  [ -z "$EXTRA" ] || batches=8  # a CPU dry run: 8 batches
  timeout "$1" python bench/bench_loader.py --data .gpu/loaderdata \
    --images "${LOADER_IMAGES:-64}" --size 448 --rounds 1 --workers "$2" \
    --loader-batches "$batches" ${4:+--only "$4"}
}

shapes() {  # shapes SECONDS ARGS...: bench_graph_shapes.py (a CPU dry run: small and short)
  timeout "$1" python bench/bench_graph_shapes.py "${@:2}" \
    ${EXTRA:+--device cpu --small --steps 12 --warm 4}
}

deform() {  # deform SECONDS ARGS...: bench_deform_bwd.py (a CPU dry run: Triton's interpreter,
  # tiny, and 10x the time: each setting takes about 20 s there)
  local seconds=$1
  [ -z "$EXTRA" ] || seconds=$((seconds * 10))
  timeout "$seconds" python bench/bench_deform_bwd.py "${@:2}" ${EXTRA:+--device cpu --small}
}
