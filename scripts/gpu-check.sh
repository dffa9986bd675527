#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see docs/performance.md, "CUDA"):
#   scripts/gpu-check.sh check   CUDA tests, `sgz bench --device cuda` (model step, then HTTP)
#   SGZ_TEST_DEVICE=cuda pytest tests/test_service.py   the service's end-to-end tests on CUDA
#   scripts/gpu-check.sh train   scale-1 training runs side by side for TRAIN_S seconds
# It expects the machine's own python3 with torch, triton and numba, the project's other
# dependencies as wheels in .whl/ (WHEELS), a shared/ folder in the checkout (SGZ_SHARED) and
# writes logs and results under OUT (default ./out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
WHEELS=${WHEELS:-.whl}
TRAIN_S=${TRAIN_S:-200}
export SGZ_SHARED=${SGZ_SHARED:-$PWD/shared} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
sgz() { python3 -m model.cli "$@"; }
stage() { echo "=== $1 ($(date +%T))"; }

case "${1:-check}" in
check)
  stage versions
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)"
  stage tests
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton.py \
    "tests/test_fast.py::test_cuda_torch_ops_match_cpu_reference" \
    tests/test_training.py -k "cuda or triton or Triton" 2>&1 | tee "$OUT/tests.log" | tail -15
  stage "model step"
  timeout 300 sgz bench --device cuda --parts model --paths fast,torch,eager,published \
    --sizes 600x400,1200x900,1920x1080,3840x2160 --batches 1,8,64 --repeats 10 \
    --out "$OUT/bench-model.json" 2>&1 | tee "$OUT/bench-model.log" | grep -v "^  "
  timeout 120 sgz bench --device cuda --parts model --paths fast,torch,published \
    --sizes 1200x900 --batches 256 --repeats 10 --out "$OUT/bench-model-256.json" 2>&1 \
    | tee "$OUT/bench-model-256.log" | grep -v "^  "
  stage "service tests on CUDA"
  SGZ_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_service.py \
    2>&1 | tee "$OUT/service-tests.log" | tail -6
  stage HTTP
  timeout 240 sgz bench --device cuda --parts http --duration 5 --rounds 1 \
    --out "$OUT/bench-http.json" 2>&1 | tee "$OUT/bench-http.log" | tail -22
  ;;
train)
  # The published recipe's scale (EFE trained at full resolution on 512 px crops), which
  # costs ~41 s a step on a 2-core CPU: four variants share the GPU for TRAIN_S seconds.
  stage train
  run() {
    local name=$1; shift
    timeout "$TRAIN_S" python3 -m model.cli train --data "$SGZ_SHARED/data/train" \
      --out "runs/$name" --scale-factor 1 --crop 512 --workers 3 --checkpoint-every 250 \
      --keep-snapshots --max-steps 100000 --no-progress "$@" >"$OUT/train-$name.log" 2>&1 &
  }
  run code-lr1e-4 --loss code --lr 1e-4
  run code-lr3e-4 --loss code --lr 3e-4
  run paper-lr3e-4 --loss paper --lr 3e-4
  run paper-lr1e-3 --loss paper --lr 1e-3
  wait
  for r in runs/*/; do tail -n 1 "$r/log.jsonl"; done
  tar czf "$OUT/runs.tgz" runs/*/snapshots runs/*/config.json runs/*/log.jsonl
  ls -la "$OUT"
  ;;
esac
